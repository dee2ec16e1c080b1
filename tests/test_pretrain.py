"""Masked-autoencoder pre-training (`retina_core pretrain`, train/pretrain.py): the masking, the loss falling on a
fixed batch, the encoder checkpoint that `train --init` imports, and that only training-split pixels are used."""
import hashlib
import json

import pytest
import torch

from retina_core.cli import main
from retina_core.errors import RetinaInputError
from retina_core.models.registry import create_model
from retina_core.phantoms import write_dataset
from retina_core.train.common import TrainConfig
from retina_core.train.pretrain import MaeConfig, MaskedAutoencoder, random_masking


def _vit(size: int = 32):
    return create_model("retfound_vit_tiny", input_size=(3, size, size))


def test_random_masking_hides_the_ratio_and_restores_the_order():
    tokens = torch.arange(2 * 16, dtype=torch.float32).view(2, 16, 1).expand(-1, -1, 3).contiguous()
    kept, mask, _ = random_masking(tokens, 0.75, torch.Generator().manual_seed(0))
    assert kept.shape == (2, 4, 3) and mask.shape == (2, 16)
    assert mask.sum(1).tolist() == [12.0, 12.0]
    for b in range(2):   # the kept tokens are exactly the unmasked positions
        assert sorted(kept[b, :, 0].tolist()) == tokens[b, mask[b] == 0, 0].tolist()
    again = random_masking(tokens, 0.75, torch.Generator().manual_seed(0))[1]
    assert torch.equal(mask, again)   # the validation loss uses the same hidden patches every epoch


def test_the_reconstruction_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    mae = MaskedAutoencoder(_vit(), MaeConfig(decoder_dim=32, decoder_depth=1))
    assert not mae.encoder.pos_embed.requires_grad     # fixed sin-cos positions while pre-training
    x = torch.randn(4, 3, 32, 32)
    opt = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(60):
        loss, pred, mask = mae(x, generator=torch.Generator().manual_seed(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert pred.shape == (4, 16, 8 * 8 * 3) and mask.shape == (4, 16)
    assert losses[-1] < 0.75 * losses[0]   # 1.31 -> 0.89 here: it memorises the hidden noise patches


def test_only_hidden_patches_count():
    torch.manual_seed(0)
    mae = MaskedAutoencoder(_vit(), MaeConfig(decoder_dim=32, decoder_depth=1))
    x = torch.randn(1, 3, 32, 32)
    loss, pred, mask = mae(x, generator=torch.Generator().manual_seed(1))
    target = mae.patchify(x)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)[0]
    assert torch.allclose(loss, per_patch[mask[0] == 1].mean())
    assert not torch.allclose(loss, per_patch.mean())
    _, rebuilt = mae.reconstruct(x, generator=torch.Generator().manual_seed(1))
    visible = mae.unpatchify(mask[..., None].expand(-1, -1, 192).float())[0] == 0
    assert torch.allclose(rebuilt[0][visible], x[0][visible], atol=1e-5)   # visible patches pasted back as they were
    assert torch.allclose(mae.unpatchify(mae.patchify(x)), x)


def test_a_cnn_is_refused():
    with pytest.raises(RetinaInputError, match="needs a ViT"):
        MaskedAutoencoder(create_model("oct_resnet18", input_size=(3, 32, 32)))


def test_pretrain_then_finetune_from_its_encoder(tmp_path):
    data = tmp_path / "data"
    write_dataset("fundus-4class", n=40, seed=2, out=data, size=48)
    cfg = dict(image_size=32, split_fractions="0.7,0.15,0.15", batch_size=8, epochs=2)
    mae_out = tmp_path / "mae"
    assert main(["pretrain", "--model", "retfound_vit_tiny", "--data", str(data), "--out", str(mae_out),
                 "--image-size", "32", "--split-fractions", "0.7,0.15,0.15", "--batch-size", "8", "--epochs", "2",
                 "--decoder-dim", "32", "--decoder-depth", "1", "--preview", "2", "--json"]) == 0
    report = json.loads((mae_out / "pretrain.json").read_text())
    assert report["labels_used"] is False and report["epochs_run"] == 2 and len(report["history"]) == 2
    assert report["sets"][0]["left_out_test"] > 0 and "test" not in report["split_sha256"]
    from PIL import Image
    assert Image.open(mae_out / "reconstructions.png").size == (3 * 32, 2 * 32)   # original | masked | rebuilt

    from safetensors.torch import load_file
    enc = load_file(str(mae_out / "encoder.safetensors"))
    vit_keys = set(_vit().state_dict())
    assert set(enc) <= vit_keys and "pos_embed" in enc and not any(k.startswith(("head.", "fc_norm.")) for k in enc)

    ft = tmp_path / "ft"
    from retina_core.train.engine import train
    train("retfound_vit_tiny", data, ft, TrainConfig(**cfg, init=str(mae_out / "encoder.safetensors")))
    entry = json.loads((ft / "manifest.json").read_text())["retfound_vit_tiny"]
    assert entry["pretrained"]["labels_used"] is False
    assert entry["init_sha256"] == hashlib.sha256((mae_out / "encoder.safetensors").read_bytes()).hexdigest()
    assert entry["pretrained"]["split_sha256"]["train"] == report["split_sha256"]["train"]
    # the same seed and fractions: pre-training saw the fine-tuning run's training split, and none of its test split
    pre = set(json.loads((mae_out / "splits.json").read_text())["files_sha256"]["train"])
    fine = json.loads((ft / "splits.json").read_text())["files_sha256"]
    assert pre == set(fine["train"]) and not pre & set(fine["test"])
