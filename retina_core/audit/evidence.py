"""The explain-eval evidence kept with the weights (`<weights dir>/evidence/`, written by
`audit.evaluate.write_evidence`) read back, and the trust notes and badges worded from it: what the app says under
every heatmap about how far its method can be trusted on this model.

    >>> ev = method_trust("oct_resnet18")                 # {method: figures} of the installed weights
    >>> note, warning = trust_note(ev.get("gradcam"), "gradcam", label="CNV")
    >>> trust_badge(ev.get("gradcam"))                    # "sanity check passed (|rho| 0.04)", ...

Nothing else is read (docs/ is for people) and nothing here draws: the pages show the notes through
`webapp.common.show_trust_note`.
"""
from __future__ import annotations

import json
from pathlib import Path


def stability_table(explain_eval_report: dict) -> list[dict]:
    """Rows {method, stability_ssim, stability_spearman, pointing_game, deletion_auc, insertion_auc,
    randomisation_abs_spearman, passes_sanity_check, cost_vs_forward, seconds_per_image, n_images} of an
    explain-eval report or evidence file (a method's own n_images where runs were merged)."""
    from .common import passes_randomisation

    rows = []
    for meth, r in (explain_eval_report.get("methods") or {}).items():
        if isinstance(r, dict):
            rows.append({"method": meth, **{k: r.get(k) for k in ("stability_ssim", "stability_spearman",
                                                                  "pointing_game", "deletion_auc",
                                                                  "insertion_auc", "randomisation_abs_spearman")},
                         "passes_sanity_check": passes_randomisation(r),
                         **{k: r.get(k) for k in ("cost_vs_forward", "seconds_per_image")},
                         "n_images": r.get("n_images", explain_eval_report.get("n_images"))})
    return rows


def evidence_kind(report: dict) -> str:
    """"real" or "phantom": what an evidence file was measured on (its `evidence` block, written by explain-eval;
    else what explain-eval would tag it: a real set's folder or a real lesion-mask report is real)."""
    from .evaluate import evidence_tag

    return (report.get("evidence") or {}).get("kind") or evidence_tag(report)[1]


def evidence_reports(model_name: str, weights_sha256: str | None = None, weights_dir=None
                     ) -> list[tuple[Path, dict]]:
    """The explain-eval evidence kept with the weights: `<weights dir>/evidence/*.json` (written by `explain-eval`,
    `audit.evaluate.write_evidence`) whose model is `model_name` and whose weights_sha256 is `weights_sha256`
    (default: the sha256 the weights dir's manifest lists for the model). Nothing else is read: docs/ is for people.
    Ordered real evidence first, then more images, then the file name (never file times). [(path, report)]."""
    from .evaluate import evidence_dir
    from ..models.loading import read_manifest

    if weights_sha256 is None:
        weights_sha256 = (read_manifest(weights_dir).get(model_name) or {}).get("sha256")
    folder = evidence_dir(weights_dir)
    if not weights_sha256 or not folder.is_dir():
        return []
    found = []
    for p in sorted(folder.glob("*.json")):
        try:
            obj = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if (isinstance(obj, dict) and obj.get("model") == model_name and obj.get("weights_sha256") == weights_sha256
                and isinstance(obj.get("methods"), dict)):
            found.append((p, obj))
    found.sort(key=lambda po: (evidence_kind(po[1]) != "real", -(po[1].get("n_images") or 0), po[0].name))
    return found


def _best_per_method(reports: list[tuple[Path, dict]], usable=lambda r: True) -> dict[str, tuple]:
    """{method: (path, report, figures)} from the report that measured the method on the most images (ties: the one
    with counterfactual phantoms, the fuller evidence; then the file name)."""
    best: dict[str, tuple] = {}
    for path, rep in reports:
        for meth, r in rep["methods"].items():
            if not isinstance(r, dict) or not usable(r):
                continue
            rank = (-(r.get("n_images") or rep.get("n_images") or 0), not rep.get("counterfactual"), path.name)
            if meth not in best or rank < best[meth][0]:
                best[meth] = (rank, path, rep, r)
    return {m: v[1:] for m, v in best.items()}


