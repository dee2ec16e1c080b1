"""The diagnosis chain: decoded image -> quality gate -> preprocess -> forward (+ heatmap, same pass) -> Analysis.

    >>> import retina_core as rc
    >>> a = rc.analyze(rc.read_image("scan.png"))          # model chosen from the detected modality
    >>> a.label, a.probabilities, a.heatmap.shape
"""
from __future__ import annotations

import functools
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .errors import RetinaInputError
from .explain.attribution import ALL_METHODS, ModelMap, available_methods, default_method, explain_batch
from .io.decode import SCREEN_SIDE, RetinalImage, read_image
from .modality import Modality
from .models import LoadedModel, load_model, read_manifest
from .models.loading import confidence_note, confidence_threshold
from .quality import MEDIA_OPACITY_CLASSES, Quality, assess_quality, hazy_only, reads_media_opacity

# Every model that reads a modality, in the order suggestions are shown: models trained on real images first, then
# phantom-only models for the tasks that have no real data here (five DR grades; CNV and drusen on OCT).
MODELS_BY_MODALITY = {
    Modality.FUNDUS: ("fundus_dme_resnet10t", "fundus_resnet18_head", "fundus_dr_effnet_b0"),
    Modality.OCT: ("oct_dme_resnet18", "oct_resnet18"),
}


# Where no real-data model is installed, the phantom model the app has always read the modality with comes first.
PHANTOM_DEFAULTS = {Modality.FUNDUS: "fundus_dr_effnet_b0", Modality.OCT: "oct_resnet18"}


def installed_models(modality: str) -> list[str]:
    """The models of `modality` whose weights are installed (a manifest entry in the weights folder): those whose
    manifest says they were trained on a real set first (in MODELS_BY_MODALITY's order), then the phantom-only
    ones, the modality's phantom default first."""
    manifest = read_manifest()
    names = [n for n in MODELS_BY_MODALITY.get(modality, ()) if n in manifest]
    order = {n: i for i, n in enumerate(MODELS_BY_MODALITY.get(modality, ()))}
    return sorted(names, key=lambda n: (not manifest[n].get("real_data"), n != PHANTOM_DEFAULTS.get(modality),
                                        order[n]))


class _DefaultModels(Mapping):
    """``{modality: model}``: the first installed model of MODELS_BY_MODALITY (a real-data model where one is
    installed), read from the weights folder at each lookup, so RETINA_WEIGHTS_DIR and newly installed weights
    count. Falls back to the first registered model of the modality when none is installed."""

    def __getitem__(self, modality: str) -> str:
        if modality not in MODELS_BY_MODALITY:
            raise KeyError(modality)
        return next(iter(installed_models(modality)), PHANTOM_DEFAULTS[modality])

    def __iter__(self):
        return iter(MODELS_BY_MODALITY)

    def __len__(self) -> int:
        return len(MODELS_BY_MODALITY)

    def __repr__(self) -> str:
        return repr({str(m): name for m, name in self.items()})


# The model used when the caller names none, per detected modality.
DEFAULT_MODELS = _DefaultModels()
NO_RESULT = "No result: retake or refer"


_LOAD_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _load_once(name: str) -> LoadedModel:
    return load_model(name)


def get_model(name: str) -> LoadedModel:
    """One shared, read-only copy of each bundled model per process (thread-safe: concurrent first calls, e.g. a
    session and the app's background warm-up, load it once)."""
    with _LOAD_LOCK:
        return _load_once(name)


LOAD_FAILURES: dict[str, str] = {}    # models whose files check out but whose full load failed (the app's status)


def _clear_models() -> None:
    with _LOAD_LOCK:
        _load_once.cache_clear()
        LOAD_FAILURES.clear()


get_model.cache_clear = _clear_models


