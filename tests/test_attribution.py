"""explain(): every method gives float32 [H, W] in [0, 1] at the shown size; ViT rollout / relevance for class-token
and global-pool ViTs; explain_eval on a few tiny phantoms."""
import numpy as np
import pytest
import timm
import torch

from retina_core.explain.attribution import (available_methods, capture_attention, explain, explain_batch,
                                             tokens_to_grid, vit_uses_cls_token)
from retina_core.models import ModelCfg, create_model
from torch import nn


class TinyCNN(nn.Module):
    """A few-layer CNN with a cfg, so IG and the evaluation run in well under a second."""

    def __init__(self, classes=("a", "b", "c")):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layers = nn.Sequential(nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()),
                                    nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU()))
        self.head = nn.Linear(16, len(classes))
        self.cfg = ModelCfg(name="tiny", arch="tiny", modality="fundus", classes=tuple(classes), task="test",
                            input_size=(3, 64, 64), target_layer="layers.1")

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean(dim=(2, 3)))


def tiny_cnn(classes=("a", "b", "c")):
    torch.manual_seed(0)
    return TinyCNN(classes).eval()


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    img = (rng.random((80, 96, 3)) * 120).astype(np.uint8)   # not the model's input size: maps follow the image
    img[20:40, 50:70] = 230
    return img


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return create_model("oct_resnet18", input_size=(3, 64, 64)).eval()


def tiny_vit(global_pool="token"):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, depth=2,
                             num_classes=3, global_pool=global_pool).eval()


def check_map(hm, shape):
    assert hm.shape == shape and hm.dtype == np.float32
    assert np.isfinite(hm).all() and hm.min() >= 0.0 and hm.max() <= 1.0


def test_default_gradcam_on_a_registry_cnn(cnn, image):
    hm = explain(cnn, image, "gradcam")
    check_map(hm, image.shape[:2])
    assert hm.max() > 0.99                                    # normalised to [0, 1]


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "integrated_gradients"])
def test_cnn_methods_shape_and_range(image, method):
    hm = explain(tiny_cnn(), image, method)
    check_map(hm, image.shape[:2])
    assert hm.max() > 0.99


def test_integrated_gradients_targets_and_retinal_image(image):
    from retina_core.io.decode import RetinalImage

    cnn = tiny_cnn(("CNV", "DME", "NORMAL"))
    ri = RetinalImage(pixels=image, kind="image", source_format="png", content_hash="0" * 64, grayscale=False)
    a = explain(cnn, ri, "integrated_gradients", target=1)
    b = explain(cnn, image, "integrated_gradients", target="DME")      # by class name: the same class
    assert np.allclose(a, b, atol=1e-5)
    maps, probs, idx = explain_batch(cnn, np.stack([image, image[::-1].copy()]), "integrated_gradients", target=[1, 2])
    assert maps.shape == (2, 80, 96) and idx == [1, 2] and np.allclose(probs.sum(1), 1, atol=1e-5)
    with pytest.raises(ValueError):
        explain(cnn, image, "attention_rollout")               # ViT-only method on a CNN
    with pytest.raises(ValueError):
        explain(cnn, image, "no-such-method")


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_vit_rollout_relevance_and_cam(image, pool):
    vit = tiny_vit(pool)
    assert vit_uses_cls_token(vit) == (pool == "token")
    assert set(available_methods(vit)) >= {"attention_rollout", "vit_relevance", "gradcam", "integrated_gradients"}
    fused = [b.attn.fused_attn for b in vit.blocks]
    for method in ("attention_rollout", "vit_relevance", "gradcam", "integrated_gradients"):
        hm = explain(vit, image, method, target=1)
        check_map(hm, image.shape[:2])
    assert [b.attn.fused_attn for b in vit.blocks] == fused     # fused attention restored after explaining
    assert explain(vit, image, "attention_rollout").max() > 0.99
    assert explain(vit, image, "vit_relevance", target=2).max() > 0.99


def test_vit_relevance_is_class_specific_and_rollout_is_not(image):
    vit = tiny_vit("token")
    r0, r1 = (explain(vit, image, "vit_relevance", target=t) for t in (0, 1))
    assert not np.allclose(r0, r1, atol=1e-3)
    a0, a1 = (explain(vit, image, "attention_rollout", target=t) for t in (0, 1))
    assert np.allclose(a0, a1)


