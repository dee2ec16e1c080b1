"""Score a trained model on a data set split: `python -m retina_core evaluate --model M --data PATH --json`.

Every model of the zoo goes through the same path: image models read image files, fundus_oct_fusion reads a
paired data set (pairs.csv), the volume models read NIfTI volumes with their metadata. The ensemble CLI reuses
`load_member`, `split_records` and `member_probabilities`, so a model scores the same alone and in an ensemble.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import RetinaInputError
from ..modality import Modality
from ..models.loading import LoadedModel, confidence_of, confidence_threshold, load_model
from ..models.predict import predict_pairs, predict_paths, predict_volumes
from .metrics import bootstrap_ci, classification_metrics
from .selective import band_accuracy, fit_threshold, risk_coverage

MULTI_INPUT = (Modality.FUNDUS_OCT, Modality.OCT_VOLUME)
LAYOUT = {Modality.FUNDUS_OCT: "paired", Modality.OCT_VOLUME: "volumes"}   # the data set layout they read


def load_member(name: str, weights_dir=None, encoders_dir=None) -> LoadedModel:
    """`load_model`, passing fundus_oct_fusion's encoder folder(s) when given."""
    return load_model(name, weights_dir=weights_dir, **({"encoders_dir": encoders_dir} if encoders_dir else {}))


def split_records(model: LoadedModel, data, split: str, seed: int):
    """(records of `split` whose label the model knows, y [N] class indices, the data set index).

    Multi-input models train on normal vs disease, so their labels are mapped before the patient-level split,
    exactly as in training: the test split is the one the model never saw. split "all": every record."""
    from ..io.datasets import load_dataset, split_patients
    from ..models.multimodal import binary_label

    conf = model.entry.get("config") or {}   # the split (and label column) the weights were trained on
    index = load_dataset(data, label_column=conf.get("label_column"), label_map=conf.get("label_map"))
    needs = LAYOUT.get(model.modality)
    if needs and index.layout != needs:
        what = {"paired": "fundus + OCT pairs (pairs.csv)", "volumes": "OCT volumes (NIfTI + metadata.csv)"}[needs]
        raise RetinaInputError(f"{model.name} reads {what}, but {data} is a {index.layout} data set. Make one with "
                               f"`python -m retina_core data phantoms --kind {'paired' if needs == 'paired' else 'oct-volume'}`.")
    classes = model.cfg.classes
    records = index.records
    if model.modality in MULTI_INPUT:
        records = [replace(r, label=r.label if r.label in classes else binary_label(r.label)) for r in records]
    if split != "all":           # "all": every record, for a data set the model never saw (as explain-eval)
        parts = split_patients(records, seed, conf.get("split_fractions"), conf.get("split_by"))
        if split not in parts and split not in ("train", "val", "test"):
            raise RetinaInputError(f"Unknown split {split!r} for {data}: use one of "
                                   f"{', '.join(sorted(parts))}, or 'all' for a data set the model never saw.")
        records = parts.get(split, [])
    records = [r for r in records if r.label in classes]
    if not records:
        raise RetinaInputError(f"The {split!r} split of {data} has no sample of the classes of model {model.name}: "
                               f"{', '.join(classes)}.")
    return records, np.array([classes.index(r.label) for r in records]), index


def member_probabilities(model: LoadedModel, records) -> np.ndarray:
    """Calibrated probabilities of a loaded model on records: (N, C), or (N,) P(disease) for one logit."""
    modality = model.modality
    if modality == Modality.FUNDUS_OCT:
        if any("oct" not in r.meta for r in records):
            raise RetinaInputError(f"{model.name} reads fundus + OCT pairs: give a paired data set (pairs.csv), "
                                   f"e.g. `python -m retina_core data phantoms --kind paired`.")
        return predict_pairs(model, [r.path for r in records], [Path(r.meta["oct"]) for r in records])
    if modality == Modality.OCT_VOLUME:
        return predict_volumes(model, records)
    return predict_paths(model, [r.path for r in records])


def is_phantom(index, data) -> bool:
    from ..train.common import is_phantom_set

    return is_phantom_set(Path(index.root)) or is_phantom_set(Path(data))


