"""Class activation maps: a single-pass Grad-CAM for the default path, the rest of the CAM family via pytorch-grad-cam.

Single pass: the forward that gives the prediction also records the target layer's activations A as a new leaf,
so the backward runs only from the target logit down to that layer (no parameter needs a gradient, nothing is
propagated to the input). The map equals pytorch-grad-cam's GradCAM on the same model and layer
(tests/test_explain.py checks it to 1e-4) at a fraction of its cost (docs/benchmarks.md).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def get_module(net: nn.Module, path: str) -> nn.Module:
    """`net.get_submodule` with a clear error for a wrong target-layer name."""
    try:
        return net.get_submodule(path)
    except AttributeError:
        raise ValueError(f"target layer {path!r} not found in {type(net).__name__}") from None


@contextmanager
def capture_as_leaf(module: nn.Module) -> Iterator[dict]:
    """While active, `module`'s output is replaced by a detached leaf that requires grad (stored in the dict)."""
    store: dict = {}

    def hook(_mod, _inp, out):
        leaf = out.detach().requires_grad_(True)
        store["activations"] = leaf
        return leaf.clone()   # a non-leaf copy, so in-place ops downstream cannot touch the leaf

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def gradcam_single_pass(net: nn.Module, x: torch.Tensor, target_layer: str,
                        targets: torch.Tensor | list[int] | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """One forward + a backward from the target logits to `target_layer` only.

    x: float32 [B, C, H, W] preprocessed. targets: class index per image (default: the predicted class).
    Returns (logits [B, K] detached, cams float32 [B, h, w] = relu(sum_c mean(dy/dA_c) * A_c), not normalised).
    """
    with capture_as_leaf(get_module(net, target_layer)) as store, torch.enable_grad():
        logits = net(x)
        if targets is None:
            idx = logits.argmax(dim=1)
        else:
            idx = torch.as_tensor(targets, device=logits.device).reshape(-1)
        score = logits.gather(1, idx[:, None]).sum()
        (grads,) = torch.autograd.grad(score, store["activations"])
    acts = store["activations"].detach()
    spatial = tuple(range(2, grads.ndim))            # 2D [B,C,h,w] and 3D [B,C,d,h,w] alike
    weights = grads.mean(dim=spatial, keepdim=True)
    cams = torch.relu((weights * acts).sum(dim=1))
    return logits.detach(), cams.float().cpu().numpy()


@contextmanager
def capture_layers(modules: list[nn.Module]) -> Iterator[dict]:
    """Record the outputs of several layers in one forward: the first to run becomes a detached leaf (so the
    backward stops there), the later ones stay in the graph. store[i] is modules[i]'s output."""
    store: dict = {}

    def make_hook(i):
        def hook(_mod, _inp, out):
            if not store:                                   # the shallowest layer: cut the graph here
                leaf = out.detach().requires_grad_(True)
                store[i] = leaf
                return leaf.clone()
            store[i] = out
            return None
        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(modules)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _scale01(cam: torch.Tensor) -> torch.Tensor:
    """Per-image min-max to [0, 1] over the spatial dims of [B, *spatial]."""
    flat = cam.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    shape = (-1,) + (1,) * (cam.ndim - 1)
    return (cam - lo.view(shape)) / (hi - lo + 1e-7).view(shape)


def multiscale_gradcam_single_pass(net: nn.Module, x: torch.Tensor, layers: list[str],
                                   targets: torch.Tensor | list[int] | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Grad-CAM at several stages from one forward and one backward, fused by their geometric mean.

    The deepest stage says which object matters (class-specific, but coarse: 4x4 cells for ResNet-18 at 128 px);
    a finer stage says where, at twice the resolution. Each stage's Grad-CAM is min-max scaled, resized
    (bilinear) to the finest stage's grid, and the maps are multiplied and rooted, so a region must be salient at
    every scale. The backward runs from the target logit down to the shallowest listed stage only.
    Returns (logits [B, K], cams float32 [B, h, w] at the finest stage's resolution, in [0, 1]).
    """
    mods = [get_module(net, name) for name in layers]
    with capture_layers(mods) as store, torch.enable_grad():
        logits = net(x)
        idx = logits.argmax(dim=1) if targets is None else torch.as_tensor(targets, device=logits.device).reshape(-1)
        score = logits.gather(1, idx[:, None]).sum()
        acts = [store[i] for i in range(len(mods))]
        grads = torch.autograd.grad(score, acts)
    cams = []
    for a, g in zip(acts, grads):
        a, g = a.detach(), g.detach()
        w = g.mean(dim=tuple(range(2, g.ndim)), keepdim=True)
        cams.append(torch.relu((w * a).sum(dim=1)).float())
    size = max((c.shape[1:] for c in cams), key=lambda s: int(np.prod(s)))
    mode = "bilinear" if len(size) == 2 else "trilinear"
    fused = torch.ones((x.shape[0], *size), device=cams[0].device)
    for c in cams:
        c = _scale01(c)
        if tuple(c.shape[1:]) != tuple(size):
            c = F.interpolate(c[:, None], size=tuple(size), mode=mode, align_corners=False)[:, 0]
        fused = fused * c.clamp_min(0)
    fused = fused ** (1.0 / len(cams))
    return logits.detach(), fused.cpu().numpy().astype(np.float32)


def normalise_map(cam: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Low-res map [h, w] -> float32 [H, W] in [0, 1]: min-max, bilinear resize, min-max (as pytorch-grad-cam)."""
    cam = np.maximum(cam.astype(np.float32), 0)
    cam = cam - cam.min()
    cam = cam / (1e-7 + cam.max())
    h, w = out_hw
    if cam.shape != (h, w):
        cam = cv2.resize(cam, (w, h), interpolation=cv2.INTER_LINEAR)
    cam = cam - cam.min()
    cam = cam / (1e-7 + cam.max())
    return np.clip(cam, 0.0, 1.0).astype(np.float32)


def pgc_methods() -> dict:
    import pytorch_grad_cam as pgc
    return {"gradcam-reference": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "hirescam": pgc.HiResCAM,
            "xgradcam": pgc.XGradCAM, "layercam": pgc.LayerCAM, "eigencam": pgc.EigenCAM, "scorecam": pgc.ScoreCAM}


CAM_METHODS = ("gradcam", "multiscale_gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "scorecam", "gradcam-reference")


def cam_with_library(net: nn.Module, x: torch.Tensor, target_layer: str, method: str,
                     targets: list[int]) -> np.ndarray:
    """pytorch-grad-cam's implementation of `method`; returns float32 [B, H, W] at the input size, in [0, 1]."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = pgc_methods()[method]
    needs_grad = [p for p in net.parameters() if not p.requires_grad]
    for p in needs_grad:   # the library back-propagates to the input through the whole net
        p.requires_grad_(True)
    try:
        with cls(model=net, target_layers=[get_module(net, target_layer)]) as cam:
            if method == "scorecam":
                cam.batch_size = 16
            out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        for p in needs_grad:
            p.requires_grad_(False)
    return out.astype(np.float32)
