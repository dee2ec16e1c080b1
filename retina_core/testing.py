"""Helpers for tests and demos that must run before (or without) trained weights.

    >>> d = write_test_weights(tmp_path)          # every registered model gets loadable weights
    >>> os.environ["RETINA_WEIGHTS_DIR"] = str(d)

Models whose bundled weights exist are linked (same file, same sha256, same manifest entry); the others get
randomly initialised weights with a manifest entry that says so ("random initialisation, tests only"), so the app
and its tests exercise every page whatever training has finished. Random weights are never written into weights/.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import zlib
from pathlib import Path

from .modality import Modality
from .models import create_model, get_cfg, list_models, read_manifest, weights_dir
from .models.loading import MANIFEST, sha256_file

RANDOM_NOTE = "random initialisation (tests only; not trained)"
MAX_RANDOM_PARAMS = 12_000_000     # skip big architectures (ViT-L, ConvNeXt-T, 3D ResNet-18): they only slow tests


def write_test_weights(directory: str | os.PathLike, names: list[str] | None = None,
                       source: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Fill `directory` with loadable weights + manifest.json for `names` (default: every registered model).

    Bundled weights from `source` (default: the bundled weights folder) are linked when present and intact;
    missing ones are written from a randomly initialised network (float32 safetensors). Returns the directory.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(source) if source else weights_dir()
    bundled = read_manifest(src)
    manifest = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).exists() else {}
    todo = names or list_models()
    # models built on other models' weights (the fusion head's frozen encoders) come last, so they find them
    todo = sorted(todo, key=lambda n: get_cfg(n).modality == Modality.FUNDUS_OCT)
    saved_env = os.environ.get("RETINA_WEIGHTS_DIR")
    os.environ["RETINA_WEIGHTS_DIR"] = str(out)
    try:
        _fill(out, src, bundled, manifest, todo, seed)
    finally:
        if saved_env is None:
            os.environ.pop("RETINA_WEIGHTS_DIR", None)
        else:
            os.environ["RETINA_WEIGHTS_DIR"] = saved_env
    return out


def _fill(out: Path, src: Path, bundled: dict, manifest: dict, todo: list[str], seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    for name in todo:
        if name in manifest and (out / manifest[name]["file"]).exists():
            continue
        entry = bundled.get(name)
        if entry and (src / entry["file"]).exists() and sha256_file(src / entry["file"]) == entry.get("sha256"):
            target = out / entry["file"]
            if not target.exists():
                try:
                    target.symlink_to((src / entry["file"]).resolve())
                except OSError:
                    shutil.copyfile(src / entry["file"], target)
            manifest[name] = entry
            (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            continue
        cfg = get_cfg(name)
        if cfg.modality != Modality.FUNDUS_OCT and _n_params(name) > MAX_RANDOM_PARAMS:
            continue
        torch.manual_seed(seed + zlib.crc32(name.encode()))      # different models, different weights
        try:
            net = create_model(name)
        except Exception:   # an architecture that cannot be built here: leave it without weights
            continue
        state = net.head_state_dict() if hasattr(net, "head_state_dict") else net.state_dict()
        if sum(v.numel() for v in state.values()) > MAX_RANDOM_PARAMS:
            continue
        file = f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / file))
        manifest[name] = {
            "file": file, "sha256": sha256_file(out / file), "arch": cfg.arch, "modality": cfg.modality,
            "classes": list(cfg.classes), "input_size": list(cfg.input_size), "temperature": 1.0,
            "dtype": "float32", "command": None, "data": RANDOM_NOTE, "trained_on_phantoms": False,
            "metric_kind": "untrained", "heldout_metrics": {}, "date": _dt.date.today().isoformat(),
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _n_params(name: str) -> int:
    """Parameter count without allocating the weights (built on the meta device)."""
    import torch

    try:
        with torch.device("meta"):
            net = create_model(name)
    except Exception:
        return 0
    return sum(p.numel() for p in net.parameters())


def mutated(seed: bytes, edits, cut, header: int) -> bytes:
    """A fuzzed copy of `seed`: each (position, value) edit lands in the first `header` bytes for odd positions
    (where sizes and offsets live) or anywhere for even ones; then the file is cut at `cut` when given."""
    data = bytearray(seed)
    for pos, val in edits:
        data[pos % min(len(data), header if pos % 2 else len(data))] = val
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    return bytes(data)


def read_within_memory(data: bytes, max_pixels: int, secrets=()):
    """`read_image(data)` under tracemalloc: (the image or None when it raised RetinaInputError, peak bytes).
    Only RetinaInputError may escape the decoder, and its message must quote none of `secrets`."""
    import tracemalloc

    from .errors import RetinaInputError
    from .io.decode import read_image

    tracemalloc.start()
    try:
        img = read_image(data, max_pixels=max_pixels)
    except RetinaInputError as exc:
        img = None
        leaked = [s for s in secrets if s in str(exc)]
        assert not leaked, f"error message quotes {leaked}"
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return img, peak
