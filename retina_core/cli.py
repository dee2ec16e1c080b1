"""Command line: `python -m retina_core <command> ...` (see `--help` of each command).

    python -m retina_core models
    python -m retina_core predict scan1.png scan2.jpeg --out heatmaps/ --json
    python -m retina_core data phantoms --kind oct-kermany --n 200 --seed 0 --out data/oct
    python -m retina_core data inspect data/oct --json
    python -m retina_core train --model oct_resnet18 --data data/oct --out runs/oct
    python -m retina_core evaluate --model oct_resnet18 --data data/oct --json
    python -m retina_core serve --address 127.0.0.1:6379 [--replicas 2]   # deploy the app's Ray Serve application (docs/app.md)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from dataclasses import fields
from pathlib import Path

from .errors import RetinaInputError
from .modality import IMAGE_MODALITIES, Modality

log = logging.getLogger("retina_core")
IMAGE_CHOICES = [m.value for m in IMAGE_MODALITIES]     # --modality / --expect: the plain strings


def _print_json(obj) -> None:
    print(json.dumps(obj, default=str))


# ---------------------------------------------------------------- models
def cmd_models(args) -> int:
    from .models import get_cfg, list_models, read_manifest

    manifest = read_manifest()
    rows = []
    for name in list_models():
        cfg, entry = get_cfg(name), manifest.get(name, {})
        rows.append({"name": name, "modality": cfg.modality, "classes": list(cfg.classes), "task": cfg.task,
                     "weights": entry.get("file"), "sha256": entry.get("sha256"),
                     "trained_on": entry.get("data"), "heldout_metrics": entry.get("heldout_metrics"),
                     "metric_kind": entry.get("metric_kind")})
    if args.json:
        for r in rows:
            _print_json(r)
        return 0
    for r in rows:
        acc = (r["heldout_metrics"] or {}).get("accuracy")
        state = f"weights {r['sha256'][:12]}, {r['metric_kind']} accuracy {acc:.3f}" if r["sha256"] else "no weights"
        print(f"{r['name']:<24} {r['modality']:<7} {len(r['classes'])} classes  ({state})\n    {r['task']}")
    return 0


# ---------------------------------------------------------------- predict
def cmd_predict(args) -> int:
    import numpy as np
    from PIL import Image

    from .analysis import analyze, analyze_all, get_model
    from .explain.overlay import heatmap_to_rgb, overlay
    from .io.decode import SCREEN_SIDE, read_image

    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    model = get_model(args.model) if args.model else None
    failures = 0
    record_values = parse_record(args.record) if args.record else {}
    for path in args.images:
        record: dict = {"file": path}
        try:
            img = read_image(path, max_side=SCREEN_SIDE)
            if img.kind == "volume":
                record.update(predict_volume(img, args.model, args.method, record_values, args.eye, out))
                failures += _report_volume(path, record, args.json)
                continue
            # --model: that model alone; else every installed model of the modality, the default one first
            found = [analyze(img, model, method=args.method, modality=args.modality)] if model else \
                analyze_all(img, method=args.method, modality=args.modality)
            for k, a in enumerate(found):
                entry = a.to_dict()
                if out and a.heatmap is not None:
                    # Outputs are named by content hash (and model), never by the input name (patient data).
                    stem = a.content_hash[:16] + ("" if k == 0 else f"_{a.model}")
                    Image.fromarray(heatmap_to_rgb(a.heatmap)).save(out / f"{stem}_heatmap.png")
                    Image.fromarray(overlay(a.image, a.heatmap)).save(out / f"{stem}_overlay.png")
                    np.save(out / f"{stem}_heatmap.npy", a.heatmap)
                    entry["heatmap"] = str(out / f"{stem}_heatmap.png")
                    entry["overlay"] = str(out / f"{stem}_overlay.png")
                if k == 0:
                    record.update(entry)
                else:
                    for key in ("quality", "laterality", "content_hash", "modality"):
                        entry.pop(key, None)
                    record.setdefault("other_suggestions", []).append(entry)
        except RetinaInputError as exc:
            failures += 1
            record["error"] = str(exc)
        if args.json:
            _print_json(record)
        elif "error" in record:
            print(f"{path}: error: {record['error']}")
        elif record["label"] is None:
            print(f"{path}: {record['suggestion']} ({'; '.join(record['notes'])})")
        else:
            for k, r in enumerate([record, *record.get("other_suggestions", [])]):
                p = r["probabilities"][r["label"]]
                head = f"{path}: {record['modality']} ->" if k == 0 else "    also:"
                print(f"{head} {r['label']} ({p:.1%}) by {r['model']} [trained on {r['trained_on']}]; "
                      f"{r['suggestion']}" + "".join(f" {n}" for n in r.get("notes", ())
                                                     if n.startswith("Confidence: "))   # measured held out
                      + (f"; heatmap {r['heatmap']}" if "heatmap" in r else ""))
    return 1 if failures else 0


VOLUME_MODEL = "oct_volume_fusion3d_tiny"


def parse_record(text: str) -> dict:
    """'age=70,sex=F,hba1c=8.4' -> the volume model's clinical record ({field: value}); unknown fields and values
    that are not numbers are refused with a clear message."""
    from .volume import META_FIELDS

    out: dict = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise RetinaInputError(f"--record item {item!r} is not field=value (e.g. age=70,sex=F,hba1c=8.4).")
        if key == "sex":
            if value.upper() not in ("F", "M"):
                raise RetinaInputError("--record sex must be F or M.")
            out["sex"] = value.upper()
        elif key in META_FIELDS:
            try:
                out[key] = float(value)
            except ValueError:
                raise RetinaInputError(f"--record {key} must be a number, got {value!r}.") from None
        else:
            raise RetinaInputError(f"--record field {key!r} unknown; the volume model reads "
                                   f"{', '.join(list(META_FIELDS) + ['sex'])}.")
    return out


def predict_volume(img, model_name: str | None, method: str | None, record: dict, eye: str | None,
                   out: Path | None) -> dict:
    """The OCT volume model on one decoded volume: P(disease), label and the 3-D heatmap of `method` (default:
    the model's), with the slice where the map is strongest; with `out`, the map as .npy [D, H, W] and overlays of
    that slice and of the en-face projection, named by content hash."""
    import numpy as np
    from PIL import Image

    from .analysis import NO_RESULT, get_model
    from .explain.attribution import default_method
    from .explain.overlay import overlay
    from .explain.volume_methods import VOLUME_METHODS
    from .models import get_cfg
    from .quality import assess_quality
    from .volume import en_face, map_en_face, run_volume_model, slice_rgb

    q = assess_quality(img)   # the one gate, before any model: a non-OCT or ungradable volume gets no result
    if q.modality == "not_retinal" or not q.gradable:
        return {"modality": q.modality, "label": None, "suggestion": NO_RESULT, "model": None,
                "quality": {"verdict": q.verdict, "gradable": q.gradable, "score": round(float(q.score), 4),
                            "reasons": list(q.reasons)}, "notes": [q.verdict, *q.reasons]}
    name = model_name or VOLUME_MODEL
    if get_cfg(name).modality != Modality.OCT_VOLUME:
        raise RetinaInputError(f"This is an OCT volume and {name} reads single images; use an OCT volume model "
                               f"(e.g. --model {VOLUME_MODEL}) or leave --model out.")
    model = get_model(name)
    method = method or default_method(model)
    if method not in VOLUME_METHODS:
        raise RetinaInputError(f"{method} does not apply to OCT volumes; choose from {', '.join(VOLUME_METHODS)}.")
    vol = img.pixels
    eye = eye or img.laterality
    res = run_volume_model(model, vol, record, eye)
    maps = res.maps if method == "gradcam" else model.explain(vol, method, meta=record, eye=eye)
    peak = int(np.argmax(maps.reshape(len(maps), -1).sum(1)))
    rec = {"modality": Modality.OCT_VOLUME.value, "model": res.model, "weights_sha256": res.weights_sha256,
           "label": res.label, "p_disease": round(res.p_disease, 4), "referable": res.referable,
           "record_used": res.metadata_used, "method": method, "shape": list(vol.shape),
           "peak_slice": peak, "heatmap_empty": bool(float(maps.max()) <= 1e-6), "content_hash": img.content_hash,
           "suggestion": "refer to an eye specialist" if res.referable else "not referable by this model"}
    if out:
        stem = img.content_hash[:16]          # never the input name, which may carry patient data
        np.save(out / f"{stem}_heatmap.npy", maps.astype(np.float32))
        Image.fromarray(overlay(slice_rgb(vol, peak), maps[peak])).save(out / f"{stem}_slice{peak}_overlay.png")
        ef = en_face(vol)
        Image.fromarray(overlay(np.repeat(ef[..., None], 3, axis=2), map_en_face(maps, ef.shape[0]))).save(
            out / f"{stem}_en_face_overlay.png")
        rec.update(heatmap=str(out / f"{stem}_heatmap.npy"), overlay=str(out / f"{stem}_slice{peak}_overlay.png"),
                   en_face_overlay=str(out / f"{stem}_en_face_overlay.png"))
    return rec


def _report_volume(path: str, record: dict, as_json: bool) -> int:
    if as_json:
        _print_json(record)
    elif record["label"] is None:
        print(f"{path}: {record['suggestion']} ({'; '.join(record['notes'])})")
    else:
        print(f"{path}: oct_volume -> {record['label']} (P(disease) {record['p_disease']:.1%}) by {record['model']}; "
              f"{record['method']} map strongest on B-scan {record['peak_slice']} of {record['shape'][0]}"
              + (f"; heatmap {record['heatmap']}" if "heatmap" in record else ""))
    return 0


# ---------------------------------------------------------------- data
def cmd_data_phantoms(args) -> int:
    from .phantoms import write_dataset

    summary = write_dataset(args.kind, n=args.n, seed=args.seed, out=Path(args.out), layout=args.layout,
                            size=args.size)
    if args.json:
        _print_json(summary)
    else:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_data_inspect(args) -> int:
    from .io.datasets import inspect_dataset

    info = inspect_dataset(args.path)
    if args.json:
        _print_json(info)
    else:
        print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_data_pair(args) -> int:
    from .io.datasets import write_pairs

    summary = write_pairs(args.fundus, args.oct, args.out)
    _print_json(summary) if args.json else print(json.dumps(summary, indent=2))
    return 0


def cmd_data_combine(args) -> int:
    from .io.datasets import combine_sets

    summary = combine_sets(args.sets or [], args.out)
    _print_json(summary) if args.json else print(json.dumps(summary, indent=2))
    return 0


class _SetOption(argparse.Action):
    """`data combine --set PATH [--label-column C] [--label-map M] --set PATH ...`: the options after a --set
    belong to that set."""

    def __call__(self, parser, namespace, value, option_string=None):
        sets = getattr(namespace, "sets", None) or []
        if self.dest == "path":
            sets.append({"path": value})
        elif not sets:
            parser.error(f"{option_string} belongs to a set: give --set PATH before it.")
        else:
            sets[-1][self.dest] = value
        namespace.sets = sets


def cmd_data_confounds(args) -> int:
    from .evaluate.confounds import acquisition_confounds

    rep = acquisition_confounds(args.path, args.positive, modality=args.modality, split=args.split, seed=args.seed,
                                fractions=args.split_fractions, split_by=args.split_by, framing=args.framing,
                                label_column=args.label_column, label_map=args.label_map)
    if args.json:
        _print_json(rep)
        return 0
    print(f"{rep['data']} ({rep['split']}, n = {rep['n']}, {rep['n_positive']} {rep['positive']}): AUC of each "
          f"global image statistic for {rep['positive']} vs the rest")
    for name, v in rep["statistics"].items():
        print(f"  {name:<22} {v['auc']:.3f} ({'higher' if v['higher_in_positive'] else 'lower'} in {rep['positive']})")
    print(f"  all five (logistic, 5-fold) {rep['all_five_logistic_cv_auc']:.3f}")
    return 0


# ---------------------------------------------------------------- train / evaluate
def cmd_train(args) -> int:
    import shutil

    from .models.loading import MANIFEST, weights_dir
    from .train.common import config_from_args
    from .train.engine import train

    result = train(args.model, args.data, args.out, config_from_args(args), data_note=args.data_note)
    if args.install:
        # Copy the new weights into the bundled weights folder and merge its manifest entry.
        wdir = weights_dir()
        shutil.copy2(result["weights"], wdir / Path(result["weights"]).name)
        manifest_path = wdir / MANIFEST
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        manifest[args.model] = json.loads((Path(args.out) / MANIFEST).read_text())[args.model]
        manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
    summary = {k: result[k] for k in ("model", "weights", "sha256", "temperature", "heldout_metrics", "metric_kind")}
    _print_json(summary) if args.json else print(json.dumps(summary, indent=2))
    return 0


def cmd_pretrain(args) -> int:
    from .train.common import TrainConfig
    from .train.pretrain import MaeConfig, pretrain

    cfg_t = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                        warmup_epochs=args.warmup_epochs, patience=args.patience, seed=args.seed,
                        image_size=args.image_size, resume=args.resume, split_fractions=args.split_fractions,
                        split_by=args.split_by, framing=args.framing, init=args.init,
                        max_steps_per_epoch=args.max_steps_per_epoch)
    mae = MaeConfig(mask_ratio=args.mask_ratio, decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth)
    report = pretrain(args.model, args.data, args.out, cfg_t, mae, preview_n=args.preview)
    summary = {k: report[k] for k in ("model", "encoder", "sets", "split_sha256", "best_epoch", "epochs_run",
                                      "best_val_loss")}
    summary["encoder"] = str(Path(args.out) / report["encoder"])
    _print_json(summary) if args.json else print(json.dumps(summary, indent=2))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate.run import evaluate

    report = evaluate(args.model, args.data, split=args.split, weights_dir=args.weights_dir,
                      encoders_dir=args.encoders_dir, by=args.by)
    if args.plots:
        from .evaluate.plots import write_eval_plots

        report["plots"] = [str(p) for p in write_eval_plots(report, args.plots)]
    _print_json(report) if args.json else print(json.dumps(report, indent=2))
    return 0


def cmd_confidence(args) -> int:
    from .evaluate.run import confidence_record, record_confidence

    rec = confidence_record(args.model, args.data, target=args.target, weights_dir=args.weights_dir,
                            encoders_dir=args.encoders_dir, min_confident=args.min_confident)
    if args.plots:
        from .evaluate.plots import write_risk_coverage_plot

        rec["plot"] = str(write_risk_coverage_plot(rec, Path(args.plots) / f"{args.model}_risk_coverage.png"))
    if args.record:
        command = "python -m retina_core " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "--record")
        rec["recorded_in"] = str(record_confidence(rec, args.weights_dir, command=command))
    rec.pop("curves")
    if args.json:
        _print_json(rec)
    else:
        for split in ("val", "test"):
            b = rec[split]
            ci = b["ci95_confident"]
            print(f"{split}: {b['confident']} of {b['n']} readings at or above {rec['threshold']:.3f} "
                  f"(coverage {b['coverage']:.3f}), accuracy {b['accuracy_confident']:.3f}"
                  + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
                  + (f"; below it {b['accuracy_unsure']:.3f}" if b["accuracy_unsure"] is not None else ""))
        if rec.get("recorded_in"):
            print(f"recorded in {rec['recorded_in']}")
    return 0


def cmd_batch(args) -> int:
    from .batch import run_batch

    summary = run_batch(args.input, args.out, engine=args.engine, heatmaps=args.heatmaps,
                        batch_size=args.batch_size, num_workers=args.workers, address=args.address,
                        runtime=args.runtime,
                        model=args.model, progress=not args.json)
    _print_json(summary) if args.json else print(json.dumps(summary, indent=2))
    return 0


def cmd_serve(args) -> int:
    """Deploy the app's Ray Serve application on a running cluster, or find it there, and print its stats."""
    from .serving import RayServeService, ServiceConfig

    if args.address == "local":
        raise RetinaInputError("serve deploys onto a running Ray cluster; give its address (\"auto\", \"host:port\" "
                               "or \"ray://host:10001\"), not \"local\".")
    if args.replicas is not None and args.replicas < 1:
        raise RetinaInputError("--replicas needs a whole number of at least 1.")
    svc = RayServeService(args.address, ServiceConfig.from_env(args.replicas), redeploy=args.redeploy)
    try:
        _print_json(svc.stats())
    finally:
        svc.close()
    return 0


def cmd_bench(args) -> int:
    from .bench import format_markdown, run

    result = run(repeats=args.repeats, only=args.only.split(",") if args.only else None)
    _print_json(result) if args.json else print(format_markdown(result))
    return 0


def cmd_gate_eval(args) -> int:
    """The quality and modality gate over folders of real images (evaluate/gate.py)."""
    from .evaluate.gate import contact_sheet, evaluate_set, format_report, resolve_sets
    from .io.decode import SCREEN_SIDE

    if args.limit is not None and args.limit < 1:
        raise RetinaInputError("--limit must be at least 1.")
    sets = resolve_sets(args.data)
    results = []
    for d in sets:
        progress = None if args.json or not sys.stderr.isatty() else (
            lambda i, n, name=d.name: print(f"\r{name}: {i}/{n}", end="" if i < n else "\n", file=sys.stderr))
        results.append(evaluate_set(d, expect=args.expect, limit=args.limit, progress=progress,
                                    max_side=None if args.full_size else SCREEN_SIDE))
    shown = contact_sheet(results, args.contact_sheet) if args.contact_sheet else None
    if args.json:
        for r in results:
            _print_json(r)
    else:
        print(format_report(results))
    if args.contact_sheet:
        print(f"contact sheet: {shown} refused images in {args.contact_sheet} (patient images: do not commit)",
              file=sys.stderr)
    return 0


# ---------------------------------------------------------------- parser
def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from .train.common import TrainConfig

    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default {f.default})")
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            p.add_argument(flag, dest=f.name, type=kind, default=None, help=f"(default {f.default})")