def _real_figures(path: Path, rep: dict, r: dict) -> dict:
    """What a note quotes from a method's figures on a real lesion set (the `real_lesions` block of
    `audit.real_lesions.summarise`, keys as it writes them)."""
    from .common import passes_randomisation
    from .evaluate import evidence_tag

    rl, ev = r["real_lesions"], rep.get("evidence") or {}
    if not ev.get("tag"):            # a report copied in by hand: what explain-eval would have tagged it
        tag, _, title = evidence_tag(rep)
        ev = {"set": tag, "set_title": title}
    les = rl.get("lesions") or {}
    return {"set": ev.get("set") or ev.get("tag"), "set_title": ev.get("set_title"),
            "n_images": les.get("n_images") or r.get("n_images") or rep.get("n_images"),
            "target": r.get("target", rep.get("target")),
            **{k: les.get(k) for k in ("pointing_game_tol", "pointing_game_tol_chance", "pointing_game_tol_p_value",
                                       "pointing_game_0px", "pointing_game_0px_chance")},
            **{k: rl.get(k) for k in ("deletion_drop", "deletion_drop_random_map", "p_target",
                                      "energy_outside_fov", "area_outside_fov", "tolerance_rule")},
            "randomisation_abs_spearman": r.get("randomisation_abs_spearman"),
            "passes_randomisation": passes_randomisation(r), "source": path.name}


def method_trust(model_name: str, weights_sha256: str | None = None, weights_dir=None) -> dict[str, dict]:
    """Per explanation method, what the explain-eval evidence kept with these weights measured
    (`evidence_reports`: `<weights dir>/evidence/`, default the bundled weights; weights_sha256 default the
    manifest's): {method: {randomisation_abs_spearman, passes_randomisation, pointing_game, energy_pointing_game,
    cost_vs_forward, deletion figures, n_images, source, kind, ..., real}}. The top-level figures are the phantom
    evidence (None where the method was measured on real images only); `real` holds the figures on a real lesion
    set (`_real_figures`) when there are any, else None. Each comes from the file that measured the method on the
    most images (ties: the one with counterfactual phantoms, then the file name), so a small run of many methods
    does not replace a large run of one. The counterfactual section (phantoms) comes from the phantom evidence with
    the most eyes: what the model uses (lesion_reliance) goes with every method; its per-class pointing game and
    per-input faithfulness (unused_lesions, faithful_alone) only with the method it was measured with. Empty when
    nothing is kept."""
    from .common import passes_randomisation

    reports = evidence_reports(model_name, weights_sha256, weights_dir)
    if not reports:
        return {}
    phantom = [(p, o) for p, o in reports if evidence_kind(o) == "phantom"]
    real = [(p, o) for p, o in reports if evidence_kind(o) == "real"]
    cfs = sorted(((-(o["counterfactual"].get("n_volumes") or 0), p.name, o["counterfactual"])
                  for p, o in phantom if isinstance(o.get("counterfactual"), dict)), key=lambda t: t[:2])
    counterfactual = cfs[0][2] if cfs else None
    guided = _lesion_guided(model_name, reports[0][1].get("weights_sha256"), weights_dir)
    unused = unused_lesions(counterfactual)      # with the per-class pointing game of the method it ran with
    cf_method = (counterfactual or {}).get("method", "gradcam")
    reliance = lesion_reliance_by_class(counterfactual)      # of the model: the same for every method
    best = _best_per_method(phantom)
    best_real = _best_per_method(real, lambda r: isinstance(r.get("real_lesions"), dict))
    # real images without lesion masks (e.g. the Mexico OCT set): the sanity check and faithfulness on real
    # images stand in for the top-level figures where no phantom evidence exists
    plain = _best_per_method(real, lambda r: not isinstance(r.get("real_lesions"), dict))
    out = {}
    for meth in [*best, *(m for m in best_real if m not in best), *(m for m in plain if m not in best
                                                                       and m not in best_real)]:
        kind = "phantom" if meth in best else "real"
        path, rep, r = best.get(meth) or plain.get(meth) or (None, {}, {})
        out[meth] = {"randomisation_abs_spearman": r.get("randomisation_abs_spearman"),
                     "passes_randomisation": passes_randomisation(r) if r else None,
                     "randomisation_empty_fraction": r.get("randomisation_empty_fraction"),
                     **{k: r.get(k) for k in ("pointing_game", "energy_pointing_game", "cost_vs_forward",
                                              "pointing_game_by_label", "n_lesion_images_by_label", "deletion_auc",
                                              "deletion_auc_random_map", "faithful_vs_random")},
                     "n_images": (r.get("n_images") or rep.get("n_images")) if r else None,
                     "source": path.name if path else None, "kind": kind if r else None,
                     "set_title": (rep.get("evidence") or {}).get("set_title") if kind == "real" else None,
                     "lesion_guided": guided,
                     "unused_lesions": unused if meth == cf_method and r else [], "lesion_reliance": reliance,
                     "faithful_alone": (counterfactual or {}).get("faithful_alone") if meth == cf_method else None,
                     "real": _real_figures(*best_real[meth]) if meth in best_real else None}
        by_mod = {mod: {k: r.get(f"{k}_{mod}") for k in _MODALITY_KEYS} for mod in PAIR_MODALITIES
                  if any(r.get(f"{k}_{mod}") is not None for k in _MODALITY_KEYS)}
        if by_mod:
            out[meth]["by_modality"] = by_mod
    return out


