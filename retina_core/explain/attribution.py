"""One interface for every explanation method: `explain(model, image, method, target) -> heatmap [H, W] in [0, 1]`.

    >>> hm = explain(load_model("oct_resnet18"), pixels, "integrated_gradients")   # float32 [H, W] at the shown size
    >>> maps, probs, targets = explain_batch(model, [img1, img2], "gradcam")

Methods
- CAM family (`cam.CAM_METHODS`): "gradcam" is the single-pass Grad-CAM of `cam.py`; "multiscale_gradcam" (CNNs
  whose cfg names a `fine_layer`) fuses Grad-CAM at the last stage and at the stage before it, from the same single
  pass, by their geometric mean (twice the resolution, still class-specific); "gradcam++", "hirescam",
  "xgradcam", "layercam", "eigencam", "scorecam" and "gradcam-reference" come from pytorch-grad-cam. On a ViT the
  target layer is the last block's `norm1` (unless the cfg names one) and the token activations are reshaped to a
  [B, C, h, w] grid, dropping the class / register tokens (`tokens_to_grid`).
- "integrated_gradients": captum IntegratedGradients from a black image (zero intensity in pixel space, i.e.
  (0 - mean) / std after normalisation), 32 steps; the signed attribution summed over channels and smoothed
  (Gaussian, sigma = 1/112 of the input side) *before* its positive part is kept: by IG's completeness, a
  Gaussian-weighted sum of attributions is the contribution of that soft region, so the map shows where the net
  evidence for the class lies. |attribution| instead tracks the image's edges whatever the weights (mean |rho|
  0.93 between the trained and a randomised OCT model, failing the sanity check; the signed map: 0.15). Then
  clipped at its 99.5th percentile and normalised.
- ViTs only (timm VisionTransformer-like: `blocks`, `patch_embed`, `attn.attn_drop`):
  "attention_rollout" (Abnar & Zuidema 2020: R = prod_l normalise(mean_heads(A_l) + I); class-agnostic) and
  "vit_relevance" (Chefer et al. 2021, "Generic attention-model explainability": R = I, then for each block
  R += mean_heads(relu(dy/dA * A)) @ R; class-specific). For a class-token ViT the map is R's CLS row over the
  patch tokens; for a global-average-pool ViT (e.g. RETFound with global_pool) it is the mean of R's patch rows.
  Attention probabilities are captured by hooking `attn_drop` while timm's fused attention is switched off.

Every map is returned at the size of the image shown to the user, float32 in [0, 1] (min-max per image).
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..modality import Modality
from ..models.framing import FieldBox, frame_boxes, map_to_image, uses_fov
from ..models.loading import preprocess_image, to_pixels
from ..models.multimodal import pair_parts
from ..models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelCfg, modality_of, model_cfg
from .cam import (CAM_METHODS, cam_with_library, capture_as_leaf, get_module, gradcam_single_pass,
                  multiscale_gradcam_single_pass, normalise_map, pgc_methods)
from .ig import black_baseline, postprocess_ig
from .pair_methods import FUSION_METHODS, pair_maps, resolve_net
from .volume_methods import VOLUME_METHODS, explain_volume

IG_METHODS = ("integrated_gradients",)
VIT_METHODS = ("attention_rollout", "vit_relevance")
ALL_METHODS = tuple(CAM_METHODS) + IG_METHODS + VIT_METHODS
IG_STEPS = 32
IG_INTERNAL_BATCH = 16


# ------------------------------------------------------------------------------------------------ model plumbing
class _Model:
    """What explain needs from a LoadedModel or a bare nn.Module: the net, a cfg, the device and a temperature."""

    def __init__(self, model):
        net = getattr(model, "net", None) if not isinstance(model, nn.Module) else model
        if not isinstance(net, nn.Module):
            raise TypeError(f"expected a LoadedModel or an nn.Module, got {type(model).__name__}")
        self.net = net
        cfg = model_cfg(model)
        self.vit = find_vit(net)
        if cfg is None:
            cfg = _default_cfg(net, self.vit)
        self.cfg = cfg
        self.temperature = float(getattr(model, "temperature", 1.0) or 1.0)
        self.entry = getattr(model, "entry", None) or {}
        try:
            self.device = next(net.parameters()).device
        except StopIteration:
            self.device = torch.device("cpu")

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.cfg.classes)

    def preprocess(self, batch_uint8: np.ndarray, boxes: list | None = None, grey: bool = False) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> float32 [B, C, h, w] (framed and resized to cfg.input_size, normalised with
        cfg.mean/std; `boxes`: the images' field-of-view boxes when the cfg frames them; `grey`: every image's
        channels are copies of one)."""
        return preprocess_batch(batch_uint8, self.cfg, self.device, boxes, grey)


