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
from typing import Any, Callable, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..errors import RetinaInputError
from ..modality import Modality
from .framing import frame_boxes, frame_tensor, local_contrast, uses_contrast, uses_fov
from .registry import ModelCfg, create_model, get_cfg, model_cfg

Inputs = Union[torch.Tensor, tuple[torch.Tensor, ...]]   # what `LoadedModel.preprocess` returns

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
                     boxes: list | None = None, grey: bool = False) -> torch.Tensor:
    """uint8 [H, W, 3] (or a batch [B, H, W, 3]) RGB -> float32 [B, C, h, w] resized to cfg.input_size and
    normalised with cfg.mean/std. Training, inference and every explainer call this, so what a model saw in
    training is what it sees in the app. A framed cfg ("fov", "disc") cuts each image to its box first
    (`models.framing`; `boxes`: the images' `frame_box`es when the caller already has them). grey: the caller
    knows the three channels are exact copies of one (`RetinalImage.meta["single_channel"]`): one channel is
    converted and resized, then copied (the same values, a third of the work)."""
    a = np.asarray(pixels)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
        raise ValueError(f"expected uint8 [H, W, 3] or [B, H, W, 3], got {a.dtype} {a.shape}")
    c, h, w = cfg.input_size
    one = grey and not uses_fov(cfg)
    x = torch.tensor(a[..., :1] if one else a, device=device).permute(0, 3, 1, 2).float().div_(255.0)
    if uses_fov(cfg):
        boxes = boxes if boxes is not None else frame_boxes(a, (h, w), cfg.framing)
        x = torch.stack([frame_tensor(xi, b, (h, w)) for xi, b in zip(x, boxes)])
        if uses_contrast(cfg):   # as training caches it: on 0-255, rounded to uint8 levels
            x = local_contrast((x * 255.0).round().clamp(0, 255)).round().div_(255.0)
    elif x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    if one:
        x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(cfg.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def to_pixels(image) -> np.ndarray:
    """uint8 [H, W, 3] from a RetinalImage, an RGB(A) array or a greyscale array (replicated to 3 channels); float
    images in [0, 1] are scaled to 0..255."""
    px = getattr(image, "pixels", image)
    px = np.asarray(px)
    if px.ndim == 2:
        px = np.repeat(px[..., None], 3, axis=2)
    if px.ndim != 3 or px.shape[2] not in (3, 4):
        raise ValueError(f"expected an image [H, W, 3], got shape {px.shape}")
    px = px[..., :3]
    if px.dtype != np.uint8:
        scale = 255.0 if px.max() <= 1.0 else 1.0
        px = np.clip(np.rint(px.astype(np.float32) * scale), 0, 255).astype(np.uint8)
    return px


def image_pixels(sample) -> np.ndarray:
    """A 2-D sample as `preprocess_image` takes it: one image (a RetinalImage, RGB or greyscale: `to_pixels`) as
    uint8 [H, W, 3]; a batch uint8 [B, H, W, 3] unchanged."""
    a = np.asarray(getattr(sample, "pixels", sample))
    return to_pixels(a) if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4)) else a


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
    caution = outside_caution(entry)
    return f"real: {real.get('title', real.get('name'))}" + (f", {n_train} training images" if n_train else "") + \
        figure + (f". {caution}" if caution else "")


OUTSIDE_CAUTION = "Did not hold outside its training set"


def outside_caution(entry: dict) -> str | None:
    """What a manifest's `external_checks` (figures measured on sets the weights were not trained on, e.g.
    scripts/external_dr_check.py --record; each names the weights it was made on, and checks of other weights
    are ignored) say against these weights, in one sentence, or None when every check held or none was made:
    "Did not hold outside its training set: <check>, <figure>; ...". Part of `trained_on`, so it is shown
    wherever what a model was trained on is."""
    sha = str(entry.get("sha256", ""))
    failed = [c for c in entry.get("external_checks") or ()
              if not c.get("holds", True) and sha.startswith(str(c.get("weights_sha256", "-")))]
    if not failed:
        return None
    return OUTSIDE_CAUTION + ": " + "; ".join(f"{c['check']}, {c['figure']}" for c in failed) + \
        ". Read its answers on photographs from other cameras as unvalidated"