PAIR_MODALITIES = ("fundus", "oct")     # the two inputs of the fusion model; its report suffixes figures by them
_MODALITY_KEYS = ("pointing_game", "n_lesion_images", "energy_pointing_game", "deletion_auc",
                  "deletion_auc_random_map", "faithful_vs_random", "randomisation_abs_spearman",
                  "randomisation_empty_fraction")


def modality_evidence(evidence: dict | None, modality: str) -> dict | None:
    """The figures of one input's map of a two-input (fusion) model, from `method_trust` evidence, in the shape
    `trust_note` reads; None when the report has no per-modality figures. The map of one input can pass while the
    other fails (the bundled fusion model's OCT map deletes no faster than a random map)."""
    from .common import passes_randomisation

    mod = ((evidence or {}).get("by_modality") or {}).get(modality)
    if not mod:
        return None
    ev = {**mod, "passes_randomisation": passes_randomisation(mod)}
    ev.update({k: evidence.get(k) for k in ("n_images", "source", "lesion_guided")})
    ev["alone"] = (evidence.get("faithful_alone") or {}).get(modality)
    return ev


def _lesion_guided(model_name: str, weights_sha256: str | None, weights_dir=None) -> bool:
    """Whether the installed weights of `model_name` (when they are the report's) were trained with lesion-mask
    guidance (`train --lesion-cam-guidance`): their maps were taught where lesions are."""
    from ..models.loading import read_manifest

    entry = read_manifest(weights_dir).get(model_name) or {}
    if weights_sha256 and entry.get("sha256") != weights_sha256:
        return False
    return bool((entry.get("config") or {}).get("lesion_cam_guidance"))


UNUSED_LESION_DROP = 0.05  # counterfactual phantoms: a class whose masked lesions, left out, lower P less than this
POINTING_TARGET = 0.8      # the pointing game a default map should reach on lesion-bearing phantoms
WEAK_INPUT_DELETION = 0.9   # deletion AUCs (map and random) at or above this: the input hardly moves the score
LOCALISATION_WARN = 0.5   # a pointing game below this (on phantoms) makes the trust note a warning


def class_localisation(evidence: dict | None, label: str | None) -> tuple[float, int] | None:
    """(pointing game, n lesion images) of the phantoms whose true class is `label`, from `method_trust` evidence;
    None when the report has no such figure (older reports, or no lesion image of that class)."""
    pg = ((evidence or {}).get("pointing_game_by_label") or {}).get(label) if label else None
    n = ((evidence or {}).get("n_lesion_images_by_label") or {}).get(label) if label else None
    return (float(pg), int(n or 0)) if pg is not None else None


