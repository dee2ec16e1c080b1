import pytest
import torch
from torch import nn

from retina_core.train.schedules import EarlyStopping, param_groups_layer_decay, vit_layer_id, warmup_cosine


def _lrs(sched, opt, steps):
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_cosine():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = warmup_cosine(opt, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lrs = _lrs(sched, opt, 111)
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.05)
    assert lrs[10] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.01 + 0.09 * 0.5)
    assert lrs[110] == pytest.approx(0.01)
    assert max(lrs) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        warmup_cosine(opt, 10, 10)


class TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.patch_embed = nn.Conv2d(3, 4, 2)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4)) for _ in range(2)])
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)


def _by_name(groups):
    return {n: g for g in groups for n in g["param_names"]}


def test_layer_decay_on_hand_made_vit():
    groups = param_groups_layer_decay(TinyViT(), base_lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    g = _by_name(groups)
    # num_layers = 2: ids 0..3, scale = 0.5 ** (3 - id)
    assert g["cls_token"]["lr_scale"] == pytest.approx(0.125) and g["cls_token"]["weight_decay"] == 0
    assert g["pos_embed"]["weight_decay"] == 0 and g["pos_embed"]["layer_id"] == 0
    assert g["patch_embed.weight"]["lr_scale"] == pytest.approx(0.125)
    assert g["patch_embed.weight"]["weight_decay"] == 0.05 and g["patch_embed.bias"]["weight_decay"] == 0
    assert g["blocks.0.1.weight"]["lr_scale"] == pytest.approx(0.25)
    assert g["blocks.1.1.weight"]["lr"] == pytest.approx(1e-3 * 0.5)
    assert g["blocks.1.0.weight"]["weight_decay"] == 0  # LayerNorm scale
    assert g["head.weight"]["lr_scale"] == 1.0 and g["head.weight"]["weight_decay"] == 0.05
    assert g["norm.weight"]["layer_id"] == 3
    n_params = sum(len(x["params"]) for x in groups)
    assert n_params == len(list(TinyViT().parameters()))


def test_layer_decay_on_timm_vit_with_scheduler():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    groups = param_groups_layer_decay(model, base_lr=1e-3, weight_decay=0.05)
    g = _by_name(groups)
    assert g["pos_embed"]["lr_scale"] == pytest.approx(0.65 ** 3)
    assert g["blocks.0.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.65 ** 2)
    assert g["blocks.1.mlp.fc1.weight"]["lr_scale"] == pytest.approx(0.65)
    assert g["head.weight"]["lr_scale"] == 1.0 and g["head.bias"]["weight_decay"] == 0
    opt = torch.optim.AdamW(groups)
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=10)
    for _ in range(2):
        opt.step()
        sched.step()
    for group in opt.param_groups:  # end of warmup: each group at its own scaled lr
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])


def test_layer_id_fn_for_cnn():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4, 2))
    groups = param_groups_layer_decay(model, 1.0, 0.0, layer_decay=0.5, layer_id_fn=lambda n: int(n.split(".")[0]))
    g = _by_name(groups)
    assert g["0.weight"]["lr"] == pytest.approx(0.25) and g["2.weight"]["lr"] == 1.0


def test_vit_layer_id_with_prefix():
    assert vit_layer_id("backbone.blocks.11.attn.qkv.weight", 24) == 12
    assert vit_layer_id("backbone.patch_embed.proj.weight", 24) == 0
    assert vit_layer_id("fc_norm.weight", 24) == 25


def test_early_stopping():
    es = EarlyStopping(patience=2, mode="max", min_delta=0.01)
    assert es.step(0.5) and not es.should_stop
    assert es.step(0.6)
    assert not es.step(0.605)  # below min_delta
    assert not es.should_stop
    assert not es.step(float("nan"))
    assert es.should_stop and es.best == 0.6 and es.best_step == 1
    es = EarlyStopping(patience=1, mode="min")
    assert es.step(1.0) and es.step(0.9) and not es.step(0.95) and es.should_stop
