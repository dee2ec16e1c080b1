"""Quality gate: which kind of scan is this (fundus / OCT / OCT volume / not retinal), and is it gradable?

Hand-crafted, documented features (no neural network), computed on a small working copy of the image:

Modality
- fundus: a roughly circular bright field on a dark border. The field is the largest bright component
  (Otsu threshold on the max channel, white export padding left out), grown into its dim parts; a circle (or an
  ellipse, for re-scaled photographs) is fitted (least squares) to the edge of its convex hull away from the image
  frame; `circle_iou` = IoU(hull, fitted disk clipped to the frame). The border outside the field must be dark and
  unsaturated (or, for a field filling the frame, the corner arcs fit the circle closely), and the field warm
  (blue lowest). Thresholds re-fitted on real photographs: docs/real_data.md.
- oct: greyscale; horizontal layered structure (vertical gradients dominate horizontal ones), a dark top
  (vitreous), and a bright band that spans the width and runs continuously from column to column.
- oct_volume: `img.kind == "volume"` (its middle B-scans are graded as OCT).
Gradability (sub-scores in [0, 1] from linear ramps between "bad" and "good" values; score = their minimum)
- fundus: focus (fine-to-coarse detail ratio of the green channel inside the field, at a fixed field diameter
  of 256 px, so it does not depend on resolution), illumination (mean brightness, saturated-green and black fractions
  over the fitted circle), field of view (share of the circle's central half inside the frame), contrast
  (coefficient of variation in the field).
- oct: signal strength (bright-band intensity and bright band vs background ratio, SNR-like), cut-off (inner retina
  touching the top edge, or the bright outer band on the bottom edge, in the central half of the width), contrast,
  focus (fine-to-coarse detail ratio).

    q = assess_quality(read_image("scan.png"))
    q.modality, q.gradable, q.verdict, q.reasons
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import ndimage as ndi

from retina_core.errors import RetinaInputError
from retina_core.io.decode import RetinalImage, looks_grey
from retina_core.modality import IMAGE_MODALITIES, Modality

log = logging.getLogger(__name__)

MODALITIES = (Modality.FUNDUS, Modality.OCT, Modality.OCT_VOLUME)
GRADABLE, UNGRADABLE, NOT_RETINAL = "gradable", "ungradable: retake or refer", "not a retinal image: no result"
DETECT_MIN = 0.5        # modality score needed to call an image retinal
GRADABLE_MIN = 0.5      # gradability score needed to give a result
WORK_SIDE = 256         # px: the working copy's size (fundus: field diameter; OCT: width)
# Classes whose finding is itself a hazy view of the retina: media opacity. A fundus photograph refused only for
# blur or low contrast (`hazy_only`) is still read by a model with one of these classes (analysis._plan).
MEDIA_OPACITY_CLASSES = ("cataract",)
HAZE_SUBSCORES = ("focus", "contrast")


@dataclass
class Quality:
    modality: str                          # a Modality (fundus, oct, oct_volume) or "not_retinal"
    modality_scores: dict[str, float]
    gradable: bool
    score: float                           # 0..1 gradability (0 when not retinal)
    reasons: list[str]                     # plain-language reasons, e.g. "image is blurred (focus 0.12 < 0.30)"
    verdict: str                           # "gradable" | "ungradable: retake or refer" | "not a retinal image: no result"
    features: dict[str, float] = field(default_factory=dict)   # the measured numbers, for reports and tuning


# --------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------

def assess_quality(img: RetinalImage, modality: str | None = None) -> Quality:
    """Detect the modality (or take the user's `modality` override) and grade the image's quality."""
    if modality is not None and modality not in MODALITIES:
        raise RetinaInputError(f"Unknown modality '{modality}'; choose one of {', '.join(MODALITIES)}.")
    refused = _header_refusal(img)  # what the file says comes before what the pixels look like
    if refused is not None:
        return refused
    if img.kind == "volume":
        return _assess_volume(img, modality)
    rgb = np.asarray(img.pixels)
    grey = bool(img.grayscale) or looks_grey(rgb)
    # a single-channel source is read as one channel (its three RGB channels are copies of it)
    work = _resize(rgb[..., 0] if img.grayscale and rgb.ndim == 3 else rgb, WORK_SIDE)
    # a greyscale image is not a colour fundus photograph (no red-dominant field: fundus score 0), so the
    # fundus features are only measured when the user or the DICOM header says "fundus"
    fundus_s, ff = (0.0, {"greyscale": 1.0}) if grey else fundus_score(work)
    g = _oct_grey(work)
    oct_s, of = oct_score(work, grey, g)
    scores = {Modality.FUNDUS: round(fundus_s, 4), Modality.OCT: round(oct_s, 4), Modality.OCT_VOLUME: 0.0}
    features = {**{f"fundus_{k}": v for k, v in ff.items()}, **{f"oct_{k}": v for k, v in of.items()}}
    reasons: list[str] = []
    chosen = modality
    if chosen is None and img.modality_hint in IMAGE_MODALITIES:
        chosen = img.modality_hint
        reasons.append(f"modality taken from the DICOM header ({chosen})")
    if chosen is None:
        best = max(IMAGE_MODALITIES, key=lambda m: scores[m])
        if scores[best] < DETECT_MIN:
            why = _not_retinal_reason(ff, of, grey)
            return Quality("not_retinal", scores, False, 0.0, [why], NOT_RETINAL, features)
        chosen = best
    elif modality is not None:
        reasons.append(f"modality set by the user ({modality})")
    if chosen == Modality.OCT_VOLUME:  # a single B-scan graded as part of a volume
        chosen = Modality.OCT
    if chosen == Modality.FUNDUS:
        if grey:
            ff = fundus_score(_resize(rgb, WORK_SIDE))[1]
        subs, why = fundus_gradability(rgb, ff)
    else:
        subs, why = oct_gradability(work, of, g)
    features = {**{f"fundus_{k}": v for k, v in ff.items()}, **{f"oct_{k}": v for k, v in of.items()}}
    return _finish(chosen, scores, subs, reasons + why, features)


def hazy_only(q: Quality) -> bool:
    """A fundus photograph refused only because it is blurred or of low contrast (its focus or contrast sub-score
    below GRADABLE_MIN, illumination and field of view fine): the look of media opacity such as cataract as much as
    of a poor capture. Retaking does not clear a cataract, so such a photograph is still read by models with a
    media-opacity class (`MEDIA_OPACITY_CLASSES`), which show only that reading (analysis._plan). In the 4-class set
    201 of the 211 cataract photographs the gate refuses are refused for these reasons alone (docs/real_data.md)."""
    if q.modality != Modality.FUNDUS or q.gradable:
        return False
    subs = {k[4:]: v for k, v in q.features.items() if k.startswith("sub_")}
    failing = {k for k, v in subs.items() if v < GRADABLE_MIN}
    return bool(failing) and failing <= set(HAZE_SUBSCORES)


def reads_media_opacity(model) -> bool:
    """Whether a model (a LoadedModel or its ModelCfg) has a media-opacity class (`MEDIA_OPACITY_CLASSES`): the
    models that read a `hazy_only` photograph (analysis._plan, batch.prepare)."""
    return any(c in MEDIA_OPACITY_CLASSES for c in getattr(model, "cfg", model).classes)


def _header_refusal(img: RetinalImage) -> Quality | None:
    """The "not a retinal image" verdict when the file's header names a non-ophthalmic modality (`meta["header"]`,
    recorded by the decoder: e.g. DICOM Modality US), for images and volumes alike, whatever the pixels or the
    user's modality override; None when the header is ophthalmic, silent or absent (the pixels decide)."""
    header = (img.meta or {}).get("header") or {}
    if header.get("ophthalmic") is not False:
        return None
    reason = header.get("reason") or f"the {header.get('format', 'file')} header names a non-ophthalmic modality"
    return Quality("not_retinal", {m: 0.0 for m in MODALITIES}, False, 0.0, [reason], NOT_RETINAL,
                   {"header_not_ophthalmic": 1.0})


