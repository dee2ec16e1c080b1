"""explain-eval for the models whose input is not one 2-D image: the OCT volume model (`oct_volume`, 3-D per-slice
maps) and the fundus + OCT fusion model (`fundus+oct`, one map per modality).

`audit.evaluate.explain_eval` dispatches here on the model's modality; the report has the 2-D report's shape
(`methods` -> {method: metrics}, `ranking`, `recommended_default`, `notes`), so `rank_methods`,
`passes_randomisation` and `audit.evidence.method_trust` read it unchanged.

Volumes (maps [D, H, W] of the disease logit at the model's input size):
  pointing_game (3-D: the map's peak inside the union lesion mask dilated in-plane by the default tolerance),
  energy_pointing_game (3-D), slice_hit_rate (the slice with the largest summed map contains a lesion; chance
  level in slice_hit_baseline), deletion / insertion AUC on P(disease) (voxels blurred / restored in map order;
  volumes the model calls disease), the model-randomisation rho, stability (SSIM / Spearman of the maps under
  Gaussian noise, brightness and an in-plane shift), cost_vs_forward. Methods (`volume_methods.VOLUME_METHODS`):
  "gradcam" (the single-pass 3-D Grad-CAM the app uses), the pytorch-grad-cam family on the same layer
  ("gradcam-reference" is its GradCAM: a cross-check of the same method), a trilinear Score-CAM and captum IG.
Fusion (maps of the predicted class per image, at each encoder's input size; "gradcam" or "integrated_gradients"):
  per modality (`_fundus`, `_oct`) pointing game, energy pointing game, deletion / insertion (one image edited,
  the other fixed), randomisation rho and stability; overall values pool both modalities. The maps of the two
  modalities are min-max normalised separately, so no per-modality share of the attribution is reported.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import RetinaInputError
from ..explain.pair_methods import FUSION_METHODS, modality_cams, pair_maps, pair_tensors, resolve_net
from ..explain.volume_methods import VOLUME_METHODS, volume_blur  # every CAM-family method, a 3-D Score-CAM and IG
from ..io.datasets import lesion_mask_files, read_volume_mask, resize_mask_3d
from ..modality import IMAGE_MODALITIES, Modality
from ..models.loading import LoadedModel, preprocess_image, to_pixels
from ..models.volume3d import metadata_tensor
from . import trust
from .common import (BRIGHTNESS, ND_MODALITIES, NOISE_SIGMA, check_map, evaluation_samples, faithfulness_summary,
                     finite_mean, json_ready, median_time_ratio, method_list, pick_round_robin, randomisation_summary,
                     randomised_net, ranked, resize_2d, resize_volume, run_methods, split_records, stability_lists,
                     stability_summary, union_mask)

log = logging.getLogger(__name__)

MODALITIES = IMAGE_MODALITIES        # the fusion model's inputs, one map each


@dataclass
class VolumeSample:
    volume: np.ndarray                # float32 [D, H, W] in [0, 1] at the model's input size
    meta: dict                        # age, sex, va_logmar, cst_um, hba1c (missing -> training mean)
    eye: str | None
    label: str | None
    mask: np.ndarray | None           # bool [D, H, W], union of the lesion masks
    name: str = ""


@dataclass
class PairSample:
    fundus: np.ndarray                # uint8 [H, W, 3] at the fundus encoder's input size
    oct: np.ndarray                   # uint8 [H', W', 3] at the OCT encoder's input size
    label: str | None
    fundus_mask: np.ndarray | None    # bool [H, W]
    oct_mask: np.ndarray | None       # bool [H', W']
    name: str = ""


# ------------------------------------------------------------------------------------------------ resizing


# ------------------------------------------------------------------------------------------------ samples


def volume_samples_from_dataset(m: LoadedModel, data_path, n: int, seed: int = 0, split: str | None = "test"
                                ) -> tuple[list[VolumeSample], str]:
    from ..io.decode import read_image

    recs, used = split_records(m, data_path, split)
    root = Path(data_path).expanduser()
    size = tuple(m.cfg.input_size[1:])
    out = []
    for r in pick_round_robin(recs, n, seed):
        img = read_image(r.path)
        if img.kind != "volume":
            raise RetinaInputError(f"{r.path} is not a volume ({img.kind}).")
        vol = np.asarray(img.pixels, np.float32)
        mask = read_volume_mask(root, Path(r.path), vol.shape)
        out.append(VolumeSample(resize_volume(vol, size), dict(r.meta), r.eye, r.label,
                                resize_mask_3d(mask, size), Path(r.path).name))
    return out, used


def pair_samples_from_dataset(m: LoadedModel, data_path, n: int, seed: int = 0, split: str | None = "test"
                              ) -> tuple[list[PairSample], str]:
    from PIL import Image

    from ..io.decode import read_image

    recs, used = split_records(m, data_path, split)
    root = Path(data_path).expanduser()
    out = []
    for r in pick_round_robin(recs, n, seed):
        if "oct" not in r.meta:
            raise RetinaInputError(f"{r.path} has no OCT partner: {m.name} reads pairs.csv data sets.")
        imgs, masks = [], []
        for p in (Path(r.path), Path(r.meta["oct"])):
            px = to_pixels(read_image(p).pixels)
            try:
                rel = p.relative_to(root).as_posix()
            except ValueError:
                rel = ""
            parts = [np.asarray(Image.open(q).convert("L")) > 127 for q in lesion_mask_files(root, rel, ".png")] if rel \
                else []
            parts = [q for q in parts if q.shape == px.shape[:2]]
            imgs.append(px)
            masks.append(np.logical_or.reduce(parts) if parts else np.zeros(px.shape[:2], bool))
        out.append(_pair_at_size(m, imgs[0], imgs[1], masks[0], masks[1], r.label, Path(r.path).stem))
    return out, used


def _pair_at_size(m: LoadedModel, fundus, oct_, fmask, omask, label, name) -> PairSample:
    f, fm = resize_2d(fundus, fmask, tuple(m.net.fundus_cfg.input_size[1:]))
    o, om = resize_2d(oct_, omask, tuple(m.net.oct_cfg.input_size[1:]))
    return PairSample(f, o, label, fm, om, name)


def volume_samples_from_phantoms(m: LoadedModel, phantoms: Sequence) -> list[VolumeSample]:
    """In-memory `phantoms.oct_volume` phantoms -> samples at the model's input size."""
    size = tuple(m.cfg.input_size[1:])
    out = []
    for i, ph in enumerate(phantoms):
        vol = np.asarray(getattr(ph, "image", None))
        if getattr(ph, "modality", "") != Modality.OCT_VOLUME or vol.ndim != 3:
            raise RetinaInputError(f"{m.name} needs OCT volume phantoms (`phantoms.oct_volume`); item {i} is a "
                                   f"{str(getattr(ph, 'modality', type(ph).__name__))!r} phantom.")
        meta = dict(ph.meta or {})
        out.append(VolumeSample(resize_volume(vol, size), meta, meta.get("eye"), ph.label,
                                resize_mask_3d(union_mask(ph.masks, vol.shape), size), f"phantom{i}"))
    return out


