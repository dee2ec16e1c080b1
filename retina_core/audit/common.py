"""What explain-eval's 2-D (`evaluate`), volume / fusion (`evaluate_nd`) and counterfactual (`counterfactual`) runs
share: the sample types and their resizing, the draw of records (round-robin over labels; the patient-level split
training used), the statistics (finite means, the random-map reference, timing ratios), the checks every map gets
whatever its dimensionality (`check_map`: deletion / insertion against a random map, the randomised model's map,
stability; their summaries into the report's keys) and the loop over methods, the ranking / recommendation of
methods, and the JSON clean-up of a report. What differs between a 2-D image, a volume and one input of a pair (how
a map is scored by deletion, compared with the randomised model's, perturbed) comes in as functions.

It imports none of those three modules, so they import it (evaluate -> counterfactual -> evaluate_nd -> common).
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from ..errors import RetinaInputError
from ..explain import volume_methods
from ..io.datasets import load_dataset, training_splits
from ..landmarks import field_of_view
from ..modality import Modality
from . import real_lesions, trust

if TYPE_CHECKING:
    from ..models.loading import LoadedModel

log = logging.getLogger(__name__)

# metric -> +1 if higher is better, -1 if lower is better (used for the ranking)
RANKED_METRICS = {"pointing_game": 1, "energy_pointing_game": 1, "insertion_auc": 1, "deletion_auc": -1,
                  "randomisation_abs_spearman": -1, "stability_ssim": 1, "stability_spearman": 1}
SPEED_TARGET = 1.3          # heatmap + prediction at most 1.3x a bare forward (the default path's budget)
RANDOMISATION_LIMIT = 0.5   # mean |Spearman| between maps of the trained and the randomised model must stay below
ND_MODALITIES = (Modality.OCT_VOLUME, Modality.FUNDUS_OCT)   # scored by `evaluate_nd` (3-D / per-modality maps)


@dataclass
class Sample:
    image: np.ndarray                 # uint8 [H, W, 3] at evaluation size
    label: str | None
    mask: np.ndarray | None           # bool [H, W], union of the lesion masks (None / empty: no lesion)
    modality: str = ""
    landmarks: dict = field(default_factory=dict)   # fovea_xy, disc_xy, disc_radius, eye (fundus); fovea_x, span_mm
    name: str = ""
    masks: dict = field(default_factory=dict)       # real lesion sets: {lesion code: bool [H, W]} (MA, HE, EX, SE, OD)
    fov: np.ndarray | None = None                   # real lesion sets: bool [H, W] field of view (chance baselines)


# ------------------------------------------------------------------------------------------------ samples
def resize_sample(s: Sample, size: tuple[int, int] | None) -> Sample:
    """The sample at (H, W) `size` (None: as it is): the image by area / bilinear interpolation, its masks and
    landmarks scaled with it (a lesion smaller than a pixel keeps its centre pixel)."""
    if size is None or s.image.shape[:2] == tuple(size):
        return replace(s, fov=field_of_view(s.image)) if s.masks and s.fov is None else s
    h0, w0 = s.image.shape[:2]
    h, w = size
    img = cv2.resize(s.image, (w, h), interpolation=cv2.INTER_AREA if h < h0 else cv2.INTER_LINEAR)
    mask = None
    if s.mask is not None:
        mask = cv2.resize(s.mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
        if s.mask.any() and not mask.any():     # a lesion smaller than one pixel at this size: keep its centre
            ys, xs = np.nonzero(s.mask)
            mask[min(h - 1, int(ys.mean() * h / h0)), min(w - 1, int(xs.mean() * w / w0))] = True
    sx, sy = w / w0, h / h0
    lm = dict(s.landmarks)
    if "fovea_xy" in lm:
        lm["fovea_xy"] = (lm["fovea_xy"][0] * sx, lm["fovea_xy"][1] * sy)
    if "disc_xy" in lm:
        lm["disc_xy"] = (lm["disc_xy"][0] * sx, lm["disc_xy"][1] * sy)
    if "disc_radius" in lm:
        lm["disc_radius"] = lm["disc_radius"] * (sx + sy) / 2
    if "fovea_x" in lm:
        lm["fovea_x"] = lm["fovea_x"] * sx
    masks, fov = {}, None
    if s.masks:       # real lesions: "any" pooling keeps microaneurysms of a few pixels; the union follows the parts
        masks = {k: real_lesions.resize_mask_any(v, (h, w)) for k, v in s.masks.items()}
        mask = real_lesions.dr_union(masks)
        fov = field_of_view(img)
    return Sample(img, s.label, mask, s.modality, lm, s.name, masks, fov)


def resize_2d(img: np.ndarray, mask: np.ndarray | None, size: tuple[int, int]):
    """(image, mask) at (H, W) `size`, as `resize_sample` resizes them."""
    s = resize_sample(Sample(img, None, mask), tuple(size))
    return s.image, s.mask


def resize_volume(vol: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """A float32 [D, H, W] volume in [0, 1] at `size` (trilinear), clipped to [0, 1]: `volume_methods.resize_volume`
    with clip."""
    return volume_methods.resize_volume(vol, size, clip=True)


def union_mask(masks: dict | None, shape) -> np.ndarray:
    """The union of a {name: mask} dict as one bool mask (all False of `shape` when there is none)."""
    ms = [np.asarray(v, bool) for v in (masks or {}).values()]
    return np.logical_or.reduce(ms) if ms else np.zeros(shape, bool)


def pick_round_robin(records, n: int, seed: int) -> list:
    """Up to n records, round-robin over their labels in sorted order, each label's records shuffled with `seed`."""
    rng = np.random.default_rng(seed)
    by: dict[str, list] = {}
    for r in records:
        by.setdefault(r.label, []).append(r)
    for v in by.values():
        rng.shuffle(v)
    chosen = []
    while len(chosen) < n and any(by.values()):
        for lab in sorted(by):
            if by[lab] and len(chosen) < n:
                chosen.append(by[lab].pop())
    return chosen


