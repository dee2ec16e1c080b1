"""`python -m retina_core ensemble`: soft / weighted voting of trained models on one data split, exhaustive subset
ablation, and whether the ensemble beats its best member (evaluate/ensemble.py does the arithmetic).

    python -m retina_core ensemble --models retinal_fusion_net_atto,retinal_fusion_net_atto_v4 --data octc8 --ablation
    python -m retina_core ensemble --models A,B --weights 0.6,0.4 --weights-dirs runs/a,runs/b --data D --json
    python -m retina_core ensemble --models retinal_fusion_net_atto@runs/v3,retinal_fusion_net_atto@runs/v4 --data D

A member is a registered model name, optionally `NAME@FOLDER` for weights written by `train` (the same
architecture trained with two recipes, e.g. V3 + V4). Members must read the same modality and share the class list.
Probabilities are the members' calibrated ones (their manifest temperatures). The split is drawn with the members'
training seed, so their held-out images stay held out; members trained with different split seeds are flagged.
"""
from __future__ import annotations

import json
from pathlib import Path


from ..errors import RetinaInputError
from .ensemble import LOWER_IS_BETTER, ablation, ensemble_report
from .run import is_phantom, load_member, member_probabilities, split_records

BRIEF = ("n", "accuracy", "auc_macro", "sensitivity_macro", "specificity_macro", "f1_macro", "kappa_quadratic", "ece")


def _brief(m: dict) -> dict:
    return {k: (round(m[k], 4) if isinstance(m.get(k), float) else m.get(k)) for k in BRIEF if k in m}


def _split_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def parse_members(models: str | list[str], weights_dirs: str | list[str] | None = None) -> list[tuple[str, str | None]]:
    """"A,B@dir" -> [(A, None), (B, dir)]; weights_dirs: one folder for all members or one per member."""
    names = _split_list(models) if isinstance(models, str) else list(models)
    if not names:
        raise RetinaInputError("Name at least one model with --models (comma-separated).")
    dirs = _split_list(weights_dirs) if isinstance(weights_dirs, str) else list(weights_dirs or [])
    if dirs and len(dirs) not in (1, len(names)):
        raise RetinaInputError(f"--weights-dirs has {len(dirs)} folders for {len(names)} models: give one folder "
                               f"for all, or one per model.")
    out = []
    for i, item in enumerate(names):
        name, _, d = item.partition("@")
        out.append((name.strip(), d.strip() or (dirs[0] if len(dirs) == 1 else dirs[i] if dirs else None)))
    return out


def _labels(members) -> list[str]:
    counts = {}
    for n, _ in members:
        counts[n] = counts.get(n, 0) + 1
    labels = []
    for n, d in members:
        lab = n if counts[n] == 1 else f"{n}@{Path(d).name if d else 'bundled'}"
        while lab in labels:
            lab += "'"
        labels.append(lab)
    return labels


