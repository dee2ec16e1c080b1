"""Registry, architectures, safe weight loading and checkpoint import."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import retina_core as rc
from retina_core.models import create_model, get_cfg, list_models, read_manifest, weights_dir
from retina_core.models.checkpoints import load_state_dict_file
from retina_core.models.loading import sha256_file

FOUNDATION = ["fundus_dr_effnet_b0", "oct_resnet18"]


def test_registry_lists_foundation_models_with_cfgs():
    names = list_models()
    for n in FOUNDATION:
        assert n in names
        cfg = get_cfg(n)
        assert cfg.num_classes == len(cfg.classes) and cfg.target_layer and cfg.card
        assert set(cfg.referable) <= set(cfg.classes)
    assert list_models("oct") == [n for n in names if get_cfg(n).modality == "oct"]


def test_unknown_model_is_a_clear_error():
    with pytest.raises(rc.RetinaInputError, match="Available models"):
        get_cfg("no_such_model")


@pytest.mark.parametrize("name", FOUNDATION)
def test_output_shapes_and_common_interface(name):
    net = create_model(name, input_size=(3, 64, 64)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = net.forward_features(x)
        logits = net.forward_head(feats)
    assert feats.ndim == 4 and logits.shape == (2, net.cfg.num_classes)
    assert torch.allclose(logits, net(x), atol=1e-5)
    assert isinstance(net.get_submodule(net.cfg.target_layer), torch.nn.Module)


@pytest.mark.parametrize("name", FOUNDATION)
def test_bundled_weights_match_manifest_and_load(name):
    entry = read_manifest()[name]
    path = weights_dir() / entry["file"]
    assert path.suffix == ".safetensors" and sha256_file(path) == entry["sha256"]
    assert entry["classes"] == list(get_cfg(name).classes)
    assert entry["trained_on_phantoms"] is True and entry["metric_kind"] == "phantom"
    m = rc.load_model(name)
    assert m.sha256 == entry["sha256"] and not m.net.training
    assert all(not p.requires_grad for p in m.net.parameters())
    # Demo weights must be clearly better than chance on held-out phantoms (chance: AUC 0.5, accuracy 1/K).
    assert entry["heldout_metrics"]["auc_macro"] > 0.75
    assert entry["heldout_metrics"]["accuracy"] > 1.4 / len(entry["classes"])


def test_tampered_or_missing_weights_refuse_to_load(tmp_path):
    name = "oct_resnet18"
    entry = read_manifest()[name]
    shutil.copy(weights_dir() / entry["file"], tmp_path / entry["file"])
    (tmp_path / "manifest.json").write_text(json.dumps({name: entry}))
    assert rc.load_model(name, weights_dir=tmp_path).sha256 == entry["sha256"]
    with open(tmp_path / entry["file"], "r+b") as f:   # flip one byte in the tensor data
        f.seek(-100, 2)
        b = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(rc.RetinaInputError, match="sha256"):
        rc.load_model(name, weights_dir=tmp_path)
    (tmp_path / entry["file"]).unlink()
    with pytest.raises(rc.RetinaInputError, match="missing"):
        rc.load_model(name, weights_dir=tmp_path)
    with pytest.raises(rc.RetinaInputError, match="no entry"):
        rc.load_model("fundus_dr_effnet_b0", weights_dir=tmp_path)


def test_checkpoint_import_strips_prefixes_and_drops_mismatched_head(tmp_path):
    src = create_model("oct_resnet18", input_size=(3, 64, 64))
    # A timm-style checkpoint for 10 classes, wrapped and prefixed as many training scripts save it.
    sd = {"module." + k[len("net."):]: v for k, v in src.state_dict().items()}
    sd["module.fc.weight"] = torch.randn(10, 512)
    sd["module.fc.bias"] = torch.randn(10)
    torch.save({"model": sd}, tmp_path / "ckpt.pth")
    dst = create_model("oct_resnet18", input_size=(3, 64, 64))
    report = load_state_dict_file(dst, tmp_path / "ckpt.pth")
    assert set(report["skipped_shape_mismatch"]) == {"net.fc.weight", "net.fc.bias"}
    assert torch.equal(dst.net.conv1.weight, src.net.conv1.weight)
    save_file({"conv1.weight": src.net.conv1.weight.contiguous()}, str(tmp_path / "w.safetensors"))
    assert load_state_dict_file(create_model("oct_resnet18"), tmp_path / "w.safetensors")["loaded"] == 1