def pair_samples_from_phantoms(m: LoadedModel, pairs: Sequence) -> list[PairSample]:
    """In-memory (fundus, OCT) phantom pairs (`phantoms.paired_phantoms`) -> samples at the encoders' sizes."""
    out = []
    for i, pr in enumerate(pairs):
        try:
            f, o = pr
        except (TypeError, ValueError):
            f = o = None
        if getattr(f, "modality", "") != Modality.FUNDUS or getattr(o, "modality", "") != Modality.OCT:
            raise RetinaInputError(f"{m.name} needs (fundus, OCT) phantom pairs (`phantoms.paired_phantoms`); item "
                                   f"{i} is not one.")
        fp, op = to_pixels(f.image), to_pixels(o.image)
        out.append(_pair_at_size(m, fp, op, union_mask(f.masks, fp.shape[:2]), union_mask(o.masks, op.shape[:2]),
                                 f.label, f"pair{i}"))
    return out


# ------------------------------------------------------------------------------------------------ helpers
def _auc(y) -> float:
    return trust.curve_auc(np.asarray(y, np.float64))


# ------------------------------------------------------------------------------------------------ volumes
def _meta_tensor(m: LoadedModel, s: VolumeSample) -> torch.Tensor:
    return meta_tensor_of(m, s.meta, s.eye)


def meta_tensor_of(m: LoadedModel, meta: dict, eye: str | None) -> torch.Tensor:
    """The clinical record as the volume model reads it: [1, M] raw values (NaN = not recorded)."""
    return metadata_tensor(m.net, meta, eye, m.device)


def _prep_volumes(m: LoadedModel, vols: np.ndarray) -> torch.Tensor:
    """float32 [B, D, H, W] in [0, 1] at the input size -> normalised [B, 1, D, H, W]."""
    x = torch.as_tensor(np.ascontiguousarray(vols, np.float32), device=m.device)[:, None]
    return (x - m.cfg.mean[0]) / m.cfg.std[0]


def _target_layer(m: LoadedModel) -> str:
    return m.cfg.target_layer or "net.layer4"


def volume_map(m: LoadedModel, net: nn.Module, vol: np.ndarray, meta_t: torch.Tensor, method: str
               ) -> tuple[float, np.ndarray]:
    """(P(disease), map float32 [D, H, W] in [0, 1] of the disease logit) of one volume at the input size
    (`volume_methods.volume_attribution`)."""
    from ..explain.volume_methods import volume_attribution

    logits, maps = volume_attribution(net, _prep_volumes(m, vol[None]), meta_t, method, _target_layer(m),
                                      mean=m.cfg.mean[0], std=m.cfg.std[0])
    p = float(torch.sigmoid(logits.float()[0, 0] / m.temperature))
    return p, np.asarray(maps[0], np.float32)


