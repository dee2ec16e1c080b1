"""Can a heatmap be trusted? Localisation, faithfulness, sanity, stability and consistency checks.

- `pointing_game` / `energy_pointing_game`: does the map's peak (mass) fall on the lesion masks (phantom ground truth)?
  `pointing_game_3d` (+ `_tiebreak`, `_chance`) / `energy_pointing_game_3d` / `slice_hit`: the same for [D, H, W]
  volume maps.
- `deletion_insertion_auc`: faithfulness - removing the most relevant pixels first should drop the class probability
  fast (low deletion AUC); inserting them first into a blurred image should raise it fast (high insertion AUC).
- `randomisation_check`: a sanity check (Adebayo et al. 2018) - a map that survives re-initialising the network's
  weights explains the image, not the model.
- `stability_under_perturbation`: SSIM / Spearman between the map of an image and of slightly perturbed copies
  (Gaussian noise, brightness, a shift), perturbed in pixel space on [0, 1] intensities.
- `class_consistency`, `centre_attention_vs_confidence`, `correct_vs_misclassified`: population summaries (seeds
  002 and 003).
"""
from __future__ import annotations

import copy
import itertools
import math
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np
import torch
from scipy import stats
from torch import nn


def _resize_to(a: np.ndarray, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    if a.shape == tuple(shape):
        return a
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(a.astype(np.float32), (shape[1], shape[0]), interpolation=interp)


def _mask_for(mask, shape: tuple[int, int]) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m.any(axis=2)
    m = m.astype(bool)
    if m.shape != tuple(shape):
        m = _resize_to(m.astype(np.float32), shape, nearest=True) > 0.5
    return m


# ------------------------------------------------------------------------------------------------ localisation
def default_tolerance(shape: tuple[int, int]) -> int:
    """15 px at 224 px (the pointing-game convention of Zhang et al.), scaled with the shorter side."""
    return int(round(15 * min(shape) / 224.0))


def pointing_game(heatmap: np.ndarray, mask, tolerance_px: int | None = None) -> bool:
    """True when the heatmap's maximum lies inside the mask dilated by `tolerance_px` (default 15 px at 224 scale).

    Ties (a plateau at the maximum) count as a hit when any maximal pixel is inside. An empty mask raises ValueError
    (there is nothing to point at: leave such images out of the score).
    """
    h = np.asarray(heatmap, dtype=np.float32)
    m = _mask_for(mask, h.shape)
    if not m.any():
        raise ValueError("empty mask: the pointing game needs a lesion to point at")
    tol = default_tolerance(h.shape) if tolerance_px is None else int(tolerance_px)
    if tol > 0:
        k = 2 * tol + 1
        m = cv2.dilate(m.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))) > 0
    if not np.isfinite(h).any() or float(np.nanmax(h)) <= 0:
        return False                        # an empty map points nowhere
    peak = h >= np.nanmax(h)
    return bool((peak & m).any())


def energy_pointing_game(heatmap: np.ndarray, mask) -> float:
    """Share of the heatmap's energy (sum of its non-negative values) inside the mask (Wang et al. 2020, Score-CAM).

    0 for an empty map. Compare with the mask's area fraction, the score of a flat map.
    """
    h = np.maximum(np.nan_to_num(np.asarray(heatmap, dtype=np.float64)), 0.0)
    m = _mask_for(mask, h.shape)
    total = h.sum()
    return float(h[m].sum() / total) if total > 0 else 0.0


def _dilate_in_plane(mask: np.ndarray, tol: int) -> np.ndarray:
    """Dilate every slice of a bool [D, H, W] mask by an ellipse of radius `tol` px (no dilation across slices)."""
    if tol <= 0:
        return mask.copy()
    k = 2 * tol + 1
    el = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    return np.stack([cv2.dilate(s.astype(np.uint8), el) > 0 for s in mask])


def _volume_pair(heatmap, mask) -> tuple[np.ndarray, np.ndarray]:
    h = np.asarray(heatmap, dtype=np.float32)
    m = np.asarray(mask).astype(bool)
    if h.ndim != 3 or m.shape != h.shape:
        raise ValueError(f"expected a [D, H, W] map and a mask of the same shape, got {h.shape} and {m.shape}")
    return h, m


