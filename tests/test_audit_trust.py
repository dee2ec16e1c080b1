"""Trust checks on hand-built cases: pointing games, deletion/insertion, randomisation, stability, consistency."""
import numpy as np
import pytest
import torch

from retina_core.audit.trust import (centre_attention_vs_confidence, class_consistency, correct_vs_misclassified,
                                       deletion_insertion_auc, energy_pointing_game, pointing_game, random_map,
                                       randomisation_check, stability_under_perturbation)


def test_pointing_game_hits_misses_and_tolerance():
    hm = np.zeros((224, 224), np.float32)
    hm[50, 60] = 1.0
    mask = np.zeros((224, 224), bool)
    mask[40:60, 50:70] = True
    assert pointing_game(hm, mask)
    far = np.zeros_like(mask)
    far[150:170, 150:170] = True
    assert not pointing_game(hm, far)
    near = np.zeros_like(mask)
    near[60:70, 70:80] = True                     # peak 10 px off: inside the 15 px tolerance, outside without it
    assert pointing_game(hm, near) and not pointing_game(hm, near, tolerance_px=0)
    assert not pointing_game(np.zeros_like(hm), mask)          # an empty map points nowhere
    with pytest.raises(ValueError):
        pointing_game(hm, np.zeros_like(mask))


def test_energy_pointing_game_is_the_exact_share():
    hm = np.zeros((10, 10), np.float32)
    hm[0, 0], hm[5, 5], hm[9, 9] = 2.0, 1.0, 1.0
    mask = np.zeros((10, 10), bool)
    mask[:3, :3] = True
    assert energy_pointing_game(hm, mask) == pytest.approx(0.5)
    assert energy_pointing_game(np.ones((10, 10)), mask) == pytest.approx(0.09)
    assert energy_pointing_game(np.zeros((10, 10)), mask) == 0.0


def _predict_fn_reading_a_square():
    """A 'model' whose class-1 probability is the mean brightness of the top-left square (its evidence)."""
    def predict(batch):
        ev = batch[:, 8:24, 8:24].astype(np.float32).mean(axis=(1, 2, 3)) / 255.0
        p1 = np.clip(ev, 0, 1)
        return np.stack([1 - p1, p1], axis=1)
    return predict


def test_deletion_auc_is_lower_for_the_map_that_points_at_the_evidence():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 60, (64, 64, 3)).astype(np.uint8)
    img[8:24, 8:24] = 240
    good = np.zeros((64, 64), np.float32)
    good[8:24, 8:24] = 1.0
    bad = 1.0 - good
    predict = _predict_fn_reading_a_square()
    g = deletion_insertion_auc(predict, img, good, target=1, steps=16, baseline="mean")
    b = deletion_insertion_auc(predict, img, bad, target=1, steps=16, baseline="mean", return_curves=True)
    assert g["deletion_auc"] < b["deletion_auc"] - 0.3
    assert g["insertion_auc"] > b["insertion_auc"] + 0.3
    assert len(b["deletion_curve"]) == 17 and b["fractions"][0] == 0 and b["fractions"][-1] == 1


def test_randomisation_changes_the_map_of_a_tiny_cnn():
    from test_attribution import tiny_cnn

    net = tiny_cnn()
    rng = np.random.default_rng(1)
    img = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    img[10:30, 30:50] = 255
    out = randomisation_check(net, img, "gradcam", cascade=True)
    assert out["changed"] and abs(out["spearman"]) < 0.5
    assert [s["stage"] for s in out["cascade"]][:2] == ["head", "layers.1"]      # from the head down
    assert all(-1 <= s["spearman"] <= 1 for s in out["cascade"])
    # the original network is untouched
    before = {k: v.clone() for k, v in net.state_dict().items()}
    randomisation_check(net, img, "gradcam")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # an explanation that ignores the model is not "changed"
    same = randomisation_check(net, img, "gradcam", explain_fn=lambda m, im, meth, t: im[..., 0] / 255.0)
    assert same["spearman"] == pytest.approx(1.0) and not same["changed"]