def volume_predict_fn(m: LoadedModel, meta_t: torch.Tensor, batch_size: int = 9):
    """predict(float32 [B, D, H, W] volumes in [0, 1] at the input size) -> P(disease) [B], the record `meta_t`
    fixed."""
    def predict(vols: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(vols), batch_size):
            x = _prep_volumes(m, vols[i:i + batch_size])
            out.append(m.predict_proba((x, meta_t.expand(len(x), -1)))[:, 1].cpu().numpy())
        return np.concatenate(out)
    return predict


def volume_deletion_insertion(predict, vol: np.ndarray, heatmap: np.ndarray, steps: int = 16) -> dict:
    """Deletion / insertion AUC of a [D, H, W] map (RISE, in 3-D): voxels are replaced by the blurred volume
    (deletion) or restored into it (insertion) in the map's order, steps + 1 points each; predict: float32
    [B, D, H, W] -> P(target) [B]."""
    n = vol.size
    jitter = np.random.default_rng(0).random(n) * 1e-6
    order = np.argsort(-(np.nan_to_num(heatmap.ravel().astype(np.float64)) + jitter), kind="stable")
    base = volume_blur(vol).ravel()
    flat = vol.astype(np.float32).ravel()
    batch = []
    for mode in ("deletion", "insertion"):
        for k in range(steps + 1):
            sel = order[:int(round(n * k / steps))]
            out = (flat if mode == "deletion" else base).copy()
            out[sel] = (base if mode == "deletion" else flat)[sel]
            batch.append(out.reshape(vol.shape))
    p = np.asarray(predict(np.stack(batch)), np.float64)
    return {"deletion_auc": _auc(p[:steps + 1]), "insertion_auc": _auc(p[steps + 1:])}


def perturb_volume(vol: np.ndarray, kind: str, rng: np.random.Generator, noise_sigma: float = NOISE_SIGMA,
                   brightness: float = BRIGHTNESS) -> tuple[np.ndarray, int]:
    """A perturbed copy of a [D, H, W] volume in [0, 1] (clipped) and its in-plane shift in px (down-right)."""
    s = 0
    if kind == "noise":
        v = vol + rng.normal(0.0, noise_sigma, size=vol.shape).astype(np.float32)
    elif kind == "brightness":
        v = vol * brightness
    elif kind == "shift":
        s = max(2, int(round(min(vol.shape[1:]) / 56.0)))
        v = trust.shift_image(vol.transpose(1, 2, 0), s, s).transpose(2, 0, 1)
    elif kind in ("none", "identity"):
        v = vol
    else:
        raise RetinaInputError(f"Unknown perturbation {kind!r}; use noise, brightness or shift.")
    return np.clip(v, 0.0, 1.0).astype(np.float32), s


def _compare_shifted(ref: np.ndarray, pm: np.ndarray, s: int) -> dict:
    a, b = ref, pm
    if s:
        b = trust.shift_image(pm.transpose(1, 2, 0), -s, -s).transpose(2, 0, 1)
        a, b = a[:, :-s, :-s], b[:, :-s, :-s]
    return {"ssim": trust.ssim(a, b), "spearman": trust.spearman(a, b)}


def volume_stability(explain_fn, vol: np.ndarray, kinds: Sequence[str], seed: int, reference: np.ndarray) -> dict:
    """{kind: {ssim, spearman}} of the maps of perturbed copies of a volume (`perturb_volume`, one generator seeded
    with `seed` across the kinds) against `reference`, a shift undone before the comparison: the volume
    counterpart of `trust.stability_under_perturbation`. explain_fn: volume -> map [D, H, W]."""
    rng = np.random.default_rng(seed)
    out = {}
    for kind in kinds:
        pv, sh = perturb_volume(vol, kind, rng)
        out[kind] = _compare_shifted(reference, explain_fn(pv), sh)
    return out


def _empty(hm: np.ndarray) -> bool:
    """A map with nothing in it (Grad-CAM's ReLU removed every cell: no evidence for the explained class)."""
    return not np.isfinite(hm).any() or float(np.ptp(np.nan_to_num(hm))) == 0.0


def compare_randomised(hm: np.ndarray, rm: np.ndarray) -> tuple[float, bool]:
    """(rho, empty) of the randomised model's map `rm` against `hm` (volume and pair maps): rho 0 where the
    randomised map is empty (the map vanished)."""
    empty = _empty(rm)
    return (0.0 if empty else trust.spearman(hm, rm)), empty


def _by_label(labels: list, flags: list) -> dict:
    out: dict[str, list] = {}
    for lab, f in zip(labels, flags):
        out.setdefault(str(lab), []).append(float(f))
    return {k: float(np.mean(v)) for k, v in sorted(out.items())}