def unused_lesions(counterfactual: dict | None) -> list[dict]:
    """From an explain-eval report's `counterfactual` section (`audit.counterfactual`): the phantom classes where
    the map often misses the lesion masks (pointing game below POINTING_TARGET) and the model does not use the
    masked lesions: left out of the same eyes, they lowered the class's probability by less than
    UNUSED_LESION_DROP (volumes: with the clinical record and without it). The variant is every masked lesion
    ("without_masked"; reports before it had only the cysts, foci and exudates, "without_ellipsoids"). Each item:
    class, n, pointing_game, how much leaving out the retinal swelling lowered the probability, and how much leaving
    out the masked lesions lowers it once the swelling is gone too (a cue the model falls back on; None when not
    measured); without the record for volumes."""
    out = []
    for cls, s in ((counterfactual or {}).get("per_class") or {}).items():
        e, pg = s.get("without_masked") or s.get("without_ellipsoids") or {}, s.get("pointing_game")
        drops = [d for d in (e.get("drop"), e.get("drop_no_record")) if d is not None]
        if (e.get("n", 0) >= 3 and drops and max(drops) < UNUSED_LESION_DROP
                and pg is not None and pg < POINTING_TARGET):
            t, both = s.get("without_thickening") or {}, s.get("without_masked_and_thickening") or {}
            rec = "_no_record" if "p_disease_no_record" in t else ""
            masked_without_swelling = (t[f"p_disease{rec}"] - both[f"p_disease{rec}"]
                                       if t.get(f"p_disease{rec}") is not None
                                       and both.get(f"p_disease{rec}") is not None else None)
            out.append({"class": cls, "n": e["n"], "pointing_game": pg,
                        "swelling_drop_no_record": t.get("drop_no_record", t.get("drop")),
                        "lesion_drop_without_swelling": masked_without_swelling})
    return out


def lesion_reliance_by_class(counterfactual: dict | None) -> dict[str, dict]:
    """Per phantom class of an explain-eval report's `counterfactual` section: {n, p (original), p_without (the same
    eyes without the lesions their masks mark), called_without, p_healthy_without (None when the model has no
    healthy class), healthy_class, p_without_swelling (OCT: the same eyes without their retinal swelling, when
    every one has some)}; without the clinical record for volume models. Reports before the masked
    variant give the cysts/foci one."""
    out = {}
    for cls, s in ((counterfactual or {}).get("per_class") or {}).items():
        e, o = s.get("without_masked") or s.get("without_ellipsoids"), s.get("original")
        if not e or not o:
            continue
        rec = "_no_record" if "p_disease_no_record" in o else ""
        if o.get(f"p_disease{rec}") is None or e.get(f"p_disease{rec}") is None:
            continue
        t = s.get("without_thickening") or {}
        out[cls] = {"n": e["n"], "p": o[f"p_disease{rec}"], "p_without": e[f"p_disease{rec}"],
                    "called_without": e[f"called{rec}"], "p_healthy_without": e.get("p_healthy"),
                    "healthy_class": counterfactual.get("healthy_class"),
                    "p_without_swelling": t.get(f"p_disease{rec}") if t.get("n") == e["n"] else None}
    return out


def _reliance_sentence(evidence: dict | None, label: str | None) -> str:
    r = ((evidence or {}).get("lesion_reliance") or {}).get(label) if label else None
    if not r or r["n"] < 3:
        return ""
    healthy = (f", P({r['healthy_class']}) {r['p_healthy_without']:.2f}" if r.get("p_healthy_without") is not None
               else "")
    verdict = ("the model uses those lesions" if r["called_without"] == 0 else
               "the model uses those lesions only in part" if r["p"] - r["p_without"] >= UNUSED_LESION_DROP else
               "the model does not use those lesions")
    if r["called_without"] and r.get("p_without_swelling") is not None:
        verdict += (f" (without the retinal swelling around them, which no mask marks, P({label}) was "
                    f"{r['p_without_swelling']:.2f})")
    return (f" Counterfactual phantoms: {r['n']} '{label}' eyes re-rendered without the lesions their masks mark "
            f"went from P({label}) {r['p']:.2f} to {r['p_without']:.2f} ({r['called_without']} still called "
            f"'{label}'{healthy}): {verdict}.")


def _counterfactual_caveat(evidence: dict | None) -> str:
    items = (evidence or {}).get("unused_lesions") or []
    if not items:
        return ""
    names = " and ".join(f"{i['class']} ({i['n']}, pointing game {i['pointing_game']:.2f})" for i in items)
    swell = [f"{i['class']} {i['swelling_drop_no_record']:.2f}" for i in items
             if i.get("swelling_drop_no_record") is not None]
    used = (" The map shows what it does use, such as the retinal swelling (leaving the swelling out lowered "
            f"the probability by {', '.join(swell)})." if swell else "")
    fallback = [i for i in items if (i.get("lesion_drop_without_swelling") or 0) >= UNUSED_LESION_DROP]
    unused = [i["class"] for i in items if i not in fallback]
    if not fallback:
        verdict = "so this model does not use those lesions"
    else:
        verdict = "; ".join(
            f"on {i['class']} eyes this model does not need them while the swelling is there (with the swelling also "
            f"left out, leaving them out lowers the probability by {i['lesion_drop_without_swelling']:.2f})"
            for i in fallback) + (f"; on {' and '.join(unused)} eyes it does not use them" if unused else "")
    return (f" Where the map misses the phantom lesions, on {names} eyes, counterfactual phantoms show why: "
            f"re-rendered without the lesions their masks mark, those eyes kept the same probability: {verdict}."
            + used)


