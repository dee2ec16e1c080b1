"""Score explanation methods on phantom images whose lesions have pixel masks:
`python -m retina_core explain-eval --model M --data PATH --methods gradcam,integrated_gradients --n 16 --json`.

Per method: pointing game and energy pointing game (lesion-bearing images), deletion / insertion AUC, the
model-randomisation Spearman rho, stability (SSIM / Spearman under noise, brightness, shift), class consistency,
zone summaries (centre share vs confidence, correct vs misclassified) and seconds per image; then a ranking.
Images are evaluated at the model's input size (the model sees nothing finer), masks and landmarks scaled with them.
The OCT volume model and the fundus + OCT fusion model are evaluated by `audit.evaluate_nd` (3-D and per-modality
metrics in the same report shape); `explain_eval` dispatches on the model's modality.
Real lesion sets (records with per-lesion masks in `meta["masks"]`, e.g. IDRiD) also get the `real_lesions` block
(pointing game at 0 px and 1% of the width, energy and deletion against chance, per lesion type) and the optic-disc
finder's error against the OD masks (`audit.real_lesions`); they are evaluated at the model's input side with the
photograph's aspect ratio kept.
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import RetinaInputError
from ..explain import zones
from ..explain.attribution import (IG_METHODS, VIT_METHODS, available_methods, explain, explain_batch, make_predict_fn,
                                   resolve_model, to_pixels)
from . import real_lesions, trust
from .counterfactual import format_lines as counterfactual_lines
from .counterfactual import lesion_reliance
from ..modality import Modality
from ..models.registry import modality_of
from .common import (BRIGHTNESS, ND_MODALITIES, NOISE_SIGMA, Sample, check_map, evaluation_samples,
                     faithfulness_summary, finite_mean, json_ready, median_time_ratio, method_list, pick_round_robin,
                     randomisation_summary, randomised_net, ranked, resize_sample, run_methods, stability_lists,
                     stability_summary)
from .evaluate_nd import explain_eval_nd
from .evaluate_nd import format_lines as nd_format_lines

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ samples


def samples_from_phantoms(phantoms: Sequence) -> list[Sample]:
    """In-memory phantoms (`retina_core.phantoms.Phantom`) -> samples (union of their lesion masks)."""
    out = []
    for i, ph in enumerate(phantoms):
        img = to_pixels(ph.image)
        masks = [np.asarray(m, bool) for m in (ph.masks or {}).values()]
        mask = np.logical_or.reduce(masks) if masks else None
        meta = dict(ph.meta or {})
        lm = {}
        if ph.modality == Modality.FUNDUS and "fovea_xy" in meta:
            lm = {k: meta[k] for k in ("fovea_xy", "disc_xy", "disc_radius") if k in meta}
            lm["eye"] = meta.get("eye")
        elif "fovea_x" in meta:
            lm = {"fovea_x": meta["fovea_x"], "span_mm": meta.get("span_mm", 6.0)}
        out.append(Sample(img, ph.label, mask, ph.modality, lm, f"phantom{i}"))
    return out


def _read_meta_csv(root: Path) -> dict[str, dict]:
    p = root / "phantom_meta.csv"
    if not p.exists():
        return {}
    with open(p, newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def _landmarks_from_row(row: dict) -> tuple[str, dict]:
    def num(k):
        v = row.get(k, "")
        return float(v) if v not in ("", None) else None

    modality = row.get("modality", "")
    if modality == Modality.FUNDUS and num("fovea_x") is not None and num("disc_x") is not None:
        return modality, {"fovea_xy": (num("fovea_x"), num("fovea_y")), "disc_xy": (num("disc_x"), num("disc_y")),
                          "disc_radius": num("disc_radius"), "eye": row.get("eye") or None}
    if modality == Modality.OCT and num("fovea_x") is not None:
        return modality, {"fovea_x": num("fovea_x")}
    return modality, {}


def samples_from_dataset(data_path, n: int, classes: Sequence[str] | None = None, seed: int = 0) -> list[Sample]:
    """Up to n images of a data set folder (any layout `load_dataset` reads), spread evenly over its classes,
    with the union of their lesion masks from `masks/` and landmarks from `phantom_meta.csv` when present."""
    from ..io.datasets import lesion_mask, lesion_mask_dir, load_dataset, record_lesion_masks
    from ..io.decode import read_image

    root = Path(data_path).expanduser()
    idx = load_dataset(root)
    recs = [r for r in idx.records if classes is None or r.label in classes] or list(idx.records)
    if not recs:
        raise RetinaInputError(f"No images found in {data_path}.")
    chosen = pick_round_robin(recs, n, seed)
    meta_rows = {}
    for base in (root, idx.root):
        meta_rows.update(_read_meta_csv(Path(base)))
    out = []
    for r in chosen:
        img = read_image(r.path)
        if img.kind != "image":
            continue
        pixels = to_pixels(img.pixels)
        _, rel = lesion_mask_dir(root, Path(r.path))
        # a lesion set's {code: mask path} (phantom_meta.csv rows name their lesion kinds in a "masks" string)
        masks = record_lesion_masks(r, pixels.shape[:2]) if isinstance(r.meta.get("masks"), dict) else {}
        mask = real_lesions.dr_union(masks) if masks else lesion_mask(root, r.path, pixels.shape[:2])
        if masks and mask is None:
            mask = np.zeros(pixels.shape[:2], bool)        # annotated, no DR lesion (e.g. only the optic disc)
        row = meta_rows.get(rel or "", {})
        modality, lm = _landmarks_from_row(row)
        modality = modality or (Modality.OCT if img.grayscale else Modality.FUNDUS)
        out.append(Sample(pixels, r.label, mask, modality, lm, rel or str(r.path), masks))
    return out


# ------------------------------------------------------------------------------------------------ evaluation


def _zones_of(hm: np.ndarray, s: Sample) -> dict:
    z = {"centre_lr": zones.centre_lr_shares(hm)}
    lm = s.landmarks
    try:
        if "fovea_xy" in lm and lm.get("disc_radius"):
            z["etdrs"] = zones.etdrs_zone_scores(hm, lm["fovea_xy"], 2 * lm["disc_radius"], lm.get("eye"),
                                                 lm.get("disc_xy"))
            z["optic_disc"] = zones.optic_disc_zone(hm, lm["disc_xy"], lm["disc_radius"])
        elif "fovea_x" in lm:
            z["oct"] = zones.oct_zone_scores(hm, lm["fovea_x"], lm.get("span_mm", 6.0))
    except ValueError:
        pass
    return z


def _mean_dicts(ds: list[dict]) -> dict | None:
    if not ds:
        return None
    return {k: finite_mean([d[k] for d in ds]) for k in ds[0]}


def evaluate_method(m, samples: list[Sample], method: str, rnet=None, steps: int = 16,
                    stability_kinds: Sequence[str] = ("noise", "brightness", "shift"), seed: int = 0,
                    reference: dict | None = None, target=None) -> dict:
    """All metrics of one method on prepared samples (see `explain_eval`). `reference`: a dict shared by the
    methods of one run, caching the random-map deletion curves (the same for every method). target: the class
    (index or name) every map explains; None: each image's predicted class."""
    predict = make_predict_fn(m)
    rm = None
    if rnet is not None:
        rm = copy.copy(m)
        rm.net = rnet
    classes = list(m.classes)
    per: dict[str, list] = {k: [] for k in ("pg", "epg", "area", "del", "ins", "del_rand", "ins_rand", "rho", "sec",
                                            "conf", "correct", "centre", "maps", "labels", "zones", "pg_label",
                                            "real", "real_i", "tgt", "r_empty")}
    stab = stability_lists(stability_kinds)
    for i, s in enumerate(samples):
        t0 = time.perf_counter()
        maps, probs, idx = explain_batch(m, s.image[None], method, target)
        per["sec"].append(time.perf_counter() - t0)
        hm, tgt = maps[0], idx[0]
        per["tgt"].append(int(tgt))
        per["maps"].append(hm)
        per["labels"].append(s.label if s.label is not None else classes[tgt])
        per["conf"].append(float(probs[0, tgt]))
        per["centre"].append(zones.centre_lr_shares(hm)["centre"])
        per["zones"].append(_zones_of(hm, s))
        if s.label in classes:
            per["correct"].append(classes.index(s.label) == int(np.argmax(probs[0])))
        else:
            per["correct"].append(None)
        real = None
        if s.masks:
            real = real_lesions.image_scores(hm, s.masks, s.fov, trust.random_map(hm.shape, seed + i))
            per["real"].append(real)
            per["real_i"].append(i)
        if s.mask is not None and s.mask.any():
            # real lesions: the report's one pointing game, at its stated tolerance with ties broken at random
            per["pg"].append(real["any"]["pg_tol"] if real and "any" in real else
                             float(trust.pointing_game(hm, s.mask)))
            per["pg_label"].append(per["labels"][-1])
            per["epg"].append(trust.energy_pointing_game(hm, s.mask))
            per["area"].append(float(s.mask.mean()))

        def randomised(s=s, hm=hm, tgt=tgt):
            rmap = explain(rm, s.image, method, tgt)
            # inside the field of view where the set gives one: the black surround (and, for fov-framed models, the
            # frame outside the box they read, zero in both maps) would otherwise count as agreement
            inside = s.fov if s.fov is not None and s.fov.shape == hm.shape and s.fov.any() else None
            rho = trust.spearman(hm, rmap) if inside is None else trust.spearman(hm[inside], rmap[inside])
            return rho, float(not np.any(rmap > 0))        # an empty map: rho 0 by convention, inconclusive

        # the random-map curves: trust.random_map seeded per image, the same for every method (cached)
        check_map(per, stab, hm, seed + i, reference=reference, key=(i, tgt),
                  score=lambda x, s=s, tgt=tgt: trust.deletion_insertion_auc(predict, s.image, x, tgt, steps=steps),
                  randomised=randomised if rm is not None else None,
                  perturbed=(lambda s=s, hm=hm, tgt=tgt: trust.stability_under_perturbation(
                      lambda im: explain(m, im, method, tgt), s.image, kinds=stability_kinds, seed=seed,
                      reference=hm)) if stability_kinds else None)
    cons = trust.class_consistency_by_label(per["maps"], per["labels"])
    flags = [c for c in per["correct"] if c is not None]
    zsum = {"centre_lr": _mean_dicts([z["centre_lr"] for z in per["zones"]])}
    for key in ("etdrs", "oct"):
        ds = [z[key] for z in per["zones"] if key in z]
        if ds:
            zsum[key] = _mean_dicts(ds)
    od = [z["optic_disc"] for z in per["zones"] if "optic_disc" in z]
    if od:
        zsum["optic_disc"] = finite_mean(od)
    res = {
        "n_images": len(samples),
        "n_lesion_images": len(per["pg"]),
        "pointing_game": finite_mean(per["pg"]),
        # per true class: a map can find haemorrhages and miss microaneurysms; the app warns per suggested class
        "pointing_game_by_label": {lab: finite_mean([h for h, l in zip(per["pg"], per["pg_label"]) if l == lab])
                                   for lab in dict.fromkeys(per["pg_label"])},
        "n_lesion_images_by_label": {lab: per["pg_label"].count(lab) for lab in dict.fromkeys(per["pg_label"])},
        "energy_pointing_game": finite_mean(per["epg"]),
        "energy_baseline_mask_area": finite_mean(per["area"]),
        **faithfulness_summary(per),
        **randomisation_summary(per),
        **stability_summary(stab),
        "class_consistency": cons,
        "centre_attention_vs_confidence": trust.centre_attention_vs_confidence(per["centre"], per["conf"]),
        "zones": zsum,
        "seconds_per_image": finite_mean(per["sec"]),
    }
    if len(flags) == len(per["correct"]) and flags:
        res["correct_vs_misclassified"] = trust.correct_vs_misclassified(per["centre"], flags)
        res["accuracy"] = float(np.mean(flags))
    if per["real"]:
        ri = per["real_i"]
        res["real_lesions"] = real_lesions.summarise(
            per["real"], [samples[i].name for i in ri], [classes[per["tgt"][i]] for i in ri],
            [per["conf"][i] for i in ri], [per["del"][i] for i in ri], [per["del_rand"][i] for i in ri])
    return res


