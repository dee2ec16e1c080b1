"""Where a heatmap puts its mass, in zones a clinician names: centre / left / right (seed 002), the ETDRS 9-subfield
grid on the fovea, the optic-disc zone, and the foveal bands of an OCT B-scan.

Every score is a *share of the heatmap's total mass* (sum of map values inside the zone / sum over the image), so the
scores of one partition sum to 1. A flat (or empty) map gives each zone its area fraction.

    >>> shares = centre_lr_shares(heatmap)                              # {"centre", "left", "right"}
    >>> lm = locate_fovea_and_disc(image_rgb)                           # fovea_xy, disc_xy, disc_radius, ...
    >>> etdrs_zone_scores(heatmap, lm["fovea_xy"], 2 * lm["disc_radius"], disc_xy=lm["disc_xy"])

Scale: one optic-disc diameter is taken as 1.8 mm (ETDRS grid diameters 1, 3 and 6 mm), so the grid follows each
photograph's magnification through its disc size. Image orientation: superior is up (smaller y); nasal is the side of
the fovea toward the optic disc (right in a right eye OD as photographed, left in a left eye OS).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ..landmarks import landmarks_from_meta, locate_fovea_and_disc, locate_oct_fovea
from ..modality import Modality

DISC_DIAMETER_MM = 1.8
ETDRS_DIAMETERS_MM = (1.0, 3.0, 6.0)
QUADRANTS = ("superior", "nasal", "inferior", "temporal")
# label image values of `etdrs_grid_mask`: 0 outside, 1 central, 2-5 inner ring, 6-9 outer ring (quadrant order above)
ETDRS_SUBFIELDS = ("central",) + tuple(f"inner_{q}" for q in QUADRANTS) + tuple(f"outer_{q}" for q in QUADRANTS)
ETDRS_ABBREVIATIONS = {"central": "CSF", "inner_superior": "SIM", "inner_nasal": "NIM", "inner_inferior": "IIM",
                       "inner_temporal": "TIM", "outer_superior": "SOM", "outer_nasal": "NOM",
                       "outer_inferior": "IOM", "outer_temporal": "TOM"}
OCT_BANDS_MM = {"central": (0.0, 0.5), "parafoveal": (0.5, 1.5), "perifoveal": (1.5, 3.0)}   # |x - fovea| ranges


def _as_map(heatmap: np.ndarray) -> np.ndarray:
    h = np.asarray(heatmap, dtype=np.float64)
    if h.ndim != 2:
        raise ValueError(f"heatmap must be 2-D [H, W], got shape {h.shape}")
    h = np.where(np.isfinite(h), h, 0.0)
    return np.maximum(h, 0.0)


def _shares(heatmap: np.ndarray, labels: np.ndarray, names: Mapping[int, str]) -> dict[str, float]:
    """Mass share of every label in `names` (a flat map is used when the heatmap has no mass)."""
    h = _as_map(heatmap)
    total = h.sum()
    if total <= 0:
        h = np.ones_like(h)
        total = h.sum()
    sums = np.bincount(labels.ravel(), weights=h.ravel(), minlength=max(names) + 1)
    return {name: float(sums[k] / total) for k, name in names.items()}


# ------------------------------------------------------------------------------------------ centre / left / right
def centre_lr_mask(shape: tuple[int, int]) -> np.ndarray:
    """int label image: 0 centre box (middle 50% of height and of width), 1 left and 2 right halves of the rest."""
    h, w = shape
    lab = np.where(np.arange(w)[None, :] < w / 2.0, 1, 2).repeat(h, axis=0).astype(np.int64)
    y0, y1 = int(round(h / 4)), int(round(3 * h / 4))
    x0, x1 = int(round(w / 4)), int(round(3 * w / 4))
    lab[y0:y1, x0:x1] = 0
    return lab


def centre_lr_shares(heatmap: np.ndarray) -> dict[str, float]:
    """Shares of heatmap mass in the centre box and the left / right remainder (RETFound-heatmap source, seed 002).

    The centre box spans the middle 50% of the height and of the width (a quarter of the area); left and right are
    the halves of what is left. The three shares sum to 1.
    """
    h = _as_map(heatmap)
    return _shares(h, centre_lr_mask(h.shape), {0: "centre", 1: "left", 2: "right"})


# ------------------------------------------------------------------------------------------------------ ETDRS
def _nasal_sign(fovea_xy, laterality: str | None, disc_xy) -> int:
    """+1 when nasal is toward +x (right of the fovea in the image), -1 when toward -x."""
    if disc_xy is not None:
        dx = float(disc_xy[0]) - float(fovea_xy[0])
        if abs(dx) > 1e-6:
            return 1 if dx > 0 else -1
    lat = (laterality or "").upper()
    if lat in ("OD", "R", "RIGHT"):
        return 1      # right eye as photographed: the disc (nasal) is right of the fovea
    if lat in ("OS", "L", "LEFT"):
        return -1
    raise ValueError("ETDRS quadrants need the eye: pass laterality ('OD' or 'OS') or disc_xy "
                     "(e.g. from locate_fovea_and_disc).")


def etdrs_grid_mask(shape: tuple[int, int], fovea_xy, disc_diameter_px: float, laterality: str | None = None,
                    disc_xy=None, disc_diameter_mm: float = DISC_DIAMETER_MM) -> np.ndarray:
    """int label image [H, W] of the ETDRS grid centred on the fovea (for zone scores and for drawing).

    0 outside the 6 mm circle, 1 central subfield (1 mm), 2-5 inner ring (3 mm) superior/nasal/inferior/temporal,
    6-9 outer ring (6 mm) in the same order; names in `ETDRS_SUBFIELDS[label - 1]`. Quadrant borders are the
    diagonals. disc_diameter_px sets the scale (one disc diameter = `disc_diameter_mm`, 1.8 mm by default).
    """
    if not disc_diameter_px or disc_diameter_px <= 0:
        raise ValueError("disc_diameter_px must be positive")
    h, w = shape
    px_per_mm = float(disc_diameter_px) / float(disc_diameter_mm)
    fx, fy = float(fovea_xy[0]), float(fovea_xy[1])
    sign = _nasal_sign(fovea_xy, laterality, disc_xy)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dx = (xx + 0.5 - (fx + 0.5)) / px_per_mm     # pixel centres; mm
    dy = (yy + 0.5 - (fy + 0.5)) / px_per_mm
    r = np.hypot(dx, dy)
    # quadrant index in QUADRANTS order: superior (up, dy<0), nasal (toward disc), inferior, temporal
    up, nasal_dir = -dy, sign * dx
    quad = np.where(np.abs(up) >= np.abs(nasal_dir),
                    np.where(up >= 0, 0, 2),
                    np.where(nasal_dir >= 0, 1, 3))
    r1, r2, r3 = (d / 2.0 for d in ETDRS_DIAMETERS_MM)
    lab = np.zeros((h, w), np.int64)
    lab[(r <= r3)] = 6 + quad[(r <= r3)]
    lab[(r <= r2)] = 2 + quad[(r <= r2)]
    lab[r <= r1] = 1
    return lab


def etdrs_zone_scores(heatmap: np.ndarray, fovea_xy, disc_diameter_px: float, laterality: str | None = None,
                      disc_xy=None, mode: str = "share",
                      disc_diameter_mm: float = DISC_DIAMETER_MM) -> dict[str, float]:
    """Heatmap over the 9 ETDRS subfields + "outside" the 6 mm circle.

    mode "share": share of the map's total mass per zone (all 10 sum to 1); "mean": mean map value per zone (density,
    independent of the zone's area; NaN for a zone that falls outside the image).
    Nasal/temporal follow `disc_xy` when given (nasal = toward the disc), else `laterality` ("OD" / "OS").
    """
    h = _as_map(heatmap)
    lab = etdrs_grid_mask(h.shape, fovea_xy, disc_diameter_px, laterality, disc_xy, disc_diameter_mm)
    names = {0: "outside", **{i + 1: n for i, n in enumerate(ETDRS_SUBFIELDS)}}
    if mode == "share":
        out = _shares(h, lab, names)
    elif mode == "mean":
        sums = np.bincount(lab.ravel(), weights=h.ravel(), minlength=10)
        cnt = np.bincount(lab.ravel(), minlength=10)
        out = {n: (float(sums[k] / cnt[k]) if cnt[k] else float("nan")) for k, n in names.items()}
    else:
        raise ValueError("mode must be 'share' or 'mean'")
    return {n: out[n] for n in (*ETDRS_SUBFIELDS, "outside")}


def optic_disc_mask(shape: tuple[int, int], disc_xy, disc_radius: float, margin: float = 1.0) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    return np.hypot(xx - float(disc_xy[0]), yy - float(disc_xy[1])) <= float(disc_radius) * margin


def optic_disc_zone(heatmap: np.ndarray, disc_xy, disc_radius: float, margin: float = 1.0) -> float:
    """Share of the heatmap mass inside the optic disc (circle of disc_radius x margin around disc_xy)."""
    h = _as_map(heatmap)
    m = optic_disc_mask(h.shape, disc_xy, disc_radius, margin)
    return _shares(h, m.astype(np.int64), {0: "out", 1: "disc"})["disc"]


# ------------------------------------------------------------------------------------------------------ OCT
def oct_zone_scores(heatmap: np.ndarray, fovea_x: float, span_mm: float = 6.0) -> dict[str, float]:
    """Shares of a B-scan heatmap's mass in bands along x around the fovea: central (|dx| <= 0.5 mm, the 1 mm
    central subfield), parafoveal (0.5-1.5 mm), perifoveal (1.5-3 mm) and outside; they sum to 1.

    span_mm: the scan width in mm (6 mm for the usual macular cube / Kermany-style B-scans).
    """
    h = _as_map(heatmap)
    width = h.shape[1]
    mm_per_px = float(span_mm) / width
    d = np.abs(np.arange(width) + 0.5 - (float(fovea_x) + 0.5)) * mm_per_px
    band = np.full(width, 3, np.int64)
    for k, (lo, hi) in enumerate(OCT_BANDS_MM.values()):
        band[(d >= lo) & (d <= hi) & (band == 3)] = k
    lab = np.broadcast_to(band[None, :], h.shape)
    return _shares(h, np.ascontiguousarray(lab), {0: "central", 1: "parafoveal", 2: "perifoveal", 3: "outside"})


def zone_report(heatmap: np.ndarray, image=None, modality: str = Modality.FUNDUS, laterality: str | None = None,
                meta: Mapping | None = None, span_mm: float = 6.0) -> dict:
    """Every zone summary of one heatmap in one call (for pages and reports).

    fundus: centre_lr, landmarks (meta or `locate_fovea_and_disc`), etdrs (shares) and optic_disc share;
    oct: centre_lr, fovea (meta or `locate_oct_fovea`) and the foveal bands. Landmarks found on `image` are scaled
    to the heatmap's size when the two differ.
    """
    hm = _as_map(heatmap)
    out: dict = {"centre_lr": centre_lr_shares(hm)}
    if image is None and meta is None:
        return out
    px = None if image is None else np.asarray(getattr(image, "pixels", image))
    sy, sx = (1.0, 1.0) if px is None else (hm.shape[0] / px.shape[0], hm.shape[1] / px.shape[1])
    if modality == Modality.OCT:
        f = locate_oct_fovea(px, meta) if px is not None or meta is not None else None
        if f is not None:
            fx = f["fovea_x"] * sx
            out["oct_fovea"] = {**f, "fovea_x": fx}
            out["oct"] = oct_zone_scores(hm, fx, float((meta or {}).get("span_mm") or span_mm))
        return out
    lm = landmarks_from_meta(meta) if meta is not None else None
    if lm is None and px is not None:
        lm = locate_fovea_and_disc(px)
    if lm is None:
        return out
    fov = (lm["fovea_xy"][0] * sx, lm["fovea_xy"][1] * sy)
    disc = (lm["disc_xy"][0] * sx, lm["disc_xy"][1] * sy)
    r = lm["disc_radius"] * (sx + sy) / 2
    out["landmarks"] = {**lm, "fovea_xy": fov, "disc_xy": disc, "disc_radius": r}
    out["etdrs"] = etdrs_zone_scores(hm, fov, 2 * r, laterality or lm.get("laterality"), disc)
    out["optic_disc"] = optic_disc_zone(hm, disc, r)
    return out
