"""Every explanation method on an OCT volume model (`oct_volume_fusion3d*`): one [D, H, W] map per volume, i.e. a
heatmap for each B-scan.

- "gradcam": the single-pass Grad-CAM of `cam.py` on the 5-D activations of `net.layer4` (the default path).
- "gradcam-reference", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam": pytorch-grad-cam, whose
  weightings are written over any number of spatial axes (1.5.x), on the same layer. The library's weighting and
  combination give the map on the layer's grid, which is upsampled trilinearly as the single pass's is.
- "scorecam": pytorch-grad-cam's Score-CAM upsamples activations bilinearly (2-D only); `ScoreCAM3D` does the same
  with trilinear upsampling: one forward per channel of the target layer, each on the volume masked by that
  channel's min-max scaled activation, weights = softmax of the masked volumes' scores.
- "integrated_gradients": captum IntegratedGradients from a black volume (intensity 0), 32 steps, the record held
  fixed; the signed attribution is smoothed (Gaussian, sigma = 1/112 of the in-plane side, and the same physical
  fraction across slices) before its positive part is kept, as for 2-D images (`attribution.py`).

The model has one logit (P(disease) = sigmoid(logit / T)). target "disease" (default, index 1) explains the logit,
"normal" (index 0) its negative. Maps are float32 in [0, 1] (min-max per volume) at the model's input size;
`explain_volume` resizes them to the volume's own shape.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RetinaInputError
from ..models.loading import as_model
from ..models.volume3d import VolumeFusion3D, volume_sample
from .cam import get_module, gradcam_single_pass, pgc_methods
from .ig import black_baseline

VOLUME_CAM_LIBRARY = ("gradcam-reference", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam")
VOLUME_METHODS = ("gradcam",) + VOLUME_CAM_LIBRARY + ("scorecam", "integrated_gradients")
VOLUME_IG_STEPS = 32
VOLUME_IG_BATCH = 4
SCORECAM_BATCH = 8


class SignedLogit(nn.Module):
    """net(x, meta) with the record fixed, times `sign` (+1: the disease logit, -1: the normal one): [B, 1]."""

    def __init__(self, net: nn.Module, meta: torch.Tensor | None, sign: float = 1.0):
        super().__init__()
        self.net, self.meta, self.sign = net, meta, float(sign)

    def forward(self, x):
        meta = self.meta
        if meta is not None and meta.shape[0] != x.shape[0]:
            meta = meta.expand(x.shape[0], *meta.shape[1:])
        out = self.net(x, meta)
        return out if self.sign == 1.0 else out * self.sign


def volume_target_sign(target, classes=("normal", "disease")) -> float:
    """+1 to explain the disease logit, -1 for normal. target: None, an index or a class name."""
    if target is None:
        return 1.0
    if isinstance(target, str):
        t = target.strip().lower()
        names = [c.lower() for c in classes]
        if t not in names:
            raise RetinaInputError(f"Unknown target {target!r}; this model explains one of {', '.join(classes)}.")
        return 1.0 if names.index(t) == 1 else -1.0
    i = int(target)
    if i not in (0, 1):
        raise RetinaInputError(f"Target index {i} out of range: this model has two classes ({', '.join(classes)}).")
    return 1.0 if i == 1 else -1.0


def _scale01(maps: np.ndarray) -> np.ndarray:
    flat = maps.reshape(len(maps), -1)
    lo = flat.min(1).reshape(-1, *([1] * (maps.ndim - 1)))
    hi = flat.max(1).reshape(-1, *([1] * (maps.ndim - 1)))
    return np.clip((maps - lo) / (hi - lo + 1e-7), 0.0, 1.0).astype(np.float32)


def _to_input_size(cams: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Raw CAMs [B, d, h, w] -> float32 [B, D, H, W] in [0, 1] (relu, trilinear, min-max)."""
    c = torch.from_numpy(np.maximum(np.asarray(cams, np.float32), 0.0))[:, None]
    if tuple(c.shape[2:]) != tuple(size):
        c = F.interpolate(c, size=tuple(size), mode="trilinear", align_corners=False)
    return _scale01(c[:, 0].numpy())