def cost_vs_forward(m, image: np.ndarray, method: str, repeats: int = 9) -> float:
    """Median over interleaved repeats of (prediction + heatmap time) / (bare forward time) for one image at the
    model's input size, in this process: a same-machine ratio, robust to background load. Slow methods
    (Integrated Gradients, Score-CAM) get 3 repeats."""
    x = m.preprocess(image[None])

    def forward():
        with torch.inference_mode():
            m.net(x)

    def heat():
        explain_batch(m, image[None], method)

    return median_time_ratio(forward, heat, 3 if method in IG_METHODS or method == "scorecam" else repeats)


def explain_eval(model, data_path=None, methods: Sequence[str] | str = ("gradcam",), n: int = 16,
                 weights_dir=None, phantoms: Sequence | None = None, seed: int = 0, steps: int = 16,
                 stability_kinds: Sequence[str] = ("noise", "brightness", "shift"), randomisation: bool = True,
                 eval_size: tuple[int, int] | str | None = "model", split: str | None = "test",
                 target=None) -> dict:
    """Run every explanation method over phantom images and report, per method, localisation (pointing game,
    energy pointing game), faithfulness (deletion / insertion AUC), the model-randomisation rho, stability
    (SSIM / Spearman per perturbation), class consistency, zone summaries and seconds per image; then rank them.

    model: a registered name (its weights are loaded from `weights_dir` or the bundled weights), a LoadedModel, or
    an nn.Module (e.g. a random-init tiny net for tests). Images: `data_path` (a folder written by
    `retina_core.phantoms.write_dataset`, or any data set `load_dataset` reads; masks from `masks/`) or in-memory
    `phantoms`. eval_size "model" evaluates at the model's input size (faster; the model sees nothing finer),
    None at the images' own size, or an explicit (H, W); real lesion-set photographs keep their aspect ratio under
    "model" (the longer side at the model's input side). target: the class (name or index) every map explains
    (e.g. "diabetic_retinopathy"); None: each image's predicted class.

    Volume (`oct_volume`) and fusion (`fundus+oct`) models go to `evaluate_nd.explain_eval_nd`: samples from the
    `split` ("test" by default: the held-out part of the patient-level split training used; "all") of a volumes /
    paired data set, at the model's input size; `eval_size` does not apply to them.
    """
    if modality_of(model) in ND_MODALITIES:
        return explain_eval_nd(model, data_path, methods=methods, n=n, weights_dir=weights_dir, phantoms=phantoms,
                               seed=seed, steps=steps, stability_kinds=stability_kinds, randomisation=randomisation,
                               split=split)
    if isinstance(model, str):
        from ..models import load_model

        model = load_model(model, weights_dir=weights_dir)
    m = resolve_model(model)
    methods = method_list(methods)
    avail = available_methods(m.net)
    notes = []
    for meth in methods:
        if meth not in avail:
            if meth in VIT_METHODS:
                notes.append(f"{meth} skipped: it applies to vision transformers only.")
            else:
                raise RetinaInputError(f"Unknown explanation method {meth!r}; choose from {', '.join(avail)}.")
    methods = [x for x in methods if x in avail]
    samples, source, _ = evaluation_samples(
        phantoms, data_path, lambda: samples_from_phantoms(phantoms),
        lambda: (samples_from_dataset(data_path, n, classes=m.classes, seed=seed), None), n, "No images to evaluate.")
    if target is not None and not (isinstance(target, (int, np.integer)) and 0 <= int(target) < len(m.classes)) \
            and target not in m.classes:
        raise RetinaInputError(f"Unknown target class {target!r} for {m.cfg.name}; choose from "
                               f"{', '.join(m.classes)}.")
    size = tuple(m.cfg.input_size[1:]) if eval_size == "model" else (tuple(eval_size) if eval_size else None)
    disc = _disc_errors(samples)          # on the full photographs, as the app's zones see an upload
    if any(s.masks for s in samples):
        if eval_size == "model":
            size = real_lesions.keep_aspect(samples[0].image.shape[:2], max(size))
        notes.append(f"real lesion masks: maps of the {target or 'predicted'} class; pointing game at 0 px and "
                     f"{real_lesions.TOLERANCE_FRACTION:.0%} of the width with ties broken at random (real_lesions; "
                     f"the top-level pointing_game is the {real_lesions.TOLERANCE_FRACTION:.0%} one), chance = "
                     f"(dilated) lesion area / field of view.")
    samples = [resize_sample(s, size) for s in samples]
    if not any(s.mask is not None and s.mask.any() for s in samples):
        notes.append("No lesion masks found: pointing-game metrics are empty.")
    rnet = randomised_net(m.net, seed, randomisation)
    reference = {}
    results = run_methods(methods, lambda meth: evaluate_method(
        m, samples, meth, rnet=rnet, steps=steps, stability_kinds=stability_kinds, seed=seed, reference=reference,
        target=target), lambda meth: cost_vs_forward(m, samples[0].image, meth), m.cfg.name)
    if any(meth in IG_METHODS for meth in methods):
        notes.append("integrated_gradients: 32 steps from a black image; its time includes all steps.")
    report = {"model": getattr(model, "name", m.cfg.name), "weights_sha256": getattr(model, "sha256", None),
              "data": source, "n_images": len(samples), "eval_size": list(size) if size else None,
              "metric_kind": _metric_kind(samples, source),
              "target": target, **ranked(results), "notes": notes,
              "settings": {"steps": steps, "stability_kinds": list(stability_kinds), "randomisation": randomisation,
                           "seed": seed, "deletion_baseline": "blur", "noise_sigma": NOISE_SIGMA,
                           "brightness": BRIGHTNESS}}
    if disc is not None:
        report["optic_disc_detection"] = disc
    return json_ready(report)