def build_parser() -> argparse.ArgumentParser:
    from .analysis import DEFAULT_MODELS
    from .explain.attribution import ALL_METHODS

    parser = argparse.ArgumentParser(prog="python -m retina_core",
                                     description="Explainable retinal imaging. Research software, not a medical device.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (and tracebacks) to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list registered models and their bundled weights")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("predict", help="diagnosis suggestion + heatmap for images")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", help=f"model name (default: by detected modality, {DEFAULT_MODELS})")
    p.add_argument("--method", default=None, choices=ALL_METHODS,
                   help="heatmap method (default: the model's, chosen by explain-eval evidence)")
    p.add_argument("--modality", choices=IMAGE_CHOICES, help="override the detected modality")
    p.add_argument("--record", help="OCT volumes: the clinical record the volume model reads, e.g. "
                                    "age=70,sex=F,va_logmar=0.3,cst_um=420,hba1c=8.4 (fields left out count as not "
                                    "recorded: the training mean is used)")
    p.add_argument("--eye", choices=["OD", "OS"], help="OCT volumes: the eye (default: from the file, if stated)")
    p.add_argument("--out", help="folder for heatmap/overlay PNGs (named by content hash)")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.set_defaults(func=cmd_predict)

    data = sub.add_parser("data", help="phantom data sets and real data set layouts").add_subparsers(
        dest="data_command", required=True)
    p = data.add_parser("phantoms", help="write a synthetic data set in a real data set's layout")
    p.add_argument("--kind", required=True,
                   choices=["fundus-dr", "fundus-4class", "oct-c8", "oct-kermany", "oct-volume", "paired"])
    p.add_argument("--n", type=int, default=100, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", default=None, help="layout variant (default: the kind's real layout)")
    p.add_argument("--size", type=int, default=None, help="image size in pixels (default per kind)")
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data_phantoms)
    p = data.add_parser("pair", help="true fundus + OCT pairs of the same eyes (joined by patient id and eye) "
                                     "as a pairs.csv; no image is copied")
    p.add_argument("fundus", help="a labelled fundus set, e.g. ../shared/realdata/mexico_fundus_dme_dr")
    p.add_argument("oct", help="a labelled OCT set of the same patients, e.g. ../shared/realdata/mexico_oct_dme")
    p.add_argument("--out", required=True, help="folder for pairs.csv (paths relative to it)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data_pair)

    p = data.add_parser("combine", help="several labelled sets as one labels.csv (each with its own label column "
                                        "and map; a source column per record); no image is copied")
    p.add_argument("--set", dest="path", action=_SetOption, metavar="PATH", help="a labelled set (repeat)")
    p.add_argument("--label-column", dest="label_column", action=_SetOption,
                   help="for the --set before it: labels from this labels.csv column")
    p.add_argument("--label-map", dest="label_map", action=_SetOption,
                   help="for the --set before it: value=label pairs; values it does not name are left out")
    p.add_argument("--out", required=True, help="folder for labels.csv and combined.json (paths relative to it)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data_combine, sets=None)

    p = data.add_parser("confounds", help="shortcut check: AUC of global image statistics (no network) for one "
                                          "label vs the rest, on a patient-level split")
    p.add_argument("path")
    p.add_argument("--positive", required=True, help="the label tested against the rest, e.g. DME")
    p.add_argument("--modality", choices=IMAGE_CHOICES, default=None, help="default: from the set")
    p.add_argument("--split", default="test", help="train | val | test | all (default test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-fractions", default=None, help="as for train (default 0.8,0.1,0.1)")
    p.add_argument("--split-by", default=None, help="as for train: stratified | patient_hash")
    p.add_argument("--label-column", default=None, help="as for train: labels from this labels.csv column")
    p.add_argument("--label-map", default=None, help="as for train: value=label pairs, e.g. 0=noDR,NPDR=DR,PDR=DR")
    p.add_argument("--framing", choices=["stretch", "fov", "fov_contrast"], default="stretch",
                   help="fov: statistics of the image as a fov-framed model sees it (field of view cut out); "
                        "fov_contrast: framed, then contrast-normalised")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data_confounds)

    p = data.add_parser("inspect", help="detected layout, splits, classes and counts of a data set folder")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data_inspect)

    p = sub.add_parser("train", help="train a registered model on a data set folder")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data-note", default=None, help="how the data was made, recorded in the manifest")
    p.add_argument("--install", action="store_true", help="copy the weights into weights/ and its manifest")
    p.add_argument("--json", action="store_true")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain", help="self-supervised masked-autoencoder pre-training of a ViT (RETFound's "
                                        "recipe) on the unlabelled training-split images of one or more sets")
    p.add_argument("--model", required=True, help="a ViT model, e.g. retfound_vit_tiny")
    p.add_argument("--data", required=True, action="append", help="a data set folder (repeat for several); only "
                                                                    "its training split is used, labels are not")
    p.add_argument("--out", required=True, help="folder for encoder.safetensors, pretrain.json, last.pt")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=5.0)
    p.add_argument("--patience", type=int, default=15, help="epochs without a lower validation loss before stopping")
    p.add_argument("--seed", type=int, default=0, help="the split's seed (use the fine-tuning run's)")
    p.add_argument("--image-size", type=int, default=None, help="input size (use the fine-tuning run's)")
    p.add_argument("--split-fractions", default="0.8,0.1,0.1", help="as for train (use the fine-tuning run's)")
    p.add_argument("--split-by", default="stratified", help="as for train: stratified | patient_hash")
    p.add_argument("--framing", default="auto", help="as for train: auto | fov | fov_contrast | stretch")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="share of patches hidden (MAE: 0.75)")
    p.add_argument("--decoder-dim", type=int, default=128)
    p.add_argument("--decoder-depth", type=int, default=2)
    p.add_argument("--init", default=None, help="start the encoder from this checkpoint")
    p.add_argument("--max-steps-per-epoch", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    p.add_argument("--preview", type=int, default=0, metavar="N",
                   help="write <out>/reconstructions.png: N validation images, masked and reconstructed (the "
                        "set's own images: never commit it for patient data)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("evaluate", help="metrics of a model on a data set split")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--weights-dir", default=None, help="a folder written by `train` (default: bundled weights)")
    p.add_argument("--encoders-dir", default=None, help="fundus_oct_fusion: folder(s) with the encoders' weights")
    p.add_argument("--plots", default=None, help="folder for the confusion matrix and reliability diagram (PNG)")
    p.add_argument("--by", default=None, metavar="COLUMN",
                   help="also per value of this labels.csv column, e.g. source (a `data combine` set)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("confidence", help="the confidence level at which a model's readings reach a target "
                                          "accuracy: chosen on the validation split, measured on the test split")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--target", type=float, default=0.90, help="accuracy the confident readings must reach on "
                                                               "validation (default 0.90)")
    p.add_argument("--min-confident", type=int, default=30, help="the fewest validation readings the level may "
                                                                 "keep (default 30)")
    p.add_argument("--weights-dir", default=None, help="a folder written by `train` (default: bundled weights)")
    p.add_argument("--encoders-dir", default=None, help="fundus_oct_fusion: folder(s) with the encoders' weights")
    p.add_argument("--plots", default=None, help="folder for the risk-coverage plot (PNG)")
    p.add_argument("--record", action="store_true", help="write the level and its figures into the weights' "
                                                         "manifest: every reading then quotes them")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_confidence)

    p = sub.add_parser("batch", help="screen a folder or CSV of images into a results CSV (resumable)")
    p.add_argument("input", help="a folder of images, or a CSV with a 'path' column")
    p.add_argument("--out", required=True, help="results CSV (rows already there are skipped)")
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument("--heatmaps", help="folder for heatmap PNGs (named by content hash)")
    p.add_argument("--model", help="one model for every image (default: by detected modality)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                   help="onnx: predictions through ONNX Runtime (faster on CPU, verified against PyTorch; no heatmaps)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding workers of the local engine (default: 2 with a GPU, none on a CPU, where the "
                        "forward already uses every core)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("serve", help="deploy the app's inference service on a running Ray cluster (the app then "
                                     "finds it by name through RETINA_SERVE_ADDRESS) and print its stats as JSON")
    p.add_argument("--address", default=os.environ.get("RETINA_SERVE_ADDRESS") or "auto",
                   help="the cluster: \"auto\", \"host:port\" or \"ray://host:10001\" (default: "
                        "$RETINA_SERVE_ADDRESS, else auto)")
    p.add_argument("--redeploy", action="store_true",
                   help="replace a running application (new settings or code; its replicas restart)")
    p.add_argument("--replicas", type=int, default=None,
                   help="replicas to deploy, each reserving RETINA_THREADS CPUs (default 1) when several "
                        "(default: $RETINA_SERVE_REPLICAS, else 1); a running application keeps its own unless "
                        "--redeploy")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="performance ratios against same-process baselines (medians)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--only", help="comma-separated parts: heatmap_overhead,batch_throughput,real_size,matmul_efficiency,"
                                  "cached_rerun,zones_rerun,cold_start,concurrent_sessions (the last two drive chromium)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("gate-eval", help="the quality and modality gate over folders of real images, per set")
    p.add_argument("data", nargs="+", help="data set folders (labels.csv 'file' column, else every image), a "
                                           "folder of such sets, or set names under $RETINA_REALDATA")
    p.add_argument("--expect", choices=IMAGE_CHOICES,
                   help="the modality every set holds (default: guessed from each set's name or labels)")
    p.add_argument("--limit", type=int, default=None, help="at most N images per set, evenly spaced")
    p.add_argument("--contact-sheet", default=None,
                   help="write a PNG grid of the refused images with their reasons here (patient images: keep local)")
    p.add_argument("--full-size", action="store_true",
                   help="read every image at full size (default: as the app reads uploads, long side 1024 px)")
    p.add_argument("--json", action="store_true", help="one JSON object per set, refused files included")
    p.set_defaults(func=cmd_gate_eval)

    from .audit.evaluate import add_cli as add_explain_eval_cli
    add_explain_eval_cli(sub)
    from .evaluate.ensemble_cli import add_cli as add_ensemble_cli
    add_ensemble_cli(sub)
    from .clinic.cli import add_cli as add_clinic_cli
    add_clinic_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except RetinaInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug, not the user's fault: short message, traceback only with --verbose
        log.debug("unexpected error", exc_info=True)
        print(f"internal error ({type(exc).__name__}): {exc}. Run with -v for details.", file=sys.stderr)
        if args.verbose:
            raise
        return 3
