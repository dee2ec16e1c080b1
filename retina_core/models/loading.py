"""Load bundled or user weights: safetensors only, each file checked against the sha256 in its manifest.

    >>> m = load_model("oct_resnet18")            # weights/ + weights/manifest.json
    >>> m = load_model("oct_resnet18", weights_dir="runs/oct")   # a directory written by `retina_core train`
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..errors import RetinaInputError
from .framing import fov_boxes, frame_tensor, local_contrast, uses_contrast, uses_fov
from .registry import ModelCfg, create_model, get_cfg

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def weights_dir() -> Path:
    """The bundled weights folder (override with RETINA_WEIGHTS_DIR)."""
    env = os.environ.get("RETINA_WEIGHTS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "weights"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def read_manifest(directory: str | os.PathLike | None = None) -> dict:
    """`{model name: entry}`; entry has file, sha256, classes, temperature, command, data, metrics, ..."""
    path = Path(directory or weights_dir()) / MANIFEST
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def preprocess_image(pixels: np.ndarray, cfg: ModelCfg, device: torch.device | str = "cpu",
                     boxes: list | None = None) -> torch.Tensor:
    """uint8 [H, W, 3] (or a batch [B, H, W, 3]) RGB -> float32 [B, C, h, w] resized to cfg.input_size and
    normalised with cfg.mean/std. Training, inference and every explainer call this, so what a model saw in
    training is what it sees in the app. A cfg with framing "fov" cuts each image to its field of view first
    (`models.framing`; `boxes`: the images' `fov_box`es when the caller already has them)."""
    a = np.asarray(pixels)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
        raise ValueError(f"expected uint8 [H, W, 3] or [B, H, W, 3], got {a.dtype} {a.shape}")
    c, h, w = cfg.input_size
    x = torch.tensor(a, device=device).permute(0, 3, 1, 2).float().div_(255.0)
    if uses_fov(cfg):
        boxes = boxes if boxes is not None else fov_boxes(a, (h, w))
        x = torch.stack([frame_tensor(xi, b, (h, w)) for xi, b in zip(x, boxes)])
        if uses_contrast(cfg):   # as training caches it: on 0-255, rounded to uint8 levels
            x = local_contrast((x * 255.0).round().clamp(0, 255)).round().div_(255.0)
    elif x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(cfg.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def _with_entry(cfg: ModelCfg, entry: dict) -> ModelCfg:
    # The manifest records the input size the weights were trained at (demo weights use a smaller one on CPU) and
    # their framing (weights without one were trained on stretched frames).
    size = tuple(entry.get("input_size") or cfg.input_size)
    framing = entry.get("framing") or "stretch"
    return cfg if (size, framing) == (cfg.input_size, cfg.framing) else replace(cfg, input_size=size, framing=framing)


def inference_cfg(name: str, weights_dir: str | os.PathLike | None = None) -> ModelCfg:
    """The cfg as the installed weights use it (input size from the manifest), without loading the network:
    enough for preprocessing in data-loader workers."""
    return _with_entry(get_cfg(name), read_manifest(weights_dir).get(name, {}))


def trained_on(entry: dict) -> str:
    """One line for people: what a manifest entry's weights were trained on and how they scored held out, e.g.
    "real: Mexico OCT (DME), 536 training images; held-out AUC 0.93 (95% CI 0.88-0.97), n = 180" or
    "synthetic phantoms only (phantom metrics say nothing about real images)". Shown next to every suggestion."""
    if not entry:
        return "unknown training data (no manifest entry)"
    if entry.get("metric_kind") == "untrained":
        return f"nothing: {entry.get('data') or 'untrained weights'}"
    if entry.get("trained_on_phantoms"):
        return "synthetic phantoms only (phantom metrics say nothing about real images)"
    real = entry.get("real_data")
    if not real:
        return f"{entry.get('data') or 'unknown data'} (not a known real set; no phantoms)"
    n_train = (entry.get("splits") or {}).get("train")
    m, ci = entry.get("heldout_metrics") or {}, entry.get("heldout_ci95") or {}
    key = "auc_macro" if m.get("auc_macro") is not None else "accuracy"
    name = "AUC" if key == "auc_macro" else "accuracy"
    figure = ""
    if m.get(key) is not None:
        interval = f" (95% CI {ci[key][0]:.2f}-{ci[key][1]:.2f})" if ci.get(key) else ""
        figure = f"; held-out {name} {m[key]:.2f}{interval}, n = {m.get('n')}"
    return f"real: {real.get('title', real.get('name'))}" + (f", {n_train} training images" if n_train else "") + \
        figure


@dataclass
class LoadedModel:
    """A network in eval mode on its device, with its cfg, calibration temperature and provenance."""

    name: str
    cfg: ModelCfg
    net: nn.Module
    device: torch.device
    sha256: str
    temperature: float = 1.0
    entry: dict = field(default_factory=dict)   # the manifest entry: command, data, metrics, dates

    @property
    def trained_on(self) -> str:
        """What these weights were trained on (real set, size, held-out figure) or "synthetic phantoms only"."""
        return trained_on(self.entry)

    @property
    def real_data(self) -> bool:
        return bool(self.entry.get("real_data"))

    def preprocess(self, pixels: np.ndarray) -> torch.Tensor:
        return preprocess_image(pixels, self.cfg, self.device)

    @torch.inference_mode()
    def predict_proba(self, batch: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        """Preprocessed input(s) -> calibrated probabilities [B, num_classes].

        `extra` are the further inputs of two-input networks (the volume model's metadata, the fusion model's OCT
        batch). A network with one logit (the volume model: P(disease)) gets a sigmoid, returned as [B, 2]
        (normal, disease) like the softmax models."""
        z = self.net(batch.to(self.device), *(e.to(self.device) for e in extra)).float() / self.temperature
        if z.shape[1] == 1:
            p = torch.sigmoid(z)
            return torch.cat([1.0 - p, p], dim=1)
        return torch.softmax(z, dim=1)


_DIGESTS: dict[tuple, str] = {}


def _checked_digest(path: Path) -> str:
    """sha256 of a weights file, remembered per (path, size, mtime) so the app's periodic re-check does not hash
    every file again; `load_model` always hashes the bytes it loads."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def weights_problem(name: str, weights_dir: str | os.PathLike | None = None) -> str | None:
    """The start-up check without building the network: None when `name` has a manifest entry whose safetensors
    file exists and matches its sha256, else the reason (the same sentences `load_model` raises)."""
    directory = Path(weights_dir) if weights_dir else globals()["weights_dir"]()
    entry = read_manifest(directory).get(name)
    if entry is None:
        return (f"No weights for model {name!r} in {directory}: its manifest.json has no entry. "
                f"Train it with `python -m retina_core train --model {name} ...`.")
    path = directory / entry["file"]
    if path.suffix != ".safetensors":
        return f"Weights for {name!r} must be a .safetensors file, not {path.name}."
    if not path.exists():
        return f"Weights file for {name!r} is missing: {path.name} (expected in {directory})."
    if _checked_digest(path) != entry.get("sha256"):
        return (f"Weights file {path.name} does not match the sha256 in manifest.json: it was changed or damaged, "
                f"so model {name!r} will not be loaded.")
    return None


def load_model(name: str, weights_dir: str | os.PathLike | None = None, device: str | None = None,
               **builder_overrides) -> LoadedModel:
    """Build `name`, load its safetensors after checking the sha256 recorded in the manifest, eval mode.

    builder_overrides: extra builder arguments, e.g. `encoders_dir` for fundus_oct_fusion's frozen encoders."""
    cfg = get_cfg(name)
    directory = Path(weights_dir) if weights_dir else globals()["weights_dir"]()
    entry = read_manifest(directory).get(name)
    if entry is None:
        raise RetinaInputError(f"No weights for model {name!r} in {directory}: its manifest.json has no entry. "
                               f"Train it with `python -m retina_core train --model {name} ...`.")
    path = directory / entry["file"]
    if path.suffix != ".safetensors":
        raise RetinaInputError(f"Weights for {name!r} must be a .safetensors file, not {path.name}.")
    if not path.exists():
        raise RetinaInputError(f"Weights file for {name!r} is missing: {path.name} (expected in {directory}).")
    digest = sha256_file(path)
    if digest != entry.get("sha256"):
        raise RetinaInputError(f"Weights file {path.name} does not match the sha256 in manifest.json: it was "
                               f"changed or damaged, so model {name!r} will not be loaded.")
    cfg = _with_entry(cfg, entry)
    kw = dict(cfg.builder_kwargs)
    kw.update(entry.get("builder_kwargs") or {})   # architecture options the weights were trained with
    if entry.get("fusion"):           # the volume model's fusion mode is part of what the weights were trained as
        kw["fusion"] = entry["fusion"]
    kw.update(builder_overrides)
    net = create_model(name, input_size=cfg.input_size, framing=cfg.framing, builder_kwargs=kw)
    cfg = net.cfg
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RetinaInputError(f"Weights file {path.name} does not fit model {name!r} "
                               f"({len(missing)} missing, {len(unexpected)} unexpected tensors).")
    dev = torch.device(device) if device else default_device()
    net.eval().to(dev)
    for p in net.parameters():
        p.requires_grad_(False)   # inference only; Grad-CAM takes gradients w.r.t. activations
    log.info("loaded %s (%s) on %s", name, digest[:12], dev)
    return LoadedModel(name=name, cfg=cfg, net=net, device=dev, sha256=digest,
                       temperature=float(entry.get("temperature", 1.0)), entry=entry)
