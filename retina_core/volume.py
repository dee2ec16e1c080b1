"""OCT volumes for the viewer: slices, the en-face projection, the 3D model with metadata, per-slice heatmaps.

    >>> img = read_image("cube.nii.gz")                      # kind "volume", pixels float32 [D, H, W] in [0, 1]
    >>> en_face(img.pixels)                                  # uint8 [D', W] mean projection along depth
    >>> r = run_volume_model(load_model("oct_volume_fusion3d_tiny"), img.pixels, {"age": 71, "sex": "F"}, "OD")
    >>> r.p_disease, r.maps.shape                            # P(disease), float32 [D, H, W] per-slice heatmaps
    >>> per_slice_2d(load_model("oct_resnet18"), img.pixels) # a B-scan model on every slice (no 3D model needed)

Slice i of the volume is B-scan i (D slices, each H deep and W wide).
"""
from __future__ import annotations

import functools

from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np

from .modality import Modality
from .models.loading import as_model

META_FIELDS = {   # numeric metadata inputs of the 3D model (sex and eye are choices): field -> (label, unit, min, max)
    "age": ("Age", "years", 18.0, 100.0),
    "va_logmar": ("Visual acuity", "logMAR", -0.3, 2.0),
    "cst_um": ("Central subfield thickness", "um", 150.0, 800.0),
    "hba1c": ("HbA1c", "%", 4.0, 14.0),
}