def evaluate_volume_method(m: LoadedModel, samples: list[VolumeSample], method: str, rnet=None, steps: int = 16,
                           stability_kinds: Sequence[str] = ("noise", "brightness", "shift"), seed: int = 0,
                           tolerance_px: int | None = None, reference: dict | None = None,
                           image_led: Sequence[bool] | None = None) -> dict:
    """All metrics of one method on volume samples (see the module docstring). Samples whose map is empty (no
    disease evidence: normal volumes, mostly) count as misses in the pointing games and are left out of the
    faithfulness, randomisation, stability and consistency checks (there is nothing to check); a randomised
    model's empty map gives rho 0 (the map vanished). `image_led` (per sample, from `volume_input_summary`):
    the pointing game is also reported over the lesion volumes called disease mainly on the image's evidence."""
    classes = list(m.cfg.classes)
    per: dict[str, list] = {k: [] for k in ("pg", "pg_tie", "chance", "epg", "area", "slice", "slice_base", "del",
                                            "ins", "del_rand", "ins_rand", "rho", "r_empty", "sec", "correct", "maps",
                                            "labels", "empty", "pg_led")}
    stab = stability_lists(stability_kinds)
    n_stab = 0
    for i, s in enumerate(samples):
        mt = _meta_tensor(m, s)
        t0 = time.perf_counter()
        p, hm = volume_map(m, m.net, s.volume, mt, method)
        per["sec"].append(time.perf_counter() - t0)
        pred = classes[1] if p >= 0.5 else classes[0]
        label = s.label if s.label is not None else pred
        empty = _empty(hm)
        per["empty"].append(empty)
        per["labels"].append(label)
        per["correct"].append(None if s.label not in classes else s.label == pred)
        if not empty:
            per["maps"].append((hm, label))
        if s.mask is not None and s.mask.any():
            per["pg"].append(float(trust.pointing_game_3d(hm, s.mask, tolerance_px)))
            if image_led is not None and image_led[i]:
                per["pg_led"].append(per["pg"][-1])
            per["pg_tie"].append(trust.pointing_game_3d_tiebreak(hm, s.mask, tolerance_px))
            per["chance"].append(trust.pointing_game_3d_chance(s.mask, tolerance_px))
            per["epg"].append(trust.energy_pointing_game_3d(hm, s.mask))
            per["area"].append(float(s.mask.mean()))
            per["slice"].append(trust.slice_hit(hm, s.mask))
            per["slice_base"].append(float(s.mask.any(axis=(1, 2)).mean()))
        if empty:
            continue
        n_stab += bool(stability_kinds)
        predict = volume_predict_fn(m, mt)
        # the random-map reference is the same for every method (`reference`: cached across them)
        check_map(per, stab, hm, seed + i, reference=reference, key=i,
                  score=(lambda x, s=s, predict=predict: volume_deletion_insertion(predict, s.volume, x, steps))
                  if steps and p >= 0.5 else None,
                  randomised=(lambda s=s, mt=mt, hm=hm: compare_randomised(
                      hm, volume_map(m, rnet, s.volume, mt, method)[1])) if rnet is not None else None,
                  perturbed=lambda s=s, mt=mt, hm=hm: volume_stability(
                      lambda v: volume_map(m, m.net, v, mt, method)[1], s.volume, stability_kinds, seed, hm))
    flags = [c for c in per["correct"] if c is not None]
    res = {
        "n_images": len(samples),
        "n_lesion_images": len(per["pg"]),
        "pointing_game": finite_mean(per["pg"]),
        "pointing_game_tiebreak": finite_mean(per["pg_tie"]),
        "pointing_game_chance": finite_mean(per["chance"]),
        "energy_pointing_game": finite_mean(per["epg"]),
        "energy_baseline_mask_area": finite_mean(per["area"]),
        "slice_hit_rate": finite_mean(per["slice"]),
        "slice_hit_baseline": finite_mean(per["slice_base"]),
        "empty_map_fraction": finite_mean([float(e) for e in per["empty"]]),
        "empty_map_fraction_by_label": _by_label(per["labels"], per["empty"]),
        "n_faithfulness_images": len(per["del"]),
        **faithfulness_summary(per),
        "n_randomisation_images": len(per["rho"]),
        **randomisation_summary(per),
        "n_stability_images": n_stab,
        **stability_summary(stab),
        "class_consistency": trust.class_consistency_by_label([h for h, _ in per["maps"]],
                                                              [lab for _, lab in per["maps"]]),
        "seconds_per_image": finite_mean(per["sec"]),
    }
    if flags and len(flags) == len(per["correct"]):
        res["accuracy"] = float(np.mean(flags))
    if image_led is not None:
        res["pointing_game_image_led"] = finite_mean(per["pg_led"])
        res["n_lesion_images_image_led"] = len(per["pg_led"])
    return res


IMAGE_LED_SHARE = 0.5    # a suggestion rests mainly on the image when the image holds at least this share