def trust_note(evidence: dict | None, method: str, label: str | None = None, modality: str | None = None
               ) -> tuple[str, bool]:
    """One sentence on how far `method`'s maps can be trusted on this model, and whether it is a warning.
    `label`: the suggested class; when the map localised poorly on phantoms of that class (below LOCALISATION_WARN,
    from at least 3 lesion images) the note is a warning about that class even if the overall figure is good.
    `modality`: for a two-input model, the note on that input's map alone (`modality_evidence`)."""
    if modality is not None:
        ev = modality_evidence(evidence, modality)
        a = (ev or {}).get("alone")
        if a and a.get("n", 0) < 3:
            a = None
        # the plain deletion test holds the other image as it is; when that image's lesions already decide the
        # output, it cannot tell a faithful map from a random one. The counterfactual test where this image
        # carries the call then decides whether to warn.
        saturated = bool(a and a["faithful_vs_random"] and ev.get("faithful_vs_random") is False)
        note, warn = _trust_note({**ev, "faithful_vs_random": None} if saturated else ev,
                                 f"{method} on the {modality.replace('oct', 'OCT')} image")
        d, dr = (ev or {}).get("deletion_auc"), (ev or {}).get("deletion_auc_random_map")
        if saturated:
            note += (f" With the other image as it is, removing parts of this one moves the score no more than "
                     f"removing random regions (deletion AUC {d:.2f} against {dr:.2f}): the other image's lesions "
                     "already decide the output on most phantom pairs.")
        elif d is not None and dr is not None and min(d, dr) >= WEAK_INPUT_DELETION:
            # with counterfactual pairs at hand, say what they show (either image's lesions usually suffice)
            # rather than guess that the other image decides
            why = ("with the other image as it is, its lesions already decide the output on most phantom pairs"
                   if a else "on phantoms its suggestion rests mainly on the other image")
            note += (f" Removing most of this image barely moves the model's score (deletion AUC {min(d, dr):.2f} "
                     f"or more): {why}.")
        if a:
            other = "fundus photograph" if modality == "oct" else "OCT B-scan"
            verdict = ("this map is faithful when this image decides" if a["faithful_vs_random"] else
                       "even then this map is no more faithful than chance")
            note += (f" Where this image carries the call ({a['n']} phantom pairs re-rendered without the "
                     f"{other}'s lesions), removing what the map marks lowers the score "
                     f"{'faster than' if a['faithful_vs_random'] else 'no faster than'} removing random regions "
                     f"(deletion AUC {a['deletion_auc']:.2f} against {a['deletion_auc_random_map']:.2f}): {verdict}.")
        return note, warn
    note, warn = _trust_note(evidence, method)
    per_class = class_localisation(evidence, label)
    if not warn and per_class and per_class[1] >= 3 and per_class[0] < LOCALISATION_WARN:
        return (f"{method} **rarely points at the lesions of '{label}'** on this model: on {per_class[1]} phantoms of "
                f"that class its peak fell on a lesion only {per_class[0]:.0%} of the time (all lesion classes: "
                f"{evidence['pointing_game']:.0%}). For this suggestion read the map as a coarse region, or choose "
                f"Integrated Gradients (slower, pixel-level) as the heatmap method. " + note
                + _reliance_sentence(evidence, label), True)
    return note + _counterfactual_caveat(evidence) + _reliance_sentence(evidence, label), warn