def _disc_errors(samples: list[Sample]) -> dict | None:
    """The optic-disc finder against the samples' OD masks (full photographs); the landmarks it found become the
    samples' landmarks (ETDRS / disc zone summaries, as in the app). None when no sample has an OD mask."""
    rows, names = [], []
    for s in samples:
        od = s.masks.get("OD")
        if od is None or not od.any():
            continue
        r = real_lesions.disc_error(s.image, od)
        lm = r.pop("landmarks")
        if not s.landmarks:
            s.landmarks = {"fovea_xy": lm["fovea_xy"], "disc_xy": lm["disc_xy"], "disc_radius": lm["disc_radius"],
                           "eye": lm["laterality"]}
        rows.append(r)
        names.append(s.name)
    return real_lesions.summarise_disc_errors(rows, names) if rows else None


# ------------------------------------------------------------------------------------------------ CLI
_SHORT = {"deletion_auc_random_map": "del_rand_map", "randomisation_spearman": "random_rho"}


def _metric_kind(samples: list[Sample], source) -> str:
    """"real_lesions" (a real set with lesion masks), "real" (a known real set without them: sanity and
    faithfulness only) or "phantom"."""
    from ..io.realsets import real_set_of

    if any(s.masks for s in samples):
        return "real_lesions"
    data = str(source or "")
    return "real" if data and "in-memory" not in data and real_set_of(data) else "phantom"