def _default_cfg(net: nn.Module, vit: nn.Module | None):
    """A minimal ModelCfg for a bare timm network without `.cfg` (tests, user models)."""
    pcfg = getattr(net, "pretrained_cfg", None) or {}
    size = None
    if vit is not None and getattr(vit.patch_embed, "img_size", None) is not None:
        size = tuple(int(s) for s in vit.patch_embed.img_size)
    elif pcfg.get("input_size"):
        size = tuple(int(s) for s in pcfg["input_size"][1:])
    size = size or (224, 224)
    k = int(getattr(net, "num_classes", 0) or 0)
    return ModelCfg(name=type(net).__name__, arch=type(net).__name__, modality="", task="",
                    classes=tuple(str(i) for i in range(max(k, 1))), input_size=(3, *size),
                    mean=tuple(pcfg.get("mean", IMAGENET_MEAN)), std=tuple(pcfg.get("std", IMAGENET_STD)))


_VIT_OF: "weakref.WeakKeyDictionary[nn.Module, tuple[int, nn.Module | None]]" = weakref.WeakKeyDictionary()


def find_vit(net: nn.Module) -> nn.Module | None:
    """The VisionTransformer inside `net` (itself, or e.g. the timm model wrapped as `net.net`), else None.
    Remembered per network (every analysis asks several times; walking a network's modules with `hasattr` costs
    about 0.3 ms), and looked up again when the network's number of modules changes."""
    n = sum(1 for _ in net.modules())
    known = _VIT_OF.get(net)
    if known is not None and known[0] == n:
        return known[1]
    found = next((m for m in net.modules() if hasattr(m, "blocks") and hasattr(m, "patch_embed")), None)
    _VIT_OF[net] = (n, found)
    return found


def is_vit(model) -> bool:
    net = model if isinstance(model, nn.Module) else getattr(model, "net", None)
    return isinstance(net, nn.Module) and find_vit(net) is not None


def available_methods(model) -> tuple[str, ...]:
    """Methods that apply to this model: the ViT-only ones only for ViTs, multiscale_gradcam where the cfg names a
    finer stage (`fine_layer`); an OCT volume model gets `volume_methods.VOLUME_METHODS`, the fundus + OCT fusion
    model Grad-CAM and IG (one map per input)."""
    modality = modality_of(model)
    if modality == Modality.OCT_VOLUME:
        return VOLUME_METHODS
    if modality == Modality.FUNDUS_OCT:
        return FUSION_METHODS
    if is_vit(model):
        return tuple(m for m in ALL_METHODS if m != "multiscale_gradcam")
    multi = bool(getattr(model_cfg(model), "fine_layer", ""))
    return tuple(m for m in CAM_METHODS if multi or m != "multiscale_gradcam") + IG_METHODS


def default_method(model) -> str:
    """The heatmap method `analyze` uses for this model: the one its manifest entry chose from `explain-eval`
    evidence (`explain-eval --set-default`), else the registry's, else Grad-CAM."""
    entry = getattr(model, "entry", None) or {}
    cfg = model_cfg(model)
    avail = available_methods(model)
    for choice in (entry.get("default_method"), getattr(cfg, "default_method", None)):
        if choice and choice in avail:
            return choice
    return "gradcam"


