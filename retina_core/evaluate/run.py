"""Score a trained model on a data set split: `python -m retina_core evaluate --model M --data PATH --json`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import RetinaInputError
from ..models.loading import LoadedModel, load_model, read_manifest, weights_dir as default_weights_dir
from .metrics import classification_metrics


@torch.inference_mode()
def predict_paths(model: LoadedModel, paths: list[Path], batch_size: int = 32) -> np.ndarray:
    """Calibrated probabilities [N, C] for image files, decoded by `read_image` and preprocessed from the cfg."""
    from ..io.decode import read_image

    out = []
    for i in range(0, len(paths), batch_size):
        x = torch.cat([model.preprocess(read_image(p).pixels) for p in paths[i:i + batch_size]])
        out.append(model.predict_proba(x).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.num_classes))


def evaluate(model_name: str, data: str | Path, split: str = "test", weights_dir: str | Path | None = None) -> dict:
    """Metrics (accuracy, macro AUC, sensitivity/specificity, F1, kappa for grades, ECE, confusion matrix)."""
    from ..io.datasets import load_dataset, patient_split

    model = load_model(model_name, weights_dir=weights_dir)
    manifest = read_manifest(weights_dir or default_weights_dir()).get(model_name, {})
    index = load_dataset(data)
    # The training seed decides the patient-level split of unsplit data; reuse it so test stays unseen.
    seed = int(manifest.get("config", {}).get("seed", 0))
    records = patient_split(index.records, seed=seed).get(split, [])
    if not records:
        raise RetinaInputError(f"The data set at {data} has no {split!r} split.")
    classes = model.cfg.classes
    records = [r for r in records if r.label in classes]
    if not records:
        raise RetinaInputError(f"No image in the {split!r} split has a class of model {model_name}: "
                               f"{', '.join(classes)}.")
    probs = predict_paths(model, [r.path for r in records])
    y = np.array([classes.index(r.label) for r in records])
    phantom = (Path(data) / "phantom_meta.csv").exists()
    return {"model": model_name, "weights_sha256": model.sha256, "data": str(data), "layout": index.layout,
            "split": split, "metric_kind": "phantom" if phantom else "as measured on this data",
            "temperature": model.temperature, "trained_on": manifest.get("data"),
            "metrics": classification_metrics(y, probs, list(classes), ordinal=model.cfg.ordinal)}