def _score_cam_3d_class():
    import pytorch_grad_cam as pgc

    class ScoreCAM3D(pgc.ScoreCAM):
        """pytorch-grad-cam's Score-CAM with trilinear upsampling for 5-D activations (2-D inputs unchanged)."""

        def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
            if activations.ndim != 5:
                return super().get_cam_weights(input_tensor, target_layer, targets, activations, grads)
            with torch.no_grad():
                act = torch.from_numpy(activations).to(input_tensor.device)
                up = F.interpolate(act, size=tuple(input_tensor.shape[-3:]), mode="trilinear", align_corners=False)
                flat = up.flatten(2)
                lo = flat.min(-1).values[..., None, None, None]
                hi = flat.max(-1).values[..., None, None, None]
                up = (up - lo) / (hi - lo + 1e-8)
                bs = getattr(self, "batch_size", SCORECAM_BATCH)
                scores = []
                for b, target in enumerate(targets):
                    masked = input_tensor[b:b + 1] * up[b][:, None]          # [C, channels, D, H, W]
                    for i in range(0, masked.shape[0], bs):
                        scores.extend(float(target(o).cpu()) for o in self.model(masked[i:i + bs]))
                s = torch.tensor(scores).view(activations.shape[0], activations.shape[1])
                return torch.softmax(s, dim=-1).numpy()

    return ScoreCAM3D


def _library_cam(model: nn.Module, x: torch.Tensor, layer: nn.Module, method: str) -> np.ndarray:
    """pytorch-grad-cam's `method` on a [B, 1, D, H, W] input with one output (target index 0): raw maps
    [B, d, h, w] on `layer`'s grid (relu'd, not scaled). The library computes each method's weighting and
    combination (`get_cam_image`); the caller resizes, trilinearly like the single pass, because the library's
    own 3-D resize is a cubic spline that overshoots between the cells of a coarse grid."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = _score_cam_3d_class() if method == "scorecam" else pgc_methods()[method]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:                      # the library back-propagates to the input through the whole net
        p.requires_grad_(True)
    targets = [ClassifierOutputTarget(0)] * x.shape[0]
    try:
        with cls(model=model, target_layers=[layer]) as cam, torch.enable_grad():
            if method == "scorecam":
                cam.batch_size = SCORECAM_BATCH
            outputs = cam.activations_and_grads(x)            # the library's forward (hooks on `layer`)
            grads = None
            if cam.uses_gradients:
                model.zero_grad()
                sum(t(o) for t, o in zip(targets, outputs)).backward()
                grads = cam.activations_and_grads.gradients[0].numpy()
            acts = cam.activations_and_grads.activations[0].numpy()
            raw = cam.get_cam_image(x, layer, targets, acts, grads, False)
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.zero_grad(set_to_none=True)
    return np.maximum(np.asarray(raw, np.float32), 0.0)


def _ig_volume(model: nn.Module, x: torch.Tensor, mean: float, std: float) -> np.ndarray:
    """Signed IG attribution [B, D, H, W] from a black volume (intensity 0, normalised like the input)."""
    from captum.attr import IntegratedGradients

    baseline = black_baseline(x, (mean,), (std,))
    with torch.inference_mode(False), torch.enable_grad():
        attr = IntegratedGradients(model).attribute(x.detach().clone().requires_grad_(True), baselines=baseline,
                                                    target=0, n_steps=VOLUME_IG_STEPS,
                                                    internal_batch_size=VOLUME_IG_BATCH)
    return attr.detach()[:, 0].float().cpu().numpy()


def postprocess_ig_volume(a: np.ndarray) -> np.ndarray:
    """Signed [D, H, W] attribution -> map in [0, 1]: Gaussian smoothing (sigma = in-plane side / 112 px in-plane,
    the same physical width across slices: (D / W) of it), positive part, clip at the 99.5th percentile, min-max."""
    from scipy.ndimage import gaussian_filter

    d, h, w = a.shape
    s = max(0.5, min(h, w) / 112.0)
    a = np.maximum(gaussian_filter(a.astype(np.float32), (s * d / w, s, s)), 0.0)
    hi = float(np.percentile(a, 99.5))
    if hi > 0:
        a = np.minimum(a, hi)
    return _scale01(a[None])[0]


def volume_attribution(net: nn.Module, x: torch.Tensor, meta: torch.Tensor | None, method: str = "gradcam",
                       target_layer: str = "net.layer4", target=None, mean: float = 0.15, std: float = 0.2,
                       ) -> tuple[torch.Tensor, np.ndarray]:
    """(disease logits [B, 1], maps float32 [B, D, H, W] in [0, 1] at the input size) of `method` on a
    preprocessed batch x [B, 1, D, H, W]. target_layer: a module path in the volume model (`cfg.target_layer`);
    mean / std: the input normalisation (for the IG baseline)."""
    if method not in VOLUME_METHODS:
        raise RetinaInputError(f"Unknown method {method!r} for a volume model; choose from "
                               f"{', '.join(VOLUME_METHODS)}.")
    sign = volume_target_sign(target)
    wrapped = SignedLogit(net, meta, sign)
    layer_path = "net." + target_layer                 # inside the SignedLogit wrapper
    with torch.inference_mode(False):
        x = x.clone()
    was_training = net.training
    net.eval()
    try:
        if method == "gradcam":
            logits, cams = gradcam_single_pass(wrapped, x, layer_path, [0] * x.shape[0])
            return logits * sign, _to_input_size(cams, tuple(x.shape[2:]))
        with torch.no_grad():
            logits = net(x, None if meta is None else meta.expand(x.shape[0], *meta.shape[1:]))
        if method == "integrated_gradients":
            raw = _ig_volume(wrapped, x, mean, std)
            return logits, np.stack([postprocess_ig_volume(r) for r in raw])
        raw = _library_cam(wrapped, x, get_module(wrapped, layer_path), method)
        return logits, _to_input_size(raw, tuple(x.shape[2:]))
    finally:
        net.train(was_training)


def volume_cam(net: VolumeFusion3D, x: torch.Tensor, meta: torch.Tensor | None = None,
               target_layer: str = "net.layer4") -> tuple[torch.Tensor, np.ndarray]:
    """3D Grad-CAM for the disease logit: (logits [B, 1], maps float32 [B, D, H, W] in [0, 1] at the input size).
    Slice i of a map is the per-slice heatmap of B-scan i (the single pass of `volume_attribution`)."""
    return volume_attribution(net, x, meta, "gradcam", target_layer)


def resize_volume(maps: np.ndarray, shape: tuple[int, int, int], clip: bool = False) -> np.ndarray:
    """Trilinear resize of float maps [D, H, W] to `shape` (unchanged when already that shape); clip: the resized
    values clipped to [0, 1] (a volume in [0, 1], as explain-eval's samples)."""
    if maps.shape == tuple(shape):
        return maps.astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0].numpy()
    return out.clip(0, 1) if clip else out