def _format(report: dict) -> str:
    cols = ("pointing_game", "energy_pointing_game", "deletion_auc", "deletion_auc_random_map", "insertion_auc",
            "randomisation_spearman", "stability_ssim", "stability_spearman", "cost_vs_forward")
    kind = report.get("metric_kind", "phantom")
    lines = [f"explain-eval: {report['model']} on {report['data']} ({report['n_images']} images, {kind} metrics)",
             "method".ljust(22) + " ".join(_SHORT.get(c, c[:12]).rjust(12) for c in cols)]
    for meth, r in report["methods"].items():
        vals = [r.get(c) for c in cols]
        lines.append(meth.ljust(22) + " ".join(("-" if v is None else f"{v:.3f}").rjust(12) for v in vals))
    ranked = [f"{d['method']} ({d['mean_rank']:.2f})" for d in report["ranking"] if d["mean_rank"] is not None]
    lines.append("ranking: " + (", ".join(ranked) if ranked else "one method only (nothing to rank it against)"))
    rec = report.get("recommended_default") or {}
    lines.append(f"recommended default: {rec.get('method')} ({rec.get('rule', 'no method passes')})")
    for meth, why in (rec.get("passed_over") or {}).items():
        lines.append(f"  passed over {meth}: {why}")
    if report.get("modality") in ND_MODALITIES:
        lines += nd_format_lines(report)
    lines += _real_lesion_lines(report)
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def _real_lesion_lines(report: dict) -> list[str]:
    """Text lines of the real-lesion block (pointing game, energy, deletion against chance) and the disc error."""
    def f(v):
        return "-" if v is None else f"{v:.3f}"

    lines = []
    for meth, r in report["methods"].items():
        rl = r.get("real_lesions")
        if not rl:
            continue
        lines.append(f"real lesions, {meth} (target {report.get('target') or 'predicted class'}; tolerance "
                     f"{rl['tolerance_px']} px = {rl['tolerance_rule']}):")
        lines.append("  region       n   PG 0px (chance)   PG tol (chance)   energy (area, random map)")
        for key, d in [("any DR", rl.get("lesions")), *rl["by_lesion"].items(), ("OD", rl.get("optic_disc"))]:
            if d:
                lines.append(f"  {key:<8} {d['n_images']:>4}   {f(d['pointing_game_0px'])} "
                             f"({f(d['pointing_game_0px_chance'])})   {f(d['pointing_game_tol'])} "
                             f"({f(d['pointing_game_tol_chance'])})   "
                             f"{f(d['energy_share'])} ({f(d['area_share_image'])}, {f(d['energy_share_random_map'])})")
        lines.append(f"  deletion: mean probability drop {f(rl['deletion_drop'])} in the map's order vs "
                     f"{f(rl['deletion_drop_random_map'])} in a random order (p target {f(rl['p_target'])})")
        lines.append(f"  map energy outside the field of view {f(rl.get('energy_outside_fov'))} (its area "
                     f"{f(rl.get('area_outside_fov'))})")
    od = report.get("optic_disc_detection")
    if od and od.get("n_images"):
        lines.append(f"optic-disc finder vs OD masks ({od['n_images']} photographs): error mean {od['mean_dd']:.3f}, "
                     f"median {od['median_dd']:.3f}, max {od['max_dd']:.3f} disc diameters (target <= "
                     f"{od['target_dd']})")
    return lines


