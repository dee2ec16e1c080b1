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


# ------------------------------------------------------------------------------ trust notes: evidence kept with weights
def _write(path, obj):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _phantom_report(sha="abc", n=40, rho=0.2, pg=0.9):
    return {"model": "m", "weights_sha256": sha, "n_images": n, "metric_kind": "phantom", "data": "/tmp/phantoms",
            "methods": {"gradcam": {"randomisation_abs_spearman": rho, "randomisation_empty_fraction": 0.0,
                                    "pointing_game": pg, "deletion_auc": 0.3, "deletion_auc_random_map": 0.6,
                                    "faithful_vs_random": True, "n_images": n}}}


def _real_report(sha="abc", pg=0.5, chance=0.19, p=0.02, drop=0.59, drop_rand=0.23, outside=0.22, target=None,
                 rho=0.22):
    """An explain-eval report on a real lesion set, in the shape `real_lesions.summarise` writes."""
    lesions = {"n_images": 10, "pointing_game_0px": 0.3, "pointing_game_0px_chance": 0.06,
               "pointing_game_tol": pg, "pointing_game_tol_chance": chance, "pointing_game_tol_p_value": p,
               "energy_share": 0.06, "area_share_image": 0.04}
    rl = {"tolerance_px": 3, "lesions": lesions, "by_lesion": {}, "p_target": 0.93, "deletion_drop": drop,
          "deletion_drop_random_map": drop_rand, "energy_outside_fov": outside, "area_outside_fov": 0.30,
          "images": [{"image": "IDRiD_01"}]}
    return {"model": "m", "weights_sha256": sha, "n_images": 10, "metric_kind": "real_lesions", "target": target,
            "data": "../shared/realdata/idrid_lesions",
            "methods": {"gradcam": {"randomisation_abs_spearman": rho, "randomisation_empty_fraction": 0.0,
                                    "pointing_game": pg, "deletion_auc": 0.33, "deletion_auc_random_map": 0.70,
                                    "faithful_vs_random": drop > drop_rand, "n_images": 10, "real_lesions": rl}}}


def _note(weights_dir, label=None, sha="abc"):
    from retina_core.quick_eval import method_trust, trust_note

    return trust_note(method_trust("m", sha, weights_dir=weights_dir).get("gradcam"), "gradcam", label)


def test_a_doc_edit_or_file_times_do_not_change_the_note(tmp_path, monkeypatch):
    """The note reads <weights dir>/evidence only: a bigger report under docs/ (or loose in weights/), edited or
    touched, changes nothing; neither do file times."""
    import os

    import retina_core.quick_eval as qe

    w = tmp_path / "weights"
    _write(w / "evidence" / "m-abc-phantoms.json", _phantom_report())
    before = _note(w)
    doc = _write(tmp_path / "docs" / "explain_eval_m.json", _phantom_report(n=500, rho=0.9, pg=0.1))
    _write(w / "explain_eval_m.json", _phantom_report(n=500, rho=0.9, pg=0.1))
    assert _note(w) == before and "90%" in before[0] and "m-abc-phantoms.json" in before[0]
    doc.write_text(doc.read_text().replace("0.9", "0.95"))
    os.utime(doc, (10 ** 10, 10 ** 10))
    assert _note(w) == before
    # two evidence files of one kind and size: the file name decides, whichever is newer
    _write(w / "evidence" / "m-abc-zzz.json", _phantom_report(pg=0.2))
    for t in ((1, 1), (10 ** 10, 10 ** 10)):
        os.utime(w / "evidence" / "m-abc-zzz.json", t)
        assert _note(w) == before
    # and nothing scans the project's folders at run time
    monkeypatch.setattr(qe, "saved_reports", lambda *a, **k: pytest.fail("docs/ scanned"))
    assert _note(w) == before


def test_real_evidence_is_worded_as_real_and_comes_first(tmp_path):
    import re

    w = tmp_path / "weights"
    _write(w / "evidence" / "m-abc-idrid_lesions.json", _real_report())
    note, warn = _note(w)
    assert not warn and note.startswith("gradcam on 10 real IDRiD photographs: its peak fell on a marked lesion "
                                        "50% of the time (a random point in the field of view: 19%, p = 0.02)")
    assert "deleting what it marks lowers P(predicted class), 0.93 on average, by 0.59 against 0.23" in note
    assert "phantom" not in note and "deletion AUC" not in note and "0.22 on these photographs" in note
    # with phantom evidence too: the real figures first, the phantom sanity check added, labelled as such
    _write(w / "evidence" / "m-abc-phantoms.json", _phantom_report(n=400, rho=0.12))
    both, warn = _note(w)
    assert not warn and both.startswith("gradcam on 10 real IDRiD photographs")
    assert "0.22 on these photographs, 0.12 on synthetic phantoms" in both and "phantom lesion" not in both
    from retina_core.quick_eval import method_trust, trust_badge

    assert trust_badge(method_trust("m", "abc", weights_dir=w)["gradcam"]) == \
        "sanity check passed on real photographs (|rho| 0.22)"
    # phantom evidence alone: said so, and never called real
    (w / "evidence" / "m-abc-idrid_lesions.json").unlink()
    phantom, warn = _note(w)
    assert not warn and "measured on synthetic phantoms only" in phantom and not re.search(r"\breal\b", phantom)