def volume_input_summary(m: LoadedModel, samples: list[VolumeSample]) -> dict:
    """Exact Shapley values of P(disease) over the image and the clinical values (`explain.inputs`) per sample,
    summarised: {"image_led": [bool per sample: called disease and the image's share >= IMAGE_LED_SHARE],
    "by_label": {label: {n, mean share per input, p_image_only, p_metadata_only}} over the volumes called disease}.
    The 3-D map can only show the image's part: where a suggestion rests on HbA1c, no map can point at a lesion."""
    from ..explain.inputs import input_shapley

    led, rows = [], {}
    for s in samples:
        a = input_shapley(m, s.volume, s.meta, s.eye)
        sh = a.shares()
        called = a.p >= 0.5
        led.append(bool(called and sh["image"] >= IMAGE_LED_SHARE))
        if called:
            rows.setdefault(s.label or "unlabelled", []).append((sh, a.p_image_only, a.p_metadata_only))
    by_label = {lab: {"n_called_disease": len(v),
                      "mean_share": {k: float(np.mean([sh[k] for sh, _, _ in v])) for k in v[0][0]},
                      "p_image_only": float(np.mean([x for _, x, _ in v])),
                      "p_metadata_only": float(np.mean([x for _, _, x in v]))} for lab, v in rows.items()}
    return {"image_led": led, "by_label": by_label}


def volume_map_grid(m: LoadedModel, s: VolumeSample) -> list[int]:
    """Cells of the target layer's output (depth, height, width) that the 3-D Grad-CAM is upsampled from."""
    from ..explain.cam import gradcam_single_pass
    from ..models.volume3d import WithMeta

    _, raw = gradcam_single_pass(WithMeta(m.net, _meta_tensor(m, s)), _prep_volumes(m, s.volume[None]),
                                 "net." + _target_layer(m), [0])
    return list(raw.shape[1:])


def volume_cost_vs_forward(m: LoadedModel, s: VolumeSample, method: str, repeats: int = 9) -> float:
    """Median (P(disease) + map time) / (bare forward time) for one volume, interleaved repeats."""
    mt = _meta_tensor(m, s)
    x = _prep_volumes(m, s.volume[None])

    def forward():
        with torch.inference_mode():
            m.net(x, mt)

    return median_time_ratio(forward, lambda: volume_map(m, m.net, s.volume, mt, method),
                         repeats if method == "gradcam" else 3)


# ------------------------------------------------------------------------------------------------ fusion
def pair_predict_fn(m: LoadedModel, modality: str, other: np.ndarray, batch_size: int = 34):
    """predict(uint8 [B, H, W, 3] images of `modality`) -> probabilities [B, K], the other image fixed (its
    embedding computed once)."""
    net = m.net
    f_cfg, o_cfg = net.fundus_cfg, net.oct_cfg
    with torch.no_grad():
        fixed = (net.embed_oct(preprocess_image(other, o_cfg, m.device)) if modality == Modality.FUNDUS
                 else net.embed_fundus(preprocess_image(other, f_cfg, m.device)))

    def predict(batch: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(batch), batch_size):
                chunk = np.asarray(batch[i:i + batch_size])
                if modality == Modality.FUNDUS:
                    e = net.embed_fundus(preprocess_image(chunk, f_cfg, m.device))
                    feats = torch.cat([e, fixed.expand(len(e), -1)], dim=1)
                else:
                    e = net.embed_oct(preprocess_image(chunk, o_cfg, m.device))
                    feats = torch.cat([fixed.expand(len(e), -1), e], dim=1)
                z = net.forward_head(feats)
                out.append(torch.softmax(z.float() / m.temperature, dim=1).cpu().numpy())
        return np.concatenate(out)
    return predict