def split_records(m: LoadedModel, data_path, split: str | None) -> tuple[list, str]:
    """The data set's records (labels mapped to the model's classes as in training) of `split`, drawn with the
    patient-level split training used (seed from the manifest entry, else 0). split None / "all": every record."""
    from ..models.multimodal import binary_label

    needs = "volumes" if m.cfg.modality == Modality.OCT_VOLUME else "paired"
    root = Path(data_path).expanduser()
    if not root.exists():
        raise RetinaInputError(f"Data folder {data_path} does not exist.")
    index = load_dataset(root)
    if index.layout != needs:
        what = {"paired": "fundus + OCT pairs (pairs.csv with fundus/ and oct/ images)",
                "volumes": "OCT volumes (NIfTI files + metadata.csv)"}[needs]
        kind = "paired" if needs == "paired" else "oct-volume"
        raise RetinaInputError(f"{m.name} reads {what}, but {data_path} is a {index.layout!r} data set. Point "
                               f"--data at such a folder, e.g. one made with `python -m retina_core data phantoms "
                               f"--kind {kind} --n 24 --out DIR`.")
    classes = tuple(m.cfg.classes)
    recs = [replace(r, label=r.label if r.label in classes else binary_label(r.label)) for r in index.records]
    recs = [r for r in recs if r.label in classes]
    if not recs:
        raise RetinaInputError(f"{data_path} has no sample of the classes of {m.name}: {', '.join(classes)}.")
    if split in (None, "", "all"):
        return recs, "all"
    if split not in ("train", "val", "test"):
        raise RetinaInputError(f"Unknown split {split!r}; use train, val, test or all.")
    seed = int((m.entry.get("config") or {}).get("seed", 0) or 0)
    try:
        chosen = training_splits(recs, seed).get(split, [])
    except RetinaInputError:
        chosen = []
    if not chosen:
        raise RetinaInputError(f"The {split!r} split of {data_path} is empty ({len(recs)} samples in all); use "
                               f"--split all for a data set the model was not trained on.")
    return chosen, split


# ------------------------------------------------------------------------------------------------ statistics
def finite_mean(xs) -> float | None:
    """The mean of the finite values of `xs` (None, NaN and inf skipped); None when there is none."""
    xs = [float(x) for x in xs if x is not None and np.isfinite(x)]
    return float(np.mean(xs)) if xs else None


def cached(cache: dict | None, key, compute):
    """compute(), remembered in `cache` under `key` (no cache: computed every time)."""
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def random_order_reference(dels: list, dels_rand: list, ins_rand: list) -> dict:
    """Faithfulness against chance: the deletion / insertion AUC of a random map (`trust.random_map`) on the same
    images, and whether the method's map deletes what matters faster (a lower mean deletion AUC)."""
    d, dr = finite_mean(dels), finite_mean(dels_rand)
    return {"deletion_auc_random_map": dr, "insertion_auc_random_map": finite_mean(ins_rand),
            "faithful_vs_random": None if d is None or dr is None else bool(d < dr)}


def median_time_ratio(forward, heat, repeats: int) -> float:
    """Median of heat() time / forward() time over interleaved repeats, after one warm-up call of each."""
    for f in (forward, heat):
        f()
    ratios = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward()
        t1 = time.perf_counter()
        heat()
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / max(t1 - t0, 1e-9))
    return float(np.median(ratios))