LOW_CONFIDENCE = 0.5   # below this top-class probability a reading says so, unless its manifest records a level


def confidence_of(entry: dict) -> dict | None:
    """The manifest entry's `confidence` record (`python -m retina_core confidence --record`: a threshold chosen
    on the validation split, measured on the test split) when it was measured on these weights (same sha256) and
    found a threshold; else None."""
    rec = entry.get("confidence") or {}
    sha = str(entry.get("sha256", ""))
    if rec.get("threshold") is None or not rec.get("weights_sha256") or not sha.startswith(rec["weights_sha256"]):
        return None
    return rec


def confidence_threshold(entry: dict) -> float:
    """The top-class probability below which a reading of these weights says "low confidence": the recorded
    threshold (`confidence_of`), else LOW_CONFIDENCE."""
    rec = confidence_of(entry)
    return float(rec["threshold"]) if rec else LOW_CONFIDENCE


def _interval(ci) -> str:
    return f" (95% CI {ci[0]:.0%}-{ci[1]:.0%})" if ci else ""


def confidence_note(entry: dict, p_top: float) -> str | None:
    """What a reading with top-class probability `p_top` is worth, from the weights' `confidence` record, in one
    sentence, e.g. "Confidence: 93% is at or above this model's confident level (74%). On 538 held-out images of
    its own set (eye_disease_4class, test split), the 348 readings that confident were right 89% of the time (95%
    CI 86%-93%)." None without a record of these weights."""
    rec = confidence_of(entry)
    if not rec or not rec.get("test"):
        return None
    t, test = float(rec["threshold"]), rec["test"]
    where = f"On {test['n']} held-out images of its own set ({rec.get('data', 'its set')}, test split)"
    if p_top >= t:
        return (f"Confidence: {p_top:.0%} is at or above this model's confident level ({t:.0%}). {where}, the "
                f"{test['confident']} readings that confident were right {test['accuracy_confident']:.0%} of the "
                f"time{_interval(test.get('ci95_confident'))}.")
    head = f"Confidence: {p_top:.0%} is below this model's confident level ({t:.0%})."
    if test.get("accuracy_unsure") is None:
        return f"{head} Review the image yourself."
    return (f"{head} {where}, the {test['unsure']} readings below it were right {test['accuracy_unsure']:.0%} of "
            f"the time{_interval(test.get('ci95_unsure'))}. Review the image yourself.")


_EXPLAINER: dict[str, Callable[..., Any]] = {}      # "explain": installed by `retina_core.explain`
_MODEL_CLASSES: dict[str, type["LoadedModel"]] = {}   # modality -> the LoadedModel subclass that reads it


def register_explainer(fn: Callable[..., Any]) -> None:
    """Install what `LoadedModel.explain` delegates to: fn(model, sample, method, target, **kwargs).
    `retina_core.explain` installs its `explain` when it is imported (always, with `retina_core`), so models import
    nothing from explain."""
    _EXPLAINER["explain"] = fn


def register_model_class(modality: Modality) -> Callable[[type["LoadedModel"]], type["LoadedModel"]]:
    """Class decorator: `load_model` and `as_model` wrap networks of `modality` in the decorated LoadedModel
    subclass (models/volume3d.py: VolumeModel, models/multimodal.py: PairModel; 2-D images: LoadedModel)."""
    def decorate(cls: type[LoadedModel]) -> type[LoadedModel]:
        _MODEL_CLASSES[modality] = cls
        return cls
    return decorate


def model_class(modality: str) -> type["LoadedModel"]:
    """The LoadedModel class that reads `modality` (LoadedModel itself for 2-D images)."""
    return _MODEL_CLASSES.get(modality, LoadedModel)