def preprocess_batch(batch_uint8: np.ndarray, cfg, device: torch.device | str = "cpu",
                     boxes: list | None = None, grey: bool = False) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, C, h, w]: `models.loading.preprocess_image`, the one preprocessing."""
    return preprocess_image(batch_uint8, cfg, device, boxes, grey)


@contextmanager
def eval_mode(net: nn.Module) -> Iterator[None]:
    """Explanations are computed in eval mode (no dropout / drop-path / batch statistics); the mode is restored."""
    training = [m for m in net.modules() if m.training]
    if not training:          # already in eval mode (every served model): nothing to switch or restore
        yield
        return
    net.eval()
    try:
        yield
    finally:
        for m in training:    # exactly the modules that were training (a frozen part stays in eval mode)
            m.training = True


def target_indices(target, classes: Sequence[str], predicted: torch.Tensor) -> list[int]:
    """The class index each image's map explains: `target` (a class name or index, or one per image), or the
    predicted class where it is None."""
    n = len(predicted)
    if target is None:
        return [int(p) for p in predicted]
    items = list(target) if isinstance(target, (list, tuple, np.ndarray, torch.Tensor)) else [target] * n
    if len(items) != n:
        raise ValueError(f"{len(items)} targets for {n} images")
    out = []
    for t in items:
        if t is None:
            out.append(int(predicted[len(out)]))
        elif isinstance(t, (int, np.integer)) or (isinstance(t, torch.Tensor) and t.ndim == 0):
            out.append(int(t))
        elif str(t) in classes:
            out.append(list(classes).index(str(t)))
        else:
            raise ValueError(f"cannot explain class {t!r}: the model's classes are {', '.join(classes)}")
    return out


# ------------------------------------------------------------------------------------------------------ ViT helpers
def vit_prefix_tokens(vit: nn.Module) -> int:
    """Class + register tokens before the patch tokens."""
    n = getattr(vit, "num_prefix_tokens", None)
    if n is None:
        n = int(getattr(vit, "cls_token", None) is not None)
        reg = getattr(vit, "reg_token", None)
        n += int(reg.shape[1]) if reg is not None else 0
    return int(n)


def vit_uses_cls_token(vit: nn.Module) -> bool:
    """True when the head reads the class token; False for global (average) pooling."""
    gp = getattr(vit, "global_pool", "token")
    if isinstance(gp, bool):
        return not gp
    if gp in ("token",):
        return True
    if gp in ("", None):
        return getattr(vit, "cls_token", None) is not None
    return False          # "avg", "avgmax", "max", "map" (attention pool: approximated by the patch mean)


def vit_grid(vit: nn.Module, x: torch.Tensor, n_tokens: int | None = None) -> tuple[int, int]:
    ps = getattr(vit.patch_embed, "patch_size", 16)
    ph, pw = (ps, ps) if isinstance(ps, int) else tuple(ps)
    gh, gw = x.shape[-2] // ph, x.shape[-1] // pw
    if n_tokens is not None and gh * gw != n_tokens:
        side = int(round(n_tokens ** 0.5))
        if side * side != n_tokens:
            raise ValueError(f"cannot lay {n_tokens} patch tokens on a grid")
        gh = gw = side
    return gh, gw


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int], prefix: int) -> torch.Tensor:
    """ViT tokens [B, N, C] -> [B, C, h, w], dropping the `prefix` class / register tokens (a CAM reshape transform)."""
    t = tokens[:, prefix:, :]
    b, n, c = t.shape
    return t.reshape(b, grid[0], grid[1], c).permute(0, 3, 1, 2)


def _vit_layer_path(net: nn.Module, vit: nn.Module, cfg) -> str:
    if cfg.target_layer:
        return cfg.target_layer
    for name, m in net.named_modules():
        if m is vit:
            return f"{name + '.' if name else ''}blocks.{len(vit.blocks) - 1}.norm1"
    raise ValueError("ViT not found inside the network")


@contextmanager
def capture_attention(vit: nn.Module) -> Iterator[list]:
    """While active, every block's attention probabilities [B, heads, N, N] are appended to the yielded list.

    timm computes attention with F.scaled_dot_product_attention when `fused_attn` is set, which never materialises
    the probabilities; it is switched off here (and restored) so `attn_drop(softmax(q k^T))` can be hooked.
    """
    store: list = []
    handles, saved = [], []
    try:
        for blk in vit.blocks:
            attn = getattr(blk, "attn", None)
            if attn is None or not hasattr(attn, "attn_drop"):
                raise ValueError("attention rollout / relevance need timm-style blocks with `attn.attn_drop`")
            saved.append((attn, getattr(attn, "fused_attn", None)))
            if hasattr(attn, "fused_attn"):
                attn.fused_attn = False
            handles.append(attn.attn_drop.register_forward_hook(lambda _m, _i, out: store.append(out)))
        yield store
    finally:
        for h in handles:
            h.remove()
        for attn, fused in saved:
            if fused is not None:
                attn.fused_attn = fused


def _rows_to_map(R: torch.Tensor, vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    prefix = vit_prefix_tokens(vit)
    if vit_uses_cls_token(vit) and prefix > 0:
        rel = R[:, 0, prefix:]
    else:
        rel = R[:, prefix:, prefix:].mean(dim=1)
    gh, gw = vit_grid(vit, x, rel.shape[1])
    return rel.reshape(-1, gh, gw)


def attention_rollout(net: nn.Module, x: torch.Tensor, head_fusion: str = "mean") -> tuple[torch.Tensor, np.ndarray]:
    """Abnar & Zuidema rollout. Returns (logits, maps [B, gh, gw] float32, unnormalised)."""
    vit = find_vit(net)
    if vit is None:
        raise ValueError("attention rollout needs a ViT")
    with capture_attention(vit) as store, torch.no_grad():
        logits = net(x)
    R = None
    for A in store:
        a = A.float().amax(dim=1) if head_fusion == "max" else A.float().mean(dim=1)
        eye = torch.eye(a.shape[-1], device=a.device).expand_as(a)
        a = a + eye
        a = a / a.sum(dim=-1, keepdim=True)
        R = a if R is None else a @ R
    return logits.detach(), _rows_to_map(R, vit, x).cpu().numpy().astype(np.float32)


def vit_relevance(net: nn.Module, x: torch.Tensor, targets: list[int] | None = None
                  ) -> tuple[torch.Tensor, np.ndarray, list[int]]:
    """Chefer et al. 2021 gradient-weighted attention relevance. Returns (logits, maps [B, gh, gw], targets)."""
    vit = find_vit(net)
    if vit is None:
        raise ValueError("ViT relevance needs a ViT")
    with capture_attention(vit) as store, torch.inference_mode(False), torch.enable_grad():
        xi = x.detach().clone().requires_grad_(True)          # builds the graph even with frozen parameters
        logits = net(xi)
        idx = targets if targets is not None else logits.argmax(1).tolist()
        score = logits.gather(1, torch.as_tensor(idx, device=logits.device)[:, None]).sum()
        grads = torch.autograd.grad(score, store)
    n = store[0].shape[-1]
    R = torch.eye(n, device=x.device).expand(x.shape[0], n, n).clone()
    for A, G in zip(store, grads):
        cam = (G.detach().float() * A.detach().float()).clamp(min=0).mean(dim=1)
        R = R + cam @ R
    return logits.detach(), _rows_to_map(R, vit, x).cpu().numpy().astype(np.float32), list(idx)


def _vit_gradcam(net: nn.Module, vit: nn.Module, x: torch.Tensor, layer: str, targets: list[int] | None):
    """Single-pass Grad-CAM on ViT tokens (reshaped to a grid, prefix tokens dropped). Equals pytorch-grad-cam's
    GradCAM with the same reshape transform."""
    with capture_as_leaf(get_module(net, layer)) as store, torch.inference_mode(False), torch.enable_grad():
        logits = net(x)
        idx = targets if targets is not None else logits.argmax(1).tolist()
        score = logits.gather(1, torch.as_tensor(idx, device=logits.device)[:, None]).sum()
        (grads,) = torch.autograd.grad(score, store["activations"])
    acts = store["activations"].detach()
    if acts.ndim == 3:
        prefix = vit_prefix_tokens(vit)
        grid = vit_grid(vit, x, acts.shape[1] - prefix)
        acts, grads = tokens_to_grid(acts, grid, prefix), tokens_to_grid(grads, grid, prefix)
    w = grads.mean(dim=(2, 3), keepdim=True)
    cams = torch.relu((w * acts).sum(dim=1))
    return logits.detach(), cams.float().cpu().numpy(), list(idx)


def _vit_library_cam(net: nn.Module, vit: nn.Module, x: torch.Tensor, layer: str, method: str,
                     targets: list[int]) -> np.ndarray:
    """pytorch-grad-cam on a ViT with the token -> grid reshape transform; float32 [B, H, W] in [0, 1]."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    prefix = vit_prefix_tokens(vit)
    grid = vit_grid(vit, x)

    def reshape(t):
        return tokens_to_grid(t, grid, prefix) if t.ndim == 3 else t

    cls = pgc_methods()[method]
    frozen = [p for p in net.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        with torch.inference_mode(False), cls(model=net, target_layers=[get_module(net, layer)],
                                              reshape_transform=reshape) as cam:
            if method == "scorecam":
                cam.batch_size = 16
            out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return out.astype(np.float32)


# ------------------------------------------------------------------------------------------------------ IG
def integrated_gradients(net: nn.Module, x: torch.Tensor, targets: list[int], cfg,
                         n_steps: int = IG_STEPS, internal_batch_size: int = IG_INTERNAL_BATCH) -> np.ndarray:
    """captum IntegratedGradients from a black image (pixel intensity 0, normalised like the input).
    Returns the signed attribution summed over channels, float32 [B, h, w] at the model input size."""
    from captum.attr import IntegratedGradients

    baseline = black_baseline(x, cfg.mean, cfg.std)
    ig = IntegratedGradients(net)
    with torch.inference_mode(False), torch.enable_grad():
        attr = ig.attribute(x.detach().clone().requires_grad_(True), baselines=baseline, target=list(targets),
                            n_steps=n_steps, internal_batch_size=max(internal_batch_size, 1))
    return attr.detach().sum(dim=1).float().cpu().numpy()


# ------------------------------------------------------------------------------------------------------ entry points
def attribute(model, x: torch.Tensor, method: str = "gradcam",
              target=None) -> tuple[np.ndarray, torch.Tensor, list[int]]:
    """Raw maps for a preprocessed batch x [B, C, h, w]: (maps [B, h', w'] float32 at the method's own resolution,
    unnormalised, logits [B, K], explained class per image). Most callers want `explain` / `explain_batch`."""
    m = model if isinstance(model, _Model) else _Model(model)
    net, cfg, vit = m.net, m.cfg, m.vit
    if method not in ALL_METHODS:
        raise ValueError(f"unknown explanation method {method!r}; choose one of {', '.join(available_methods(net))}")
    if method in VIT_METHODS and vit is None:
        raise ValueError(f"{method} applies to vision transformers only; {cfg.name} is not one. "
                         f"Use one of {', '.join(available_methods(net))}.")
    with torch.inference_mode(False):      # a normal tensor even when the caller runs under inference_mode
        x = x.to(m.device).clone()
    # explicit targets need only the class list; None means "the predicted class", known after the forward
    tg = None if target is None else target_indices(target, m.classes, torch.zeros(x.shape[0], dtype=torch.long))
    with eval_mode(net):
        if method == "attention_rollout":
            logits, maps = attention_rollout(net, x)
            return maps, logits, tg if tg is not None else logits.argmax(1).tolist()
        if method == "vit_relevance":
            logits, maps, idx = vit_relevance(net, x, tg)
            return maps, logits, idx
        if method == "gradcam":
            if vit is not None:
                logits, cams, idx = _vit_gradcam(net, vit, x, _vit_layer_path(net, vit, cfg), tg)
                return cams, logits, idx
            with torch.inference_mode(False):
                logits, cams = gradcam_single_pass(net, x, cfg.target_layer, tg)
            return cams, logits, tg if tg is not None else logits.argmax(1).tolist()
        if method == "multiscale_gradcam":
            if vit is not None or not getattr(cfg, "fine_layer", ""):
                raise ValueError(f"multiscale_gradcam needs a CNN whose cfg names a finer stage (fine_layer); "
                                 f"{cfg.name} has none.")
            with torch.inference_mode(False):
                logits, cams = multiscale_gradcam_single_pass(net, x, [cfg.target_layer, cfg.fine_layer], tg)
            return cams, logits, tg if tg is not None else logits.argmax(1).tolist()
        with torch.no_grad():
            logits = net(x)
        idx = tg if tg is not None else logits.argmax(1).tolist()
        if method in IG_METHODS:
            return integrated_gradients(net, x, idx, cfg), logits, idx
        if vit is not None:
            return _vit_library_cam(net, vit, x, _vit_layer_path(net, vit, cfg), method, idx), logits, idx
        return cam_with_library(net, x, cfg.target_layer, method, idx), logits, idx


@dataclass(frozen=True, eq=False)
class ModelMap:
    """A heatmap kept at the resolution its method made it (a few KB), placed on the image only when drawn:
    `to_image()` gives exactly what `explain_batch` returns for that image (float32 [H, W] in [0, 1]), at the
    cost of one upsampling. raw: the method's map [h, w] (Integrated Gradients already post-processed); box: the
    field-of-view box the model read (fov-framed models), else None; out_hw: the image's (H, W)."""

    raw: np.ndarray
    box: FieldBox | None
    out_hw: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.out_hw)

    def to_image(self) -> np.ndarray:
        if self.box is not None:
            return map_to_image(self.raw, self.box, self.out_hw)
        return normalise_map(self.raw, self.out_hw)

    def is_empty(self) -> bool:
        """Whether `to_image()` is all zero, mostly decided at the map's own resolution: a constant map is empty;
        a varying one is not when it is upsampled (without a box) or when it rises above its minimum well inside
        the round field a framed model read; otherwise the placed map is checked."""
        r = np.maximum(self.raw, 0)
        lo, hi = float(r.min()), float(r.max())
        if hi <= lo:
            return True
        h, w = r.shape
        up = h <= self.out_hw[0] and w <= self.out_hw[1]
        if self.box is None and up:
            return False
        if up:
            ys, xs = (np.arange(h) + 0.5) / h - 0.5, (np.arange(w) + 0.5) / w - 0.5
            inner = ys[:, None] ** 2 + xs[None, :] ** 2 <= 0.2      # radius 0.45 of the box; the field's is 0.5
            if (r[inner] > lo).any():
                return False
        return not float(self.to_image().max()) > 0


