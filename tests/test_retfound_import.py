"""Importing the public RETFound checkpoint format into the RETFound ViT (built small here)."""
import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

import retina_core as rc
from retina_core.models import create_model
from retina_core.models.vit import import_retfound_checkpoint
from retina_core.train.engine import TrainConfig, build_for_training


def _public_checkpoint(prefix="backbone.", img=64, classes=1000, mae_norm=True):
    """A RETFound-style checkpoint: {'model': sd}, prefixed keys, a 1000-class head, pos_embed for an 8x8 grid,
    MAE leftovers (norm instead of fc_norm, decoder, mask_token)."""
    src = create_model("retfound_vit_tiny", input_size=(3, 64, 64))         # patch 8: 8x8 grid
    sd = dict(src.state_dict())
    sd["head.weight"] = torch.randn(classes, 192)
    sd["head.bias"] = torch.randn(classes)
    if mae_norm:   # RETFound MAE encoders carry `norm.*` and no fc_norm
        sd["norm.weight"], sd["norm.bias"] = sd.pop("fc_norm.weight"), sd.pop("fc_norm.bias")
    sd["mask_token"] = torch.zeros(1, 1, 192)
    sd["decoder_embed.weight"] = torch.randn(128, 192)
    return src, {prefix + k: v for k, v in sd.items()}


def test_import_strips_prefixes_drops_head_and_interpolates_pos_embed(tmp_path):
    src, sd = _public_checkpoint()
    torch.save({"model": sd, "epoch": 799}, tmp_path / "RETFound_cfp_weights.pth")
    net = create_model("retfound_vit_tiny", input_size=(3, 32, 32))         # 4x4 patch grid
    report = import_retfound_checkpoint(net, tmp_path / "RETFound_cfp_weights.pth")

    assert report["dropped_head"] == ["head.weight (1000, 192)", "head.bias (1000,)"]
    assert report["pos_embed"] == {"interpolated": True, "from": [8, 8], "to": [4, 4]}
    assert set(report["missing"]) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert {"norm.weight", "norm.bias", "mask_token", "decoder_embed.weight"} <= set(report["unexpected"])
    assert report["head_reinitialised"] and report["loaded"] > 50
    # the trunk is the checkpoint's, the pos_embed its bicubic resample, the head freshly initialised (std 2e-5)
    assert torch.equal(net.blocks[3].attn.qkv.weight, src.blocks[3].attn.qkv.weight)
    assert torch.equal(net.patch_embed.proj.weight, src.patch_embed.proj.weight)
    expected = resample_abs_pos_embed(src.pos_embed.detach(), new_size=[4, 4], old_size=[8, 8], num_prefix_tokens=1)
    assert torch.allclose(net.pos_embed, expected, atol=1e-6)
    assert torch.equal(net.pos_embed[:, :1], src.pos_embed[:, :1])            # class token position kept
    assert net.head.weight.shape == (4, 192) and net.head.weight.abs().max() < 1e-3
    assert torch.count_nonzero(net.head.bias) == 0
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_import_module_prefix_safetensors_and_a_matching_head_is_kept(tmp_path):
    src, sd = _public_checkpoint(prefix="module.", classes=4, mae_norm=False)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "ft.safetensors"))
    net = create_model("retfound_vit_tiny", input_size=(3, 64, 64))
    report = import_retfound_checkpoint(net, tmp_path / "ft.safetensors")
    assert report["dropped_head"] == [] and not report["pos_embed"]["interpolated"]
    assert report["missing"] == [] and not report["head_reinitialised"]
    assert torch.equal(net.head.weight, sd["module.head.weight"])
    assert torch.equal(net.fc_norm.weight, src.fc_norm.weight)
    # a state dict works as well as a file
    assert import_retfound_checkpoint(create_model("retfound_vit_tiny"), {"model": sd})["loaded"] > 50


def test_train_init_uses_the_retfound_importer(tmp_path):
    src, sd = _public_checkpoint()
    torch.save({"model": sd}, tmp_path / "ckpt.pth")
    net = build_for_training("retfound_vit_tiny", TrainConfig(init=str(tmp_path / "ckpt.pth"), image_size=32))
    assert net.cfg.input_size == (3, 32, 32) and net.pos_embed.shape == (1, 17, 192)
    assert torch.equal(net.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    torch.save({"model": {"conv1.weight": torch.randn(64, 3, 7, 7)}}, tmp_path / "resnet.pth")
    with pytest.raises(rc.RetinaInputError, match="No tensor"):
        import_retfound_checkpoint(create_model("retfound_vit_tiny"), tmp_path / "resnet.pth")