def test_stability_identical_input_is_one_and_noise_lowers_it():
    rng = np.random.default_rng(0)
    img = (rng.random((64, 64, 3)) * 120).astype(np.uint8)
    img[20:40, 20:44] += 100

    def explain_fn(im):                           # a map that follows the image detail (noise-sensitive)
        return im.astype(np.float32).mean(axis=2) / 255.0

    same = stability_under_perturbation(explain_fn, img, kinds=("none",))
    assert same["none"]["ssim"] == pytest.approx(1.0) and same["none"]["spearman"] == pytest.approx(1.0)
    out = stability_under_perturbation(explain_fn, img, kinds=("noise", "brightness", "shift"), noise_sigma=0.1)
    assert out["noise"]["ssim"] < 0.99
    assert out["shift"]["ssim"] == pytest.approx(1.0, abs=1e-6)    # the map is shifted back before comparison
    assert set(out) == {"noise", "brightness", "shift"}


def test_consistency_and_population_summaries():
    a = np.zeros((8, 8))
    a[2, 2] = 1
    b = np.zeros((8, 8))
    b[6, 6] = 1
    assert class_consistency([a, a, a]) == pytest.approx(1.0)
    assert class_consistency([a, b]) == pytest.approx(0.0)
    assert np.isnan(class_consistency([a]))
    c = centre_attention_vs_confidence([0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8])
    assert c["pearson"] == pytest.approx(1.0) and c["spearman"] == pytest.approx(1.0) and c["n"] == 4
    s = correct_vs_misclassified([0.6, 0.7, 0.2, 0.3], [True, True, False, False])
    assert s["correct"]["n"] == 2 and s["difference"] == pytest.approx(0.4)
    centre = np.zeros((40, 40))
    centre[15:25, 15:25] = 1
    assert centre_attention_vs_confidence([centre, a, centre], [1.0, 0.0, 1.0])["n"] == 3


def test_integrated_gradients_passes_the_randomisation_check_on_the_bundled_oct_model():
    """The signed, region-smoothed IG map depends on the weights (|attribution| would follow the image's edges
    whatever the weights: mean |rho| 0.93 on held-out phantoms)."""
    from retina_core.analysis import get_model
    from retina_core.phantoms import oct_phantom

    model = get_model("oct_resnet18")
    rhos = [randomisation_check(model, oct_phantom(label, seed=300 + i).image, "integrated_gradients")["spearman"]
            for i, label in enumerate(("CNV", "DME", "DRUSEN"))]
    assert np.mean(np.abs(rhos)) < 0.5, rhos


def test_random_map_reference_is_coarse_seeded_and_sits_between_a_good_and_a_bad_map():
    r2, r3 = random_map((128, 128), 0), random_map((32, 64, 64), 1)
    assert r2.shape == (128, 128) and r3.shape == (32, 64, 64) and r2.dtype == np.float32
    assert 0 <= r2.min() and r2.max() <= 1 and np.array_equal(r2, random_map((128, 128), 0))
    assert not np.array_equal(r2, random_map((128, 128), 1))
    # coarse: 8 x 8 cells of 16 px, so neighbouring pixels are close, unlike per-pixel noise
    assert np.abs(np.diff(r2, axis=1)).mean() < 0.05 and np.abs(np.diff(r3, axis=0)).mean() < 0.1
    assert random_map((100, 37), 2).shape == (100, 37)
    # on the hand-built square, a random order deletes the evidence slower than the right map, faster than the
    # inverted one: the reference a faithful map must beat
    rng = np.random.default_rng(0)
    img = rng.integers(0, 60, (64, 64, 3)).astype(np.uint8)
    img[8:24, 8:24] = 240
    good = np.zeros((64, 64), np.float32)
    good[8:24, 8:24] = 1.0
    predict = _predict_fn_reading_a_square()
    aucs = [deletion_insertion_auc(predict, img, m, target=1, steps=16, baseline="mean")["deletion_auc"]
            for m in (good, 1.0 - good)]
    rand = np.mean([deletion_insertion_auc(predict, img, random_map((64, 64), s), target=1, steps=16,
                                           baseline="mean")["deletion_auc"] for s in range(8)])
    assert aucs[0] < rand - 0.1 and rand < aucs[1] - 0.1