def set_default(model_name: str, report: dict, weights_dir=None) -> Path:
    """Record the recommended default method, with its evidence, in the model's manifest entry."""
    from ..models.loading import MANIFEST, weights_dir as bundled

    _refuse_default_for_nd(model_name, report.get("modality"))
    rec = report.get("recommended_default") or {}
    if not rec.get("method"):
        raise RetinaInputError("No method passes the randomisation check and the speed target; the default is "
                               "left unchanged.")
    path = Path(weights_dir or bundled()) / MANIFEST
    manifest = json.loads(path.read_text())
    if model_name not in manifest:
        raise RetinaInputError(f"{path} has no entry for {model_name}.")
    if manifest[model_name].get("sha256") != report.get("weights_sha256"):
        raise RetinaInputError("The report was made with other weights than the manifest's; run explain-eval again.")
    r = report["methods"][rec["method"]]
    manifest[model_name]["default_method"] = rec["method"]
    manifest[model_name]["default_method_evidence"] = {
        "data": report["data"], "n_images": report["n_images"], "n_lesion_images": r.get("n_lesion_images"),
        "metric_kind": report.get("metric_kind", "phantom"), "rule": rec["rule"], "mean_rank": rec["mean_rank"],
        "pointing_game": r.get("pointing_game"), "energy_pointing_game": r.get("energy_pointing_game"),
        "insertion_auc": r.get("insertion_auc"), "randomisation_abs_spearman": r.get("randomisation_abs_spearman"),
        "cost_vs_forward": r.get("cost_vs_forward"), "ranking": [d["method"] for d in report["ranking"]],
        "passed_over": rec.get("passed_over", {})}
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def _refuse_default_for_nd(model_name: str, modality: str | None) -> None:
    """Volume and fusion models always explain with their own Grad-CAM: there is no default method to record."""
    if modality in ND_MODALITIES:
        raise RetinaInputError(f"{model_name} always explains with its own Grad-CAM ({modality} model): there is no "
                               f"default method to set.")