def slice_rgb(vol: np.ndarray, i: int) -> np.ndarray:
    """B-scan i of a float32 [D, H, W] volume in [0, 1] as uint8 [H, W, 3]."""
    s = np.clip(np.rint(vol[int(i)] * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(s[..., None], 3, axis=2)


def en_face(vol: np.ndarray, out_height: int | None = None) -> np.ndarray:
    """En-face projection: mean intensity along depth, contrast-stretched, uint8 [D', W]; rows = slices.

    out_height: rows of the picture (default: W, so a square scan looks square); rows are interpolated."""
    proj = vol.mean(axis=1).astype(np.float32)                       # [D, W]
    lo, hi = np.percentile(proj, [1, 99])
    proj = np.clip((proj - lo) / max(hi - lo, 1e-6), 0, 1)
    d, w = proj.shape
    h = int(out_height or w)
    if h != d:
        proj = cv2.resize(proj, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.rint(proj * 255).astype(np.uint8)


def en_face_rows(n_slices: int, out_height: int) -> np.ndarray:
    """Row in the en-face picture at the centre of each slice (to mark the current B-scan)."""
    return ((np.arange(n_slices) + 0.5) * out_height / n_slices).astype(int)


def map_en_face(maps: np.ndarray, out_height: int | None = None) -> np.ndarray:
    """Per-slice heatmaps float32 [D, H, W] -> their en-face maximum projection float32 [D', W] in [0, 1]."""
    proj = maps.max(axis=1).astype(np.float32)
    d, w = proj.shape
    h = int(out_height or w)
    if h != d:
        proj = cv2.resize(proj, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(proj / max(float(proj.max()), 1e-7), 0, 1).astype(np.float32)


@dataclass
class VolumeResult:
    """The 3D model on one volume. maps: float32 [D, H, W] in [0, 1] at the volume's size (3D Grad-CAM)."""

    model: str
    weights_sha256: str
    p_disease: float                     # calibrated: sigmoid(logit / T)
    label: str                           # "normal" | "disease"
    metadata_used: dict                  # field -> value given (None = missing, the training mean is used)
    maps: np.ndarray = field(repr=False)
    referable: bool = False


def run_volume_model(model, vol: np.ndarray, meta: dict, eye: str | None = None) -> VolumeResult:
    """P(disease) and per-slice 3D Grad-CAM maps of `oct_volume_fusion3d*` for a float32 [D, H, W] volume, from one
    forward (`VolumeModel.preprocess`, then the single-pass Grad-CAM that also gives the logit).

    meta: {age, sex ("M"/"F"), va_logmar, cst_um, hba1c}; a missing value (None) becomes the training mean."""
    import torch

    from .explain.volume_methods import resize_volume, volume_cam

    model = as_model(model)
    cfg = model.cfg
    x, mt = model.preprocess(vol, meta, eye)
    logits, maps = volume_cam(model.net, x, mt, cfg.target_layer or "net.layer4")
    p = float(torch.sigmoid(logits.float()[0, 0] / model.temperature))
    label = cfg.classes[1] if p >= 0.5 else cfg.classes[0]
    features = getattr(model.net, "meta_features", None)
    used = {f: (meta.get(f) if f != "eye" else eye) for f in (features or ())}
    return VolumeResult(model=model.name, weights_sha256=model.sha256, p_disease=p, label=label,
                        metadata_used=used, maps=resize_volume(maps[0], vol.shape),
                        referable=label in cfg.referable)


def per_slice_2d(model, vol: np.ndarray, batch_size: int = 8, progress: Callable[[float], None] | None = None,
                 run: Callable[[Callable], object] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A B-scan model on every slice: (maps float32 [D, H, W] in [0, 1] (Grad-CAM of each slice's predicted
    class), calibrated probabilities float32 [D, K]). progress(fraction done) is called after each batch.
    run(job): how each batch's forward and Grad-CAM is run (default: here); the app passes the server's inference
    service, so the batches queue with every other session's work and progress still shows between them."""
    from .explain.attribution import explain_batch

    d = vol.shape[0]
    maps, probs = [], []
    for i in range(0, d, batch_size):
        batch = np.stack([slice_rgb(vol, j) for j in range(i, min(d, i + batch_size))])
        job = functools.partial(explain_batch, model, batch, "gradcam")
        m, p, _ = run(job) if run is not None else job()
        maps.append(m)
        probs.append(p)
        if progress:
            progress(min(1.0, (i + len(batch)) / d))
    return np.concatenate(maps).astype(np.float32), np.concatenate(probs).astype(np.float32)


def phantom_volume(label: str = "disease", seed: int = 7, n_slices: int = 32, size: int = 128):
    """A bundled sample volume (synthetic phantom) and its non-identifying metadata (age, sex, eye, VA, CST, HbA1c)."""
    from .phantoms import oct_volume

    ph = oct_volume(label, seed=seed, n_slices=n_slices, height=size, width=size)
    meta = {k: ph.meta.get(k) for k in ("age", "sex", "va_logmar", "cst_um", "hba1c")}
    return ph.image, meta, ph.meta.get("eye"), ph.meta.get("oct_class")


def volume_reading(model, image, result: VolumeResult, maps: np.ndarray, method: str, quality,
                   eye: str | None = None):
    """The 3D model's result on `image` (a decoded volume) as one reading the worklist can keep: the volume's
    en-face projection as the picture, the heatmap's en-face maximum projection over it, and the calibrated
    P(normal) / P(disease). Returns (RetinalImage of the picture, Analysis). The clinical values given to the
    model are not part of it (they are used for the result only and stored nowhere); the B-scans are not kept."""
    from .analysis import Analysis, suggestion_for
    from .io.decode import RetinalImage

    picture = np.repeat(en_face(image.pixels)[..., None], 3, axis=2)
    heatmap = map_en_face(maps, picture.shape[0])
    classes = list(model.cfg.classes)
    probabilities = {classes[0]: 1.0 - result.p_disease, classes[1]: result.p_disease}
    referable, suggestion = suggestion_for(result.label, model)
    d = image.pixels.shape[0]
    img = RetinalImage(pixels=picture, kind="image", source_format=image.source_format,
                       content_hash=image.content_hash, grayscale=True, laterality=eye or image.laterality,
                       meta={"width": picture.shape[1], "height": picture.shape[0], "frames": d,
                             "picture": "en-face projection of an OCT volume"})
    notes = [f"OCT volume of {d} B-scans, kept as its en-face projection (mean along depth); the heatmap is the "
             f"strongest 3-D {method} value along depth."]
    return img, Analysis(Modality.OCT_VOLUME, quality, probabilities, result.label, heatmap, model.name, model.sha256,
                         method, classes[1], referable, suggestion, image.content_hash, eye or image.laterality,
                         picture, notes, model.trained_on)