def run_ensemble(models, data, weights=None, weights_dirs=None, ablate: bool = False, split: str = "test",
                 metric: str = "accuracy", seed: int | None = None, encoders_dir: str | None = None) -> dict:
    """Evaluate every member and their soft / weighted vote on one split; optionally rank all 2^k - 1 subsets."""
    members = parse_members(models, weights_dirs)
    labels = _labels(members)
    loaded = [load_member(n, d, encoders_dir) for n, d in members]
    first = loaded[0]
    warnings = []
    for lab, m in zip(labels, loaded):
        if m.cfg.classes != first.cfg.classes or m.cfg.modality != first.cfg.modality:
            raise RetinaInputError(f"Members disagree: {labels[0]} reads {first.cfg.modality} images with classes "
                                   f"{list(first.cfg.classes)}, {lab} reads {m.cfg.modality} with "
                                   f"{list(m.cfg.classes)}. Ensemble models of the same task only.")
    seeds = [int(m.entry.get("config", {}).get("seed", 0)) for m in loaded]
    if seed is None:
        seed = seeds[0]
        if len(set(seeds)) > 1:
            warnings.append(f"members were trained with different split seeds {dict(zip(labels, seeds))}: where "
                            f"the data set has no fixed split, this {split!r} split (seed {seed}) may hold images "
                            f"some members trained on.")
    w = None
    if weights is not None:
        wl = [float(x) for x in (_split_list(weights) if isinstance(weights, str) else weights)]
        if len(wl) != len(labels):
            raise RetinaInputError(f"{len(wl)} weights for {len(labels)} models: give one weight per model.")
        w = dict(zip(labels, wl))
    records, y, index = split_records(first, data, split, seed)
    probs = {lab: member_probabilities(m, records) for lab, m in zip(labels, loaded)}
    classes = list(first.cfg.classes)
    soft = ensemble_report(probs, y, classes, None, metric=metric, ordinal=first.cfg.ordinal)
    phantom = is_phantom(index, data)
    report = {
        "models": labels, "weights_dirs": [d for _, d in members], "data": str(data), "layout": index.layout,
        "split": split, "seed": seed, "n": int(len(y)), "metric": metric,
        "metric_kind": "phantom" if phantom else "as measured on this data",
        "weights_sha256": {lab: m.sha256 for lab, m in zip(labels, loaded)},
        "members": {lab: _brief(v) for lab, v in soft["members"].items()},
        "soft_vote": _brief(soft["ensemble"]),
        "best_member": soft["best_member"], "best_member_score": soft["best_member_score"],
        "ensemble_score": soft["ensemble_score"], "improvement": soft["improvement"],
        "beats_best_member": soft["beats_best_member"], "warnings": warnings,
    }
    if w is not None:
        weighted = ensemble_report(probs, y, classes, w, metric=metric, ordinal=first.cfg.ordinal)
        report["weights"] = weighted["weights"]
        report["weighted_vote"] = _brief(weighted["ensemble"])
        report["weighted_score"] = weighted["ensemble_score"]
        report["weighted_beats_best_member"] = weighted["beats_best_member"]
    if ablate:
        entries = ablation(probs, y, classes, metric=metric, weights=w, ordinal=first.cfg.ordinal)
        report["n_subsets"] = len(entries)
        report["ablation"] = [{"rank": e["rank"], "members": e["members"], "score": e["score"],
                               **{k: v for k, v in _brief(e["metrics"]).items() if k != "n"}} for e in entries]
        best_single = min((e for e in entries if len(e["members"]) == 1), key=lambda e: e["rank"])
        s0, s1 = entries[0]["score"], best_single["score"]
        report["best_subset"] = entries[0]["members"]
        report["best_subset_beats_best_member"] = bool(
            len(entries[0]["members"]) > 1 and s0 is not None and s1 is not None
            and (s0 < s1 if metric in LOWER_IS_BETTER else s0 > s1))
    return report


def _print_table(r: dict) -> None:
    m = r["metric"]
    print(f"{r['split']} split of {r['data']} ({r['layout']}, n = {r['n']}, {r['metric_kind']} metrics; "
          f"research software, not clinical accuracy)")
    for lab, v in r["members"].items():
        print(f"  {lab:<40} {m} {v.get(m)}  auc {v.get('auc_macro')}")
    print(f"  {'soft vote (equal weights)':<40} {m} {r['soft_vote'].get(m)}  auc {r['soft_vote'].get('auc_macro')}")
    if "weighted_vote" in r:
        print(f"  {'weighted vote ' + str(r['weights']):<40} {m} {r['weighted_vote'].get(m)}")
    verdict = "beats" if r["beats_best_member"] else "does not beat"
    print(f"The soft vote {verdict} the best member ({r['best_member']}, {m} {r['best_member_score']}).")
    if "ablation" in r:
        print(f"Ablation over all {r['n_subsets']} subsets, best first:")
        for e in r["ablation"]:
            print(f"  {e['rank']:>3}. {' + '.join(e['members']):<60} {m} {e['score']}")
    for w in r["warnings"]:
        print(f"warning: {w}")


def cmd_ensemble(args) -> int:
    report = run_ensemble(args.models, args.data, weights=args.weights, weights_dirs=args.weights_dirs,
                          ablate=args.ablation, split=args.split, metric=args.metric, seed=args.seed,
                          encoders_dir=args.encoders_dir)
    if args.json:
        print(json.dumps(report, default=str))
    else:
        _print_table(report)
    return 0


def add_cli(sub) -> None:
    """Register `ensemble` on the CLI's subparsers."""
    p = sub.add_parser("ensemble", help="soft / weighted voting of models on a data split, subset ablation")
    p.add_argument("--models", required=True,
                   help="comma-separated model names; NAME@FOLDER takes NAME's weights from a `train` output folder")
    p.add_argument("--data", required=True)
    p.add_argument("--weights", default=None, help="comma-separated voting weights, one per model (e.g. 0.6,0.4)")
    p.add_argument("--weights-dirs", default=None,
                   help="comma-separated weight folders: one for all models or one per model (default: bundled)")
    p.add_argument("--encoders-dir", default=None, help="fundus_oct_fusion: folder(s) with the encoders' weights")
    p.add_argument("--ablation", action="store_true", help="evaluate and rank all 2^k - 1 subsets of the models")
    p.add_argument("--split", default="test")
    p.add_argument("--metric", default="accuracy",
                   help="ranking metric: accuracy, auc_macro, f1_macro, sensitivity_macro, specificity_macro, "
                        "kappa_quadratic, ece")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the members' training seed)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ensemble)