@dataclass
class LoadedModel:
    """A network in eval mode on its device, with its cfg, calibration temperature and provenance, behind one
    interface whatever it reads (as timm models share one):

        x = model.preprocess(sample)           # the modality's raw sample -> the network's inputs
        p = model.predict_proba(x)             # -> calibrated probabilities [B, num_classes]
        maps = model.explain(sample)           # -> heatmap(s) at the sample's own size

    This class reads 2-D images (fundus photographs, OCT B-scans). `load_model` returns the subclass registered for
    the cfg's modality: `volume3d.VolumeModel` (an OCT volume with its clinical record) or `multimodal.PairModel`
    (a fundus photograph and an OCT B-scan of one eye)."""

    name: str
    cfg: ModelCfg
    net: nn.Module
    device: torch.device
    sha256: str | None                          # None: a network not loaded from a weights file (`as_model`)
    temperature: float = 1.0
    entry: dict = field(default_factory=dict)   # the manifest entry: command, data, metrics, dates

    @property
    def modality(self) -> str:
        """The cfg's Modality."""
        return self.cfg.modality

    @property
    def trained_on(self) -> str:
        """What these weights were trained on (real set, size, held-out figure) or "synthetic phantoms only"."""
        return trained_on(self.entry)

    @property
    def real_data(self) -> bool:
        return bool(self.entry.get("real_data"))

    def preprocess(self, sample) -> Inputs:
        """One image (uint8 [H, W, 3], greyscale [H, W] or a RetinalImage) or a batch uint8 [B, H, W, 3] ->
        float32 [B, C, h, w] on the model's device (`preprocess_image`: framed, resized, normalised by the cfg)."""
        return preprocess_image(image_pixels(sample), self.cfg, self.device)

    @torch.inference_mode()
    def predict_proba(self, inputs: Inputs, *extra: torch.Tensor) -> torch.Tensor:
        """What `preprocess` returned -> calibrated probabilities [B, num_classes].

        inputs: one tensor, or the tuple of a two-input network's tensors ((volume, metadata) of the volume model,
        (fundus, OCT) of the fusion model); `predict_proba(batch, *extra)` with the further inputs as positional
        arguments is the same call. A network with one logit (the volume model: P(disease)) gets a sigmoid,
        returned as [B, 2] (normal, disease) like the softmax models."""
        xs = (*inputs, *extra) if isinstance(inputs, (tuple, list)) else (inputs, *extra)
        z = self.net(*(x.to(self.device) for x in xs)).float() / self.temperature
        if z.shape[1] == 1:
            p = torch.sigmoid(z)
            return torch.cat([1.0 - p, p], dim=1)
        return torch.softmax(z, dim=1)

    def explain(self, sample, method: str | None = None, target=None, **kwargs):
        """Heatmap(s) of `method` for one sample (what `preprocess` takes), float32 in [0, 1] at the sample's own
        size: [H, W] for an image, [D, H, W] for a volume (one map per B-scan), {"fundus": [H, W], "oct": [H', W']}
        for a pair. method None: the model's default; target: the class to explain (default: the predicted one;
        the volume model: "disease"). kwargs: the volume model's `meta` / `eye`. `retina_core.explain.explain`."""
        if "explain" not in _EXPLAINER:
            raise RuntimeError("No explainer installed: import retina_core.explain.")
        return _EXPLAINER["explain"](self, sample, method, target, **kwargs)


def as_model(model, weights_dir: str | os.PathLike | None = None) -> LoadedModel:
    """A registered model name (loaded from `weights_dir`), a LoadedModel, or a network with a cfg (e.g. built by
    `create_model`: temperature 1, no weights file, on its parameters' device) as the LoadedModel of its modality.
    Nothing is loaded or moved for a LoadedModel of the right class, and no network changes mode."""
    if isinstance(model, str):
        return load_model(model, weights_dir=weights_dir)
    net = model if isinstance(model, nn.Module) else getattr(model, "net", None)
    if not isinstance(net, nn.Module):
        raise TypeError(f"expected a model name, a LoadedModel or an nn.Module, got {type(model).__name__}")
    cfg = model_cfg(model)
    if cfg is None:
        raise RetinaInputError("This network has no cfg: pass a registered model name or a LoadedModel.")
    cls = model_class(cfg.modality)
    if isinstance(model, cls):
        return model
    device = getattr(model, "device", None)
    if device is None:
        device = next(net.parameters(), torch.empty(0)).device
    temp = 1.0 if isinstance(model, nn.Module) else float(getattr(model, "temperature", 1.0) or 1.0)
    return cls(getattr(model, "name", None) or cfg.name, cfg, net, device, getattr(model, "sha256", None), temp,
               dict(getattr(model, "entry", None) or {}))


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
    return model_class(cfg.modality)(name=name, cfg=cfg, net=net, device=dev, sha256=digest,
                                     temperature=float(entry.get("temperature", 1.0)), entry=entry)