def pointing_game_3d(heatmap: np.ndarray, mask, tolerance_px: int | None = None) -> bool:
    """3-D pointing game: True when the maximum of a [D, H, W] map lies inside the [D, H, W] lesion mask dilated
    in-plane (each slice, by `tolerance_px`; default `default_tolerance((H, W))`, 15 px at 224) but not across
    slices. Ties count as a hit when any maximal voxel is inside; an empty mask raises ValueError."""
    return pointing_game_3d_tiebreak(heatmap, mask, tolerance_px) > 0


def pointing_game_3d_tiebreak(heatmap: np.ndarray, mask, tolerance_px: int | None = None) -> float:
    """The 3-D pointing game with ties broken at random: the share of the map's maximal voxels inside the in-plane
    dilated mask (1 or 0 for a single peak). A coarse map upsampled from a few cells has a plateau at its maximum,
    which the any-voxel rule of `pointing_game_3d` counts generously. 0 for an empty map."""
    h, m = _volume_pair(heatmap, mask)
    if not m.any():
        raise ValueError("empty mask: the pointing game needs a lesion to point at")
    tol = default_tolerance(h.shape[1:]) if tolerance_px is None else int(tolerance_px)
    if not np.isfinite(h).any() or float(np.nanmax(h)) <= 0:
        return 0.0
    peak = h >= np.nanmax(h)
    return float((peak & _dilate_in_plane(m, tol)).sum() / peak.sum())


def pointing_game_3d_chance(mask, tolerance_px: int | None = None) -> float:
    """Share of the voxels inside the in-plane dilated mask: the 3-D pointing game of a peak placed at random."""
    m = np.asarray(mask).astype(bool)
    tol = default_tolerance(m.shape[1:]) if tolerance_px is None else int(tolerance_px)
    return float(_dilate_in_plane(m, tol).mean())


def energy_pointing_game_3d(heatmap: np.ndarray, mask) -> float:
    """Share of a [D, H, W] map's non-negative energy inside the [D, H, W] mask (0 for an empty map)."""
    h, m = _volume_pair(heatmap, mask)
    h = np.maximum(np.nan_to_num(h.astype(np.float64)), 0.0)
    total = h.sum()
    return float(h[m].sum() / total) if total > 0 else 0.0


def slice_hit(heatmap: np.ndarray, mask) -> float:
    """Does the most-attended slice (largest summed map) contain a lesion voxel? 1.0 / 0.0; when several slices
    tie for the largest sum (e.g. a map with one cell across depth is the same on every slice), the share of the
    tied slices that hold a lesion (a random tie-break's expected hit). 0 for an empty map."""
    h, m = _volume_pair(heatmap, mask)
    per_slice = np.maximum(np.nan_to_num(h.astype(np.float64)), 0.0).sum(axis=(1, 2))
    top = per_slice.max()
    if top <= 0:
        return 0.0
    tied = per_slice >= top * (1 - 1e-6)
    return float(m[tied].any(axis=(1, 2)).mean())


# ------------------------------------------------------------------------------------------------ faithfulness
def _baseline_image(image: np.ndarray, baseline: str) -> np.ndarray:
    if baseline == "blur":
        s = max(2.0, min(image.shape[:2]) / 16.0)
        return cv2.GaussianBlur(image, (0, 0), s)
    if baseline == "mean":
        return np.broadcast_to(image.reshape(-1, image.shape[-1]).mean(0), image.shape).astype(image.dtype)
    if baseline == "black":
        return np.zeros_like(image)
    raise ValueError("baseline must be 'blur', 'mean' or 'black'")


def curve_auc(y: np.ndarray) -> float:
    """Trapezoidal area under a curve sampled at evenly spaced points of [0, 1]."""
    x = np.linspace(0.0, 1.0, len(y))
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


RANDOM_MAP_CELL_2D = 16   # px per cell of the random reference map: a 128 px input gets 8 x 8 cells, 320 px 20 x 20
RANDOM_MAP_CELL_3D = 8    # voxels per cell along each axis: a 32 x 64 x 64 volume gets 4 x 8 x 8 cells


