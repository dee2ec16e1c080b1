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


def test_eval_mode_restores_exactly_the_modules_that_were_training_and_find_vit_follows_changes():
    from retina_core.explain.attribution import eval_mode, find_vit
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
    net.train()
    net[1].eval()                        # a frozen BatchNorm, as two-phase training leaves it
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == [True, True, False, True]
    net.eval()
    with eval_mode(net):                 # nothing training: nothing switched, nothing restored
        assert not any(m.training for m in net.modules())
    assert not any(m.training for m in net.modules())
    assert find_vit(net) is None
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=2)
    net.append(vit)                      # the remembered answer is looked up again when the modules change
    assert find_vit(net) is vit
