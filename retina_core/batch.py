"""Batch screening: a folder or CSV of images -> one results row per image, resumable, never stopped by a bad file.

    python -m retina_core batch archive/ --out results.csv --heatmaps maps/            # local engine
    python -m retina_core batch list.csv --out results.csv --engine ray [--address auto]

Local engine: with a GPU, DataLoader workers decode, gate and preprocess while the main process runs batched
forwards with the single-pass Grad-CAM, so decoding overlaps inference. On a CPU the forward already uses every
core and workers only compete with it (measured: docs/benchmarks.md), so the default there is no workers.
Ray engine: the same per-image steps on Ray Data with the models held in actors, for archives beyond one
machine (an existing cluster with --address, else a local one).
Both produce the same rows (tests/test_batch.py checks it).

The app's Batch screening page screens uploads in memory on the same steps (`screen_uploads`): `prepare` decodes
with `read_image`, which takes bytes as well as paths, so nothing is written to disk (a DICOM's header never lands
in a temporary file).

    >>> rows = screen_uploads([("a.png", data_a), ("b.dcm", data_b)], chunk=8, progress=lambda k, n: ...)
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .analysis import DEFAULT_MODELS, get_model, suggestion_for
from .errors import RetinaInputError
from .explain.cam import gradcam_single_pass, normalise_map
from .models.framing import FieldBox, frame_box, map_to_image, uses_fov
from .models.loading import confidence_threshold, inference_cfg, preprocess_image

log = logging.getLogger(__name__)
COLUMNS = ["file", "content_hash", "modality", "quality", "quality_score", "model", "label", "confidence",
           "referable", "probabilities", "heatmap", "error", "confident"]
# confident: the top-class probability reaches the model's confident level (the manifest's `confidence` record,
# measured on held-out images; else models.loading.LOW_CONFIDENCE). Last, so results written before it resume.
_SKIP = {".csv", ".json", ".txt", ".md", ".parquet"}


def list_inputs(source: str | os.PathLike) -> list[str]:
    """Files of a folder (recursively, hidden files and masks/ folders skipped) or the `path`/`file` column of a CSV."""
    src = Path(source)
    if src.is_dir():
        return sorted(str(p) for p in src.rglob("*") if p.is_file() and not p.name.startswith(".")
                      and "masks" not in p.relative_to(src).parts and p.suffix.lower() not in _SKIP)
    if src.is_file() and src.suffix.lower() == ".csv":
        with open(src, newline="") as f:
            reader = csv.DictReader(f)
            col = next((c for c in ("path", "file", "image") if c in (reader.fieldnames or [])), None)
            if col is None:
                raise RetinaInputError(f"{src.name} needs a 'path' (or 'file') column listing the images.")
            base = src.parent
            return [str(p if Path(p).is_absolute() else base / p) for p in (row[col] for row in reader) if p]
    raise RetinaInputError(f"{source} is neither a folder of images nor a CSV file listing them.")


def done_files(out_csv: Path) -> set[str]:
    if not out_csv.exists():
        return set()
    with open(out_csv, newline="") as f:
        return {row["file"] for row in csv.DictReader(f)}


@dataclass
class Prepared:
    """One decoded, gated and preprocessed image (or its error): what a worker hands to the model."""

    file: str
    row: dict
    tensor: torch.Tensor | None = None    # [C, h, w] normalised, when a model should read it
    size: tuple[int, int] | None = None   # H, W of the image as decoded (for the heatmap)
    box: FieldBox | None = None           # the field-of-view box the tensor was framed on (fov-framed models)
    hazy: bool = False                    # an ungradable hazy photograph, read for media opacity only


def prepare(path: str, model_override: str | None = None) -> Prepared:
    """Decode + quality gate + preprocess one file; errors become a row, never an exception."""
    from .io.decode import SCREEN_SIDE, read_image
    from .quality import assess_quality, hazy_only, reads_media_opacity

    row = {c: "" for c in COLUMNS}
    row["file"] = path
    try:
        img = read_image(path, max_side=SCREEN_SIDE)
        row["content_hash"] = img.content_hash
        if img.kind != "image":
            raise RetinaInputError("OCT volume: batch screening reads single images.")
        q = assess_quality(img)
        row.update(modality=str(q.modality), quality=q.verdict, quality_score=round(float(q.score), 4))
        name = model_override or DEFAULT_MODELS.get(q.modality)
        if q.modality == "not_retinal" or name is None or (not q.gradable and not hazy_only(q)):
            row["label"] = "no result"
            return Prepared(path, row)
        cfg = inference_cfg(name)   # preprocessing needs the cfg only; the network stays in the main process
        # as analysis._plan: a hazy (blurred, low-contrast) photograph is read by a model with a media-opacity
        # class, which shows only that reading (`infer`)
        hazy = not q.gradable
        if hazy and not reads_media_opacity(cfg):
            row["label"] = "no result"
            return Prepared(path, row)
        if cfg.modality != q.modality:
            row.update(label="no result", error=f"{q.modality} image, model {name} reads {cfg.modality}")
            return Prepared(path, row)
        row["model"] = name
        box = frame_box(img.pixels, tuple(cfg.input_size[1:]), cfg.framing) if uses_fov(cfg) else None
        x = preprocess_image(img.pixels, cfg, boxes=None if box is None else [box],
                             grey=bool((img.meta or {}).get("single_channel")))[0]
        return Prepared(path, row, x, img.pixels.shape[:2], box, hazy)
    except RetinaInputError as exc:
        row["error"] = str(exc)
        return Prepared(path, row)


class _Files(Dataset):
    def __init__(self, files: list[str], model_override: str | None):
        self.files, self.model_override = files, model_override

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Prepared:
        return prepare(self.files[i], self.model_override)


_ONNX: dict[str, object] = {}


def _onnx_predictor(name: str):
    """One verified ONNX Runtime session per model and process (see runtime.py)."""
    if name not in _ONNX:
        from .runtime import OnnxPredictor, onnx_available

        if not onnx_available():
            raise RetinaInputError("--runtime onnx needs onnxruntime and onnx (pip install onnxruntime onnx).")
        _ONNX[name] = OnnxPredictor(get_model(name))
    return _ONNX[name]


def infer(items: list[Prepared], heatmaps: Path | None, runtime: str = "torch") -> list[dict]:
    """Batched forward per model (+ single-pass Grad-CAM when heatmaps are written); fills label, probabilities and
    heatmap into the rows. runtime "onnx": predictions through ONNX Runtime (no heatmaps)."""
    from .quality import MEDIA_OPACITY_CLASSES

    by_model: dict[str, list[Prepared]] = {}
    for it in items:
        if it.tensor is not None:
            by_model.setdefault(it.row["model"], []).append(it)
    for name, group in by_model.items():
        model = get_model(name)
        x = torch.stack([g.tensor for g in group]).to(model.device)
        cams = [None] * len(group)
        if heatmaps is not None:
            logits, cams = gradcam_single_pass(model.net, x, model.cfg.target_layer)
            probs = torch.softmax(logits.float() / model.temperature, dim=1).cpu().numpy()
        elif runtime == "onnx":
            probs = _onnx_predictor(name).predict_proba(x)
        else:
            probs = model.predict_proba(x).cpu().numpy()
        for g, p, cam in zip(group, probs, cams):
            k = int(np.argmax(p))
            label = model.cfg.classes[k]
            if g.hazy and label not in MEDIA_OPACITY_CLASSES:   # as analysis.finish_reading: withheld
                g.row.update(label="no result", error=f"too hazy to grade; the model's answer ({label}) was not "
                                                      "media opacity")
                continue
            g.row.update(label=label, confidence=round(float(p[k]), 6),
                         confident=bool(p[k] >= confidence_threshold(model.entry)),
                         referable=suggestion_for(label, model)[0],
                         probabilities=json.dumps({c: round(float(v), 6) for c, v in zip(model.cfg.classes, p)}))
            if cam is not None:
                hm = normalise_map(cam, g.size) if g.box is None else map_to_image(cam, g.box, g.size)
                g.row["heatmap"] = str(write_heatmap(hm,
                                                     heatmaps / f"{g.row['content_hash'][:16]}_heatmap.png"))
    return [it.row for it in items]


def _header(out: Path) -> list[str] | None:
    """The columns of an existing results CSV (None: no file yet, or an empty one)."""
    if not out.is_file() or out.stat().st_size == 0:
        return None
    with open(out, newline="") as f:
        return next(csv.reader(f), None)


def write_heatmap(heatmap: np.ndarray, path: Path) -> Path:
    """The map itself as an 8-bit greyscale PNG the size of the image (pixel / 255 = heatmap value), fast zlib level:
    quantitative for audits and zone statistics, and 6x cheaper to write than a colour-mapped picture (any colour
    map can be applied on reading: `retina_core.explain.overlay.overlay(image, png / 255)`)."""
    from PIL import Image

    Image.fromarray(np.uint8(np.clip(heatmap, 0.0, 1.0) * 255.0 + 0.5)).save(path, compress_level=1)
    return path


def _collate(batch: list[Prepared]) -> list[Prepared]:
    return batch


def default_workers() -> int:
    """DataLoader workers of the local engine: 2 when the model runs on a GPU, none on a CPU."""
    return 2 if torch.cuda.is_available() else 0


def run_local(files: list[str], heatmaps: Path | None, batch_size: int = 16, num_workers: int | None = None,
              model_override: str | None = None, runtime: str = "torch") -> Iterator[list[dict]]:
    num_workers = default_workers() if num_workers is None else num_workers
    loader = DataLoader(_Files(files, model_override), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate, persistent_workers=False)
    for items in loader:
        yield infer(items, heatmaps, runtime)


def run_ray(files: list[str], heatmaps: Path | None, batch_size: int = 16, address: str | None = None,
            model_override: str | None = None, num_actors: int = 1, runtime: str = "torch") -> Iterator[list[dict]]:
    """Ray Data: `prepare` runs as a parallel map, inference in actors that each hold one copy of the models."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": os.cpu_count() or 2}))

    class Predictor:
        def __call__(self, batch: dict) -> dict:
            items = [Prepared(f, json.loads(r), torch.from_numpy(t) if t is not None and t.size else None,
                              tuple(s) if s is not None and len(s) else None)
                     for f, r, t, s in zip(batch["file"], batch["row"], batch["tensor"], batch["size"])]
            rows = infer(items, heatmaps, runtime)
            return {"row": [json.dumps(r) for r in rows]}

    def prep(item: dict) -> dict:
        p = prepare(item["file"], model_override)
        return {"file": p.file, "row": json.dumps(p.row),
                "tensor": p.tensor.numpy() if p.tensor is not None else np.zeros(0, np.float32),
                "size": np.array(p.size if p.size else [], dtype=np.int64)}

    ds = ray.data.from_items([{"file": f} for f in files]).map(prep)
    ds = ds.map_batches(Predictor, batch_size=batch_size, concurrency=num_actors, batch_format="numpy")
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield [json.loads(r) for r in batch["row"]]


