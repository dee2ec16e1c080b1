"""Explanations scored against real lesion masks (a lesion set such as IDRiD: `meta["masks"]` per photograph) and
the optic-disc finder scored against the real disc masks. `explain_eval` calls these when its samples carry
per-lesion masks:
`python -m retina_core explain-eval --model fundus_dr_effnet_b0 --data ../shared/realdata/idrid_lesions --json`.

Per heatmap (the model's target class, on the photograph at the evaluation size):
- pointing game: is the map's peak inside a DR lesion (MA, HE, EX, SE; any of them, and per type), at 0 px and
  with a tolerance of 1% of the image width (`TOLERANCE_FRACTION`; the mask dilated by that many pixels); ties
  broken at random (the share of the map's maximal pixels inside: Integrated Gradients maps are clipped at their
  99.5th percentile, a plateau of 0.5% of the pixels that the any-pixel rule would count generously);
  chance: where a random point of the field of view lands, (dilated) lesion area inside the FOV / FOV area;
- energy pointing game: the share of the map's energy inside the lesions, against the lesion area share of the image
  (a flat map's score) and the share of the same coarse random map the deletion reference uses;
- deletion: the drop of the target's probability while pixels are deleted in the map's order (mean over the curve,
  = p(original) - deletion AUC), against deleting in the random map's order.
Masks are reduced to the evaluation size by "any" pooling (a pixel is lesion when any photograph pixel under it is),
so microaneurysms of a few pixels are not lost; the chance baselines use the same reduced masks.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np

from ..explain import zones
from . import trust

DR_LESIONS = ("MA", "HE", "EX", "SE")      # microaneurysms, haemorrhages, hard exudates, soft exudates
LESION_NAMES = {"MA": "microaneurysms", "HE": "haemorrhages", "EX": "hard exudates", "SE": "soft exudates",
                "OD": "optic disc"}
TOLERANCE_FRACTION = 0.01                  # pointing-game tolerance: 1% of the image width (21 px at 2144 px)
DISC_ERROR_TARGET_DD = 0.25                # the disc finder's target: centre within a quarter disc diameter


# ------------------------------------------------------------------------------------------------ masks
def keep_aspect(shape: tuple[int, int], side: int) -> tuple[int, int]:
    """(H, W) with the longer side `side` and the photograph's aspect ratio (real photographs are not square; the
    square model input would make a pixel tolerance anisotropic)."""
    h, w = shape
    s = side / max(h, w)
    return max(1, int(round(h * s))), max(1, int(round(w * s)))


def resize_mask_any(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool [h, w]: True where any pixel of `mask` under the output pixel is True (area pooling > 0)."""
    h, w = size
    if mask.shape == (h, w):
        return mask.astype(bool)
    interp = cv2.INTER_AREA if h < mask.shape[0] else cv2.INTER_NEAREST
    return cv2.resize(mask.astype(np.float32), (w, h), interpolation=interp) > 0


def dr_union(masks: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """Union of the DR lesion masks (MA / HE / EX / SE; not the optic disc), None when there is none."""
    parts = [np.asarray(masks[k], bool) for k in DR_LESIONS if k in masks]
    return np.logical_or.reduce(parts) if parts else None


def tolerance_px(shape: tuple[int, int]) -> int:
    """The pointing-game tolerance at this size: TOLERANCE_FRACTION of the width, at least 1 px."""
    return max(1, int(round(TOLERANCE_FRACTION * shape[1])))


def _dilate(mask: np.ndarray, tol: int) -> np.ndarray:
    if tol <= 0:
        return mask
    k = 2 * tol + 1         # the same ellipse as `trust.pointing_game`
    return cv2.dilate(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))) > 0


# ------------------------------------------------------------------------------------------------ one map
def _region_scores(hm, mask, fov, rand, tol) -> dict:
    hits, chances = {}, {}
    for key, t in (("0px", 0), ("tol", tol)):
        hits[key] = trust.pointing_game_3d_tiebreak(hm[None], mask[None], tolerance_px=t)   # one slice
        chances[key] = float((_dilate(mask, t) & fov).sum() / max(1, fov.sum()))
    return {"pg_0px": hits["0px"], "pg_tol": hits["tol"], "chance_0px": chances["0px"], "chance_tol": chances["tol"],
            "energy": trust.energy_pointing_game(hm, mask), "area_image": float(mask.mean()),
            "area_fov": float((mask & fov).sum() / max(1, fov.sum())),
            "energy_random_map": trust.energy_pointing_game(rand, mask)}


