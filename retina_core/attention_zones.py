"""Attention zones for one image: several explainers, their zone shares, the ETDRS grid drawn, and stability.

The page-facing layer over `explain.attribution`, `explain.zones` and `audit.trust`:

    >>> maps = explain_methods(model, pixels, ["gradcam", "integrated_gradients"])   # {method: [H, W] in [0, 1]}
    >>> lm = landmarks(pixels, "fundus")                       # fovea, disc, radius, laterality, confidence
    >>> zone_summary(maps["gradcam"], "fundus", lm)            # centre/left/right, ETDRS, optic-disc shares
    >>> draw_zones(pixels, "fundus", lm)                       # uint8 image with the ETDRS grid and the disc
    >>> perturbation_views(model, pixels, "gradcam", maps["gradcam"])   # perturbed images, their maps, SSIM

Every share is a share of the heatmap's total mass (see `explain.zones`).
"""
from __future__ import annotations

import cv2
import numpy as np

from .audit import trust
from .explain import zones
from .explain.attribution import available_methods, explain, explain_batch

OCT_SPAN_MM = 6.0     # usual macular B-scan width (Kermany / OCT-C8 style); the bands are in mm from the fovea


def methods_for(model) -> tuple[str, ...]:
    """Explanation methods that apply to `model` (ViT-only methods only for ViTs; the slow ScoreCAM and the
    reference Grad-CAM left out of the default choice)."""
    return tuple(m for m in available_methods(model) if m not in ("gradcam-reference",))


def explain_methods(model, pixels: np.ndarray, methods, target=None) -> dict[str, np.ndarray]:
    """{method: heatmap float32 [H, W] in [0, 1]} for one uint8 [H, W, 3] image; the same class is explained by
    every method (the predicted class unless `target` is given)."""
    if target is None:
        _, probs, idx = explain_batch(model, pixels[None], "gradcam")
        target = idx[0]
    return {m: explain(model, pixels, m, target) for m in methods}