def test_captured_attention_rows_sum_to_one_and_tokens_reshape():
    vit = tiny_vit("token")
    x = torch.randn(2, 3, 64, 64)
    with capture_attention(vit) as store, torch.no_grad():
        out = vit(x)
    assert len(store) == 2 and store[0].shape == (2, 3, 65, 65)   # 3 heads, 64 patches + CLS
    assert torch.allclose(store[0].sum(-1), torch.ones(2, 3, 65), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(out, vit(x), atol=1e-5)             # fused and manual attention agree
    tok = torch.arange(2 * 65 * 4, dtype=torch.float32).reshape(2, 65, 4)
    grid = tokens_to_grid(tok, (8, 8), prefix=1)
    assert grid.shape == (2, 4, 8, 8) and torch.equal(grid[0, :, 0, 0], tok[0, 1])


def test_library_cam_on_vit_uses_the_reshape(image):
    vit = tiny_vit("avg")
    check_map(explain(vit, image, "eigencam"), image.shape[:2])


def test_explain_eval_on_tiny_phantoms_returns_all_metrics():
    from retina_core.audit.common import RANKED_METRICS
    from retina_core.audit.evaluate import explain_eval
    from retina_core.phantoms import fundus_phantom

    phantoms = [fundus_phantom(label, seed, 96) for seed, label in enumerate(["Moderate", "Severe", "No DR"])]
    net = tiny_cnn(("No DR", "Mild", "Moderate", "Severe"))
    rep = explain_eval(net, phantoms=phantoms, methods="gradcam", n=3, steps=4)
    r = rep["methods"]["gradcam"]
    for key in (*RANKED_METRICS, "randomisation_spearman", "energy_baseline_mask_area", "seconds_per_image",
                "class_consistency", "stability", "zones", "centre_attention_vs_confidence"):
        assert key in r
    assert r["n_lesion_images"] == 2 and 0 <= r["pointing_game"] <= 1 and 0 <= r["energy_pointing_game"] <= 1
    assert r["n_lesion_images_by_label"] == {"Moderate": 1, "Severe": 1}
    assert r["pointing_game"] == pytest.approx(sum(r["pointing_game_by_label"].values()) / 2)
    assert 0 <= r["deletion_auc"] <= 1 and 0 <= r["insertion_auc"] <= 1
    assert 0 <= r["deletion_auc_random_map"] <= 1 and 0 <= r["insertion_auc_random_map"] <= 1
    assert r["faithful_vs_random"] == (r["deletion_auc"] < r["deletion_auc_random_map"])
    assert set(r["stability"]) == {"noise", "brightness", "shift"}
    assert -1 <= r["randomisation_spearman"] <= 1 and r["seconds_per_image"] > 0
    assert "etdrs" in r["zones"] and abs(sum(r["zones"]["centre_lr"].values()) - 1) < 1e-6
    assert rep["ranking"][0]["method"] == "gradcam" and rep["eval_size"] == [64, 64]
    assert r["cost_vs_forward"] > 0 and rep["recommended_default"]["method"] in ("gradcam", None)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_vit_single_pass_gradcam_equals_pytorch_grad_cam_with_reshape(pool):
    rng = np.random.default_rng(0)
    img = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    vit = tiny_vit(pool)
    for t in (0, 2):
        ours, ref = explain(vit, img, "gradcam", t), explain(vit, img, "gradcam-reference", t)
        assert np.abs(ours - ref).max() < 1e-4


def test_explain_eval_reads_a_phantom_data_set_folder(tmp_path):
    from retina_core.audit.evaluate import explain_eval
    from retina_core.labels import DR_GRADES
    from retina_core.phantoms import write_dataset

    write_dataset("fundus-dr", 3, 0, tmp_path / "dr", size=96)
    rep = explain_eval(tiny_cnn(DR_GRADES), tmp_path / "dr", "gradcam", n=3, steps=4, stability_kinds=("noise",))
    r = rep["methods"]["gradcam"]
    assert rep["n_images"] == 3 and r["n_lesion_images"] >= 1 and r["pointing_game"] is not None
    assert "etdrs" in r["zones"] and set(r["stability"]) == {"noise"}


def test_default_method_comes_from_the_manifest_then_the_registry(cnn, image):
    from types import SimpleNamespace

    from retina_core.explain.attribution import available_methods, default_method

    assert "multiscale_gradcam" in available_methods(cnn) and default_method(cnn) == cnn.cfg.default_method
    chosen = SimpleNamespace(net=cnn, cfg=cnn.cfg, entry={"default_method": "multiscale_gradcam"}, temperature=1.0)
    assert default_method(chosen) == "multiscale_gradcam"
    check_map(explain(chosen, image), image.shape[:2])               # method None: the model's default
    bogus = SimpleNamespace(net=cnn, cfg=cnn.cfg, entry={"default_method": "attention_rollout"}, temperature=1.0)
    assert default_method(bogus) == "gradcam"                        # not applicable to a CNN: ignored
    assert "multiscale_gradcam" not in available_methods(tiny_vit())


def test_recommended_default_skips_slow_and_insane_methods():
    from retina_core.audit.common import recommend_default

    results = {"a": {"randomisation_abs_spearman": 0.9, "cost_vs_forward": 1.0},     # ignores the weights
               "b": {"randomisation_abs_spearman": 0.1, "cost_vs_forward": 4.0},     # too slow
               "c": {"randomisation_abs_spearman": 0.2, "cost_vs_forward": 1.1, "pointing_game": 0.7}}
    ranking = [{"method": k, "mean_rank": i + 1.0} for i, k in enumerate("abc")]
    rec = recommend_default(results, ranking)
    assert rec["method"] == "c" and set(rec["passed_over"]) == {"a", "b"}
    assert "randomisation" in rec["passed_over"]["a"] and "slow" in rec["passed_over"]["b"]
    assert recommend_default({"a": results["a"]}, ranking[:1])["method"] is None
    # a map that deletes what matters no faster than a random map is passed over too (where that was measured)
    unfaithful = {"randomisation_abs_spearman": 0.1, "cost_vs_forward": 1.0, "deletion_auc": 0.66,
                  "deletion_auc_random_map": 0.65, "faithful_vs_random": False}
    rec = recommend_default({"u": unfaithful, **results}, [{"method": "u", "mean_rank": 0.5}, *ranking])
    assert rec["method"] == "c" and "no more faithful than a random map (deletion AUC 0.66 >= 0.65)" \
        in rec["passed_over"]["u"]


def test_explain_eval_set_default_records_the_choice_and_analyze_uses_it(tmp_path, capsys):
    import json

    from retina_core.cli import main
    from retina_core.models.loading import load_model
    from retina_core.phantoms import write_dataset
    from retina_core.testing import write_test_weights

    w = write_test_weights(tmp_path / "w", ["oct_resnet18"])
    write_dataset("oct-kermany", 6, 0, tmp_path / "oct", size=96)
    code = main(["explain-eval", "--model", "oct_resnet18", "--data", str(tmp_path / "oct"), "--weights-dir", str(w),
                 "--methods", "gradcam,multiscale_gradcam", "--n", "4", "--steps", "4", "--stability", "",
                 "--set-default", "--json"])
    out = capsys.readouterr().out
    entry = json.loads((w / "manifest.json").read_text())["oct_resnet18"]
    if code == 0:
        rep = json.loads(out)
        chosen = rep["recommended_default"]["method"]
        assert entry["default_method"] == chosen in ("gradcam", "multiscale_gradcam")
        ev = entry["default_method_evidence"]
        assert ev["metric_kind"] == "phantom" and ev["cost_vs_forward"] <= 1.3 and set(ev["ranking"]) == {
            "gradcam", "multiscale_gradcam"}
        model = load_model("oct_resnet18", weights_dir=w, device="cpu")
        from retina_core.explain.attribution import default_method
        assert default_method(model) == chosen
    else:                      # both too slow on a loaded machine: nothing is written, the message says why
        assert "default_method" not in entry


def _evidence(weights_dir, name, report):
    """An explain-eval evidence file in `weights_dir`/evidence (where explain-eval keeps it)."""
    import json

    (weights_dir / "evidence").mkdir(parents=True, exist_ok=True)
    (weights_dir / "evidence" / name).write_text(json.dumps(report))
    return weights_dir / "evidence" / name


def test_method_trust_keeps_each_method_from_its_largest_report(tmp_path):
    """A smaller evidence file of many methods adds the methods it measured; it does not replace the figures of a
    larger one of the default method, nor the counterfactual (model-level) evidence that one has. File times never
    decide."""
    import os

    from retina_core.quick_eval import method_trust

    big = {"model": "m", "weights_sha256": "abc", "n_images": 240,
           "methods": {"gradcam": {"randomisation_abs_spearman": 0.04, "pointing_game": 0.81}},
           "counterfactual": {"per_class": {}, "faithful_alone": {"n": 3}}}
    small = {"model": "m", "weights_sha256": "abc", "n_images": 48,
             "methods": {"gradcam": {"randomisation_abs_spearman": 0.1, "pointing_game": 0.7},
                         "layercam": {"randomisation_abs_spearman": 0.6, "pointing_game": 0.75}}}
    _evidence(tmp_path, "big.json", big)
    _evidence(tmp_path, "small.json", small)
    os.utime(tmp_path / "evidence" / "big.json", (1, 1))                  # the big report is the older one
    ev = method_trust("m", "abc", weights_dir=tmp_path)
    assert ev["gradcam"]["pointing_game"] == 0.81 and ev["gradcam"]["source"] == "big.json"
    assert ev["layercam"]["pointing_game"] == 0.75 and ev["layercam"]["source"] == "small.json"
    assert not ev["layercam"]["passes_randomisation"]
    # the counterfactual's per-input faithfulness was measured with Grad-CAM maps: it goes with gradcam only
    assert ev["gradcam"]["faithful_alone"] == {"n": 3} and ev["layercam"]["faithful_alone"] is None
    # as many images but no counterfactual phantoms: the fuller report keeps gradcam (whatever the file times)
    _evidence(tmp_path, "same_size.json", {**small, "n_images": 240})
    assert method_trust("m", "abc", weights_dir=tmp_path)["gradcam"]["source"] == "big.json"
    _evidence(tmp_path, "again.json", big)          # as full: the file name breaks the tie, not which is newer
    assert method_trust("m", "abc", weights_dir=tmp_path)["gradcam"]["source"] == "again.json"
    os.utime(tmp_path / "evidence" / "again.json", (1, 1))
    os.utime(tmp_path / "evidence" / "big.json", (10 ** 9, 10 ** 9))
    assert method_trust("m", "abc", weights_dir=tmp_path)["gradcam"]["source"] == "again.json"


def test_method_trust_reads_the_evidence_of_these_weights(tmp_path):
    from retina_core.quick_eval import method_trust, trust_note

    report = {"model": "m", "weights_sha256": "abc", "n_images": 10,
              "methods": {"gradcam": {"randomisation_abs_spearman": 0.3, "pointing_game": 0.9},
                          "layercam": {"randomisation_abs_spearman": 0.7, "pointing_game": 0.8}}}
    _evidence(tmp_path, "explain_eval_m.json", report)
    _evidence(tmp_path, "other_weights.json", {**report, "weights_sha256": "old", "methods": {
        "gradcam": {"randomisation_abs_spearman": 0.9}}})
    ev = method_trust("m", "abc", weights_dir=tmp_path)
    assert ev["gradcam"]["passes_randomisation"] and not ev["layercam"]["passes_randomisation"]
    assert ev["gradcam"]["source"] == "explain_eval_m.json"
    ok, warn_ok = trust_note(ev["gradcam"], "gradcam")
    bad, warn_bad = trust_note(ev["layercam"], "layercam")
    assert not warn_ok and "passed the sanity check" in ok and "90%" in ok
    assert warn_bad and "failed the sanity check" in bad and "0.70" in bad
    assert method_trust("m", "unknown", weights_dir=tmp_path) == {}
    assert "not evaluated" in trust_note(None, "scorecam")[0]
    coarse, warn_coarse = trust_note({**ev["gradcam"], "pointing_game": 0.25}, "gradcam")
    assert warn_coarse and "rarely points at a lesion" in coarse and "25%" in coarse and "0.30" in coarse
    from retina_core.audit.common import passes_randomisation

    empty = {"randomisation_abs_spearman": 0.02, "randomisation_empty_fraction": 0.9}   # rho 0 by convention
    assert passes_randomisation(empty) is None and passes_randomisation({**empty, "randomisation_empty_fraction": 0.1})
    vague, warn_vague = trust_note({**empty, "passes_randomisation": None, "pointing_game": 0.9, "source": "x",
                                    "n_images": 3}, "gradcam")
    assert not warn_vague and "inconclusive" in vague and "passed" not in vague
    # a good overall figure can hide a class the map misses: the note warns for that suggested class only
    by_class = {**ev["gradcam"], "pointing_game_by_label": {"Mild": 0.2, "Severe": 1.0},
                "n_lesion_images_by_label": {"Mild": 5, "Severe": 5}}
    mild, warn_mild = trust_note(by_class, "gradcam", "Mild")
    assert warn_mild and "rarely points at the lesions of 'Mild'" in mild and "20%" in mild and "90%" in mild
    assert not trust_note(by_class, "gradcam", "Severe")[1] and not trust_note(by_class, "gradcam")[1]
    few = {**by_class, "n_lesion_images_by_label": {"Mild": 2}}
    assert not trust_note(few, "gradcam", "Mild")[1]                       # 2 images are too few to warn on
    from retina_core.quick_eval import trust_badge

    assert trust_badge(ev["gradcam"]).startswith("sanity check passed")
    assert trust_badge(ev["layercam"]).startswith("FAILED") and trust_badge(None) == "not evaluated"
    # weights trained with lesion masks: the note says their maps were taught where lesions are
    assert ev["gradcam"]["lesion_guided"] is False and "lesion masks" not in ok
    guided = trust_note({**ev["gradcam"], "lesion_guided": True}, "gradcam")[0]
    assert "trained with lesion masks" in guided and "90%" in guided
    assert "trained with lesion masks" in trust_note({**ev["gradcam"], "lesion_guided": True, "pointing_game": 0.25},
                                                     "gradcam")[0]
    from retina_core.models.loading import read_manifest
    entry = read_manifest()["fundus_dr_effnet_b0"]          # the bundled grader was trained with guidance
    bundled = method_trust("fundus_dr_effnet_b0", entry["sha256"])
    assert bundled and bundled["gradcam"]["lesion_guided"] is True
    # faithfulness against a random map: a map that deletes no faster than chance is a warning whatever it points at
    sharp = {**ev["gradcam"], "deletion_auc": 0.72, "deletion_auc_random_map": 0.67, "faithful_vs_random": False}
    note, warn = trust_note(sharp, "gradcam")
    assert warn and "no more faithful than chance" in note and "0.72 against 0.67" in note
    note, warn = trust_note({**sharp, "deletion_auc": 0.23, "deletion_auc_random_map": 0.74,
                             "faithful_vs_random": True}, "gradcam")
    assert not warn and "faster than removing random regions (deletion AUC 0.23 against 0.74)" in note
    coarse, warn = trust_note({**sharp, "pointing_game": 0.42, "faithful_vs_random": True, "deletion_auc": 0.41,
                               "deletion_auc_random_map": 0.80}, "gradcam")
    assert warn and "rarely points at a lesion" in coarse and "(deletion AUC 0.41 against 0.80)" in coarse


def test_trust_note_names_the_lesions_a_counterfactual_showed_the_model_ignores(tmp_path):
    from retina_core.quick_eval import method_trust, trust_note, unused_lesions

    def cls(n, drop, drop0, swell0=None, pg=0.0):
        out = {"n": n, "pointing_game": pg, "original": {"n": n},
               "without_ellipsoids": {"n": n, "drop": drop, "drop_no_record": drop0}}
        out["without_thickening"] = None if swell0 is None else {"n": n, "drop": 0.1, "drop_no_record": swell0}
        return out

    cf = {"per_class": {"DR": cls(18, 0.001, -0.002, 0.11), "DME": cls(13, 0.0, 0.01, 0.63, pg=0.53),
                        "MH": cls(23, 0.0, 0.30),           # used without the record: not listed
                        "CNV": cls(30, 0.0, 0.0, pg=1.0),   # cysts unused, but the map finds the CNV: not listed
                        "CSR": cls(2, 0.0, 0.0),            # too few eyes to say
                        "AMD": {"n": 15, "without_ellipsoids": None}}}
    assert [u["class"] for u in unused_lesions(cf)] == ["DR", "DME"] and unused_lesions(None) == []
    report = {"model": "m", "weights_sha256": "abc", "n_images": 10, "counterfactual": cf,
              "methods": {"gradcam": {"randomisation_abs_spearman": 0.1, "pointing_game": 0.8}}}
    _evidence(tmp_path, "explain_eval_m.json", report)
    ev = method_trust("m", "abc", weights_dir=tmp_path)["gradcam"]
    note, warn = trust_note(ev, "gradcam")
    assert not warn and "on DR (18, pointing game 0.00) and DME (13, pointing game 0.53) eyes" in note
    assert "does not use those lesions" in note
    assert "DR 0.11, DME 0.63" in note and "MH" not in note
    # a cue the model falls back on: with the swelling gone too, leaving the lesions out lowers P
    backup = [{**u, "lesion_drop_without_swelling": 0.2 if u["class"] == "DME" else 0.0} for u in ev["unused_lesions"]]
    fallback = trust_note({**ev, "unused_lesions": backup}, "gradcam")[0]
    assert ("on DME eyes this model does not need them while the swelling is there (with the swelling also left out, "
            "leaving them out lowers the probability by 0.20); on DR eyes it does not use them") in fallback
    plain = trust_note({**ev, "unused_lesions": []}, "gradcam")[0]
    assert "Counterfactual" not in plain


def test_trust_note_reports_what_leaving_the_suggested_class_lesions_out_did(tmp_path):
    """2-D counterfactual phantoms (masked lesions left out; no clinical record): the note under a suggestion says
    how P(suggested class) moved on phantoms of that class, with a verdict that follows the figures."""
    from retina_core.quick_eval import lesion_reliance_by_class, method_trust, trust_note, unused_lesions

    def cls(n, p, p_without, called_without, p_healthy, pg=1.0):
        return {"n": n, "pointing_game": pg, "original": {"n": n, "p_disease": p, "called": n},
                "without_masked": {"n": n, "p_disease": p_without, "called": called_without, "drop": p - p_without,
                                   "p_healthy": p_healthy}}

    cf = {"modality": "fundus", "healthy_class": "No DR", "variants": ["original", "without_masked"],
          "per_class": {"Moderate": cls(12, 0.84, 0.0, 0, 0.98), "Severe": cls(12, 0.9, 0.7, 9, 0.1),
                        "Mild": cls(12, 0.6, 0.59, 12, 0.3, pg=0.4), "PDR": cls(2, 0.9, 0.0, 0, 0.9)}}
    assert [u["class"] for u in unused_lesions(cf)] == ["Mild"]     # the map misses and the lesions are unused
    report = {"model": "m2", "weights_sha256": "abc", "n_images": 10, "counterfactual": cf,
              "methods": {"gradcam": {"randomisation_abs_spearman": 0.1, "pointing_game": 0.9}}}
    _evidence(tmp_path, "explain_eval_m2.json", report)
    ev = method_trust("m2", "abc", weights_dir=tmp_path)["gradcam"]
    used = trust_note(ev, "gradcam", label="Moderate")[0]
    assert ("12 'Moderate' eyes re-rendered without the lesions their masks mark went from P(Moderate) 0.84 to 0.00 "
            "(0 still called 'Moderate', P(No DR) 0.98): the model uses those lesions.") in used
    assert "only in part" in trust_note(ev, "gradcam", label="Severe")[0]
    # OCT: the swelling left out too (every eye had some): said where the lesions explain only part of the call
    swell = {**cf["per_class"]["Severe"], "without_thickening": {"n": 12, "p_disease": 0.39, "called": 7}}
    ev2 = {**ev, "lesion_reliance": lesion_reliance_by_class({**cf, "per_class": {"Severe": swell}})}
    assert ("only in part (without the retinal swelling around them, which no mask marks, P(Severe) was 0.39)"
            in trust_note(ev2, "gradcam", label="Severe")[0])
    assert "the model does not use those lesions" in trust_note(ev, "gradcam", label="Mild")[0]
    assert "Counterfactual phantoms:" not in trust_note(ev, "gradcam", label="PDR")[0]      # 2 eyes: too few
    assert "Counterfactual phantoms:" not in trust_note(ev, "gradcam")[0]                   # no suggestion named