def image_scores(heatmap: np.ndarray, masks: Mapping[str, np.ndarray], fov: np.ndarray | None,
                 random_heatmap: np.ndarray) -> dict:
    """Scores of one map against one photograph's masks (all at the map's size): {"tolerance_px", "any": {...},
    per lesion code present and non-empty: {...}, "OD": {...} when given}; each {...} holds pg_0px / pg_tol (1.0
    hit, 0.0 miss; with tied maxima the share of them inside), chance_0px / chance_tol, energy, area_image, area_fov,
    energy_random_map; peak_share: the share of pixels at the map's maximum; energy_outside_fov: the map's share on
    the black surround (a map there points at the frame, not the retina) and area_outside_fov its area share."""
    hm = np.asarray(heatmap, np.float32)
    fov = np.ones(hm.shape, bool) if fov is None else np.asarray(fov, bool)
    tol = tolerance_px(hm.shape)
    out: dict = {"tolerance_px": tol, "peak_share": float((hm >= hm.max()).mean()) if hm.size else 0.0,
                 "energy_outside_fov": trust.energy_pointing_game(hm, ~fov), "area_outside_fov": float((~fov).mean())}
    union = dr_union(masks)
    if union is not None and union.any():
        out["any"] = _region_scores(hm, union, fov, random_heatmap, tol)
    for k in (*DR_LESIONS, "OD"):
        if k in masks and np.asarray(masks[k]).any():
            out[k] = _region_scores(hm, np.asarray(masks[k], bool), fov, random_heatmap, tol)
    return out


# ------------------------------------------------------------------------------------------------ summaries
def _mean(xs) -> float | None:
    xs = [float(x) for x in xs if x is not None and np.isfinite(x)]
    return float(np.mean(xs)) if xs else None


def p_value_vs_chance(hits: Sequence[float], chances: Sequence[float]) -> float | None:
    """One-sided P(at least this many hits) when image i is hit with its own chance (a Poisson-binomial tail):
    how often random points would do as well as the map. Tie-broken (fractional) hits are summed and rounded down."""
    if not hits:
        return None
    dist = np.array([1.0])
    for p in chances:
        dist = np.convolve(dist, [1.0 - p, p])
    return float(dist[int(math.floor(sum(hits) + 1e-9)):].sum())


def _summarise_region(rows: list[dict]) -> dict:
    def m(k):
        return _mean([r[k] for r in rows])

    energy, area = m("energy"), m("area_image")
    return {"n_images": len(rows),
            "pointing_game_0px": m("pg_0px"), "pointing_game_0px_chance": m("chance_0px"),
            "pointing_game_0px_p_value": p_value_vs_chance([r["pg_0px"] for r in rows],
                                                           [r["chance_0px"] for r in rows]),
            "pointing_game_tol": m("pg_tol"), "pointing_game_tol_chance": m("chance_tol"),
            "pointing_game_tol_p_value": p_value_vs_chance([r["pg_tol"] for r in rows],
                                                           [r["chance_tol"] for r in rows]),
            "energy_share": energy, "area_share_image": area, "area_share_fov": m("area_fov"),
            "energy_share_random_map": m("energy_random_map"),
            "energy_over_area": _mean([r["energy"] / r["area_image"] for r in rows if r["area_image"] > 0])}