# ------------------------------------------------------------------------------------------------ evidence
EVIDENCE_DIR = "evidence"     # <weights dir>/evidence/<model>-<sha256[:12]>-<tag>.json: what the trust notes quote
_RUN_ONLY = ("default_written_to", "evidence_written_to")   # keys of a printed report that are not evidence


def evidence_dir(weights_dir=None) -> Path:
    """Where the explain-eval evidence of the weights in `weights_dir` (default: the bundled folder) is kept."""
    from ..models.loading import weights_dir as bundled

    return Path(weights_dir or bundled()) / EVIDENCE_DIR


def evidence_tag(report: dict) -> tuple[str, str, str | None]:
    """(tag, kind, set title) of what a report was measured on: a real set's name ("idrid_lesions", from
    `io.realsets.real_set_of`) and kind "real", or "phantoms" and kind "phantom". A lesion-mask set outside the
    known real sets is real too, tagged by its folder name."""
    import re

    from ..io.realsets import real_set_of

    data = str(report.get("data") or "")
    real = real_set_of(data) if data and "in-memory" not in data else None
    if real:
        tag, title = real["name"], real.get("title")
    elif report.get("metric_kind") in ("real_lesions", "real"):
        tag, title = Path(data).name or "real", Path(data).name
    else:
        return "phantoms", "phantom", None
    return re.sub(r"[^A-Za-z0-9_.-]+", "+", tag).strip("+") or "real", "real", title