def run_batch(source: str | os.PathLike, out: str | os.PathLike, engine: str = "local",
              heatmaps: str | os.PathLike | None = None, batch_size: int = 16, num_workers: int | None = None,
              address: str | None = None, model: str | None = None, progress: bool = True,
              runtime: str = "torch") -> dict:
    """Screen every input, appending rows to `out` (CSV; a .parquet twin is written at the end). Resumable."""
    out = Path(out)
    files = list_inputs(source)
    done = done_files(out)
    todo = [f for f in files if f not in done]
    hm = Path(heatmaps) if heatmaps else None
    if runtime not in ("torch", "onnx"):
        raise RetinaInputError(f"Unknown runtime {runtime!r}: use 'torch' or 'onnx'.")
    if runtime == "onnx" and hm:
        raise RetinaInputError("--runtime onnx gives predictions only; heatmaps need PyTorch (drop --heatmaps or "
                               "use --runtime torch).")
    if hm:
        hm.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    runner: Iterable[list[dict]]
    if engine == "local":
        runner = run_local(todo, hm, batch_size, num_workers, model, runtime)
    elif engine == "ray":
        runner = run_ray(todo, hm, batch_size, address, model, runtime=runtime)
    else:
        raise RetinaInputError(f"Unknown engine {engine!r}: use 'local' or 'ray'.")
    counts = {"processed": 0, "errors": 0, "no_result": 0}
    from tqdm import tqdm

    with tqdm(total=len(todo), disable=not progress, unit="img", desc="screening") as bar, \
            open(out, "a", newline="") as f:
        columns = _header(out) or COLUMNS     # resuming a file written with fewer columns keeps its own
        writer = csv.DictWriter(f, fieldnames=columns)
        if not done and f.tell() == 0:
            writer.writeheader()
        for rows in runner:
            for r in rows:
                writer.writerow({c: r.get(c, "") for c in columns})
                counts["processed"] += 1
                counts["errors"] += bool(r.get("error"))
                counts["no_result"] += r.get("label") == "no result"
            f.flush()
            bar.update(len(rows))
    _write_parquet(out)
    return {"inputs": len(files), "skipped_already_done": len(files) - len(todo), **counts, "out": str(out),
            "engine": engine, "runtime": runtime}


def _write_parquet(out: Path) -> None:
    try:
        import pandas as pd

        pd.read_csv(out, dtype=str, keep_default_na=False).to_parquet(out.with_suffix(".parquet"), index=False)
    except ImportError:   # pyarrow missing: the CSV is the result
        log.info("pyarrow not installed; no parquet copy written")


def screen_uploads(files: list[tuple[str, bytes]], chunk: int = 8, model: str | None = None,
                   progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """One row per (name, bytes): decode + quality gate + preprocess (`prepare`), then batched forwards with
    single-pass Grad-CAM per chunk (`infer`). Rows have `COLUMNS`; `file` is the uploaded name. progress(done,
    total) is called after every chunk."""
    rows: list[dict] = []
    n = len(files)
    for start in range(0, n, chunk):
        part = files[start:start + chunk]
        items = [prepare(data, model) for _, data in part]   # bytes go straight to read_image
        for (name, _), it in zip(part, items):
            it.file = name
            it.row["file"] = name
        rows.extend(infer(items, None))
        if progress:
            progress(min(n, start + len(part)), n)
    return rows