def explain_batch(model, images, method: str | None = None, target=None, grey: bool = False,
                  placed: bool = True) -> tuple[np.ndarray | list[ModelMap], np.ndarray, list[int]]:
    """Heatmaps for same-size images: (maps float32 [B, H, W] in [0, 1] at the image size, calibrated
    probabilities [B, K], explained class per image). images: uint8 [B, H, W, 3] or a list of [H, W, 3].
    method None: the model's `default_method`. grey: every image's three channels are exact copies of one
    (decoded from a grey source: `RetinalImage.meta["single_channel"]`), so one is preprocessed. placed False:
    the maps stay at the method's resolution, one `ModelMap` per image, placed on the image when drawn."""
    m = model if isinstance(model, _Model) else _Model(model)
    method = method or default_method(m)
    batch = np.stack([to_pixels(i) for i in images]) if not isinstance(images, np.ndarray) or images.ndim != 4 \
        else images
    h, w = batch.shape[1:3]
    boxes = frame_boxes(batch, tuple(m.cfg.input_size[1:]), m.cfg.framing) if uses_fov(m.cfg) else None
    x = m.preprocess(batch, boxes, grey)
    raw, logits, idx = attribute(m, x, method, target)
    if method in IG_METHODS:
        raw = [postprocess_ig(r, r.shape[-2:]) for r in raw]
    probs = torch.softmax(logits.float() / m.temperature, dim=1).cpu().numpy()
    kept = [ModelMap(np.array(r, np.float32), None if boxes is None else boxes[i], (h, w)) for i, r in enumerate(raw)]
    if not placed:
        return kept, probs, idx
    # the map covers each image's field-of-view box (fov framing): put it back in place
    return np.stack([k.to_image() for k in kept]).astype(np.float32), probs, idx