def test_real_images_without_lesion_masks_give_a_real_sanity_and_faithfulness_note(tmp_path):
    """A real set with no lesion masks (the Mexico OCT set): the randomisation check and the deletion test on real
    images make the note, worded as real, saying that where the map points is not scored."""
    from retina_core.quick_eval import method_trust, trust_badge

    w = tmp_path / "weights"
    rep = {**_phantom_report(n=32, rho=0.27, pg=None), "metric_kind": "real",
           "data": "../shared/realdata/mexico_oct_dme",
           "evidence": {"tag": "mexico_oct_dme", "kind": "real", "set": "mexico_oct_dme",
                        "set_title": "Mexico OCT (DME)"}}
    _write(w / "evidence" / "m-abc-mexico_oct_dme.json", rep)
    note, warn = _note(w)
    assert not warn and note.startswith("gradcam passed the sanity check on this model")
    assert "deletion AUC 0.30 against 0.60" in note and "32 real images of Mexico OCT (DME)" in note
    assert "training images included" in note and "not scored" in note and "phantom" not in note
    badge = trust_badge(method_trust("m", "abc", weights_dir=w)["gradcam"])
    assert badge == "sanity check passed on real images (|rho| 0.27)"
    # a phantom report for the same weights comes first for the top-level figures (it scores the pointing game)
    _write(w / "evidence" / "m-abc-phantoms.json", _phantom_report(n=40, rho=0.2, pg=0.9))
    assert "measured on synthetic phantoms only" in _note(w)[0]


@pytest.mark.parametrize("kind, figures, words", [
    ("chance", dict(pg=0.21, chance=0.24, p=0.75, target="diabetic_retinopathy"),
     "**is no better than chance at finding real lesions**"),
    ("not shown", dict(pg=0.48, p=0.09), "**is not shown to find real lesions better than chance**"),
    ("unfaithful", dict(drop=0.1, drop_rand=0.2), "**is no more faithful than chance on real photographs**"),
    ("frame", dict(outside=0.74), "**marks the frame more than the retina**"),
    ("randomisation", dict(rho=0.7), "**failed the sanity check**"),
])
def test_real_evidence_warnings_stay_warnings(tmp_path, kind, figures, words):
    w = tmp_path / "weights"
    _write(w / "evidence" / "m-abc-idrid_lesions.json", _real_report(**figures))
    note, warn = _note(w)
    assert warn and words in note and "real IDRiD photographs" in note and "phantom" not in note
    if kind == "chance":
        assert "(maps of 'diabetic_retinopathy')" in note and "P(diabetic_retinopathy)" in note
    if kind == "frame":
        assert "74% of its map lies outside the field of view" in note


def test_evidence_of_other_weights_is_ignored(tmp_path):
    from retina_core.quick_eval import evidence_reports, method_trust

    w = tmp_path / "weights"
    _write(w / "evidence" / "m-old-idrid_lesions.json", _real_report(sha="old"))
    _write(w / "evidence" / "m-abc-phantoms.json", _phantom_report())
    _write(w / "evidence" / "other-abc-phantoms.json", {**_phantom_report(), "model": "other"})
    ev = method_trust("m", "abc", weights_dir=w)
    assert ev["gradcam"]["real"] is None and ev["gradcam"]["source"] == "m-abc-phantoms.json"
    assert "real" not in _note(w)[0].split("measured")[0]
    assert method_trust("m", "new", weights_dir=w) == {}
    assert "not evaluated" in _note(w, sha="new")[0]
    # without a sha: the weights the manifest of that folder lists
    _write(w / "manifest.json", {"m": {"file": "m.safetensors", "sha256": "old"}})
    assert [p.name for p, _ in evidence_reports("m", weights_dir=w)] == ["m-old-idrid_lesions.json"]