def _finish(modality: str, scores: dict, subs: dict[str, float], reasons: list[str], features: dict) -> Quality:
    score = float(min(subs.values())) if subs else 0.0
    features.update({f"sub_{k}": round(v, 4) for k, v in subs.items()})
    gradable = score >= GRADABLE_MIN
    return Quality(modality, scores, gradable, round(score, 4), reasons, GRADABLE if gradable else UNGRADABLE,
                   features)


def _assess_volume(img: RetinalImage, modality: str | None) -> Quality:
    vol = np.asarray(img.pixels, dtype=np.float32)
    d = vol.shape[0]
    picks = sorted({d // 2, d // 4, (3 * d) // 4})  # middle B-scan (fovea) and two either side
    subs_all, reasons, feats = [], [], {}
    for i in picks:
        u8 = np.rint(np.clip(vol[i], 0, 1) * 255).astype(np.uint8)
        work = _resize(u8, WORK_SIDE)
        g = _oct_grey(work)
        _, of = oct_score(work, True, g)
        subs, why = oct_gradability(work, of, g)
        subs_all.append(subs)
        if i == d // 2:
            reasons, feats = why, {f"oct_{k}": v for k, v in of.items()}
    subs = {k: float(np.median([s[k] for s in subs_all])) for k in subs_all[0]}
    scores = {Modality.FUNDUS: 0.0, Modality.OCT: 0.0, Modality.OCT_VOLUME: 1.0}
    pre = [f"modality set by the user ({modality})"] if modality and modality != Modality.OCT_VOLUME else []
    return _finish(Modality.OCT_VOLUME, scores, subs, pre + reasons, feats)


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------

def _resize(rgb: np.ndarray, side: int) -> np.ndarray:
    """float32 [h, w, 3] (or [h, w] from a single channel) in [0, 1], the longest side = `side` (box filter: area
    average, no aliasing)."""
    from PIL import Image
    h, w = rgb.shape[:2]
    if max(h, w) <= side:  # never up-sample: interpolation would read as blur
        return np.asarray(rgb, dtype=np.float32) / 255.0
    s = side / max(h, w)
    size = (max(8, int(round(w * s))), max(8, int(round(h * s))))
    im = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    return np.asarray(im.resize(size, Image.BOX), dtype=np.float32) / 255.0


def _ramp(x: float, bad: float, good: float) -> float:
    """0 at `bad`, 1 at `good`, linear between (works for either direction)."""
    if good == bad:
        return float(x >= good)
    return float(np.clip((x - bad) / (good - bad), 0.0, 1.0))


def _otsu(values: np.ndarray) -> float:
    # np.histogram(values, bins=128, range=(0, 1)) for values in [0, 1], without its generic bookkeeping
    v = np.ravel(values)
    hist = np.bincount(np.minimum((v * 128).astype(np.int64), 127), minlength=128).astype(np.float64)
    edges = np.linspace(0.0, 1.0, 129)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between))])


