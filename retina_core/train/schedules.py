"""Learning-rate schedules, layer-wise lr decay parameter groups (BEiT / MAE / RETFound fine-tuning) and
early stopping. Steps are optimizer steps (call ``scheduler.step()`` once after each ``optimizer.step()``)."""

from __future__ import annotations

import math
import re
from typing import Callable

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

# Parameter names (last dotted component) that are embeddings or tokens: layer 0 and no weight decay.
EMBED_TOKENS = frozenset({"cls_token", "pos_embed", "reg_token", "dist_token", "mask_token"})
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)(?:\.|$)")


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """lr multiplier at ``step``: linear warmup step / warmup_steps (0 at step 0, 1 at warmup_steps), then
    cosine from 1 down to min_lr_ratio at total_steps, min_lr_ratio after that."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> LambdaLR:
    """LambdaLR applying ``warmup_cosine_factor`` to every group's initial lr (so layer-decay lr scales persist)."""
    if warmup_steps < 0 or total_steps <= warmup_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
    return LambdaLR(optimizer, lambda s: warmup_cosine_factor(s, warmup_steps, total_steps, min_lr_ratio))


def vit_layer_id(name: str, num_layers: int) -> int:
    """Layer id of a ViT parameter (MAE convention): patch_embed / cls_token / pos_embed -> 0,
    blocks.i.* -> i + 1, everything else (final norm, fc_norm, head) -> num_layers + 1.
    Prefixes such as ``backbone.`` or ``encoder.`` are allowed."""
    parts = name.split(".")
    if "patch_embed" in parts or parts[-1] in EMBED_TOKENS:
        return 0
    match = _BLOCK_RE.search(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def _no_weight_decay(name: str, param: nn.Parameter, skip: set[str]) -> bool:
    """Biases, norm scales (any 1-D tensor), positional embeddings and tokens get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias") or name in skip or name.split(".")[-1] in EMBED_TOKENS


def param_groups_layer_decay(model: nn.Module, base_lr: float, weight_decay: float, layer_decay: float = 0.65,
                             num_layers: int | None = None,
                             layer_id_fn: Callable[[str], int] | None = None) -> list[dict]:
    """Optimizer parameter groups with layer-wise lr decay (BEiT / MAE style).

    Layer ids run 0..num_layers + 1 (ViT: see ``vit_layer_id``; CNNs: pass ``layer_id_fn(name) -> int``).
    lr_scale = layer_decay ** (num_layers + 1 - layer_id): the head gets base_lr, earlier layers geometrically less.
    num_layers defaults to len(model.blocks) for ViTs, or to (max layer id - 1) when layer_id_fn is given.
    Biases, 1-D params (norms), pos_embed and tokens (and names in ``model.no_weight_decay()``) get weight_decay 0.
    Frozen parameters (requires_grad False) are left out.
    Each group: {params, param_names, weight_decay, lr_scale, lr = base_lr * lr_scale, layer_id}.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if layer_id_fn is None:
        if num_layers is None:
            if not hasattr(model, "blocks"):
                raise ValueError("model has no `blocks`: pass num_layers, or layer_id_fn for non-ViT models")
            num_layers = len(model.blocks)
        n_layers = num_layers

        def layer_id_fn(name: str) -> int:
            return vit_layer_id(name, n_layers)
    elif num_layers is None:
        num_layers = max(layer_id_fn(n) for n, _ in named) - 1
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()

    groups: dict[tuple[int, bool], dict] = {}
    for name, param in named:
        layer_id = layer_id_fn(name)
        decay = not _no_weight_decay(name, param, skip)
        scale = layer_decay ** (num_layers + 1 - layer_id)
        group = groups.setdefault((layer_id, decay), {
            "params": [], "param_names": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": scale, "lr": base_lr * scale, "layer_id": layer_id,
        })
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


class EarlyStopping:
    """Stop after ``patience`` consecutive steps without improvement.

    mode "max" (e.g. AUC, accuracy): improved when value > best + min_delta; "min" (loss): value < best - min_delta.
    The first finite value always improves. NaN never improves. ``step(value)`` returns whether it improved;
    ``should_stop`` turns True once ``bad_steps >= patience``. ``best`` and ``best_step`` (0-based) track the best.
    """

    def __init__(self, patience: int, mode: str = "max", min_delta: float = 0.0):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if patience < 1 or min_delta < 0:
            raise ValueError("need patience >= 1 and min_delta >= 0")
        self.patience, self.mode, self.min_delta = patience, mode, min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_steps = 0
        self.steps = 0

    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def step(self, value: float) -> bool:
        value = float(value)
        improved = self._improves(value)
        if improved:
            self.best, self.best_step, self.bad_steps = value, self.steps, 0
        else:
            self.bad_steps += 1
        self.steps += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.bad_steps >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad_steps": self.bad_steps, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.bad_steps, self.steps = state["bad_steps"], state["steps"]