def summarise(per_image: list[dict], names: Sequence[str], targets: Sequence[str], p_target: Sequence[float],
              deletion_auc: Sequence[float], deletion_auc_random: Sequence[float]) -> dict:
    """The "real_lesions" block of one method's explain-eval results: the union of DR lesions ("any"), each lesion
    type, the optic disc (where the map looks, not a lesion), deletion drops vs the random order, per image rows."""
    regions = {}
    for key in ("any", *DR_LESIONS, "OD"):
        rows = [r[key] for r in per_image if key in r]
        if rows:
            regions[key] = _summarise_region(rows)
    drop = [p - d for p, d in zip(p_target, deletion_auc)]
    drop_rand = [p - d for p, d in zip(p_target, deletion_auc_random)]
    images = []
    for r, name, tgt, p, d, dr in zip(per_image, names, targets, p_target, deletion_auc, deletion_auc_random):
        a = r.get("any", {})
        images.append({"image": Path(str(name)).stem, "target": tgt, "p_target": p, "deletion_auc": d,
                       "deletion_auc_random_map": dr, "pointing_game_0px": a.get("pg_0px"),
                       "pointing_game_tol": a.get("pg_tol"), "energy_share": a.get("energy"),
                       "area_share_image": a.get("area_image")})
    tols = sorted({r["tolerance_px"] for r in per_image})
    return {"tolerance_px": tols[0] if len(tols) == 1 else tols,
            "peak_share": _mean([r["peak_share"] for r in per_image]),
            "energy_outside_fov": _mean([r["energy_outside_fov"] for r in per_image]),
            "area_outside_fov": _mean([r["area_outside_fov"] for r in per_image]),
            "tolerance_rule": f"{TOLERANCE_FRACTION:.0%} of the image width at the evaluation size",
            "lesions": regions.get("any"),
            "by_lesion": {k: v for k, v in regions.items() if k in DR_LESIONS},
            "optic_disc": regions.get("OD"),
            "p_target": _mean(p_target),
            "deletion_drop": _mean(drop), "deletion_drop_random_map": _mean(drop_rand),
            "deletion_faster_than_random_fraction": _mean([float(a < b) for a, b in zip(deletion_auc,
                                                                                         deletion_auc_random)]),
            "images": images}


# ------------------------------------------------------------------------------------------------ optic disc
def disc_error(image_rgb: np.ndarray, od_mask: np.ndarray) -> dict:
    """The disc finder (`zones.locate_fovea_and_disc`) against one OD mask (same pixel grid): the distance of the
    found centre from the mask's centroid in disc diameters (the mask's equivalent diameter), and the found radius
    over the mask's equivalent radius."""
    od = np.asarray(od_mask, bool)
    ys, xs = np.nonzero(od)
    if not len(xs):
        raise ValueError("empty optic-disc mask")
    cx, cy = float(xs.mean()), float(ys.mean())
    dd = 2.0 * math.sqrt(od.sum() / math.pi)
    lm = zones.locate_fovea_and_disc(image_rgb)
    err = math.hypot(lm["disc_xy"][0] - cx, lm["disc_xy"][1] - cy) / dd
    return {"error_dd": err, "disc_diameter_px": dd, "truth_xy": [cx, cy], "found_xy": list(lm["disc_xy"]),
            "radius_ratio": lm["disc_radius"] / (dd / 2.0), "confidence": lm["confidence"], "landmarks": lm}


def summarise_disc_errors(rows: Sequence[dict], names: Sequence[str]) -> dict:
    """Mean / median / max disc-centre error (disc diameters) over photographs, against DISC_ERROR_TARGET_DD."""
    errs = np.array([r["error_dd"] for r in rows], float)
    if not len(errs):
        return {"n_images": 0}
    return {"n_images": int(len(errs)), "mean_dd": float(errs.mean()), "median_dd": float(np.median(errs)),
            "max_dd": float(errs.max()), "within_target_fraction": float(np.mean(errs <= DISC_ERROR_TARGET_DD)),
            "target_dd": DISC_ERROR_TARGET_DD, "meets_target": bool(errs.mean() <= DISC_ERROR_TARGET_DD),
            "radius_ratio_mean": float(np.mean([r["radius_ratio"] for r in rows])),
            "rule": "distance of the found disc centre from the OD mask's centroid / the mask's equivalent "
                    "diameter, on the full photograph",
            "images": [{"image": Path(str(n)).stem, "error_dd": r["error_dd"], "radius_ratio": r["radius_ratio"],
                        "confidence": r["confidence"]} for r, n in zip(rows, names)]}