def _gauss(g: np.ndarray, sigma: float) -> np.ndarray:
    """`scipy.ndimage.gaussian_filter(g, sigma)` of a 2-D float32 image (mode "reflect", truncate 4) through
    OpenCV, five times faster; equal to it within 1e-6 (tests/test_quality.py)."""
    r = int(4.0 * sigma + 0.5)
    return cv2.GaussianBlur(np.asarray(g, dtype=np.float32), (2 * r + 1, 2 * r + 1), sigma,
                            borderType=cv2.BORDER_REFLECT)


_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


def _erode(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """`scipy.ndimage.binary_erosion(mask, iterations=...)` (cross structure, outside = False) through OpenCV,
    ten times faster and equal to it (tests/test_quality.py)."""
    return cv2.erode(mask.astype(np.uint8), _CROSS, iterations=iterations, borderType=cv2.BORDER_CONSTANT,
                     borderValue=0) > 0


def _dilate(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """`scipy.ndimage.binary_dilation(mask, iterations=...)`, the same way."""
    return cv2.dilate(mask.astype(np.uint8), _CROSS, iterations=iterations, borderType=cv2.BORDER_CONSTANT,
                      borderValue=0) > 0


def _channels(work: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """max, min and mean over the colour channels of [h, w, 3] (numpy's axis=2 reductions over three values are
    several times slower than element-wise maxima and sums; the results are the same)."""
    r, g, b = work[..., 0], work[..., 1], work[..., 2]
    return np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b), (r + g + b) / np.float32(3)


def _detail_ratio(g: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Fine (sigma 0.5-1.5 px) over coarse (1.5-4 px) band-pass energy: low when the image is blurred."""
    b1, b2, b3 = (_gauss(g, s) for s in (0.5, 1.5, 4.0))
    fine, coarse = (b1 - b2) ** 2, (b2 - b3) ** 2
    if mask is not None:
        fine, coarse = fine[mask], coarse[mask]
    return float(np.sqrt(fine.mean() / (coarse.mean() + 1e-12))) if fine.size else 0.0


# --------------------------------------------------------------------------------------------------------------
# Fundus
# --------------------------------------------------------------------------------------------------------------

def _white_padding(vmin: np.ndarray) -> np.ndarray:
    """Near-white, unsaturated areas touching the image frame (min channel >= 0.96), with their 2 px anti-aliased
    seam: export padding around a re-warped photograph (seen in the 4-class set), not part of the scene."""
    white = vmin >= 0.96
    if white.mean() < 0.002:
        return np.zeros_like(white)
    labels, _ = ndi.label(white)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    border = border[border > 0]
    return _dilate(np.isin(labels, border), 2) if border.size else np.zeros_like(white)


def _corner_level(vmax: np.ndarray, pad: np.ndarray) -> tuple[float, float]:
    """Median and median absolute deviation of the max channel in the four corner squares (6% of the short side),
    padding left out: the camera's black surround in a fundus photograph. (1, 0) when the corners are all padding."""
    k = max(3, int(0.06 * min(vmax.shape)))
    c = np.concatenate([v[~q] for v, q in ((vmax[a, b], pad[a, b]) for a in (slice(0, k), slice(-k, None))
                                            for b in (slice(0, k), slice(-k, None)))])
    if c.size == 0:
        return 1.0, 0.0
    level = float(np.median(c))
    return level, float(np.median(np.abs(c - level)))


def _field_mask(work: np.ndarray, grow: bool = False) -> tuple[np.ndarray, float]:
    """The camera's field of view: the largest bright component of the max channel (Otsu threshold / 2, white
    padding left out), hole-filled; with `grow`, first grown by hysteresis into its dim parts down to just above
    the black surround.

    The growth matters on real photographs: a dark macula, a shadowed side or a small-pupil crescent is part of the
    field though darker than the Otsu threshold; without it the field looked bitten and was not a circle (the Mexico
    set's dark photographs were called "not retinal"). The low threshold is the corners' level + max(0.014, 3 MAD)
    (a black surround carries a few grey levels of JPEG or PNG noise), never above the first one, so a photograph
    without a dark surround does not grow.
    """
    vmax, vmin, _ = _channels(work)
    pad = _white_padding(vmin)
    t = float(np.clip(_otsu(vmax[~pad]) * 0.5 if (~pad).any() else 0.5, 0.015, 0.15))
    core = _dilate(_erode((vmax > t) & ~pad, 2), 2)   # binary opening
    labels, n = ndi.label(core)
    if n == 0:
        return np.zeros_like(core), t
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    mask = labels == (int(np.argmax(sizes)) + 1)
    if grow:
        level, mad = _corner_level(vmax, pad)
        t_low = min(t, level + max(0.014, 3.0 * mad))
        grown, _ = ndi.label(mask | _dilate(_erode((vmax > t_low) & ~pad, 1), 1))
        ids = np.unique(grown[mask])
        mask = np.isin(grown, ids[ids > 0])
    # holes filled: everything but the background connected to the image frame (= ndi.binary_fill_holes)
    back, _ = ndi.label(~mask)
    frame = np.unique(np.concatenate([back[0], back[-1], back[:, 0], back[:, -1]]))
    return ~np.isin(back, frame[frame > 0]), t


def _convex_hull(mask: np.ndarray) -> np.ndarray:
    """The filled convex hull of a mask: the camera's field is convex, so a dark notch reaching in from the edge
    (a shadow, a small pupil) does not bend the fitted outline."""
    # the hull of a mask is the hull of each row's first and last pixel (every other pixel lies between them):
    # two points a row instead of every pixel of the field
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return mask
    sub = mask[rows]
    first = sub.argmax(axis=1)
    last = mask.shape[1] - 1 - sub[:, ::-1].argmax(axis=1)
    pts = np.concatenate([np.stack([first, rows], 1), np.stack([last, rows], 1)]).astype(np.int32)[:, None]
    out = np.zeros(mask.shape, np.uint8)
    cv2.fillConvexPoly(out, cv2.convexHull(pts), 1)
    return out > 0

def _fit_circle(mask: np.ndarray) -> tuple[float, float, float] | None:
    """Least-squares (Kasa) circle through the field's edge, ignoring edge pixels on the image frame."""
    edge = mask & ~_erode(mask)
    edge[:2, :] = edge[-2:, :] = False
    edge[:, :2] = edge[:, -2:] = False
    ys, xs = np.nonzero(edge)
    if xs.size < 20:
        return None
    a = np.column_stack([xs, ys, np.ones_like(xs)]).astype(np.float64)
    b = -(xs.astype(np.float64) ** 2 + ys.astype(np.float64) ** 2)
    (d, e, f), *_ = np.linalg.lstsq(a, b, rcond=None)
    cx, cy = -d / 2, -e / 2
    r2 = cx * cx + cy * cy - f
    if not np.isfinite(r2) or r2 <= 0:
        return None
    return float(cx), float(cy), float(np.sqrt(r2))


def _fit_ellipse(mask: np.ndarray, refits: int = 2) -> tuple[float, float, float, float] | None:
    """Least-squares axis-aligned ellipse (cx, cy, rx, ry) through the field's edge off the image frame, refitted
    twice on the edge points within 5% of it (so straight hull chords and notches drop out). Some public sets were
    resized to a square from a wide photograph, which turns the circular field into an ellipse."""
    edge = mask & ~_erode(mask)
    edge[:2, :] = edge[-2:, :] = False
    edge[:, :2] = edge[:, -2:] = False
    ys, xs = (v.astype(np.float64) for v in np.nonzero(edge))
    keep, fit = np.ones(xs.size, bool), None
    for _ in range(refits + 1):
        if keep.sum() < 20:
            break
        x, y = xs[keep], ys[keep]
        (a, d, e, f), *_ = np.linalg.lstsq(np.column_stack([y * y, x, y, np.ones_like(x)]), -(x * x), rcond=None)
        if not np.isfinite(a) or a <= 0:
            break
        cx, cy = -d / 2, -e / (2 * a)
        rx2 = cx * cx + a * cy * cy - f
        if not np.isfinite(rx2) or rx2 <= 0:
            break
        rx, ry = float(np.sqrt(rx2)), float(np.sqrt(rx2 / a))
        fit = (float(cx), float(cy), rx, ry)
        keep = np.abs(np.sqrt(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2) - 1) < 0.05
    return fit


def fundus_score(work: np.ndarray) -> tuple[float, dict[str, float]]:
    """Fundus likelihood in [0, 1] and its features, from a float [h, w, 3] working copy in [0, 1].

    Four sub-scores, combined as their geometric mean: the field's outline (its convex hull) fits a circle, or an
    ellipse of aspect >= 0.3 (re-scaled photographs); the surround is dark and unsaturated (white export padding
    left out), or, where the field fills the frame and only corner arcs show, the arcs fit the circle closely
    (glowing corners: flash reflex); the field is warm (blue lowest: max(R, G) > B), or, under a bluish cast,
    its brightest part (optic disc) is; the field is at least a third of the image.
    Thresholds re-fitted on real photographs (docs/real_data.md, "Quality and modality gate on real images").
    """
    h, w = work.shape[:2]
    field, thr = _field_mask(work, grow=True)
    feats: dict[str, float] = {"threshold": thr, "fov_fraction": float(field.mean())}
    mask = _convex_hull(field) if field.any() else field
    ellipse = _fit_ellipse(mask) if mask.any() else None
    if ellipse is None:
        feats.update(circle_iou=0.0, circle_visible=0.0, border_fraction=float(1 - mask.mean()))
        return 0.0, feats
    yy, xx = np.mgrid[0:h, 0:w]

    def overlap(cx: float, cy: float, rx: float, ry: float) -> tuple[float, np.ndarray]:
        disk = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        return float((disk & mask).sum() / max((disk | mask).sum(), 1)), disk

    iou, disk = overlap(*ellipse)
    circle = _fit_circle(mask)
    if circle is not None:  # a camera's field is a circle: prefer it unless the ellipse fits clearly better
        c_iou, c_disk = overlap(circle[0], circle[1], circle[2], circle[2])
        if c_iou >= iou - 0.01:
            ellipse, iou, disk = (circle[0], circle[1], circle[2], circle[2]), c_iou, c_disk
    cx, cy, rx, ry = ellipse
    visible = float(disk.sum() / (np.pi * rx * ry))  # share of the fitted circle inside the frame
    # share of its central part (half the radius: macula, disc, arcades) inside the frame: a photograph whose
    # field is cropped by the frame top and bottom (common, e.g. 4:3 sensors) still shows all of it
    central = ((xx - cx) / (0.5 * rx)) ** 2 + ((yy - cy) / (0.5 * ry)) ** 2 <= 1
    central_visible = float(min(1.0, central.sum() / (np.pi * 0.25 * rx * ry)))
    aspect = min(rx, ry) / max(rx, ry)
    vmax, vmin, _ = _channels(work)
    pad = _white_padding(vmin)
    outside = ~mask & ~pad
    border_fraction = float((~mask).mean())
    # judge the border away from the field's edge: blur or vignetting spreads the field's light a few px out
    far = ~_dilate(mask, max(2, int(0.04 * max(h, w)))) & ~pad
    outside = far if far.sum() > 0.25 * outside.sum() else outside
    border_dark = float(np.percentile(vmax[outside], 90)) if outside.any() else 1.0
    sat = (vmax - vmin) / np.maximum(vmax, 1e-3)
    # saturation is meaningless for near-black noise: judge only border pixels that carry some light
    lit = outside & (vmax > 0.1)
    border_sat = float(np.median(sat[lit])) if lit.sum() > max(20, 0.05 * outside.sum()) else 0.0
    inside = work[mask]
    m_r, m_g, m_b = (float(v) for v in inside.mean(axis=0))
    warmth = (max(m_r, m_g) - m_b) / max(m_r, m_g, 1e-3)
    lum = inside.mean(axis=1)
    t_r, t_g, t_b = (float(v) for v in inside[lum >= np.percentile(lum, 97)].mean(axis=0))
    warmth_bright = (max(t_r, t_g) - t_b) / max(t_r, t_g, 1e-3)
    radius = max(rx, ry)
    feats.update(circle_iou=iou, circle_visible=visible, central_visible=central_visible,
                 field_cx=float(cx / w), field_cy=float(cy / h), field_rx=float(rx / w), field_ry=float(ry / h),
                 radius_fraction=float(2 * radius / max(h, w)),
                 aspect=aspect, border_fraction=border_fraction, border_dark=border_dark, border_saturation=border_sat,
                 mean_r=m_r, mean_g=m_g, mean_b=m_b, redness=(m_r - m_g) / max(m_r, 1e-3), warmth=warmth,
                 warmth_bright=warmth_bright)
    s_circle = _ramp(iou, 0.80, 0.93) * _ramp(aspect, 0.2, 0.3)
    s_border = _ramp(border_dark, 0.20, 0.08) * _ramp(border_fraction, 0.004, 0.012) * _ramp(border_sat, 0.8, 0.5)
    s_halo = _ramp(iou, 0.95, 0.97) * _ramp(border_fraction, 0.10, 0.08) * _ramp(border_fraction, 0.004, 0.012)
    s_border = max(s_border, s_halo)
    s_red = max(_ramp(warmth, 0.03, 0.10), _ramp(warmth, -0.05, 0.0) * _ramp(warmth_bright, 0.10, 0.20))
    s_size = _ramp(2 * radius / max(h, w), 0.3, 0.5)
    score = (s_circle * s_border * s_red * s_size) ** 0.25
    feats.update(s_circle=s_circle, s_border=s_border, s_red=s_red, s_size=s_size)
    return float(score), feats

def _fitted_field(work: np.ndarray, ff: dict[str, float]) -> np.ndarray:
    """The field of view to grade: the circle (ellipse) fitted by `fundus_score`, shrunk to 97% to keep its rim
    out, clipped to the frame; its dark parts count (a shadowed half is part of the photograph). Without a fit
    (a modality override), the thresholded field grown into its dim parts."""
    if "field_rx" not in ff:
        return _field_mask(work, grow=True)[0]
    h, w = work.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    rx, ry = 0.97 * ff["field_rx"] * w, 0.97 * ff["field_ry"] * h
    return ((xx - ff["field_cx"] * w) / rx) ** 2 + ((yy - ff["field_cy"] * h) / ry) ** 2 <= 1


def fundus_gradability(rgb: np.ndarray, ff: dict[str, float]) -> tuple[dict[str, float], list[str]]:
    """Sub-scores (focus, illumination, field, contrast) and plain-language reasons for the failing ones.

    Thresholds re-fitted on real photographs (the patient-level "fit" half of the Mexico and 4-class sets, judged
    by eye after a brightness stretch, as a grader adjusts the display; docs/real_data.md): dark photographs whose
    vessels and lesions show once brightened are gradable (the 0.5 point of "too dark" moved from a mean brightness
    of 0.15 to 0.05), and slightly soft or low-contrast ones with visible vessels too (focus 0.44 -> 0.29,
    contrast 0.07 -> 0.05); dense haze stays out. The posterior pole must be in the image, the circle's rim need not.
    """
    # Re-sample so that the field diameter is WORK_SIDE px: focus is judged at a fixed anatomical scale.
    diam_frac = ff.get("radius_fraction", 1.0) or 1.0
    side = int(np.clip(WORK_SIDE / max(min(diam_frac, 1.0), 0.3), WORK_SIDE, 3 * WORK_SIDE))
    work = _resize(rgb, min(side, max(rgb.shape[:2])))
    # brightness is judged over the fitted circle (a shadowed half is part of the photograph and of its
    # darkness); focus and contrast over the lit field, where their thresholds were fitted
    circle = _fitted_field(work, ff)
    mask, _ = _field_mask(work, grow=True)
    reasons: list[str] = []
    if mask.sum() < 100:
        return {"field": 0.0}, ["no bright field of view found"]
    circle = circle if circle.sum() >= 100 else mask
    core = _erode(mask, max(2, int(0.03 * max(work.shape[:2]))))
    core = core if core.sum() > 50 else mask
    g = work[..., 1]
    lum = _channels(work)[2]
    inside = lum[circle]
    mean_lum = float(inside.mean())
    clipped = float((g[circle] >= 0.98).mean())  # green: red clips in normal photographs, green almost never
    dark = float((inside < 0.04).mean())
    g_in = g[core]
    gn = g / max(float(g_in.mean()), 1e-3)  # brightness-normalised: focus must not depend on exposure
    focus = _detail_ratio(gn, core)
    contrast = float(g_in.std() / max(g_in.mean(), 1e-3))
    visible = float(ff.get("circle_visible", 0.0))
    central = float(ff.get("central_visible", visible))
    subs = {
        "focus": _ramp(focus, 0.24, 0.34),
        "illumination": min(_ramp(mean_lum, 0.035, 0.06), _ramp(clipped, 0.30, 0.10), _ramp(dark, 0.75, 0.55)),
        # the posterior pole must be in the image; the rim of the circle may be cropped by the frame
        "field": min(_ramp(central, 0.70, 0.90), _ramp(visible, 0.25, 0.40)),
        "contrast": _ramp(contrast, 0.035, 0.065),
    }
    if subs["focus"] < 0.5:
        reasons.append(f"image is blurred (focus score {focus:.2f} < 0.29)")
    if _ramp(mean_lum, 0.035, 0.06) < 0.5:
        reasons.append(f"image is too dark (mean brightness {mean_lum:.3f} < 0.048)")
    if _ramp(clipped, 0.30, 0.10) < 0.5:
        reasons.append(f"image is over-exposed ({100 * clipped:.0f}% of the field is saturated)")
    if _ramp(dark, 0.75, 0.55) < 0.5:
        reasons.append(f"uneven illumination ({100 * dark:.0f}% of the field is black)")
    if subs["field"] < 0.5:
        reasons.append(f"field of view is cut off (only {100 * central:.0f}% of the central field and "
                       f"{100 * visible:.0f}% of the circular field are in the image)")
    if subs["contrast"] < 0.5:
        reasons.append(f"very low contrast (variation {contrast:.3f} < 0.05): haze, media opacity or wrong exposure")
    for k, v in (("focus", focus), ("mean_brightness", mean_lum), ("clipped", clipped), ("dark", dark),
                 ("contrast", contrast), ("field_visible", visible), ("central_visible", central)):
        ff[k] = float(v)
    return subs, reasons


# --------------------------------------------------------------------------------------------------------------
# OCT
# --------------------------------------------------------------------------------------------------------------

def _oct_grey(work: np.ndarray) -> np.ndarray:
    """Grey B-scan with registration padding removed: saturated white areas touching the border (common in
    Kermany/Spectralis exports, where the flattened scan is padded with white) are set to the background level."""
    g = work if work.ndim == 2 else (work[..., 0] + work[..., 1] + work[..., 2]) / np.float32(3)
    white = g >= 0.995
    if white.mean() < 0.002:
        return g
    labels, n = ndi.label(white)
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))) - {0}
    if not border:
        return g
    pad = np.isin(labels, list(border))
    g = g.copy()
    g[pad] = float(np.percentile(g[~pad], 10)) if (~pad).any() else 0.0
    return g