def _without_per_image_rows(obj):
    """The report without its per-image rows (the `images` lists of real_lesions and optic_disc_detection): the
    notes read the summaries only, and weights/ stays small."""
    if isinstance(obj, dict):
        return {k: _without_per_image_rows(v) for k, v in obj.items() if not (k == "images" and isinstance(v, list))}
    if isinstance(obj, list):
        return [_without_per_image_rows(v) for v in obj]
    return obj


def evidence_record(report: dict) -> dict:
    """An explain-eval report as evidence: per-image rows dropped, each method's figures labelled with the run they
    come from (n_images, data, target, metric_kind), and an `evidence` block (tag, kind, set, the runs merged)."""
    import datetime as dt

    tag, kind, title = evidence_tag(report)
    rec = _without_per_image_rows({k: v for k, v in report.items() if k not in _RUN_ONLY})
    run = {k: report.get(k) for k in ("data", "n_images", "metric_kind", "target")}
    for r in (rec.get("methods") or {}).values():
        if isinstance(r, dict):
            r.setdefault("n_images", report.get("n_images"))
            r.update({k: v for k, v in run.items() if k != "n_images"})
    run.update(methods=sorted(rec.get("methods") or {}), counterfactual=bool(report.get("counterfactual")),
               date=dt.date.today().isoformat())
    rec["evidence"] = {"tag": tag, "kind": kind, "set": None if kind == "phantom" else tag, "set_title": title,
                       "runs": [run]}
    return rec


def merge_evidence(old: dict | None, new: dict) -> dict:
    """Evidence of the same weights and set: each method keeps the figures of the run that measured it on the
    most images (at equal size the new run's), so a small run of many methods adds methods without replacing a
    large run of one. The counterfactual section likewise (most eyes, else the new one); the report-level fields
    follow the larger run."""
    if not old or old.get("weights_sha256") != new.get("weights_sha256"):
        return new

    def n(r):
        return (r or {}).get("n_images") or 0

    larger_new = n(new) >= n(old)
    out = dict(new if larger_new else old)
    methods = dict(old.get("methods") or {})
    for meth, r in (new.get("methods") or {}).items():
        if meth not in methods or n(r) >= n(methods[meth]):
            methods[meth] = r
    out["methods"] = methods
    cf_old, cf_new = old.get("counterfactual"), new.get("counterfactual")
    if cf_old or cf_new:
        out["counterfactual"] = (cf_new if cf_new and (not cf_old or (cf_new.get("n_volumes") or 0)
                                                        >= (cf_old.get("n_volumes") or 0)) else cf_old)
    runs = [*((old.get("evidence") or {}).get("runs") or []), *((new.get("evidence") or {}).get("runs") or [])]
    out["evidence"] = {**(new.get("evidence") or {}), "runs": [r for i, r in enumerate(runs) if r not in runs[:i]]}
    return out


def write_evidence(report: dict, weights_dir=None) -> Path | None:
    """Keep `report` as evidence next to the weights it measured: `<weights dir>/evidence/<model>-<sha256[:12]>-
    <tag>.json` (tag: "phantoms" or the real set's name), merged with what that file already holds
    (`merge_evidence`). Only when the weights dir's manifest lists these weights (the bundled folder, or a training
    run's folder via --weights-dir); None otherwise. The app's trust notes read these files and nothing else."""
    from ..models.loading import read_manifest

    model, sha = report.get("model"), report.get("weights_sha256")
    entry = (read_manifest(weights_dir).get(model) or {}) if model else {}
    if not sha or entry.get("sha256") != sha or not isinstance(report.get("methods"), dict):
        return None
    rec = evidence_record(report)
    folder = evidence_dir(weights_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{model}-{sha[:12]}-{rec['evidence']['tag']}.json"
    old = None
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merge_evidence(old, rec), indent=1) + "\n")
    tmp.replace(path)
    return path