@dataclass
class Analysis:
    """One image read by one model. `heatmap`: float32 [H, W] in [0, 1] at the shown image's size, or None.
    `modality` is kept a plain str (a Modality's value, or "not_retinal"): it is stored in the clinic's database.

    A reading keeps its map at the model's resolution (`heatmap_at_model`, an `explain.attribution.ModelMap` of a
    few KB) and places it on the image each time `heatmap` is read, so a result held in a session, a queue or a
    Ray object store costs the image and little more; read `heatmap` once per drawing. It may also be given a
    placed array (volumes, pairs), which it keeps as given."""

    modality: str
    quality: Quality
    probabilities: dict[str, float]          # calibrated; sums to 1; empty when there is no result
    label: str | None
    heatmap: np.ndarray | None = field(repr=False)
    model: str | None
    weights_sha256: str | None
    method: str
    target: str | None                        # the class the heatmap explains
    referable: bool | None
    suggestion: str
    content_hash: str
    laterality: str | None
    image: np.ndarray = field(repr=False)     # uint8 [H, W, 3], the image as shown to the user
    notes: list[str] = field(default_factory=list)
    trained_on: str | None = None             # what the model was trained on ("real: <set>, n, held-out AUC" / phantoms)
    confident: bool | None = None             # top class at or above the model's confident level; None: no result

    def __post_init__(self) -> None:
        if isinstance(self.modality, str):
            self.modality = str(self.modality)     # a Modality member -> its plain value

    @property
    def heatmap_at_model(self) -> ModelMap | None:
        """The map as the model made it, when this result keeps one (else None: no map, or a placed array)."""
        m = self.__dict__.get("_heatmap")
        return m if isinstance(m, ModelMap) else None

    @property
    def heatmap_empty(self) -> bool:
        """No region raised the explained class's score (True also when there is no map)."""
        return _map_empty(self.__dict__.get("_heatmap"))

    @property
    def has_result(self) -> bool:
        return self.label is not None

    def to_dict(self) -> dict:
        """JSON-ready summary (no pixel arrays)."""
        q = self.quality
        return {"modality": self.modality, "label": self.label, "probabilities": self.probabilities,
                "referable": self.referable, "suggestion": self.suggestion, "model": self.model,
                "weights_sha256": self.weights_sha256, "trained_on": self.trained_on, "method": self.method,
                "target": self.target,
                "quality": {"verdict": q.verdict, "gradable": q.gradable, "score": round(float(q.score), 4),
                            "reasons": list(q.reasons)},
                "laterality": self.laterality, "content_hash": self.content_hash, "notes": list(self.notes),
                "confident": self.confident}


def _no_result(img: RetinalImage, q: Quality, modality: str, method: str, why: list[str],
               model: LoadedModel | None = None) -> Analysis:
    return Analysis(modality=modality, quality=q, probabilities={}, label=None, heatmap=None,
                    model=model.name if model else None, weights_sha256=model.sha256 if model else None,
                    method=method, target=None, referable=None, suggestion=NO_RESULT,
                    content_hash=img.content_hash, laterality=img.laterality, image=img.pixels, notes=why,
                    trained_on=model.trained_on if model else None)


def _target_index(target: str | int | None, classes: tuple[str, ...], predicted: int) -> int:
    if target is None:
        return predicted
    if isinstance(target, (int, np.integer)) and 0 <= int(target) < len(classes):
        return int(target)
    if target in classes:
        return classes.index(target)
    raise RetinaInputError(f"Cannot explain class {target!r}: the model's classes are {', '.join(classes)}.")


def _map_empty(m: np.ndarray | ModelMap | None) -> bool:
    if m is None:
        return True
    return m.is_empty() if isinstance(m, ModelMap) else not float(np.max(m)) > 0


def _heatmap_get(self: Analysis) -> np.ndarray | None:
    m = self.__dict__.get("_heatmap")
    return m.to_image() if isinstance(m, ModelMap) else m


def _heatmap_set(self: Analysis, value: np.ndarray | ModelMap | None) -> None:
    self.__dict__["_heatmap"] = value


# the dataclass field `heatmap` (its __init__ sets it) is kept as given, a ModelMap placed on reading
Analysis.heatmap = property(_heatmap_get, _heatmap_set,   # type: ignore[assignment]
                            doc="float32 [H, W] in [0, 1] at the shown image's size, or None (placed on each read)")


def suggestion_for(label: str, model: LoadedModel) -> tuple[bool, str]:
    """Plain-language action for a predicted class, from the cfg's referable classes."""
    if label in model.cfg.referable:
        return True, f"Refer to an eye specialist: findings suggest {label}."
    return False, f"Not referable by this model: findings suggest {label}. Routine follow-up."


def analyze(image, model: LoadedModel | str | None = None, method: str | None = None,
            target: str | int | None = None, modality: str | None = None) -> Analysis:
    """Read one image with one model: quality gate, calibrated probabilities and a heatmap.

    image: a RetinalImage, a path, bytes or a binary file (decoded by `read_image`). model: a LoadedModel, a
    registered name, or None for the default model of the detected modality. method: one of
    `available_methods(model)` (single-pass "gradcam" and "multiscale_gradcam"; the pytorch-grad-cam family;
    integrated gradients; for ViTs attention rollout and relevance); None for the model's default
    (`default_method`: the best-ranked method of `explain-eval` that meets the speed target). target: the class to explain (default: the predicted one).
    modality: the user's override of the detected modality ("fundus" | "oct").
    Ungradable or non-retinal images, and images of a modality the model does not read, give an Analysis with
    no result (label None, suggestion "No result: retake or refer") and the reasons in `notes`.
    """
    return run_reading(plan_analysis(image, model, method, target, modality))