def _trust_note(evidence: dict | None, method: str) -> tuple[str, bool]:
    """`trust_note` without the per-class check."""
    from .common import RANDOMISATION_LIMIT

    if not evidence or (not evidence.get("real") and evidence.get("kind", "phantom") is None):
        return (f"{method}: not evaluated on this model yet (`python -m retina_core explain-eval`): no measured "
                "evidence of how far its map can be trusted.", False)
    if evidence.get("real"):
        return _real_trust_note(evidence["real"], evidence, method)
    rho, pg = evidence.get("randomisation_abs_spearman"), evidence.get("pointing_game")
    where = f" (measured on synthetic phantoms only: {evidence.get('n_images')} phantoms, `{evidence['source']}`)"
    if evidence.get("kind") == "real":
        title = evidence.get("set_title") or "a real set"
        where = (f" (measured on {evidence.get('n_images')} real images of {title}, drawn from the whole set, "
                 f"training images included; it has no lesion masks, so where the map points is not scored; "
                 f"`{evidence['source']}`)")
    pointing = f"; it hit a phantom lesion {pg:.0%} of the time" if pg is not None else ""
    d, dr = evidence.get("deletion_auc"), evidence.get("deletion_auc_random_map")
    if evidence.get("passes_randomisation") is False:
        return (f"{method} **failed the sanity check** on this model: its map barely changes when the model's "
                f"weights are randomised (mean |rho| {rho:.2f} >= {RANDOMISATION_LIMIT}), so it shows the image's "
                f"structure more than what the model learnt{pointing}{where}. Compare it, do not rely on it.", True)
    if evidence.get("faithful_vs_random") is False:
        return (f"{method} **is no more faithful than chance** on this model: removing what its map marks lowers "
                f"the model's score no faster than removing random regions (deletion AUC {d:.2f} against {dr:.2f} "
                f"for a random map){pointing}{where}. The map may look right without being what the model used.",
                True)
    faithful = ""
    if evidence.get("faithful_vs_random") and d is not None and dr is not None:
        faithful = (f"; removing what it marks lowers the score faster than removing random regions (deletion AUC "
                    f"{d:.2f} against {dr:.2f})")
        pointing += faithful
    inconclusive = rho is not None and evidence.get("passes_randomisation") is None
    if pg is not None and pg < LOCALISATION_WARN:
        sanity = ("sanity check not run" if rho is None else "sanity check inconclusive: the randomised model's "
                  "maps were mostly empty" if inconclusive else f"it passed the sanity check (mean |rho| {rho:.2f})")
        return (f"{method} **rarely points at a lesion** on this model: its peak fell on a phantom lesion only "
                f"{pg:.0%} of the time ({sanity}{faithful}){where}. Read it as a coarse region the model weighed, "
                f"not as a lesion finder.{_guided_caveat(evidence)}", True)
    if rho is None or inconclusive:
        what = "inconclusive (the randomised model's maps were mostly empty)" if inconclusive else "not run"
        return f"{method}: sanity check {what}{pointing}{where}.", False
    return (f"{method} passed the sanity check on this model (map changes when the weights are randomised: mean "
            f"|rho| {rho:.2f}){pointing}{where}.{_guided_caveat(evidence)}", False)


def _guided_caveat(evidence: dict) -> str:
    if not evidence.get("lesion_guided") or evidence.get("pointing_game") is None:
        return ""
    return (" These weights were trained with lesion masks (lesion-mask guidance), so their maps were taught where "
            "phantom lesions are: the figure shows how well that carries over to new phantoms, not to photographs "
            "of patients.")


REAL_SET_SHORT = {"idrid_lesions": "IDRiD"}     # how a note names a real lesion set (else its title, else its tag)
REAL_P_VALUE = 0.05       # a real pointing game above chance with a p-value at or above this is "not shown"
OUTSIDE_FOV_WARN = 0.5    # a map with this share of its energy outside the field of view marks the frame


def _f2(x: float) -> str:
    """Two decimals, without a negative zero."""
    t = f"{x:.2f}"
    return "0.00" if t == "-0.00" else t