def cmd_explain_eval(args) -> int:
    if args.set_default:                     # refused before the evaluation runs, not after it
        _refuse_default_for_nd(args.model, modality_of(args.model))
    if args.counterfactual and modality_of(args.model) not in tuple(Modality):
        raise RetinaInputError(f"--counterfactual re-renders phantom eyes without their lesions: it applies to the OCT, "
                               f"fundus, fundus + OCT and OCT volume models, not to {args.model}.")
    split = getattr(args, "split", "test")
    report = explain_eval(args.model, args.data, methods=args.methods, n=args.n, weights_dir=args.weights_dir,
                          seed=args.seed, steps=args.steps,
                          stability_kinds=tuple(k for k in args.stability.split(",") if k),
                          randomisation=not args.no_randomisation, split=None if split == "all" else split,
                          target=getattr(args, "target", None))
    if args.set_default:
        report["default_written_to"] = str(set_default(args.model, report, args.weights_dir))
    if args.counterfactual:
        report["counterfactual"] = lesion_reliance(args.model, args.data, n=args.n, split=split, seed=args.seed,
                                                   weights_dir=args.weights_dir)
    if not getattr(args, "no_evidence", False):
        written = write_evidence(report, args.weights_dir)
        if written is not None:
            report["evidence_written_to"] = str(written)
    if args.json:
        print(json.dumps(report))
    else:
        print(_format(report))
        if args.counterfactual:
            print("\n".join(counterfactual_lines(report["counterfactual"])))
        if args.set_default:
            print(f"default method of {args.model} set to {report['recommended_default']['method']} in "
                  f"{report['default_written_to']}")
        if report.get("evidence_written_to"):
            print(f"evidence for the app's trust notes: {report['evidence_written_to']}")
    return 0


def add_cli(subparsers) -> None:
    """Register `explain-eval` on the CLI's subparsers (called from retina_core/cli.py)."""
    p = subparsers.add_parser("explain-eval", help="score explanation methods on phantom images with lesion masks "
                                                   "(2-D models, the OCT volume model, the fundus + OCT fusion model)")
    p.add_argument("--model", required=True, help="registered model name (weights from --weights-dir or bundled); "
                                                  "oct_volume_fusion3d* and fundus_oct_fusion get 3-D / per-modality "
                                                  "metrics")
    p.add_argument("--data", required=True, help="data set folder with masks/ (e.g. written by `data phantoms`; "
                                                 "--kind oct-volume for volume models, --kind paired for the fusion "
                                                 "model), or a real lesion set (../shared/realdata/idrid_lesions: "
                                                 "scored against its MA/HE/EX/SE masks, disc finder vs OD masks)")
    p.add_argument("--methods", default="gradcam", help="comma-separated, e.g. gradcam,gradcam++,integrated_gradients "
                                                        "(volume models: the CAM family, scorecam and "
                                                        "integrated_gradients; fusion: gradcam, integrated_gradients)")
    p.add_argument("--n", type=int, default=16, help="number of images (spread over the classes)")
    p.add_argument("--weights-dir", default=None)
    p.add_argument("--steps", type=int, default=16, help="deletion / insertion steps")
    p.add_argument("--stability", default="noise,brightness,shift", help="perturbations ('' to skip)")
    p.add_argument("--no-randomisation", action="store_true", help="skip the model-randomisation check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", choices=("test", "val", "train", "all"),
                   help="volume / fusion models only: which part of the patient-level split training used to draw "
                        "from (default test, held out; 'all' for a data set the model never saw). 2-D models use "
                        "every image of --data")
    p.add_argument("--counterfactual", action="store_true",
                   help="on phantom sets: re-render each diseased eye from its seeds without the lesions its masks "
                        "mark (OCT also without its cysts/foci alone, its diffuse thickening and both; pairs "
                        "without the fundus, the OCT or both images' lesions) and report per class how the "
                        "probability of its class changes (does the model use the lesions its map is scored "
                        "against?)")
    p.add_argument("--target", default=None,
                   help="2-D models: the class every map explains (e.g. diabetic_retinopathy, DME); default each "
                        "image's predicted class. On a lesion set (e.g. ../shared/realdata/idrid_lesions) the maps "
                        "are scored against its real masks")
    p.add_argument("--set-default", action="store_true",
                   help="write the recommended default method and its evidence into the model's manifest entry")
    p.add_argument("--no-evidence", action="store_true",
                   help="do not keep the report as evidence next to the weights (by default it is merged into "
                        "<weights dir>/evidence/<model>-<sha256[:12]>-<phantoms|real set>.json, the only thing the "
                        "app's trust notes read)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_explain_eval)