def evaluate(model_name: str, data: str | Path, split: str = "test", weights_dir: str | Path | None = None,
             encoders_dir: str | None = None, by: str | None = None) -> dict:
    """Metrics (accuracy, macro AUC, sensitivity/specificity, F1, kappa for grades, ECE, confusion matrix), with
    patient-level bootstrap intervals; `by`: the same per value of a labels.csv column (e.g. `source` of a
    `data combine` set), under report["by"]."""
    model = load_member(model_name, weights_dir, encoders_dir)
    # The training seed decides the patient-level split of unsplit data; reuse it so test stays unseen.
    seed = int(model.entry.get("config", {}).get("seed", 0))
    records, y, index = split_records(model, data, split, seed)
    probs = member_probabilities(model, records)
    report = _metrics_report(model, y, probs, records)
    # the readings the app calls confident (the weights' recorded level, else the default) and how often right
    report["selective"] = {**band_accuracy(y, probs, confidence_threshold(model.entry),
                                           groups=[r.patient_id or str(r.path) for r in records]),
                           "level": "recorded (chosen on val)" if confidence_of(model.entry) else "default"}
    if by:
        values = [str(r.meta.get(by, "")) for r in records]
        if not any(values):
            raise RetinaInputError(f"--by {by!r}: no record of {data} has a value in that column.")
        groups = {}
        for v in sorted(set(values)):
            keep = np.array([x == v for x in values])
            groups[v or "(none)"] = {"n": int(keep.sum()), **_metrics_report(
                model, y[keep], probs[keep], [r for r, k in zip(records, keep) if k])}
        report = {**report, "by": {"column": by, "groups": groups}}
    return {"model": model_name, "weights_sha256": model.sha256, "data": str(data), "layout": index.layout,
            "split": split, "n": int(len(y)), "metric_kind": "phantom" if is_phantom(index, data)
            else "as measured on this data", "temperature": model.temperature, "trained_on": model.entry.get("data"),
            **report}


def confidence_record(model_name: str, data: str | Path, target: float = 0.90, weights_dir: str | Path | None = None,
                      encoders_dir: str | None = None, n_boot: int = 1000, min_confident: int = 30) -> dict:
    """Where a model's readings become confident, chosen on the validation split and measured on the test split.

    The threshold is the lowest top-class probability at which the validation readings at or above it are right
    `target` of the time (`selective.fit_threshold`); the test split (the one `train` held out) then says how many
    readings reach it and how often they, and the ones below it, are right, with patient-level intervals. The
    result is what `python -m retina_core confidence --record` writes into the manifest entry (`confidence`), and
    carries the risk-coverage curves of both splits under "curves" (not recorded). min_confident: the fewest
    validation readings a level may keep (a level kept by a handful of lucky readings says nothing)."""
    model = load_member(model_name, weights_dir, encoders_dir)
    seed = int(model.entry.get("config", {}).get("seed", 0))
    bands, curves, threshold = {}, {}, None
    for split in ("val", "test"):
        records, y, index = split_records(model, data, split, seed)
        probs = member_probabilities(model, records)
        if split == "val":
            threshold = fit_threshold(y, probs, target, min_confident)
            if threshold is None:
                raise RetinaInputError(f"No confidence level of {model_name} reaches accuracy {target:.2f} on "
                                       f"{len(y)} validation images (with at least {min_confident} readings at or "
                                       "above it): lower --target.")
            threshold = float(np.floor(threshold * 1e4) / 1e4)   # as recorded: the figures hold for this value
        groups = [r.patient_id or str(r.path) for r in records]
        bands[split] = band_accuracy(y, probs, threshold, groups=groups, n_boot=n_boot)
        curves[split] = risk_coverage(y, probs)
    return {"model": model_name, "weights_sha256": (model.sha256 or "")[:12], "data": Path(str(data)).name,
            "real_data": not is_phantom(index, data), "target_accuracy": target, "threshold": bands["val"]["threshold"],
            "chosen_on": "val", "val": bands["val"], "test": bands["test"], "curves": curves}


def record_confidence(record: dict, weights_dir: str | Path | None = None, command: str | None = None) -> Path:
    """Write a `confidence_record` (without its curves) into the manifest entry of the weights it was measured on
    (the bundled folder, or a `train` run's), refusing when that entry holds other weights; returns the manifest."""
    import json

    from ..models.loading import MANIFEST
    from ..models.loading import weights_dir as bundled

    path = Path(weights_dir or bundled()) / MANIFEST
    manifest = json.loads(path.read_text())
    entry = manifest.get(record["model"]) or {}
    if not record["weights_sha256"] or not str(entry.get("sha256", "")).startswith(record["weights_sha256"]):
        raise RetinaInputError(f"{path} holds other weights of {record['model']} than the ones measured: "
                               "nothing recorded.")
    entry["confidence"] = {**{k: v for k, v in record.items() if k not in ("model", "curves", "plot")},
                           **({"command": command} if command else {})}
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def _metrics_report(model: LoadedModel, y: np.ndarray, probs: np.ndarray, records) -> dict:
    return {"metrics": classification_metrics(y, probs, list(model.cfg.classes), ordinal=model.cfg.ordinal),
            "ci95": bootstrap_ci(y, probs, list(model.cfg.classes),
                                 groups=[r.patient_id or str(r.path) for r in records])}