# ------------------------------------------------------------------------------------------------ per-map checks
# The checks every map gets, 2-D image, volume or one input of a pair alike: what differs (how a map is scored by
# deletion, how the randomised model's map is compared, how the input is perturbed) comes in as functions.
NOISE_SIGMA, BRIGHTNESS = 0.03, 1.15     # the stability perturbations (intensities in [0, 1])


def method_list(methods) -> list[str]:
    """"a, b" or a sequence -> a list of method names."""
    return [x.strip() for x in methods.split(",") if x.strip()] if isinstance(methods, str) else list(methods)


def stability_lists(kinds) -> dict:
    """Per perturbation kind, the SSIM and Spearman values to collect (`check_map`, `stability_summary`)."""
    return {k: {"ssim": [], "spearman": []} for k in kinds}


def check_map(per: dict, stab: dict, hm: np.ndarray, seed_i: int, score=None, reference: dict | None = None,
              key=None, randomised=None, perturbed=None) -> None:
    """Faithfulness, randomisation and stability of one map, appended to `per` ("del", "ins", "del_rand",
    "ins_rand", "rho", "r_empty") and `stab` ({kind: {"ssim", "spearman"}}).

    score(map) -> {deletion_auc, insertion_auc} of the input with that map (None: skipped); the random-map reference
    (`trust.random_map(hm.shape, seed_i)`) is remembered in `reference` under `key` (the same for every method).
    randomised() -> (rho, empty) of the randomised model's map against hm (None: skipped). perturbed() -> {kind:
    {ssim, spearman}} of the maps of perturbed inputs against hm (None: skipped)."""
    if score is not None:
        di = score(hm)
        per["del"].append(di["deletion_auc"])
        per["ins"].append(di["insertion_auc"])
        dr = cached(reference, key, lambda: score(trust.random_map(hm.shape, seed_i)))
        per["del_rand"].append(dr["deletion_auc"])
        per["ins_rand"].append(dr["insertion_auc"])
    if randomised is not None:
        rho, empty = randomised()
        per["r_empty"].append(empty)
        per["rho"].append(rho)
    if perturbed is not None:
        for k, v in perturbed().items():
            stab[k]["ssim"].append(v["ssim"])
            stab[k]["spearman"].append(v["spearman"])


def faithfulness_summary(per: dict, suffix: str = "") -> dict:
    """deletion_auc, insertion_auc and the random-map reference of `check_map`'s lists (keys + suffix)."""
    out = {"deletion_auc": finite_mean(per["del"]), "insertion_auc": finite_mean(per["ins"]),
           **random_order_reference(per["del"], per["del_rand"], per["ins_rand"])}
    return {k + suffix: v for k, v in out.items()}


def randomisation_summary(per: dict, suffix: str = "", changed: bool = True) -> dict:
    """The model-randomisation figures of `check_map`'s lists (keys + suffix; changed: with the share of maps
    whose |rho| < 0.5)."""
    rho = per["rho"]
    out = {"randomisation_spearman": finite_mean(rho), "randomisation_abs_spearman": finite_mean([abs(r) for r in rho])}
    if changed:
        out["randomisation_changed_fraction"] = finite_mean([float(abs(r) < 0.5) for r in rho])
    out["randomisation_empty_fraction"] = finite_mean([float(e) for e in per["r_empty"]])
    return {k + suffix: v for k, v in out.items()}


def stability_summary(stab: dict, suffix: str = "") -> dict:
    """stability ({kind: {ssim, spearman}}), stability_ssim and stability_spearman (means over the kinds)."""
    st = {k: {"ssim": finite_mean(v["ssim"]), "spearman": finite_mean(v["spearman"])} for k, v in stab.items()}
    return {"stability" + suffix: st, "stability_ssim" + suffix: finite_mean([v["ssim"] for v in st.values()]),
            "stability_spearman" + suffix: finite_mean([v["spearman"] for v in st.values()])}


def run_methods(methods, evaluate, cost, name: str = "", cost_in_wall: bool = False) -> dict[str, dict]:
    """{method: evaluate(method) with wall_seconds and cost_vs_forward (cost(method))}; cost_in_wall: the wall time
    includes the cost measurement (volume / fusion runs), else it is the evaluation's alone (2-D runs)."""
    results = {}
    for meth in methods:
        t0 = time.perf_counter()
        r = evaluate(meth)
        if cost_in_wall:
            r["cost_vs_forward"] = cost(meth)
        r["wall_seconds"] = round(time.perf_counter() - t0, 2)
        if not cost_in_wall:
            r["cost_vs_forward"] = cost(meth)
        results[meth] = r
        log.info("explain-eval %s %s done in %.1fs", name, meth, r["wall_seconds"])
    return results