def analyze_all(image, method: str | None = None, modality: str | None = None) -> list[Analysis]:
    """Every suggestion the image's modality supports: the quality gate once, then each installed model of
    MODELS_BY_MODALITY (real-data models first, e.g. a fundus photograph gets DME, the 4-class reading and the
    phantom-only DR grade). An image with no result gives one Analysis saying why. `method` applies to every model
    that offers it; the others use their default."""
    return [run_reading(p) for p in plan_all(image, method, modality)]


@dataclass
class Reading:
    """A gated image planned for one model's forward: what `analyze` / `analyze_all` have decided before any model
    runs (`plan_analysis`, `plan_all`). `run_reading` runs it alone; a server runs several readings of the same
    model, method and image size as one `explain_batch` and hands each its slice (`retina_core.serving`)."""

    img: RetinalImage
    quality: Quality
    model: LoadedModel
    method: str                               # resolved: one of available_methods(model)
    target: str | int | None
    note: str | None = None                   # appended to the result's notes
    hazy: bool = False                        # an ungradable, hazy fundus photograph read for media opacity only


def plan_analysis(image, model: LoadedModel | str | None = None, method: str | None = None,
                  target: str | int | None = None, modality: str | None = None) -> Analysis | Reading:
    """`analyze` up to the forward: the decoded, gated image and the model and method that will read it, or the
    no-result Analysis when none will (ungradable, not retinal, wrong modality). Raises RetinaInputError as
    `analyze` does."""
    img, q = _gated(image, method, modality)
    return _plan(img, q, model, method, target)


def plan_all(image, method: str | None = None, modality: str | None = None) -> list[Analysis | Reading]:
    """`analyze_all` up to the forwards: one Reading per installed model of the image's modality, or one
    no-result Analysis saying why none applies."""
    img, q = _gated(image, method, modality)
    names = installed_models(q.modality) if q.modality in MODELS_BY_MODALITY else []
    if names and hazy_only(q):        # only a model with a media-opacity class reads a hazy photograph
        names = [n for n in names if reads_media_opacity(get_model(n))]
    if not names or q.modality == "not_retinal" or (not q.gradable and not hazy_only(q)):
        return [_plan(img, q, None, method, None)]
    models = [get_model(n) for n in names]
    if method is not None and not any(method in available_methods(m) for m in models):
        raise RetinaInputError(f"Method {method!r} does not apply to {', '.join(names)}; choose one of "
                               f"{', '.join(available_methods(models[0]))}.")
    out = []
    for m in models:
        fits = method is None or method in available_methods(m)
        p = _plan(img, q, m, method if fits else None, None)
        if not fits and isinstance(p, Reading):
            p.note = f"{method} does not apply to {m.name}; its default map ({p.method}) is shown."
        out.append(p)
    return out


def run_reading(plan: Analysis | Reading) -> Analysis:
    """One planned reading run alone (a no-result Analysis passes through)."""
    return plan if isinstance(plan, Analysis) else run_readings([plan])[0]


def run_readings(readings: list[Reading]) -> list[Analysis]:
    """Readings of one model, method, target and image size as one `explain_batch`; each finished as alone."""
    first = readings[0]
    pixels = np.stack([r.img.pixels for r in readings])
    grey = all((r.img.meta or {}).get("single_channel") for r in readings)   # channels copies of one
    maps, probs, idx = explain_batch(first.model, pixels, first.method, first.target, grey=grey, placed=False)
    return [finish_reading(r, maps[i], probs[i], int(idx[i])) for i, r in enumerate(readings)]


def _gated(image, method: str | None, modality: str | None) -> tuple[RetinalImage, Quality]:
    img = image if isinstance(image, RetinalImage) else read_image(image, max_side=SCREEN_SIDE)
    if img.kind != "image":
        raise RetinaInputError("This is an OCT volume; this step reads single images (fundus photographs or "
                               "OCT B-scans). Open it in the volume viewer, or export one B-scan.")
    if method is not None and method not in ALL_METHODS:
        raise RetinaInputError(f"Unknown heatmap method {method!r}; choose one of {', '.join(ALL_METHODS)}.")
    return img, assess_quality(img, modality=modality)