def evaluate_fusion_method(m: LoadedModel, samples: list[PairSample], method: str, rnet=None, steps: int = 16,
                           stability_kinds: Sequence[str] = ("noise", "brightness", "shift"), seed: int = 0) -> dict:
    """All metrics of one method on pair samples, per modality and pooled (see the module docstring). Empty maps
    are handled as for volumes (`evaluate_volume_method`)."""
    if method not in FUSION_METHODS:
        raise RetinaInputError(f"Unknown method {method!r} for {m.name}; choose from {', '.join(FUSION_METHODS)}.")
    classes = list(m.cfg.classes)
    keys = ("pg", "pg_tie", "chance", "epg", "area", "del", "ins", "del_rand", "ins_rand", "rho", "r_empty", "maps",
            "empty")
    per = {mod: {k: [] for k in keys} for mod in MODALITIES}
    stab = {mod: stability_lists(stability_kinds) for mod in MODALITIES}
    sec, correct, labels = [], [], []
    for i, s in enumerate(samples):
        imgs = {Modality.FUNDUS: s.fundus, Modality.OCT: s.oct}
        masks = {Modality.FUNDUS: s.fundus_mask, Modality.OCT: s.oct_mask}
        t0 = time.perf_counter()
        probs, k, maps = pair_maps(m, m.net, s.fundus, s.oct, method=method)
        sec.append(time.perf_counter() - t0)
        correct.append(None if s.label not in classes else classes.index(s.label) == k)
        label = s.label if s.label is not None else classes[k]
        labels.append(label)
        rmaps = pair_maps(m, rnet, s.fundus, s.oct, target=k, method=method)[2] if rnet is not None else None
        for mod in MODALITIES:
            hm, mask, P = maps[mod], masks[mod], per[mod]
            other = imgs[Modality.OCT if mod == Modality.FUNDUS else Modality.FUNDUS]
            empty = _empty(hm)
            P["empty"].append(empty)
            if not empty:
                P["maps"].append((hm, label))
            if mask is not None and mask.any():
                P["pg"].append(float(trust.pointing_game(hm, mask)))
                P["pg_tie"].append(trust.pointing_game_3d_tiebreak(hm[None], mask[None], trust.default_tolerance(
                    hm.shape)))
                P["chance"].append(trust.pointing_game_3d_chance(mask[None], trust.default_tolerance(hm.shape)))
                P["epg"].append(trust.energy_pointing_game(hm, mask))
                P["area"].append(float(mask.mean()))
            if empty:
                continue

            def explain_fn(im, mod=mod, s=s, k=k):
                pair = (im, s.oct) if mod == Modality.FUNDUS else (s.fundus, im)
                return pair_maps(m, m.net, *pair, target=k, method=method)[2][mod]

            predict = pair_predict_fn(m, mod, other) if steps else None
            check_map(P, stab[mod], hm, seed + i,      # no reference cache: the target is the predicted class
                      score=(lambda x, mod=mod, k=k, predict=predict: trust.deletion_insertion_auc(
                          predict, imgs[mod], x, k, steps=steps)) if steps else None,
                      randomised=(lambda hm=hm, mod=mod: compare_randomised(hm, rmaps[mod]))
                      if rmaps is not None else None,
                      perturbed=(lambda hm=hm, mod=mod, explain_fn=explain_fn: trust.stability_under_perturbation(
                          explain_fn, imgs[mod], kinds=stability_kinds, seed=seed, reference=hm))
                      if stability_kinds else None)
    grids = {}
    if samples:
        a, b = pair_tensors(m, samples[0].fundus, samples[0].oct)
        _, cf, co = modality_cams(m.net, a, b)
        grids = {Modality.FUNDUS: list(cf.shape[1:]), Modality.OCT: list(co.shape[1:])}
    res: dict = {"n_images": len(samples)}
    pooled = {k: [] for k in ("pg", "pg_tie", "epg", "del", "ins", "del_rand", "ins_rand")}
    worst = None
    for mod in MODALITIES:
        P = per[mod]
        for k in pooled:
            pooled[k] += P[k]
        rand = randomisation_summary(P, f"_{mod}", changed=False)
        abs_rho = rand[f"randomisation_abs_spearman_{mod}"]
        res.update({
            f"n_lesion_images_{mod}": len(P["pg"]),
            f"pointing_game_{mod}": finite_mean(P["pg"]),
            f"pointing_game_tiebreak_{mod}": finite_mean(P["pg_tie"]),
            f"pointing_game_chance_{mod}": finite_mean(P["chance"]),
            f"energy_pointing_game_{mod}": finite_mean(P["epg"]),
            f"energy_baseline_mask_area_{mod}": finite_mean(P["area"]),
            f"empty_map_fraction_{mod}": finite_mean([float(e) for e in P["empty"]]),
            **faithfulness_summary(P, f"_{mod}"),
            **rand,
            **stability_summary(stab[mod], f"_{mod}"),
            f"map_grid_{mod}": grids.get(mod),
        })
        if abs_rho is not None and (worst is None or abs_rho > res[f"randomisation_abs_spearman_{worst}"]):
            worst = mod
    all_rho = per[Modality.FUNDUS]["rho"] + per[Modality.OCT]["rho"]
    flags = [c for c in correct if c is not None]
    res.update({
        "n_lesion_images": len(pooled["pg"]),
        "pointing_game": finite_mean(pooled["pg"]),
        "pointing_game_tiebreak": finite_mean(pooled["pg_tie"]),
        "energy_pointing_game": finite_mean(pooled["epg"]),
        **faithfulness_summary(pooled),
        # a map must pass the sanity check in both modalities: the overall rho is the worse modality's
        "randomisation_modality": worst,
        "randomisation_spearman": res.get(f"randomisation_spearman_{worst}") if worst else None,
        "randomisation_abs_spearman": res.get(f"randomisation_abs_spearman_{worst}") if worst else None,
        "randomisation_changed_fraction": finite_mean([float(abs(r) < 0.5) for r in all_rho]),
        "stability_ssim": finite_mean([res[f"stability_ssim_{mod}"] for mod in MODALITIES]),
        "stability_spearman": finite_mean([res[f"stability_spearman_{mod}"] for mod in MODALITIES]),
        "class_consistency": {mod: trust.class_consistency_by_label([h for h, _ in per[mod]["maps"]],
                                                                    [lab for _, lab in per[mod]["maps"]])
                              for mod in MODALITIES},
        "seconds_per_image": finite_mean(sec),
    })
    if flags and len(flags) == len(correct):
        res["accuracy"] = float(np.mean(flags))
    return res


def fusion_cost_vs_forward(m: LoadedModel, s: PairSample, method: str = "gradcam", repeats: int = 9) -> float:
    a, b = pair_tensors(m, s.fundus, s.oct)

    def forward():
        with torch.inference_mode():
            m.net(a, b)

    return median_time_ratio(forward, lambda: pair_maps(m, m.net, s.fundus, s.oct, method=method),
                             repeats if method == "gradcam" else 3)


