"""RETFound architecture (capability 4): a timm VisionTransformer with global average pooling + fc_norm, and an
importer for the public RETFound checkpoint format.

    net = create_model("retfound_vit")                          # ViT-L/16, 1024-d, 24 blocks, 16 heads, 224 px
    report = import_retfound_checkpoint(net, "RETFound_cfp_weights.pth")
    python -m retina_core train --model retfound_vit --init RETFound_cfp_weights.pth --recipe retfound_finetune ...

Parameter names are timm's (and so RETFound's, which builds on timm): `patch_embed`, `cls_token`, `pos_embed`,
`blocks.i`, `fc_norm`, `head`. The patch tokens pass through `token_grid` (no parameters) as a [B, C, h, w] map
before pooling, so the CAM family (and the single-pass Grad-CAM of `explain/cam.py`) reads a spatial layer.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import RetinaInputError
from ..labels import FUNDUS4
from ..modality import Modality
from .checkpoints import read_state_dict, strip_prefixes
from .registry import ModelCfg, register_model


class TokenGrid(nn.Module):
    """Identity on patch tokens viewed as a map: [B, N, C] -> [B, C, h, w] (the CAM target layer)."""

    def __init__(self, grid: tuple[int, int]):
        super().__init__()
        self.grid = tuple(grid)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        h, w = self.grid
        if h * w != n:   # a different input size than built for: assume a square grid
            h = w = int(round(n ** 0.5))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class RetFoundViT(VisionTransformer):
    """timm VisionTransformer with RETFound's choices (global_pool="avg" -> fc_norm, LayerNorm eps 1e-6).

    forward_features(x) -> tokens [B, 1 + N, C]; forward_head(tokens) -> logits [B, num_classes].
    """

    def __init__(self, cfg: ModelCfg):
        kw = {"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4.0,
              "qkv_bias": True, "global_pool": "avg", "fc_norm": True, "drop_path_rate": 0.2,
              **cfg.builder_kwargs}
        super().__init__(img_size=cfg.input_size[1:], in_chans=cfg.input_size[0], num_classes=cfg.num_classes,
                         norm_layer=partial(nn.LayerNorm, eps=1e-6), **kw)
        self.token_grid = TokenGrid(self.patch_embed.grid_size)
        trunc_normal_(self.head.weight, std=2e-5)   # RETFound's head initialisation
        nn.init.zeros_(self.head.bias)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        prefix, patches = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        grid = self.token_grid(patches)                          # [B, C, h, w], hookable
        x = torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1)
        return super().forward_head(x, pre_logits=pre_logits)

    def import_checkpoint(self, path) -> dict:
        """`train --init` calls this: the RETFound importer below."""
        return import_retfound_checkpoint(self, path)


def import_retfound_checkpoint(net: VisionTransformer, source) -> dict:
    """Load a RETFound-format checkpoint into `net` as RETFound's fine-tuning script does.

    source: a path (.pth/.pt read with weights_only=True, or .safetensors) holding `{'model': state_dict}` (or a bare
    state dict), or a state dict. Steps: strip `module.` / `backbone.` prefixes; drop `head.*` when its shape differs
    (e.g. a 1000-class or 5-class head); resample `pos_embed` to the network's patch grid (timm
    `resample_abs_pos_embed`, bicubic, class token kept); load with strict=False; re-initialise the head
    (trunc_normal, std 2e-5) unless it was loaded. Returns {loaded, missing, unexpected, dropped_head,
    head_reinitialised, pos_embed: {interpolated, from, to}}.
    """
    if isinstance(source, dict):
        raw = source.get("model", source) if isinstance(source.get("model", None), dict) else source
        raw = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    else:
        raw = read_state_dict(Path(source))
    sd = {strip_prefixes(k, ("module.", "backbone.")): v for k, v in raw.items()}   # RETFound's own wrappers
    target = net.state_dict()
    report = {"dropped_head": [], "pos_embed": {"interpolated": False}}

    for k in ("head.weight", "head.bias"):
        if k in sd and (k not in target or sd[k].shape != target[k].shape):
            report["dropped_head"].append(f"{k} {tuple(sd.pop(k).shape)}")

    if "pos_embed" in sd and sd["pos_embed"].shape != target["pos_embed"].shape:
        old = sd["pos_embed"]
        prefix = 0 if getattr(net, "no_embed_class", False) else net.num_prefix_tokens
        n_old = old.shape[1] - prefix
        side = int(round(n_old ** 0.5))
        if side * side != n_old:
            raise RetinaInputError(f"pos_embed of the checkpoint has {n_old} patch positions, not a square grid.")
        new_grid = list(net.patch_embed.grid_size)
        sd["pos_embed"] = resample_abs_pos_embed(old.float(), new_size=new_grid, old_size=[side, side],
                                                 num_prefix_tokens=prefix).to(target["pos_embed"].dtype)
        report["pos_embed"] = {"interpolated": True, "from": [side, side], "to": new_grid}

    fitting, mismatched = {}, []
    for k, v in sd.items():
        if k in target and target[k].shape != v.shape:
            mismatched.append(f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}")
        else:
            fitting[k] = v.to(target[k].dtype) if k in target else v
    if not any(k in target for k in fitting):
        raise RetinaInputError("No tensor of the checkpoint fits this ViT: is it a RETFound / timm ViT checkpoint "
                               "of the same width and depth?")
    missing, unexpected = net.load_state_dict(fitting, strict=False)
    head_loaded = "head.weight" in fitting and "head.weight" not in missing
    if not head_loaded:
        trunc_normal_(net.head.weight, std=2e-5)
        nn.init.zeros_(net.head.bias)
    report.update({"loaded": len(fitting) - len(unexpected), "missing": list(missing),
                   "unexpected": list(unexpected), "shape_mismatch": mismatched,
                   "head_reinitialised": not head_loaded})
    return report


_RECIPE = ("Fine-tune recipe (`--recipe retfound_finetune`, as RETFound's main_finetune): AdamW, base lr 5e-4 "
           "(x batch/256), weight decay 0.05, layer-wise lr decay 0.65 (head full lr, each earlier block x0.65), "
           "warm-up then cosine, drop_path 0.2, label smoothing 0.1, input 224. Import the public checkpoint with "
           "`--init RETFound_cfp_weights.pth` (`{'model': state_dict}`; `backbone.`/`module.` prefixes stripped, a "
           "mismatched head dropped and re-initialised with trunc_normal std 2e-5, pos_embed resampled to the "
           "patch grid, strict=False with missing/unexpected keys reported). CAM target: the patch-token grid "
           "after the last block (`token_grid`); ViT-specific maps (attention rollout, relevance) use `blocks`. ")

register_model(ModelCfg(
    name="retfound_vit",
    arch="vit_large_patch16_224",
    modality=Modality.FUNDUS,
    classes=FUNDUS4,
    task="Fundus photograph, 4 classes: cataract, diabetic retinopathy, glaucoma, normal",
    weights="retfound_vit.safetensors",
    target_layer="token_grid",
    referable=("cataract", "diabetic_retinopathy", "glaucoma"),
    builder_kwargs={"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16, "global_pool": "avg",
                    "fc_norm": True, "drop_path_rate": 0.2},
    card=("RETFound architecture: ViT-Large/16 (303M parameters; 1024-d, 24 blocks, 16 heads, patch 16, 224x224), "
          "global average pooling of the patch tokens + fc_norm, as RETFound_mae fine-tuned on the 4-class eye "
          "disease data set in the RETFound-with-heatmap source. " + _RECIPE + "No demo weights (600 MB in fp16; "
          "RETFound weights cannot be downloaded here): bring your own checkpoint."),
), RetFoundViT)

register_model(ModelCfg(
    name="retfound_vit_tiny",
    arch="vit_tiny_patch8",
    modality=Modality.FUNDUS,
    classes=FUNDUS4,
    task="Fundus photograph, 4 classes: cataract, diabetic retinopathy, glaucoma, normal",
    input_size=(3, 64, 64),
    weights="retfound_vit_tiny.safetensors",
    target_layer="token_grid",
    referable=("cataract", "diabetic_retinopathy", "glaucoma"),
    builder_kwargs={"patch_size": 8, "embed_dim": 192, "depth": 6, "num_heads": 3, "global_pool": "avg",
                    "fc_norm": True, "drop_path_rate": 0.1},
    card=("CPU variant of the RETFound architecture: the same ViT (global average pool + fc_norm) at 192-d, "
          "6 blocks, 3 heads, patch 8; built at 64x64 (8x8 patch grid), the bundled weights at 112x112. No RETFound "
          "weights are available here, so the bundled weights were pre-trained as RETFound was, as a masked "
          "autoencoder (`python -m retina_core pretrain`), on the unlabelled training-split photographs of the real "
          "4-class set, then fine-tuned on it (their manifest's `pretrained` entry and docs/real_data.md give the "
          "commands, the data and the held-out figures, far below the source's 93.96%). " + _RECIPE),
), RetFoundViT)