def test_the_bundled_evidence_is_read_from_weights(tmp_path):
    """The bundled DR grader has real IDRiD evidence (quoted first) and phantom evidence; the real 4-class head's
    DR maps are no better than chance on IDRiD: a warning. Read only (nothing is written into weights/)."""
    from retina_core.models.loading import read_manifest
    from retina_core.quick_eval import method_trust, trust_note

    manifest = read_manifest()
    for name in ("fundus_dr_effnet_b0", "fundus_resnet18_head"):
        if name not in manifest:
            pytest.skip(f"no bundled {name}")
    ev = method_trust("fundus_dr_effnet_b0", manifest["fundus_dr_effnet_b0"]["sha256"])["gradcam"]
    assert ev["real"]["set"] == "idrid_lesions" and ev["kind"] == "phantom"
    note, warn = trust_note(ev, "gradcam")
    assert not warn and note.startswith("gradcam on 10 real IDRiD photographs") and "on synthetic phantoms" in note
    head = method_trust("fundus_resnet18_head", manifest["fundus_resnet18_head"]["sha256"])["gradcam"]
    note, warn = trust_note(head, "gradcam", label="glaucoma")
    assert warn and "no better than chance at finding real lesions" in note


def test_evidence_tag_merge_and_refusal(tmp_path):
    from retina_core.audit.evaluate import evidence_record, evidence_tag, merge_evidence, write_evidence

    assert evidence_tag({"data": "/somewhere/idrid_lesions", "metric_kind": "real_lesions"})[:2] == \
        ("idrid_lesions", "real")
    assert evidence_tag({"data": "/tmp/dr93", "metric_kind": "phantom"})[:2] == ("phantoms", "phantom")
    rec = evidence_record(_real_report())
    assert "images" not in rec["methods"]["gradcam"]["real_lesions"]           # per-image rows dropped
    assert rec["methods"]["gradcam"]["real_lesions"]["deletion_drop"] == 0.59
    big = evidence_record(_phantom_report(n=240))
    small = evidence_record({**_phantom_report(n=16), "methods": {
        "gradcam": {"randomisation_abs_spearman": 0.9, "n_images": 16}, "layercam": {"n_images": 16}}})
    merged = merge_evidence(big, small)
    assert merged["methods"]["gradcam"]["n_images"] == 240 and "layercam" in merged["methods"]
    assert merged["n_images"] == 240 and len(merged["evidence"]["runs"]) == 2
    # weights the folder's manifest does not list: nothing written
    assert write_evidence(_phantom_report(), tmp_path) is None and not (tmp_path / "evidence").exists()


def test_explain_eval_keeps_its_report_as_evidence_with_the_weights(tmp_path, capsys, monkeypatch):
    """A tiny phantom run (2 images) on weights in a temporary folder: its report is kept in that folder's
    evidence/ and the note quotes it; --no-evidence leaves the folder alone."""
    import json

    from retina_core.audit import evaluate
    from retina_core.cli import main
    from retina_core.phantoms import write_dataset
    from retina_core.quick_eval import method_trust, trust_note
    from retina_core.testing import write_test_weights

    w = write_test_weights(tmp_path / "w", ["oct_resnet18"])
    sha = json.loads((w / "manifest.json").read_text())["oct_resnet18"]["sha256"]
    write_dataset("oct-kermany", 4, 0, tmp_path / "oct", size=96)
    args = ["explain-eval", "--model", "oct_resnet18", "--data", str(tmp_path / "oct"), "--weights-dir", str(w),
            "--methods", "gradcam", "--n", "2", "--steps", "2", "--stability", "", "--json"]
    assert main(args) == 0
    rep = json.loads(capsys.readouterr().out)
    path = w / "evidence" / f"oct_resnet18-{sha[:12]}-phantoms.json"
    assert rep["evidence_written_to"] == str(path) and path.is_file()
    kept = json.loads(path.read_text())
    assert kept["weights_sha256"] == sha and kept["evidence"]["kind"] == "phantom"
    assert kept["methods"]["gradcam"]["randomisation_abs_spearman"] == \
        rep["methods"]["gradcam"]["randomisation_abs_spearman"]
    ev = method_trust("oct_resnet18", weights_dir=w)["gradcam"]
    assert ev["source"] == path.name and ev["n_images"] == 2
    note = trust_note(ev, "gradcam")[0]
    assert path.name in note and "measured on synthetic phantoms only" in note
    # --no-evidence (the same report again, without re-running it): the kept file is not touched
    before = path.read_text()
    again = {**{k: v for k, v in rep.items() if k != "evidence_written_to"}, "n_images": 99}
    monkeypatch.setattr(evaluate, "explain_eval", lambda *a, **k: again)
    assert main(args + ["--no-evidence"]) == 0
    assert "evidence_written_to" not in json.loads(capsys.readouterr().out) and path.read_text() == before