# ------------------------------------------------------------------------------------------------ entry point
def explain_eval_nd(model, data_path=None, methods: Sequence[str] | str = ("gradcam",), n: int = 16,
                    weights_dir=None, phantoms: Sequence | None = None, seed: int = 0, steps: int = 16,
                    stability_kinds: Sequence[str] = ("noise", "brightness", "shift"), randomisation: bool = True,
                    split: str | None = "test") -> dict:
    """explain-eval of the OCT volume model or the fundus + OCT fusion model (see the module docstring).

    data_path: a `volumes` data set (NIfTI + metadata.csv, masks/<volume>/<lesion>.nii.gz [D, H, W]) or a `paired`
    one (pairs.csv, masks/{fundus,oct}/<id>/<lesion>.png); samples come from its `split` of the patient-level split
    training used (default "test"; "all" for data the model never saw). phantoms: in-memory `oct_volume` phantoms
    or (fundus, OCT) pairs from `paired_phantoms` instead. Everything is evaluated at the model's input size.
    """
    m = resolve_net(model, weights_dir)
    modality = m.cfg.modality
    if modality not in ND_MODALITIES:
        raise RetinaInputError(f"{m.name} is a {str(modality)!r} model; explain_eval_nd handles "
                               f"{', '.join(ND_MODALITIES)}.")
    methods = method_list(methods)
    avail = VOLUME_METHODS if modality == Modality.OCT_VOLUME else FUSION_METHODS
    bad = [x for x in methods if x not in avail]
    if bad or not methods:
        raise RetinaInputError(f"{m.name} ({modality}) supports the explanation method(s) {', '.join(avail)} only, "
                               f"not {', '.join(bad) or 'none'}.")
    stability_kinds = tuple(stability_kinds)
    for k in stability_kinds:
        if k not in ("noise", "brightness", "shift"):
            raise RetinaInputError(f"Unknown perturbation {k!r}; use noise, brightness or shift.")
    volume = modality == Modality.OCT_VOLUME
    samples, source, used_split = evaluation_samples(
        phantoms, data_path, lambda: (volume_samples_from_phantoms if volume else pair_samples_from_phantoms)(
            m, phantoms), lambda: (volume_samples_from_dataset if volume else pair_samples_from_dataset)(
            m, data_path, n, seed=seed, split=split), n, "No samples to evaluate.")
    notes = []
    if used_split == "test":
        notes.append("Samples from the test split of the patient-level split training used (held out).")
    elif used_split:
        notes.append(f"Samples from the {used_split!r} split: not held out from training unless this data set was "
                     f"not used to train the model.")
    if len(samples) < n:
        notes.append(f"Only {len(samples)} samples available (asked for {n}).")
    rnet = randomised_net(m.net, seed, randomisation)
    reference = {}
    inputs = volume_input_summary(m, samples) if modality == Modality.OCT_VOLUME else None
    if modality == Modality.OCT_VOLUME:
        results = run_methods(methods, lambda meth: evaluate_volume_method(
            m, samples, meth, rnet=rnet, steps=steps, stability_kinds=stability_kinds, seed=seed, reference=reference,
            image_led=inputs["image_led"]), lambda meth: volume_cost_vs_forward(m, samples[0], meth), m.name, True)
    else:
        results = run_methods(methods, lambda meth: evaluate_fusion_method(
            m, samples, meth, rnet=rnet, steps=steps, stability_kinds=stability_kinds, seed=seed),
            lambda meth: fusion_cost_vs_forward(m, samples[0], meth), m.name, True)
    if modality == Modality.OCT_VOLUME:
        size = list(m.cfg.input_size[1:])
        tol = trust.default_tolerance(tuple(size[1:]))
        grid = volume_map_grid(m, samples[0])
        for r in results.values():
            r["map_grid"] = grid
        notes += [
            f"The 3-D Grad-CAM is upsampled (trilinear) from {_target_layer(m)}'s {grid[0]} x {grid[1]} x {grid[2]} "
            f"cells (depth x height x width) for a {size[0]} x {size[1]} x {size[2]} input"
            + (": one cell across depth, so every slice gets the same map and slice_hit_rate carries no slice "
               "information (at best it equals slice_hit_baseline)." if grid[0] == 1 else "."),
            "Volume model: 'gradcam' is the single-pass 3-D Grad-CAM on "
            f"{_target_layer(m)} (the app's default); 'gradcam-reference', 'gradcam++', 'hirescam', 'xgradcam', "
            "'layercam' and 'eigencam' are pytorch-grad-cam's weightings on the same layer, upsampled trilinearly as "
            "the single pass is; 'scorecam' is pytorch-grad-cam's Score-CAM with trilinear upsampling "
            "(`volume_methods.ScoreCAM3D`); 'integrated_gradients' is captum IG from a black volume "
            "with the record fixed (`volume_methods`).",
            "Maps explain the disease logit (one-logit model) for every volume; deletion / insertion AUC are on "
            "P(disease), over the volumes the model calls disease (n_faithfulness_images).",
            "An empty map (Grad-CAM's ReLU left nothing: no disease evidence, mostly normal volumes; "
            "empty_map_fraction_by_label) misses in the pointing games and is left out of the faithfulness, "
            "randomisation and stability checks; where the randomised model's map is empty, rho is 0 (the map "
            "vanished; randomisation_empty_fraction).",
            f"3-D pointing game: the map's peak inside the lesion mask dilated by {tol} px in-plane (15 px at 224, "
            "scaled), not across slices; a plateau at the peak counts if any voxel is inside (as in 2-D), "
            "pointing_game_tiebreak breaks ties at random, pointing_game_chance is a random voxel's score. "
            "slice_hit_rate: the slice with the largest summed map holds a lesion (ties: the share of tied slices "
            "that do); slice_hit_baseline is a random slice's.",
        ]
        settings_extra = {"tolerance_px": tol, "deletion_baseline": "3-D Gaussian blur",
                          "shift_px": max(2, int(round(min(size[1:]) / 56.0)))}
        eval_size = size
    else:
        eval_size = {Modality.FUNDUS: list(m.net.fundus_cfg.input_size[1:]),
                     Modality.OCT: list(m.net.oct_cfg.input_size[1:])}
        r0 = next(iter(results.values()))
        notes += [
            "Fusion model: 'gradcam' is one Grad-CAM per modality (`modality_cams`, fundus at "
            f"{m.net.fundus_encoder.cfg.target_layer}, a {r0.get('map_grid_fundus')} grid; OCT at "
            f"{m.net.oct_encoder.cfg.target_layer}, a {r0.get('map_grid_oct')} grid), for the predicted class; "
            "'integrated_gradients' is captum IG on both inputs at once from black images "
            "(`pair_integrated_gradients`).",
            "The two maps are min-max normalised separately, so no per-modality share of the attribution is "
            "reported: the maps say where within each image, not which image mattered more.",
            "pointing_game / energy_pointing_game pool the lesion-bearing images of both modalities; "
            "randomisation_abs_spearman is the worse modality's mean |rho| (a map must pass in both); deletion / "
            "insertion edit one image with the other fixed.",
            "An empty map (nothing left after Grad-CAM's ReLU or IG's positive part) misses in the pointing games "
            "and is left out of the other checks; where the randomised model's map is empty, rho is 0 (the map "
            "vanished).",
        ]
        settings_extra = {"deletion_baseline": "blur"}
    extra = {}
    if inputs is not None:
        extra["inputs"] = {"image_led_fraction": finite_mean([float(x) for x in inputs["image_led"]]),
                           "by_label": inputs["by_label"]}
        notes.append("inputs: exact Shapley values of P(disease) over the image (the volume against its 3-D blur) "
                     "and each clinical value (given against not recorded), shares |value| / sum, averaged over "
                     "the volumes called disease. pointing_game_image_led is the pointing game over the lesion "
                     f"volumes called disease with the image holding >= {IMAGE_LED_SHARE:.0%} of the evidence: a "
                     "suggestion that rests on clinical values (HbA1c, on the diabetic phantoms) has no image "
                     "location to point at.")
    return json_ready({"model": m.name, "weights_sha256": m.sha256, "modality": modality, "data": source,
                   "split": used_split, "n_images": len(samples), "eval_size": eval_size, "metric_kind": "phantom",
                   **ranked(results), **extra, "notes": notes,
                   "settings": {"steps": steps, "stability_kinds": list(stability_kinds),
                                "randomisation": randomisation, "seed": seed, "noise_sigma": NOISE_SIGMA,
                                "brightness": BRIGHTNESS, **settings_extra}})