def explain(model, image, method: str | None = None, target=None, *, meta: dict | None = None,
            eye: str | None = None):
    """Heatmap(s) of `method` for one sample, keyed on the model's modality; what `LoadedModel.explain` and the
    callable `retina_core.explain` run.

    A 2-D image model: float32 [H, W] in [0, 1] at the size of the image shown. model: a LoadedModel or an nn.Module
    (with `.cfg`, or a bare timm network). image: uint8 [H, W, 3] (or [H, W]) or a RetinalImage. method: see the
    module docstring (None: the model's `default_method`). target: class index or name to explain (default: the
    predicted class).

    An OCT volume model (`oct_volume_fusion3d*`) takes a volume [D, H, W] (float in [0, 1] or uint8, a RetinalImage
    of kind "volume", or (volume, meta[, eye])) and returns float32 [D, H, W], one heatmap per B-scan; `meta` is the
    clinical record it reads ({age, sex, va_logmar, cst_um, hba1c}, missing values become the training means),
    `eye` "OD" / "OS"; target "disease" (default) or "normal" (`volume_methods.explain_volume`). The fundus + OCT
    fusion model takes a pair (fundus, oct) or {"fundus": ..., "oct": ...} and returns {"fundus": [H, W], "oct":
    [H', W']}, one map per input at its own size (`explain_pair`).
    """
    modality = modality_of(model)
    if modality == Modality.OCT_VOLUME:
        return explain_volume(model, image, method, target, meta=meta, eye=eye)
    if modality == Modality.FUNDUS_OCT:
        return explain_pair(model, image, method, target)
    return explain_batch(model, to_pixels(image)[None], method, target)[0][0]