def _plan(img: RetinalImage, q: Quality, model, method: str | None, target) -> Analysis | Reading:
    """One gated image planned for one model (the model of the modality by default), or why it gets no result."""
    asked = method or "default"
    if q.modality == "not_retinal":
        return _no_result(img, q, q.modality, asked, [q.verdict, *q.reasons])
    if model is None:
        model = DEFAULT_MODELS.get(q.modality)
        if model is None:
            return _no_result(img, q, q.modality, asked, [f"No bundled model reads {q.modality} images."])
    if isinstance(model, str):
        model = get_model(model)
    if model.cfg.modality != q.modality:
        why = (f"This image looks like a {q.modality} image, but model {model.name} reads {model.cfg.modality} "
               f"images. Choose a {q.modality} model, or override the modality if the detection is wrong.")
        return _no_result(img, q, q.modality, asked, [why], model)
    hazy = not q.gradable and hazy_only(q) and reads_media_opacity(model)
    if not q.gradable and not hazy:
        return _no_result(img, q, q.modality, asked, [q.verdict, *q.reasons], model)

    classes = model.cfg.classes
    method = method or default_method(model)
    if method not in available_methods(model):
        raise RetinaInputError(f"Method {method!r} does not apply to {model.name}; choose one of "
                               f"{', '.join(available_methods(model))}.")
    if target is not None:
        _target_index(target, classes, 0)   # a clear message for an unknown class, before any work
    return Reading(img, q, model, method, target, hazy=hazy)


HAZY_NOTE = ("The retina itself cannot be graded on this photograph (blurred or low contrast). A hazy view is also "
             "what media opacity such as cataract looks like, so only a media-opacity reading is shown; if the eye's "
             "media are clear, retake the photograph.")
HAZY_WITHHELD = ("This photograph is too hazy to grade the retina, and the model did not read it as media opacity "
                 "(its answer was {label}), so no reading is shown: retake the photograph, or refer.")


def finish_reading(plan: Reading, heatmap: np.ndarray | ModelMap, probabilities: np.ndarray,
                   target_index: int) -> Analysis:
    """The forward's output for one planned reading -> its Analysis (label, suggestion, notes; audited).
    heatmap: the image's ModelMap (kept as is), or float32 [H, W] in [0, 1] at the image's size; probabilities:
    calibrated [K]; target_index: the class the heatmap explains (`explain_batch`'s outputs for this image)."""
    img, q, model, method = plan.img, plan.quality, plan.model, plan.method
    classes = model.cfg.classes
    # One forward gives the prediction and (for Grad-CAM) the heatmap; other methods reuse that forward's logits.
    probs = np.asarray(probabilities).astype(np.float64)
    probs = probs / probs.sum()
    pred = int(np.argmax(probs))
    t_idx = int(target_index)
    label = classes[pred]
    if plan.hazy and label not in MEDIA_OPACITY_CLASSES:
        return _no_result(img, q, q.modality, method, [q.verdict, *q.reasons, HAZY_WITHHELD.format(label=label)],
                          model)
    referable, suggestion = suggestion_for(label, model)
    if plan.hazy:
        suggestion += " The retina itself is not gradable on this photograph."
    notes = ["The heatmap is empty: no region raised the explained class's score."] if _map_empty(heatmap) else []
    confident = bool(probs[pred] >= confidence_threshold(model.entry))
    measured = confidence_note(model.entry, float(probs[pred]))   # the weights' recorded level, measured held out
    if not confident:
        suggestion += f" Low confidence ({probs[pred]:.0%}): review the image yourself."
    if measured or not confident:
        notes.append(measured or f"Low confidence: the top class has {probs[pred]:.0%}; review the image yourself.")
    if plan.hazy:
        notes.append(HAZY_NOTE)
    if plan.note:
        notes.append(plan.note)
    result = Analysis(modality=q.modality, quality=q, probabilities={c: float(p) for c, p in zip(classes, probs)},
                      label=label, heatmap=heatmap, model=model.name, weights_sha256=model.sha256, method=method,
                      target=classes[t_idx], referable=referable, suggestion=suggestion,
                      content_hash=img.content_hash, laterality=img.laterality, image=img.pixels, notes=notes,
                      trained_on=model.trained_on, confident=confident)
    audit(result)
    return result


def audit(a: Analysis) -> None:
    """Append to the JSONL audit log named by RETINA_AUDIT_LOG, if set: hashes and outputs, never patient data."""
    path = os.environ.get("RETINA_AUDIT_LOG")
    if path and a.model:
        from .audit_log import AuditLog

        AuditLog(path).record(a.content_hash, a.model, a.weights_sha256,
                              {"label": a.label, "probabilities": a.probabilities, "method": a.method,
                               "modality": a.modality, "quality": a.quality.verdict})