def format_lines(report: dict) -> list[str]:
    """Extra lines of the text report for volume / fusion models (appended by `evaluate._format`)."""
    lines = []
    for meth, r in report.get("methods", {}).items():
        if report.get("modality") == Modality.OCT_VOLUME:
            keys = ("pointing_game_tiebreak", "pointing_game_chance", "pointing_game_image_led",
                    "energy_baseline_mask_area", "slice_hit_rate", "slice_hit_baseline", "empty_map_fraction",
                    "randomisation_empty_fraction")
        else:
            keys = tuple(f"{k}_{mod}" for k in ("pointing_game", "pointing_game_chance", "energy_pointing_game",
                                                  "randomisation_spearman", "deletion_auc", "insertion_auc",
                                                  "empty_map_fraction") for mod in MODALITIES)
        vals = ", ".join(f"{k} {'-' if r.get(k) is None else format(r[k], '.3f')}" for k in keys)
        lines.append(f"  {meth}: {vals}")
    for lab, row in ((report.get("inputs") or {}).get("by_label") or {}).items():
        shares = ", ".join(f"{k} {v:.0%}" for k, v in sorted(row["mean_share"].items(), key=lambda kv: -kv[1])[:4])
        lines.append(f"  inputs of the {row['n_called_disease']} '{lab}' volumes called disease: {shares}")
    return lines