def random_map(shape: Sequence[int], seed: int, cell: int | None = None) -> np.ndarray:
    """The faithfulness reference: uniform noise on a coarse grid (one cell per `cell` px / voxels per axis, the
    grain of a Grad-CAM map at output stride 16 in 2-D, 8 in 3-D), upsampled (bi/trilinear) to `shape`, float32 in
    [0, 1]. Its deletion AUC is what ordering the pixels by chance gives; a map is faithful only when deleting in
    its order lowers the score faster (a lower deletion AUC). Coarse rather than per-pixel noise, so both orders
    delete blobs of a similar size, not blobs against salt-and-pepper."""
    from scipy.ndimage import zoom

    shape = tuple(int(v) for v in shape)
    c = cell or (RANDOM_MAP_CELL_2D if len(shape) == 2 else RANDOM_MAP_CELL_3D)
    grid = tuple(max(1, int(math.ceil(v / c))) for v in shape)
    noise = np.random.default_rng(seed).random(grid).astype(np.float32)
    out = zoom(noise, [t / g for t, g in zip(shape, grid)], order=1, mode="nearest", grid_mode=True)
    out = out[tuple(slice(0, v) for v in shape)]
    if out.shape != shape:                        # zoom rounds; pad the last row / column if it came out short
        out = np.pad(out, [(0, t - o) for t, o in zip(shape, out.shape)], mode="edge")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def deletion_insertion_auc(predict_fn: Callable[[np.ndarray], np.ndarray], image: np.ndarray, heatmap: np.ndarray,
                           target: int, steps: int = 16, baseline: str = "blur", batch_size: int = 34,
                           return_curves: bool = False) -> dict:
    """Deletion and insertion curves (Petsiuk et al. 2018, RISE) and their areas under the curve.

    Pixels are ranked by the heatmap (most relevant first; ties broken by a fixed tiny jitter, not raster order).
    Deletion: step k replaces the top k/steps of the pixels with the baseline; insertion: step k puts the top k/steps
    of the original pixels into the baseline image. The curve is the target's probability at k = 0..steps, the AUC
    its trapezoid area on x in [0, 1]. Baseline "blur" (Gaussian, sigma = side/16; as in RISE's insertion),
    "mean" (the image's mean colour) or "black".
    predict_fn: uint8 [B, H, W, 3] -> probabilities [B, K]. A faithful map has a low deletion and a high insertion AUC.
    """
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    h, w = img.shape[:2]
    hm = _resize_to(np.asarray(heatmap, dtype=np.float32), (h, w))
    jitter = np.random.default_rng(0).random(h * w).astype(np.float64) * 1e-6
    order = np.argsort(-(np.nan_to_num(hm.ravel().astype(np.float64)) + jitter), kind="stable")
    base = _baseline_image(img, baseline)
    n = h * w
    counts = [int(round(n * k / steps)) for k in range(steps + 1)]
    flat_img, flat_base = img.reshape(n, -1), base.reshape(n, -1)
    batch = []
    for mode in ("deletion", "insertion"):
        for c in counts:
            sel = order[:c]
            if mode == "deletion":
                out = flat_img.copy()
                out[sel] = flat_base[sel]
            else:
                out = flat_base.copy()
                out[sel] = flat_img[sel]
            batch.append(out.reshape(img.shape))
    batch = np.stack(batch).astype(np.uint8)
    probs = np.concatenate([np.asarray(predict_fn(batch[i:i + batch_size]))
                            for i in range(0, len(batch), batch_size)])
    p = probs[:, int(target)].astype(np.float64)
    dele, ins = p[: steps + 1], p[steps + 1:]
    out = {"deletion_auc": curve_auc(dele), "insertion_auc": curve_auc(ins)}
    if return_curves:
        out.update({"fractions": [c / n for c in counts], "deletion_curve": dele.tolist(),
                    "insertion_curve": ins.tolist()})
    return out


