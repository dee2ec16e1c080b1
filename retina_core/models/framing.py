"""How a fundus photograph is framed before a model sees it: the field of view, centred and letterboxed.

Cameras frame the same retina differently: IDRiD's 4288x2848 frames cut the circular field at top and bottom, the
4-class set's square crops fill the frame, the Mexico clinic's photographs leave wide black margins. Stretching each
frame to the model's square input squeezes some retinas into ovals and leaves others round, so a model can learn
the camera instead of the eye (measured: the 4-class model's P(DR) on IDRiD photographs was 0.005 squeezed and
0.93-1.00 letterboxed). With `framing="fov"` every fundus image is cut to a box of the input's aspect around the
bright field of view, padded with black where the box leaves the frame, then resized: a round field stays round
and fills the input the same way whatever the camera. Only the round field inscribed in the box is kept: a camera
that crops the retina to a square and one that leaves black corners then look alike.

    box = fov_box(pixels, (224, 224))              # FieldBox(x0, y0, w, h) in image pixels, may leave the frame
    x = frame_tensor(t, box, (224, 224))           # [C, H, W] float -> [C, 224, 224], black outside the frame
    hm = map_to_image(cam, box, pixels.shape[:2])  # a model-space map back onto the photograph

With `framing="disc"` the box is instead a square of DISC_VIEW_RADII disc radii around the optic disc that
`landmarks.locate_fovea_and_disc` finds: the disc, its cup and rim and the peripapillary retina at several times
the resolution they have in a whole-field input of the same size (glaucoma is judged there). The heatmap goes back
onto the photograph through the same box.

    box = frame_box(pixels, (128, 128), "disc")      # the box a cfg's framing asks for

Training (`train.engine.CachedImages`), inference (`models.loading.preprocess_image`), batch screening and heatmaps
(`explain.attribution.explain_batch`) use these functions, so the geometry a model was trained with is the one it
is served with. The manifest records each model's framing; weights without it were trained stretched.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..landmarks import locate_fovea_and_disc
from ..modality import Modality

FRAMINGS = ("stretch", "fov", "fov_contrast", "disc")
DISC_VIEW_RADII = 6.0   # the disc view's side, in disc radii: 3 disc diameters, disc and peripapillary retina
_LEVEL = 20          # uint8: brighter than this (any channel) is inside the field; camera black is 0-15
_MIN_SHARE = 0.02    # a row or column belongs to the field when this share of it is bright (burnt-in text is not)


@dataclass(frozen=True)
class FieldBox:
    """A box in image pixel coordinates (x0, y0 its top-left corner; it may extend past the frame)."""

    x0: float
    y0: float
    w: float
    h: float


def uses_fov(cfg) -> bool:
    """Whether images for this cfg are framed (cut to a box: around the field of view, or the optic disc) rather
    than stretched (fundus models trained that way)."""
    return getattr(cfg, "framing", "stretch") in ("fov", "fov_contrast", "disc") \
        and getattr(cfg, "modality", None) == Modality.FUNDUS


def uses_contrast(cfg) -> bool:
    """Whether framed images are also contrast-normalised (`local_contrast`; framing "fov_contrast")."""
    return getattr(cfg, "framing", "stretch") == "fov_contrast" and getattr(cfg, "modality", None) == Modality.FUNDUS


def local_contrast(x: torch.Tensor) -> torch.Tensor:
    """Local contrast normalisation of framed fundus images (B. Graham's, from the 2015 Kaggle DR competition):
    4 * (x - gaussian_blur(x)) + 128 on 0-255 values, blur sigma = input height / 30, clipped to 0-255; the
    rim of the round field (outside 0.95 of its radius) is set to 128. What is left is what differs from its
    neighbourhood (vessels, lesions, the disc's edge); the camera's colour, exposure and vignetting go, which are
    the cues a model can read instead of the disease. `x`: float [C, H, W] or [B, C, H, W] on 0-255."""
    from torchvision.transforms.functional import gaussian_blur

    h, w = x.shape[-2:]
    sigma = h / 30.0
    k = 2 * int(3 * sigma) + 1
    out = (4.0 * (x - gaussian_blur(x, [k, k], [sigma, sigma])) + 128.0).clamp(0.0, 255.0)
    yy = (torch.arange(h, device=x.device, dtype=torch.float32) + 0.5) / h * 2 - 1
    xx = (torch.arange(w, device=x.device, dtype=torch.float32) + 0.5) / w * 2 - 1
    inside = ((yy[:, None] ** 2 + xx[None, :] ** 2) <= 0.95 ** 2).to(out.dtype)
    return out * inside + 128.0 * (1.0 - inside)


def fov_box(pixels: np.ndarray, out_hw: tuple[int, int]) -> FieldBox:
    """The box of aspect out_hw (h, w) centred on the bright field of view of a uint8 [H, W, 3] (or [H, W]) image,
    just large enough to hold it. A frame without a dark border (a crop that fills the frame, a phantom whose
    field reaches the edges) gives the whole frame, letterboxed to the aspect."""
    a = np.asarray(pixels)
    H, W = a.shape[:2]
    step = max(1, max(H, W) // 512)
    g = a[::step, ::step]
    if g.ndim == 3:   # the channels' maximum, element-wise (numpy's axis=2 reduction is several times slower)
        g = np.maximum(np.maximum(g[..., 0], g[..., 1]), g[..., 2]) if g.shape[2] == 3 else g.max(axis=2)
    bright = g > _LEVEL
    rows = np.flatnonzero(bright.mean(axis=1) > _MIN_SHARE)
    cols = np.flatnonzero(bright.mean(axis=0) > _MIN_SHARE)
    if rows.size == 0 or cols.size == 0:
        y0, y1, x0, x1 = 0.0, float(H), 0.0, float(W)
    else:
        y0, y1 = rows[0] * step, min(H, (rows[-1] + 1) * step)
        x0, x1 = cols[0] * step, min(W, (cols[-1] + 1) * step)
    oh, ow = out_hw
    bw, bh = float(x1 - x0), float(y1 - y0)
    w = max(bw, bh * ow / oh)
    h = w * oh / ow
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    return FieldBox(float(cx - w / 2.0), float(cy - h / 2.0), float(w), float(h))


def disc_box(pixels: np.ndarray, out_hw: tuple[int, int]) -> FieldBox:
    """The box of aspect out_hw (h, w) centred on the optic disc that `landmarks.locate_fovea_and_disc` finds,
    DISC_VIEW_RADII disc radii across its shorter side (padded with black where it leaves the frame)."""
    lm = locate_fovea_and_disc(pixels)
    (cx, cy), r = lm["disc_xy"], float(lm["disc_radius"])
    oh, ow = out_hw
    side = DISC_VIEW_RADII * r
    w, h = (side * ow / oh, side) if ow >= oh else (side, side * oh / ow)
    return FieldBox(float(cx - w / 2.0), float(cy - h / 2.0), float(w), float(h))


def frame_box(pixels: np.ndarray, out_hw: tuple[int, int], framing: str = "fov") -> FieldBox:
    """The box a framed model cuts from a photograph: around the optic disc (framing "disc") or the field of view
    (the other framings)."""
    return disc_box(pixels, out_hw) if framing == "disc" else fov_box(pixels, out_hw)


def frame_boxes(batch: np.ndarray, out_hw: tuple[int, int], framing: str = "fov") -> list[FieldBox]:
    return [frame_box(p, out_hw, framing) for p in batch]


def frame_tensor(x: torch.Tensor, box: FieldBox, out_hw: tuple[int, int], mode: str = "area",
                 round_mask: bool = True) -> torch.Tensor:
    """[C, H, W] float -> [C, h, w]: the part of `box` inside the frame resized onto its place in a black canvas.
    mode "area" (images: antialiased bilinear), "max" (masks: a lesion pixel anywhere in an output pixel's
    footprint marks it, so tiny lesions survive downsizing) or "nearest". Only the round field inscribed in the
    box is kept (`round_field`), for images and masks alike (round_mask False: the whole box, e.g. a stretched
    frame)."""
    C, H, W = x.shape
    oh, ow = out_hw
    sx, sy = ow / box.w, oh / box.h
    ix0, iy0 = max(0, int(np.floor(box.x0))), max(0, int(np.floor(box.y0)))
    ix1, iy1 = min(W, int(np.ceil(box.x0 + box.w))), min(H, int(np.ceil(box.y0 + box.h)))
    ox0, oy0 = max(0, int(round((ix0 - box.x0) * sx))), max(0, int(round((iy0 - box.y0) * sy)))
    ox1, oy1 = min(ow, int(round((ix1 - box.x0) * sx))), min(oh, int(round((iy1 - box.y0) * sy)))
    out = torch.zeros((C, oh, ow), dtype=x.dtype, device=x.device)
    if ix1 <= ix0 or iy1 <= iy0 or ox1 <= ox0 or oy1 <= oy0:
        return out
    part = x[None, :, iy0:iy1, ix0:ix1]
    size = (oy1 - oy0, ox1 - ox0)
    if tuple(part.shape[-2:]) != size:
        if mode == "max" and part.shape[-2] >= size[0] and part.shape[-1] >= size[1]:
            part = F.adaptive_max_pool2d(part, size)
        elif mode in ("max", "nearest"):
            part = F.interpolate(part, size=size, mode="nearest")
        else:
            part = F.interpolate(part, size=size, mode="bilinear", antialias=True, align_corners=False)
    out[:, oy0:oy1, ox0:ox1] = part[0]
    return out * round_field((oh, ow), x.device, out.dtype) if round_mask else out


def round_field(out_hw: tuple[int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """[h, w] 1 inside the ellipse inscribed in the canvas, 0 outside. Framed inputs keep only this round field:
    a camera that crops the field to a square (retina into the corners) and one that leaves a round field on black
    then give the same shape of input, so the field's outline cannot stand in for the camera."""
    oh, ow = out_hw
    yy = (torch.arange(oh, device=device, dtype=torch.float32) + 0.5) / oh * 2 - 1
    xx = (torch.arange(ow, device=device, dtype=torch.float32) + 0.5) / ow * 2 - 1
    return ((yy[:, None] ** 2 + xx[None, :] ** 2) <= 1.0).to(dtype)


def frame_pixels(pixels: np.ndarray, out_hw: tuple[int, int]) -> tuple[np.ndarray, FieldBox]:
    """uint8 [H, W, 3] -> (uint8 [h, w, 3] framed around the field of view, its box). For people and tests: the
    input a framed model sees, before normalisation."""
    box = fov_box(pixels, out_hw)
    t = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float()
    out = frame_tensor(t, box, out_hw).round().clamp(0, 255).to(torch.uint8)
    return out.permute(1, 2, 0).numpy(), box


def map_to_image(cam: np.ndarray, box: FieldBox, out_hw: tuple[int, int], round_mask: bool = True) -> np.ndarray:
    """A map over a framed input (any resolution [h, w], covering `box`) -> float32 [H, W] in [0, 1] on the
    image: min-max, bilinear, min-max (as `explain.cam.normalise_map`), zero where the model saw nothing: outside
    the box, and (round_mask, as `frame_tensor`) outside the round field inscribed in it, so a coarse map's
    bleed into the black the model was given is not drawn on the photograph's corners."""
    cam = np.maximum(np.asarray(cam, np.float32), 0)
    cam = cam - cam.min()
    cam = cam / (1e-7 + cam.max())
    h, w = cam.shape
    H, W = out_hw
    sx, sy = w / box.w, h / box.h
    # image pixel centre (x + 0.5) -> map coordinate u with pixel centres at u + 0.5
    M = np.array([[sx, 0.0, (0.5 - box.x0) * sx - 0.5], [0.0, sy, (0.5 - box.y0) * sy - 0.5]], np.float32)
    out = cv2.warpAffine(cam, M, (W, H), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REPLICATE)          # edges as cv2.resize treats them
    xs, ys = np.arange(W) + 0.5, np.arange(H) + 0.5
    out[(ys < box.y0) | (ys > box.y0 + box.h), :] = 0               # nothing outside the box the model saw
    out[:, (xs < box.x0) | (xs > box.x0 + box.w)] = 0
    if round_mask:
        ny = (ys - (box.y0 + box.h / 2)) / (box.h / 2)
        nx = (xs - (box.x0 + box.w / 2)) / (box.w / 2)
        out[(ny[:, None] ** 2 + nx[None, :] ** 2) > 1.0] = 0
    out = out - out.min()
    out = out / (1e-7 + out.max())
    return np.clip(out, 0.0, 1.0).astype(np.float32)