def oct_fovea_x(pixels: np.ndarray) -> tuple[float, str]:
    """Column of the foveal pit in an OCT B-scan and how it was found.

    The inner retinal surface (first bright row per column) is detrended with a robust quadratic (the scan's
    curvature); the pit is where the residual is deepest below both its shoulders (+-w/10), searched in the
    central half of the width. When no pit stands out (e.g. a
    lesion lifts the fovea), the image centre is used: macular B-scans are centred on the fovea."""
    grey = pixels.astype(np.float32).mean(axis=2) if pixels.ndim == 3 else pixels.astype(np.float32)
    h, w = grey.shape
    g = cv2.GaussianBlur(grey, (0, 0), max(1.0, w / 200))
    thr = np.percentile(g, 60) + 0.35 * (np.percentile(g, 99.5) - np.percentile(g, 60))
    bright = g > thr
    has = bright.any(axis=0)
    if has.sum() < w // 2:
        return w / 2.0, "image centre (retinal surface not found)"
    top = np.where(has, bright.argmax(axis=0), np.nan).astype(np.float64)
    xs = np.arange(w, dtype=np.float64)
    ok = np.isfinite(top)
    keep = ok.copy()
    for _ in range(3):   # refit without the columns the pit (or a lesion) pulls away from the curve
        coef = np.polyfit(xs[keep], top[keep], 2)
        resid = top - np.polyval(coef, xs)
        spread = np.nanstd(resid[keep]) + 1e-6
        keep = ok & (np.abs(resid) < 1.5 * spread)
        if keep.sum() < w // 4:
            break
    resid = np.where(ok, resid, 0.0)
    resid = cv2.GaussianBlur(resid.astype(np.float32)[None, :], (0, 0), max(2.0, w / 80))[0]
    d = max(2, w // 10)                               # ~0.6 mm at a 6 mm scan: the pit's radius
    pit = resid - np.maximum(np.roll(resid, d), np.roll(resid, -d))   # deeper than both shoulders
    lo, hi = max(d, int(0.25 * w)), min(w - d, int(0.75 * w))
    k = lo + int(np.argmax(pit[lo:hi]))
    if pit[k] < max(2.0, 0.006 * h) or k in (lo, hi - 1):    # no pit, or a lesion's shoulder at the border
        return w / 2.0, "image centre (no foveal pit found)"
    return float(k), "foveal pit"


def landmarks(pixels: np.ndarray, modality: str, meta: dict | None = None, laterality: str | None = None) -> dict:
    """Anatomical landmarks for zone scores. fundus: `zones.locate_fovea_and_disc` (phantom meta wins when given);
    oct: the foveal column. The user's laterality, when given, overrides the one guessed from the disc side."""
    if modality == "fundus":
        lm = dict(zones.locate_fovea_and_disc(pixels, meta))
        if laterality:
            lm["laterality_user"] = laterality
        return lm
    if modality == "oct":
        if meta and meta.get("fovea_x") is not None:
            return {"fovea_x": float(meta["fovea_x"]), "method": "meta"}
        fx, how = oct_fovea_x(pixels)
        return {"fovea_x": fx, "method": how}
    return {}


def zone_summary(heatmap: np.ndarray, modality: str, lm: dict) -> dict:
    """Zone shares of one map: centre_lr always; fundus adds etdrs (9 subfields + outside) and disc (share
    inside the optic disc); oct adds oct_bands (central / parafoveal / perifoveal / outside)."""
    out = {"centre_lr": zones.centre_lr_shares(heatmap)}
    if modality == "fundus" and lm.get("disc_radius"):
        out["etdrs"] = zones.etdrs_zone_scores(heatmap, lm["fovea_xy"], 2 * lm["disc_radius"], disc_xy=lm["disc_xy"])
        out["disc"] = zones.optic_disc_zone(heatmap, lm["disc_xy"], lm["disc_radius"])
    elif modality == "oct" and lm.get("fovea_x") is not None:
        out["oct_bands"] = zones.oct_zone_scores(heatmap, lm["fovea_x"], OCT_SPAN_MM)
    return out


def _outline(label_image: np.ndarray) -> np.ndarray:
    """Boundary pixels of an int label image (where a pixel differs from its right or lower neighbour)."""
    edge = np.zeros(label_image.shape, bool)
    edge[:, :-1] |= label_image[:, :-1] != label_image[:, 1:]
    edge[:-1, :] |= label_image[:-1, :] != label_image[1:, :]
    return cv2.dilate(edge.astype(np.uint8), np.ones((2, 2), np.uint8)) > 0


def draw_zones(pixels: np.ndarray, modality: str, lm: dict, centre_box: bool = False) -> np.ndarray:
    """A copy of uint8 [H, W, 3] `pixels` with the zones drawn: fundus - the ETDRS grid on the fovea (white, with
    subfield abbreviations) and the optic-disc circle (yellow); oct - the foveal bands (dashed verticals);
    centre_box - the centre / left / right partition (cyan)."""
    img = pixels.copy()
    h, w = img.shape[:2]
    thick = max(1, round(min(h, w) / 300))
    font = max(0.3, min(h, w) / 900)
    if centre_box:
        img[_outline(zones.centre_lr_mask((h, w)))] = (0, 220, 255)
    if modality == "fundus" and lm.get("disc_radius"):
        lab = zones.etdrs_grid_mask((h, w), lm["fovea_xy"], 2 * lm["disc_radius"], disc_xy=lm["disc_xy"])
        img[_outline(lab)] = (255, 255, 255)
        dx, dy = (int(round(v)) for v in lm["disc_xy"])
        cv2.circle(img, (dx, dy), int(round(lm["disc_radius"])), (255, 230, 0), thick + 1, cv2.LINE_AA)
        for k, name in enumerate(zones.ETDRS_SUBFIELDS, start=1):
            ys, xs = np.nonzero(lab == k)
            if len(xs) > 30:
                cv2.putText(img, zones.ETDRS_ABBREVIATIONS[name], (int(xs.mean()) - int(12 * font * 2),
                            int(ys.mean()) + 4), cv2.FONT_HERSHEY_SIMPLEX, font, (255, 255, 255), 1, cv2.LINE_AA)
    elif modality == "oct" and lm.get("fovea_x") is not None:
        px_per_mm = w / OCT_SPAN_MM
        for _, hi in zones.OCT_BANDS_MM.values():
            for side in (-1, 1):
                x = int(round(lm["fovea_x"] + side * hi * px_per_mm))
                if 0 <= x < w:
                    for y0 in range(0, h, 12):
                        cv2.line(img, (x, y0), (x, min(h - 1, y0 + 6)), (255, 255, 255), thick)
        x = int(round(lm["fovea_x"]))
        cv2.line(img, (x, 0), (x, h - 1), (255, 230, 0), thick)
    return img


def zone_layer(shape: tuple[int, int], modality: str, lm: dict, centre_box: bool = False) -> np.ndarray:
    """The zone drawing of `draw_zones` alone, on black: uint8 [H, W, 3]; paste it with `paste_layer`. Computed
    once per image, so redrawing over a changed overlay costs a masked copy."""
    return draw_zones(np.zeros((*shape, 3), np.uint8), modality, lm, centre_box)


def paste_layer(image: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """A copy of uint8 [H, W, 3] `image` with the non-black pixels of `layer` pasted over it."""
    out = image.copy()
    mask = (layer[..., 0] | layer[..., 1] | layer[..., 2]) > 0     # ~15x faster than layer.any(axis=2)
    out[mask] = layer[mask]
    return out


def perturbation_views(model, pixels: np.ndarray, method: str, reference: np.ndarray, target=None,
                       kinds=("noise", "brightness", "shift"), seed: int = 0) -> list[dict]:
    """Stability shown, not only scored: for each perturbation kind, the perturbed image, its map and the
    similarity to the reference map (`trust.stability_under_perturbation`: SSIM and Spearman, 1 = unchanged).
    target: the class the reference map explains (the same class is explained on every perturbed copy).
    Returns [{kind, image uint8 [H, W, 3], heatmap float32 [H, W], ssim, spearman}]."""
    seen: list[tuple[np.ndarray, np.ndarray]] = []

    def explain_fn(img: np.ndarray) -> np.ndarray:
        m = explain(model, img, method, target)
        seen.append((img, m))
        return m

    scores = trust.stability_under_perturbation(explain_fn, pixels, kinds=kinds, seed=seed, reference=reference)
    return [{"kind": k, "image": img, "heatmap": hm, **scores[k]} for k, (img, hm) in zip(kinds, seen)]