# ------------------------------------------------------------------------------------------------ sanity checks
def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (resized to a's shape); 0 when either is constant."""
    a = np.asarray(a, dtype=np.float64)
    b = _resize_to(np.asarray(b, dtype=np.float64), a.shape).astype(np.float64)
    a, b = a.ravel(), b.ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    rho = stats.spearmanr(a, b).statistic
    return float(rho) if np.isfinite(rho) else 0.0


def randomise_parameters(net: nn.Module, seed: int = 0, modules: Iterable[nn.Module] | None = None) -> nn.Module:
    """Re-initialise (in place) the parameters of `modules` (default: every module of `net`) with their own
    `reset_parameters`; normalisation layers get reset affine parameters *and* running statistics. Modules without
    `reset_parameters` but with parameters get a normal(0, 0.02) draw. Seeded, so reproducible; the generator is
    derived from `seed` (not `torch.manual_seed(seed)` itself), so it never replays the draw that built a network
    initialised with `torch.manual_seed(seed)`."""
    targets = list(net.modules()) if modules is None else list(modules)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(int(np.random.SeedSequence([int(seed), 0x5EED]).generate_state(1)[0]))
        for mod in targets:
            own = list(mod.parameters(recurse=False))
            if hasattr(mod, "reset_parameters") and callable(mod.reset_parameters):
                mod.reset_parameters()
            elif own:
                for p in own:
                    p.normal_(0.0, 0.02)
    return net


def _top_down_stages(net: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """Parameter-holding leaf modules grouped by their top-level child, ordered from the output (head) down."""
    groups: dict[str, list[nn.Module]] = {}
    root = net
    kids = list(root.named_children())
    while len(kids) == 1:                     # descend through wrappers such as TimmClassifier.net
        root = kids[0][1]
        kids = list(root.named_children())
    for name, child in kids:
        mods = [m for m in child.modules() if list(m.parameters(recurse=False))]
        if mods:
            groups[name] = mods
    # further split a "blocks"/"layers" Sequential into its children, so the cascade has useful steps
    stages: list[tuple[str, list[nn.Module]]] = []
    for name, child in kids:
        if name not in groups:
            continue
        sub = list(child.named_children()) if isinstance(child, (nn.Sequential, nn.ModuleList)) else []
        if len(sub) > 1:
            for sname, sm in sub:
                mods = [m for m in sm.modules() if list(m.parameters(recurse=False))]
                if mods:
                    stages.append((f"{name}.{sname}", mods))
        else:
            stages.append((name, groups[name]))
    return stages[::-1]


def randomisation_check(model, image: np.ndarray, method: str = "gradcam", target=None, cascade: bool = False,
                        model_factory: Callable[[], nn.Module] | None = None, seed: int = 0,
                        threshold: float = 0.5, explain_fn=None) -> dict:
    """Model-parameter randomisation test (Adebayo et al. 2018).

    The map of `image` from `model` is compared (Spearman rank correlation) with the map of the same image and the
    same class from a copy of the network whose weights were re-initialised: the whole network ("full"), and with
    `cascade=True` also cumulatively from the top (head first, then each stage down to the stem). `model_factory`,
    when given, supplies the randomised network (e.g. `lambda: create_model(name)`) instead of re-initialising a
    copy. A map "changed" when |rho| < threshold (0.5): it depends on what the network learnt, as it should.
    Returns {spearman, changed, target, cascade: [{stage, spearman}, ...] (when asked)}.
    """
    from ..explain.attribution import explain, resolve_model

    m = resolve_model(model)
    xfn = explain_fn or explain
    pix = np.asarray(getattr(image, "pixels", image))
    if explain_fn is None:
        ref_map, _, idx = _map_and_target(m, pix, method, target)
        tgt = idx[0]
    else:
        from ..explain.attribution import target_indices, make_predict_fn, to_pixels

        probs = make_predict_fn(m)(to_pixels(pix)[None])
        tgt = target_indices(target, m.classes, torch.as_tensor(probs.argmax(1)))[0]
        ref_map = xfn(m, pix, method, tgt)

    def map_of(net: nn.Module) -> np.ndarray:
        rm = copy.copy(m)
        rm.net = net
        return xfn(rm, pix, method, tgt)

    if model_factory is not None:
        rnet = model_factory()
        rnet.to(m.device)
    else:
        rnet = randomise_parameters(copy.deepcopy(m.net), seed=seed)
    rnet.eval()
    rho = spearman(ref_map, map_of(rnet))
    out = {"spearman": rho, "changed": bool(abs(rho) < threshold), "target": int(tgt)}
    if cascade:
        steps = []
        cnet = copy.deepcopy(m.net).eval()
        for name, mods in _top_down_stages(cnet):
            randomise_parameters(cnet, seed=seed, modules=mods)
            steps.append({"stage": name, "spearman": spearman(ref_map, map_of(cnet))})
        out["cascade"] = steps
    return out


def _map_and_target(m, pixels, method, target):
    from ..explain.attribution import explain_batch, to_pixels

    maps, _, idx = explain_batch(m, to_pixels(pixels)[None], method, target)
    return maps[0], None, idx


# ------------------------------------------------------------------------------------------------ stability
def shift_image(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate by (dy, dx) pixels, filling the uncovered border with the edge values."""
    h, w = img.shape[:2]
    pad = [(max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0))] + [(0, 0)] * (img.ndim - 2)
    p = np.pad(img, pad, mode="edge")
    y0, x0 = max(-dy, 0), max(-dx, 0)
    return p[y0:y0 + h, x0:x0 + w]


def perturb(image_uint8: np.ndarray, kind: str, rng: np.random.Generator, noise_sigma: float = 0.03,
            brightness: float = 1.15, shift_px: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """One perturbed copy in pixel space (intensities in [0, 1], back to uint8). Returns (image, (dy, dx) shift)."""
    x = image_uint8.astype(np.float32) / 255.0
    dydx = (0, 0)
    if kind == "noise":
        x = x + rng.normal(0.0, noise_sigma, size=x.shape).astype(np.float32)
    elif kind == "brightness":
        x = x * brightness
    elif kind == "shift":
        s = shift_px if shift_px is not None else max(2, int(round(min(x.shape[:2]) / 56.0)))
        dydx = (s, s)
        x = shift_image(x, *dydx)
    elif kind not in ("none", "identity"):
        raise ValueError(f"unknown perturbation {kind!r}; use noise, brightness, shift or none")
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8), dydx


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two maps in [0, 1] (skimage, data_range 1, window fitted to small maps)."""
    from skimage.metrics import structural_similarity

    a = np.asarray(a, dtype=np.float64)
    b = _resize_to(np.asarray(b, dtype=np.float64), a.shape).astype(np.float64)
    win = min(7, min(a.shape) // 2 * 2 - 1 if min(a.shape) % 2 == 0 else min(a.shape))
    if win < 3:
        return float(np.allclose(a, b))
    return float(structural_similarity(a, b, data_range=1.0, win_size=win))


def stability_under_perturbation(explain_fn: Callable[[np.ndarray], np.ndarray], image_uint8: np.ndarray,
                                 kinds: Sequence[str] = ("noise", "brightness", "shift"), noise_sigma: float = 0.03,
                                 brightness: float = 1.15, shift_px: int | None = None, seed: int = 0,
                                 reference: np.ndarray | None = None) -> dict:
    """How much a map moves when the image is slightly perturbed, per kind: {kind: {ssim, spearman}}.

    Perturbations act in pixel space on [0, 1] intensities (unlike the ResNet50-XAI source, which added noise after
    mean subtraction): Gaussian noise with sigma `noise_sigma`, brightness x `brightness` (clipped), and a shift by
    `shift_px` pixels down-right (default ~4 px at 224) whose map is shifted back before comparison; the border
    strip the shift uncovered is left out of the comparison. 1 = unchanged map.
    explain_fn: uint8 image -> heatmap [H, W]; `reference` is the map of the unperturbed image (computed if None).
    """
    img = np.asarray(getattr(image_uint8, "pixels", image_uint8))
    ref = np.asarray(explain_fn(img) if reference is None else reference, dtype=np.float32)
    rng = np.random.default_rng(seed)
    out = {}
    for kind in kinds:
        pimg, (dy, dx) = perturb(img, kind, rng, noise_sigma, brightness, shift_px)
        pm = _resize_to(np.asarray(explain_fn(pimg), dtype=np.float32), ref.shape)
        a, b = ref, pm
        if dy or dx:
            b = shift_image(pm, -dy, -dx)
            h, w = ref.shape
            a, b = a[: h - abs(dy), : w - abs(dx)], b[: h - abs(dy), : w - abs(dx)]
        out[kind] = {"ssim": ssim(a, b), "spearman": spearman(a, b)}
    return out


# ------------------------------------------------------------------------------------------------ populations
def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def class_consistency(maps: Sequence[np.ndarray]) -> float:
    """Mean pairwise cosine similarity of maps (resized to the first map's shape): 1 = the same map every time.
    NaN for fewer than two maps. Computed per class by the caller (seed 003: consistency within a class)."""
    if len(maps) < 2:
        return float("nan")
    shape = np.asarray(maps[0]).shape
    flat = [_resize_to(np.asarray(m, dtype=np.float32), shape).ravel().astype(np.float64) for m in maps]
    return float(np.mean([_cos(a, b) for a, b in itertools.combinations(flat, 2)]))


def class_consistency_by_label(maps: Sequence[np.ndarray], labels: Sequence) -> dict:
    """{label: mean pairwise cosine} for labels with >= 2 maps, plus "mean" over those labels."""
    by: dict = {}
    for mp, lab in zip(maps, labels):
        by.setdefault(lab, []).append(mp)
    out = {str(k): class_consistency(v) for k, v in by.items() if len(v) >= 2}
    vals = [v for v in out.values() if np.isfinite(v)]
    out["mean"] = float(np.mean(vals)) if vals else float("nan")
    return out


def _centre_shares(items) -> np.ndarray:
    from ..explain.zones import centre_lr_shares

    vals = []
    for it in items:
        if isinstance(it, dict):
            vals.append(float(it["centre"]))
        elif np.ndim(it) == 2:
            vals.append(centre_lr_shares(np.asarray(it))["centre"])
        else:
            vals.append(float(it))
    return np.asarray(vals, dtype=np.float64)


def _corr(x: np.ndarray, y: np.ndarray) -> dict:
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": n, "pearson": float("nan"), "pearson_p": float("nan"), "spearman": float("nan"),
                "spearman_p": float("nan")}
    pr = stats.pearsonr(x, y)
    sr = stats.spearmanr(x, y)
    return {"n": n, "pearson": float(pr.statistic), "pearson_p": float(pr.pvalue),
            "spearman": float(sr.statistic), "spearman_p": float(sr.pvalue)}


def centre_attention_vs_confidence(centre_shares_or_maps, confidences: Sequence[float]) -> dict:
    """Pearson and Spearman correlation (with p-values) between the centre share of each map (seed 002's "central
    attention") and the model's confidence. Items may be heatmaps, zone dicts or centre shares."""
    x = _centre_shares(centre_shares_or_maps)
    y = np.asarray(confidences, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError("one confidence per map")
    return _corr(x, y)


def correct_vs_misclassified(values, correct: Sequence[bool]) -> dict:
    """Summary of a per-image attention value (centre share by default: items may be heatmaps, zone dicts or
    numbers) for correct and misclassified predictions: n, mean, median, std per group, the difference of means
    and a two-sided Mann-Whitney U p-value (NaN when a group has < 2 images)."""
    v = _centre_shares(values)
    c = np.asarray(correct, dtype=bool)
    if len(v) != len(c):
        raise ValueError("one correctness flag per value")

    def summary(a: np.ndarray) -> dict:
        if len(a) == 0:
            return {"n": 0, "mean": float("nan"), "median": float("nan"), "std": float("nan")}
        return {"n": int(len(a)), "mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std())}

    a, b = v[c], v[~c]
    p = float(stats.mannwhitneyu(a, b).pvalue) if len(a) >= 2 and len(b) >= 2 else float("nan")
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else float("nan")
    return {"correct": summary(a), "misclassified": summary(b), "difference": diff, "mannwhitney_p": p}


def finite_or_none(x) -> float | None:
    """JSON-friendly float (NaN / inf -> None)."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