def _real_trust_note(real: dict, phantom: dict, method: str) -> tuple[str, bool]:
    """The note when the method was measured on a real lesion set (IDRiD): where its peak fell against a random
    point of the field of view, what deleting in its order did to the probability against a random order, and the
    randomisation check (on these photographs, and on synthetic phantoms when that was measured too). A warning when
    the map fails the check, deletes no faster than random regions, finds lesions no better than chance (or is not
    shown to), or puts most of its energy outside the field of view."""
    from .common import RANDOMISATION_LIMIT

    name = (REAL_SET_SHORT.get(real.get("set") or "") or (real.get("set_title") or "").split(" (")[0]
            or real.get("set") or "lesion-set")
    target = real.get("target")
    p_name = f"P({target})" if target else "P(predicted class)"
    maps = f" (maps of '{target}')" if target else ""
    n = real.get("n_images")
    pg, ch, pv = (real.get(k) for k in ("pointing_game_tol", "pointing_game_tol_chance", "pointing_game_tol_p_value"))
    d, dr, pt = real.get("deletion_drop"), real.get("deletion_drop_random_map"), real.get("p_target")
    out_fov, out_area = real.get("energy_outside_fov"), real.get("area_outside_fov")
    facts = []
    if pg is not None:
        chance = f"a random point in the field of view: {ch:.0%}" if ch is not None else "chance not measured"
        pval = f", p = {pv:.2f}" if pv is not None else ""
        facts.append(f"its peak fell on a marked lesion {pg:.0%} of the time ({chance}{pval})")
    if d is not None and dr is not None:
        frm = f", {pt:.2f} on average," if pt is not None else ""
        moves = f"lowers {p_name}{frm} by {_f2(d)}" if d > -0.005 else f"raises {p_name}{frm} by {_f2(-d)}"
        rand = _f2(dr) if dr > -0.005 else f"a rise of {_f2(-dr)}"
        facts.append(f"deleting what it marks {moves} against {rand} for random regions")
    if out_fov is not None and out_fov >= OUTSIDE_FOV_WARN:
        facts.append(f"{out_fov:.0%} of its map lies outside the field of view (the black frame, "
                     f"{out_area or 0:.0%} of the image)")
    where = f" (`{real['source']}`)"
    checks = [(lab, ev.get("randomisation_abs_spearman"), ev.get("passes_randomisation"))
              for lab, ev in (("on these photographs", real), ("on synthetic phantoms", phantom or {}))
              if ev.get("randomisation_abs_spearman") is not None]
    failed = [f"{rho:.2f} {lab}" for lab, rho, ok in checks if ok is False]
    passed = [f"{rho:.2f} {lab}" for lab, rho, ok in checks if ok]
    if failed:
        sanity = (f" Its map barely changes when the model's weights are randomised (mean |rho| {', '.join(failed)}; "
                  f"the limit is {RANDOMISATION_LIMIT}): it shows the image's structure more than what the model "
                  f"learnt.")
    elif passed:
        sanity = (f" It passed the sanity check (its map changes when the weights are randomised: mean |rho| "
                  f"{', '.join(passed)}).")
    elif checks:
        sanity = " Sanity check inconclusive (the randomised model's maps were mostly empty)."
    else:
        sanity = " Sanity check not run."
    problems = []
    if failed:
        problems.append(("failed the sanity check", "Compare it, do not rely on it."))
    if d is not None and dr is not None and d <= dr:
        problems.append(("is no more faithful than chance on real photographs",
                         "The map may look right without being what the model used."))
    if pg is not None and ch is not None and pg <= ch:
        problems.append(("is no better than chance at finding real lesions",
                         "Read it as a coarse region the model weighed, not as a lesion finder."))
    elif pg is not None and pv is not None and pv >= REAL_P_VALUE:
        problems.append(("is not shown to find real lesions better than chance",
                         "Read it as a coarse region the model weighed, not as a lesion finder."))
    if out_fov is not None and out_fov >= OUTSIDE_FOV_WARN:
        problems.append(("marks the frame more than the retina", "It does not show lesions."))
    body = "; ".join(facts)
    if problems:
        head = " and ".join(f"**{p}**" for p, _ in problems[:2])
        advice = " ".join(dict.fromkeys(a for _, a in problems))
        return (f"{method} {head} on this model: on {n} real {name} photographs{maps} {body}{where}.{sanity} "
                f"{advice}", True)
    return f"{method} on {n} real {name} photographs{maps}: {body}{where}.{sanity}", False


def trust_badge(evidence: dict | None) -> str:
    """A few words for a map's caption: the sanity check's verdict on this model, from `method_trust` (measured on
    real photographs when it was, else on phantoms; a failure on either is a failure)."""
    checks = [ev for ev in ((evidence or {}).get("real"), evidence)
              if ev and ev.get("passes_randomisation") is not None]
    if not checks:
        return "not evaluated"
    ev = next((c for c in checks if c["passes_randomisation"] is False), checks[0])
    rho = ev["randomisation_abs_spearman"]
    where = " on real photographs" if ev is (evidence or {}).get("real") else (
        " on real images" if ev.get("kind") == "real" else "")
    return (f"sanity check passed{where} (|rho| {rho:.2f})" if ev["passes_randomisation"]
            else f"FAILED sanity check{where} (|rho| {rho:.2f}): compare, do not rely")
