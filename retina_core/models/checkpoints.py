"""Start from weights a user has on disk (timm / torchvision / RETFound-style checkpoints).

Only tensors are read: safetensors, or `torch.load(weights_only=True)` for .pth/.pt files, so a checkpoint
cannot run code. Keys are matched leniently (wrappers such as `{'model': ...}` or `{'state_dict': ...}`, prefixes
`module.`/`backbone.`, and our `net.` wrapper prefix), tensors whose shape does not fit (e.g. a classifier head for
other classes) are dropped, and what was loaded, missing and unexpected is reported.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import RetinaInputError

_PREFIXES = ("module.", "backbone.", "model.", "encoder.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise RetinaInputError(f"Checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickles with code, corrupt files
        raise RetinaInputError(f"{path.name} is not a plain tensor checkpoint that can be loaded safely "
                               f"({type(exc).__name__}). Convert it to .safetensors.") from None
    for key in ("model", "state_dict", "model_state", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise RetinaInputError(f"{path.name} holds no state dict.")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def strip_prefixes(key: str, prefixes: tuple[str, ...] = _PREFIXES) -> str:
    """`key` without any leading wrapper prefixes (repeatedly: "module.backbone.x" -> "x")."""
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def load_state_dict_file(net: nn.Module, path: str | Path) -> dict:
    """Load what fits from `path` into `net` (strict=False). Returns a report of the matching."""
    target = net.state_dict()
    src = {strip_prefixes(k): v for k, v in read_state_dict(path).items()}
    mapped, skipped, unexpected = {}, [], []
    for k, v in src.items():
        cand = k if k in target else "net." + k
        if cand not in target:
            unexpected.append(k)
        elif target[cand].shape != v.shape:
            skipped.append(cand)
        else:
            mapped[cand] = v.to(target[cand].dtype)
    if not mapped:
        raise RetinaInputError(f"No tensor of {Path(path).name} fits {type(net).__name__}: wrong architecture?")
    missing, _ = net.load_state_dict(mapped, strict=False)
    return {"loaded": len(mapped), "missing": list(missing), "unexpected": unexpected,
            "skipped_shape_mismatch": skipped}