def evaluation_samples(phantoms, data_path, from_phantoms, from_data, n: int, empty: str
                       ) -> tuple[list, str, str | None]:
    """(samples, source, split used) of an explain-eval run: the first n of from_phantoms() when `phantoms` are
    given, else from_data() -> (samples, split used or None) of the `data_path` folder."""
    used = None
    if phantoms is not None:
        samples = from_phantoms()[:n]
        source = f"{len(samples)} in-memory phantoms"
    elif data_path is not None:
        samples, used = from_data()
        source = str(data_path)
    else:
        raise RetinaInputError("explain_eval needs data_path or phantoms.")
    if not samples:
        raise RetinaInputError(empty)
    return samples, source, used


def randomised_net(net, seed: int, randomisation: bool = True):
    """A randomised copy of `net` for the model-randomisation check (None: the check is not run)."""
    return trust.randomise_parameters(copy.deepcopy(net), seed=seed).eval() if randomisation else None


# ------------------------------------------------------------------------------------------------ ranking
def ranked(results: dict[str, dict]) -> dict:
    """The report's methods, their ranking and the recommended default."""
    ranking = rank_methods(results)
    return {"methods": results, "ranking": ranking, "recommended_default": recommend_default(results, ranking)}


def passes_randomisation(report: dict) -> bool | None:
    """The sanity verdict of one method's explain-eval results: mean |rho| below RANDOMISATION_LIMIT. None when the
    check was not run, or when it is inconclusive: the randomised model's maps were mostly empty (a one-logit model's
    Grad-CAM after ReLU), so rho is 0 by convention and says nothing."""
    rho = report.get("randomisation_abs_spearman")
    if rho is None or (report.get("randomisation_empty_fraction") or 0.0) > 0.5:
        return None
    return bool(rho < RANDOMISATION_LIMIT)


def rank_methods(results: dict[str, dict]) -> list[dict]:
    """Mean rank over RANKED_METRICS (1 = best; ties share the average rank); metrics missing for a method are
    skipped for it. Class consistency and speed are reported but not ranked (their 'better' is not one-sided)."""
    from scipy.stats import rankdata

    ranks: dict[str, dict[str, float]] = {m: {} for m in results}
    for metric, sign in RANKED_METRICS.items():
        have = [(m, r.get(metric)) for m, r in results.items() if r.get(metric) is not None]
        if len(have) < 2:
            continue
        rk = rankdata([-sign * v for _, v in have], method="average")
        for (m, _), k in zip(have, rk):
            ranks[m][metric] = float(k)
    rows = [{"method": m, "mean_rank": (float(np.mean(list(r.values()))) if r else None), "ranks": r}
            for m, r in ranks.items()]
    rows.sort(key=lambda d: (d["mean_rank"] is None, d["mean_rank"] or 0.0))
    return rows


def recommend_default(results: dict[str, dict], ranking: list[dict]) -> dict:
    """The best-ranked method that passes the randomisation check, deletes what matters faster than a random map
    (when that was measured) and meets the speed target (None if none)."""
    why = {}
    for row in ranking:
        meth, r = row["method"], results[row["method"]]
        rho, cost = r.get("randomisation_abs_spearman"), r.get("cost_vs_forward")
        problems = []
        if passes_randomisation(r) is False:
            problems.append(f"fails the randomisation check (mean |rho| {rho:.2f} >= {RANDOMISATION_LIMIT})")
        if r.get("faithful_vs_random") is False:
            problems.append(f"no more faithful than a random map (deletion AUC {r['deletion_auc']:.2f} >= "
                            f"{r['deletion_auc_random_map']:.2f})")
        if cost is not None and cost > SPEED_TARGET:
            problems.append(f"too slow ({cost:.2f}x a bare forward > {SPEED_TARGET}x)")
        if not problems:
            return {"method": meth, "mean_rank": row["mean_rank"], "pointing_game": r.get("pointing_game"),
                    "cost_vs_forward": cost, "randomisation_abs_spearman": rho, "passed_over": why,
                    "deletion_auc": r.get("deletion_auc"), "deletion_auc_random_map": r.get("deletion_auc_random_map"),
                    "rule": f"best mean rank among methods with mean |rho| < {RANDOMISATION_LIMIT}, a deletion AUC "
                            f"below a random map's (where measured) and cost <= {SPEED_TARGET}x a bare forward"}
        why[meth] = "; ".join(problems)
    return {"method": None, "passed_over": why}


def json_ready(obj):
    """JSON-ready: NaN / inf -> None, numpy scalars -> Python numbers, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return trust.finite_or_none(obj)
    return obj