def explain_pair(model, pair, method: str | None = None, target=None) -> dict[str, np.ndarray]:
    """Per-modality heatmaps of the fundus + OCT fusion model: {"fundus": float32 [H, W], "oct": float32 [H', W']}
    in [0, 1], each at its image's size. pair: (fundus, oct) or {"fundus": ..., "oct": ...}; each uint8 RGB,
    greyscale or a RetinalImage. target: class index or name (default: the predicted class)."""
    f, o = pair_parts(pair)
    method = method or default_method(model)
    m = resolve_net(model)
    idx = None if target is None else target_indices(target, tuple(m.cfg.classes),
                                                       torch.zeros(1, dtype=torch.long))[0]
    with eval_mode(m.net):
        return pair_maps(m, m.net, to_pixels(f), to_pixels(o), idx, method)[2]


def make_predict_fn(model, batch_size: int = 32):
    """predict_fn(uint8 [B, H, W, 3]) -> calibrated probabilities [B, K] (for deletion / insertion curves)."""
    m = model if isinstance(model, _Model) else _Model(model)

    def predict(batch: np.ndarray) -> np.ndarray:
        out = []
        with eval_mode(m.net), torch.no_grad():
            for i in range(0, len(batch), batch_size):
                logits = m.net(m.preprocess(np.asarray(batch[i:i + batch_size])))
                out.append(torch.softmax(logits.float() / m.temperature, dim=1).cpu().numpy())
        return np.concatenate(out)

    return predict


def explain_fn_for(model, method: str = "gradcam", target=None):
    """explain_fn(uint8 image) -> heatmap; a fixed model, method and target (for stability tests)."""
    m = model if isinstance(model, _Model) else _Model(model)
    return lambda image: explain(m, image, method, target)


def resolve_model(model) -> _Model:
    return model if isinstance(model, _Model) else _Model(model)