def oct_score(work: np.ndarray, grey: bool, g: np.ndarray | None = None) -> tuple[float, dict[str, float]]:
    """OCT B-scan likelihood in [0, 1] and its features (g: `_oct_grey(work)` when already computed)."""
    g = _oct_grey(work) if g is None else g
    # colour relative to brightness: a dark colour photograph carries little absolute colour, a grey scan none
    # (absolute colour let dark fundus photographs score as OCT)
    chroma = float(np.abs(work - g[..., None]).mean() / max(float(g.mean()), 1e-3)) if work.ndim == 3 else 0.0
    s_grey = 1.0 if grey else _ramp(chroma, 0.08, 0.03)
    if s_grey == 0.0:   # a colour image: the score is 0 whatever the layers look like
        return 0.0, {"chroma": chroma, "grey": float(grey), "s_grey": s_grey}
    h, w = g.shape
    sm = _gauss(g, 2.0)
    gy, gx = np.abs(np.diff(sm, axis=0)).mean(), np.abs(np.diff(sm, axis=1)).mean()
    anisotropy = float(gy / (gx + 1e-6))
    # the brightest row of each column (block of 4 columns): present everywhere and continuous
    cols = sm[:, : (w // 4) * 4].reshape(h, -1, 4).mean(axis=2)
    peak_rows = cols.argmax(axis=0).astype(np.float64)
    peak_vals = cols.max(axis=0)
    # dark vitreous above the retina, judged column by column (top tenth of the rows against the column's peak):
    # a quarter of the columns suffices, since a tilted, curved or thick retina reaches the top at the sides
    lo = float(np.percentile(sm, 5))
    top = cols[: max(2, h // 10)].mean(axis=0)
    dark_top = float(np.percentile((top - lo) / (peak_vals - lo + 1e-6), 25))
    bg = float(np.percentile(sm, 20))
    span = float((peak_vals > bg + 0.5 * (peak_vals.max() - bg)).mean()) if peak_vals.size else 0.0
    jumps = float(np.median(np.abs(np.diff(peak_rows))) / h) if peak_rows.size > 1 else 1.0
    feats = {"anisotropy": anisotropy, "dark_top": dark_top, "band_span": span, "band_jumps": jumps,
             "chroma": chroma, "grey": float(grey)}
    s_aniso = _ramp(anisotropy, 1.2, 1.8)
    s_top = _ramp(dark_top, 0.45, 0.2)
    s_band = _ramp(span, 0.5, 0.8) * _ramp(jumps, 0.06, 0.02)
    score = (s_grey * s_aniso * s_top * s_band) ** 0.25
    feats.update(s_grey=s_grey, s_aniso=s_aniso, s_top=s_top, s_band=s_band)
    return float(score), feats


def oct_gradability(work: np.ndarray, of: dict[str, float], g: np.ndarray | None = None
                    ) -> tuple[dict[str, float], list[str]]:
    """Sub-scores (signal, cut-off, contrast, focus) and reasons for an OCT B-scan working copy."""
    g = _oct_grey(work) if g is None else g
    h = g.shape[0]
    sm = _gauss(g, 1.0)
    p5, p50, p95, p99 = (float(v) for v in np.percentile(sm, [5, 50, 95, 99]))
    profile = ndi.gaussian_filter1d(sm.mean(axis=1), 2.0)
    # Cut-off is judged where a grader reads the scan, the central half of the width (fovea): the inner retina
    # touches the top edge (top rows above the dark level + 0.25 of the column's peak), or the bright outer band
    # (RPE) lies on the bottom edge, in most central columns. The choroid reaching the bottom and a curved
    # periphery touching the top are normal (the Mexico set has many); whole-width row means called them "cut off".
    w = g.shape[1]
    edge = max(2, int(0.03 * h))
    sm2 = _gauss(g, 2.0)
    cols = sm2[:, w // 4: w - w // 4]
    dark = float(np.percentile(sm2, 5))
    peak_vals, peak_rows = cols.max(axis=0), cols.argmax(axis=0)
    top_tissue = float((cols[:edge].mean(axis=0) > dark + 0.25 * (peak_vals - dark)).mean())
    bottom_band = float((peak_rows >= h - edge).mean())
    cut_top, cut_bottom = top_tissue > 0.5, bottom_band > 0.5
    bg_rows = profile <= np.percentile(profile, 25)
    background = sm[bg_rows]
    snr = float((p99 - background.mean()) / (background.std() + 2.0 / 255))
    contrast = p95 - p5
    focus = _detail_ratio(g / max(float(g.mean()), 1e-3))
    subs = {
        "signal": min(_ramp(p99, 0.22, 0.32), _ramp(snr, 3.0, 6.0)),
        "cutoff": 0.0 if (cut_top or cut_bottom) else 1.0,
        "contrast": _ramp(contrast, 0.06, 0.14),
        "focus": _ramp(focus, 0.40, 0.60),
    }
    reasons: list[str] = []
    if _ramp(p99, 0.22, 0.32) < 0.5:
        reasons.append(f"signal is too weak (brightest tissue {p99:.2f} < 0.27 of full scale)")
    if _ramp(snr, 3.0, 6.0) < 0.5:
        reasons.append(f"signal-to-noise too low ({snr:.1f} < 4.5)")
    if cut_top or cut_bottom:
        where = " and ".join(s for s, c in (("top", cut_top), ("bottom", cut_bottom)) if c)
        reasons.append(f"retina is cut off at the {where} of the scan")
    if subs["contrast"] < 0.5:
        reasons.append(f"low contrast (range {contrast:.2f} < 0.10)")
    if subs["focus"] < 0.5:
        reasons.append(f"scan is blurred (focus score {focus:.2f} < 0.50)")
    of.update(p99=p99, snr=snr, contrast=contrast, focus=focus, cut_top=float(cut_top), cut_bottom=float(cut_bottom),
              top_tissue=top_tissue, bottom_band=bottom_band, median=p50)
    return subs, reasons


def _not_retinal_reason(ff: dict[str, float], of: dict[str, float], grey: bool) -> str:
    if grey:
        return ("greyscale image without the layered structure of an OCT B-scan (dark vitreous on top, bright "
                "bands across the width)")
    if ff.get("circle_iou", 0.0) < 0.8 or ff.get("s_border", 0.0) < 0.5:
        return "no circular field of view on a dark border, as a fundus photograph has"
    return "colours do not match a fundus photograph (a red-dominant field)"


# --------------------------------------------------------------------------------------------------------------
# Validation of the gate on phantoms
# --------------------------------------------------------------------------------------------------------------

def degrade(image: np.ndarray, kind: str, modality: str) -> np.ndarray:
    """Synthetic acquisition failures: "blur" (Gaussian, sigma = 1/64 of the image width), "dark" (x0.1),
    "crop" (fundus: keep 55% of the width, cutting the circular field; OCT: keep 20% of the rows centred on the
    RPE band, so the retina touches both edges), all uint8 in, uint8 out."""
    img = np.asarray(image)
    # Severities re-set on real photographs (docs/real_data.md): x0.25 (mean brightness 0.07-0.12) and sigma 1/128
    # (focus 0.34-0.47) left phantoms as dark and as sharp as real photographs graders grade once brightened;
    # x0.1 and 1/64 match the real ones that show no retinal detail.
    if kind == "blur":
        sigma = img.shape[1] / 64.0
        return np.rint(ndi.gaussian_filter(img.astype(np.float32), (sigma, sigma) + (0,) * (img.ndim - 2))
                       ).clip(0, 255).astype(np.uint8)
    if kind == "dark":
        return (img.astype(np.float32) * 0.1).astype(np.uint8)
    if kind == "crop":
        h, w = img.shape[:2]
        if modality == Modality.FUNDUS:
            return np.ascontiguousarray(img[:, : int(0.55 * w)])
        grey = img if img.ndim == 2 else img.mean(axis=2)
        centre = int(np.argmax(ndi.uniform_filter1d(grey.mean(axis=1), 5)))  # the RPE band
        top = int(np.clip(centre - 0.1 * h, 0, h - 0.2 * h))
        return np.ascontiguousarray(img[top: top + int(0.2 * h)])
    raise ValueError(f"unknown degradation {kind!r}")


def roc_auc(positive: list[float], negative: list[float]) -> float:
    """Mann-Whitney ROC AUC: P(score of a positive > score of a negative), ties count one half."""
    pos, neg = np.asarray(positive, float)[:, None], np.asarray(negative, float)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def gate_roc(n: int = 8, size: int = 256, seed: int = 0) -> dict:
    """ROC AUC of the gradability score, clean phantoms (positive) vs degraded ones (negative).

    n clean fundus + n clean OCT phantoms (labels cycled), each also blurred, darkened and cropped (so 2n clean,
    6n degraded). A "not a retinal image" verdict counts as score 0: it gives no result either.
        python -c "from retina_core.quality import gate_roc; print(gate_roc())"
    """
    from retina_core.labels import DR_GRADES, FUNDUS4, OCT8
    from retina_core.phantoms import fundus_phantom, oct_phantom

    def score(image: np.ndarray) -> Quality:
        rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
        return assess_quality(RetinalImage(rgb, "image", "png", "", image.ndim == 2))

    fundus_labels = DR_GRADES + FUNDUS4
    clean, degraded, flagged = [], [], {}
    for i in range(n):
        for modality in IMAGE_MODALITIES:
            if modality == Modality.FUNDUS:
                image = fundus_phantom(fundus_labels[i % len(fundus_labels)], seed + i, size=size).image
            else:
                image = oct_phantom(OCT8[i % len(OCT8)], seed + i, width=size, height=int(size * 496 / 512)).image
            clean.append(score(image).score)
            for kind in ("blur", "dark", "crop"):
                q = score(degrade(image, kind, modality))
                degraded.append(q.score)
                flagged.setdefault(f"{modality}_{kind}", []).append(not q.gradable)
    return {"auc": roc_auc(clean, degraded), "n_clean": len(clean), "n_degraded": len(degraded),
            "clean_gradable": float(np.mean([s >= GRADABLE_MIN for s in clean])),
            "degraded_flagged": float(np.mean([s < GRADABLE_MIN for s in degraded])),
            "flagged_by_kind": {k: float(np.mean(v)) for k, v in flagged.items()}}