def explain_volume(model, volume, method: str | None = None, target=None, meta: dict | None = None,
                   eye: str | None = None) -> np.ndarray:
    """Heatmap of `method` for one OCT volume: float32 [D, H, W] in [0, 1] at the volume's own shape (slice i is
    the heatmap of B-scan i).

    model: a VolumeModel (or the bare network) of an `oct_volume_fusion3d*` model. volume: what
    `VolumeModel.preprocess` takes: float32 [D, H, W] in [0, 1], uint8 [D, H, W], a RetinalImage of kind "volume"
    (`retina_core.read_image` on a NIfTI / multi-frame DICOM), or (volume, meta[, eye]). meta: the clinical record
    the model reads ({age, sex, va_logmar, cst_um, hba1c}; missing values become the training means); eye "OD" /
    "OS". target: "disease" (default) or "normal".
    """
    m = as_model(model)
    vol, meta, eye = volume_sample(volume, meta, eye)
    method = method or _default_method(m, m.cfg)
    x, mt = m.preprocess(vol, meta, eye)
    cfg = m.cfg
    _, maps = volume_attribution(m.net, x, mt, method, cfg.target_layer or "net.layer4", target, cfg.mean[0],
                                 cfg.std[0])
    return _scale01(resize_volume(maps[0], vol.shape)[None])[0]


def _default_method(model, cfg) -> str:
    entry = getattr(model, "entry", None) or {}
    choice = entry.get("default_method") or getattr(cfg, "default_method", None)
    return choice if choice in VOLUME_METHODS else "gradcam"


def volume_blur(vol: np.ndarray) -> np.ndarray:
    """The deletion / insertion baseline of explain-eval and the image's "absent" state in `inputs.input_shapley`: a 3-D Gaussian blur (sigma max(2, side / 16) in-plane as in 2-D,
    max(1, D / 16) across slices)."""
    from scipy.ndimage import gaussian_filter

    d, h, w = vol.shape
    s = max(2.0, min(h, w) / 16.0)
    return gaussian_filter(vol.astype(np.float32), sigma=(max(1.0, d / 16.0), s, s), mode="nearest")
