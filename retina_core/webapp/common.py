"""Streamlit glue every page shares: cached model loading, per-session result cache and the inference service,
bundled samples, trust notes, common widgets.

Pages stay thin: they lay out widgets and plots and call these helpers and the retina_core API.
Nothing patient-specific goes into a shared (cross-session) cache: models, phantom samples and phantom evaluations
are shared; uploaded images and everything computed from them live only in the session's own `st.session_state`
(`memo`, `analysis_for`, `decode_upload`), keyed by content hash, so a rerun (a slider moved, an overlay switched)
finds its result there and recomputes nothing heavy.
"""
from __future__ import annotations

import io
from typing import Callable, Hashable, TypeVar

import numpy as np
import streamlit as st
from PIL import Image

from ..about import DISCLAIMER
from ..analysis import DEFAULT_MODELS, LOAD_FAILURES, Analysis, get_model
from ..errors import RetinaInputError
from ..io.decode import SCREEN_SIDE, RetinalImage, read_image
from ..models import get_cfg, list_models, read_manifest  # noqa: F401  (get_cfg: the pages read common.get_cfg)
from ..models.loading import OUTSIDE_CAUTION, trained_on

T = TypeVar("T")

SAMPLES = {  # label shown -> (generator, class, seed)
    "Fundus phantom: moderate diabetic retinopathy": ("fundus", "Moderate", 11),
    "Fundus phantom: no diabetic retinopathy": ("fundus", "No DR", 12),
    "Fundus phantom: proliferative diabetic retinopathy": ("fundus", "Proliferative DR", 13),
    "Fundus phantom: glaucoma (large cup)": ("fundus", "glaucoma", 14),
    "Fundus phantom: cataract (hazy media)": ("fundus", "cataract", 15),
    "OCT phantom: choroidal neovascularisation (CNV)": ("oct", "CNV", 21),
    "OCT phantom: diabetic macular oedema (DME)": ("oct", "DME", 22),
    "OCT phantom: drusen": ("oct", "DRUSEN", 23),
    "OCT phantom: normal": ("oct", "NORMAL", 24),
    "OCT phantom: central serous retinopathy (CSR)": ("oct", "CSR", 25),
    "OCT phantom: macular hole (MH)": ("oct", "MH", 26),
}
NO_SAMPLE = "(none)"
EYE_OPTIONS = {"Not specified": None, "Right eye (OD)": "OD", "Left eye (OS)": "OS"}
ANALYSIS_LIMIT = 64     # analyses kept per session (oldest dropped): bounded memory for long sessions
PLACED_HEATMAP_LIMIT = 8   # heatmaps kept placed on their image per session (about 3 MB each at 1024 px)


# ------------------------------------------------------------------------------------------- shared caches
@st.cache_resource(show_spinner="Loading model weights (once per server)...")
def cached_model(name: str):
    """One read-only model copy per process, shared by all sessions (CUDA when present): `retina_core.get_model`,
    the same process-wide copy `analyze` uses when it picks a model itself and the background warm-up fills.
    `load_model` applies what the manifest entry records (input size, architecture options, the volume model's
    fusion mode, the fusion head's encoders)."""
    try:
        return get_model(name)
    except RetinaInputError as exc:
        LOAD_FAILURES[name] = str(exc)
        raise


def _warm_up(names: list[str]) -> None:
    """Load the verified models in a background thread, so the first page renders at once and the first
    prediction finds its model ready; failures are recorded for `model_status`."""
    def run():
        for n in names:
            try:
                get_model(n)
            except RetinaInputError as exc:
                LOAD_FAILURES[n] = str(exc)
            except Exception as exc:   # a broken architecture must not take the app down
                LOAD_FAILURES[n] = f"Model {n!r} could not be built ({type(exc).__name__})."

    import threading

    threading.Thread(target=run, name="retina-warm-up", daemon=False).start()   # not daemon: never killed mid-load


@st.cache_resource(ttl=120, show_spinner=False)
def _checked_weights() -> dict[str, str | None]:
    from ..models.loading import weights_problem

    status = {name: weights_problem(name) for name in list_models()}
    _warm_up([n for n in DEFAULT_MODELS.values() if status.get(n) is None] +
             [n for n, why in status.items() if why is None and n not in DEFAULT_MODELS.values()])
    return status


def model_status() -> dict[str, str | None]:
    """Start-up check: model name -> None when its weights are installed and intact, else the reason it is
    unavailable. Files and sha256 are checked at once (re-checked every two minutes, so weights installed while
    the server runs appear without a restart); the networks load in the background, defaults first, and a model
    whose full load fails (e.g. a fusion head without its encoders) is reported with the reason."""
    return {**_checked_weights(), **LOAD_FAILURES}


def model_or_reason(name: str):
    """(LoadedModel, None) when `name` is usable, else (None, a sentence saying why not)."""
    reason = model_status().get(name, f"Unknown model {name!r}.")
    if reason:
        return None, reason
    try:
        return cached_model(name), None
    except RetinaInputError as exc:
        return None, str(exc)


def available_models(modality: str | None = None) -> list[str]:
    """Registered models of `modality` whose weights loaded."""
    status = model_status()
    return [n for n in list_models(modality) if status.get(n) is None]


def model_choices(modality: str | None = None) -> list[str]:
    """Usable models first (for selectboxes); unavailable ones are explained by `unavailable_note`."""
    return available_models(modality)


def unavailable_note(modality: str | None = None, names: list[str] | None = None) -> None:
    """A collapsed list of models that exist but cannot be used here, each with the reason."""
    status = model_status()
    missing = {n: status[n] for n in (names or list_models(modality)) if status.get(n)}
    if missing:
        with st.expander(f"{len(missing)} model(s) not available here", icon=":material/info:"):
            for n, why in missing.items():
                st.markdown(f"- **{n}**: {why}")


@st.cache_data(show_spinner=False)
def sample_png(label: str) -> bytes:
    """PNG bytes of a bundled sample (a deterministic phantom), so a demo needs no files."""
    from ..phantoms import fundus_phantom, oct_phantom

    kind, cls, seed = SAMPLES[label]
    ph = fundus_phantom(cls, seed=seed, size=512) if kind == "fundus" else oct_phantom(cls, seed=seed)
    return png_bytes(ph.image)


# ------------------------------------------------------------------------------------------- per-session cache
def memo(kind: str, key: Hashable, compute: Callable[[], T], limit: int = 16) -> T:
    """Per-session memo: `compute()` once per (kind, key) in this browser session (never shared between users).

    Keys should contain content hashes, model names and settings; at most `limit` results per kind are kept."""
    store = st.session_state.setdefault("_memo", {}).setdefault(kind, {})
    if key not in store:
        if len(store) >= limit:
            store.pop(next(iter(store)))
        store[key] = compute()
    return store[key]


def method_evidence(model_name: str, weights_sha256: str) -> dict[str, dict]:
    """What the explain-eval evidence kept with these weights (`<weights dir>/evidence/`, real lesion sets first)
    measured per method (read once per session; nothing under docs/ is read)."""
    from ..audit.evidence import method_trust

    return memo("method_trust", (model_name, weights_sha256), lambda: method_trust(model_name, weights_sha256))


def method_trust_note(model_name: str, weights_sha256: str, method: str, label: str | None = None,
                      modality: str | None = None) -> tuple[str, bool]:
    """How far `method`'s maps can be trusted on this model (for the suggested class `label`, when given; for one
    input's map of a two-input model when `modality` is given): a sentence and whether it is a warning (failed
    sanity check, no more faithful than chance, or a map that rarely points at a lesion, or on real lesions no better
    than chance). Evidence measured on real photographs is worded as such and comes first."""
    from ..audit.evidence import trust_note

    return trust_note(method_evidence(model_name, weights_sha256).get(method), method, label, modality)


def show_trust_note(model_name: str, weights_sha256: str, method: str, where=None, label: str | None = None,
                    modality: str | None = None) -> None:
    """`method_trust_note` under a map: a caption, or a warning when the map failed a check."""
    note, warn = method_trust_note(model_name, weights_sha256, method, label, modality)
    where = where or st
    (where.warning if warn else where.caption)(note, **({"icon": ":material/warning:"} if warn else {}))


def decode_upload(data: bytes, name: str | None) -> RetinalImage:
    """Uploaded bytes -> RetinalImage through the one decoder, memoised per session by content."""
    cache = st.session_state.setdefault("_decoded", {})
    key = (hash(data), name)
    if key not in cache:
        if len(cache) >= ANALYSIS_LIMIT:
            cache.pop(next(iter(cache)))
        cache[key] = read_image(data, name=name, max_side=SCREEN_SIDE)
    return cache[key]


def _service():
    """The server's one inference service (`retina_core.serving`): every session's forwards go through its
    bounded queue and one worker, batched; a full queue is a ServerBusyError (a RetinaInputError: pages show it)."""
    from ..serving import get_service

    return get_service()


def _service_model(model: str | None):
    """The model for the service: in-process, the shared copy (`cached_model`, which records load failures for
    the status table); through Ray Serve, its name (the replicas load their own)."""
    if not model:
        return None
    return cached_model(model) if _service().backend == "local" else model


def _session_stopped():
    """A check the service polls while this session waits: true once Streamlit asked this script run to stop for
    good (the browser tab closed, the session shut down). A rerun request does not count: the result is still
    wanted then.

    Streamlit has no public API for this (1.67: `st.context` says nothing about the connection, and a stopped run
    only learns of it at its next `st.*` call, which a run blocked on the service never makes), so this is the one
    place in the app that reads Streamlit internals: the run's `ScriptRunContext.script_requests` and its private
    `_state` (CONTINUE, RERUN or STOP). Where either is missing (outside a script run, or a Streamlit that renamed
    them) it gives None, or a check that stays false: the queued work then runs to the end, as without the check."""
    try:
        from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx

        requests = getattr(get_script_run_ctx(), "script_requests", None)
    except Exception:
        return None
    if requests is None or not hasattr(requests, "_state"):
        return None
    return lambda: getattr(getattr(requests, "_state", None), "value", None) == "STOP"


def on_service(job: Callable[[], T]) -> T:
    """Run `job` once through the server's inference service (its queue, worker and thread cap), not memoised:
    for work split into steps that report progress between them (the volume viewer's per-slice pass)."""
    return _service().call(job, cancelled=_session_stopped())


def served(kind: str, key, compute: Callable, limit: int = 32):
    """`memo` for model work other than a reading (fusion, 3-D volume model and maps, explainer comparisons):
    computed once per session and key, through the server's inference service (`InferenceService.call`), so it
    queues with every other session's forwards under the same thread cap and back-pressure."""
    return memo(kind, key, lambda: _service().call(compute, cancelled=_session_stopped()), limit=limit)


def analysis_for(img: RetinalImage, model: str | None, method: str | None, modality: str | None) -> Analysis:
    """Analyse once per (content hash, model, method, modality) in this session; reruns reuse the result.

    The forward runs in the server's shared inference service (`retina_core.serving`), batched with other
    sessions' requests. method None is the model's default; the result is also filed under the method it
    resolved to, so choosing that method by name later reuses it."""
    cache = st.session_state.setdefault("_analyses", {})
    key = (img.content_hash, model, method or "default", modality)
    if key not in cache:
        while len(cache) >= ANALYSIS_LIMIT:
            cache.pop(next(iter(cache)))
        a = _service().analyze(img, _service_model(model), method=method, modality=modality,
                               cancelled=_session_stopped())
        cache[key] = a
        if method is None and a.label is not None:
            cache.setdefault((img.content_hash, model, a.method, modality), a)
    return cache[key]


def analyses_for(img: RetinalImage, model: str | None, method: str | None, modality: str | None) -> list[Analysis]:
    """Every suggestion for one image (`analyze_all`: each installed model of its modality, real-data models
    first), or the chosen model's alone; memoised per session like `analysis_for`."""
    if model:
        return [analysis_for(img, model, method, modality)]
    cache = st.session_state.setdefault("_analyses", {})
    key = (img.content_hash, "all", method or "default", modality)
    if key not in cache:
        while len(cache) >= ANALYSIS_LIMIT:
            cache.pop(next(iter(cache)))
        found = cache[key] = _service().analyze_all(img, method=method, modality=modality,
                                                    cancelled=_session_stopped())
        resolved = {a.method for a in found if a.label is not None}
        if method is None and len(resolved) == 1:   # choosing that method by name later reuses these
            cache.setdefault((img.content_hash, "all", resolved.pop(), modality), found)
    return cache[key]


# ------------------------------------------------------------------------------------------- common widgets
def disclaimer() -> None:
    """The statement every page carries, with what the loaded weights were trained on."""
    st.warning(DISCLAIMER, icon=":material/science:")


def heatmap_of(a: Analysis):
    """`a.heatmap` placed on its image once per session, for the last few maps drawn (a result keeps its map at the
    model's resolution, `Analysis.heatmap_at_model`): a slider move redraws the overlay without placing it again."""
    key = (a.content_hash, a.model, a.weights_sha256, a.method, a.target, a.image.shape[:2])
    return memo("placed_heatmap", key, lambda: a.heatmap, limit=PLACED_HEATMAP_LIMIT)


def probability_rows(probabilities: dict[str, float], label: str | None = None, where=None) -> None:
    """The calibrated probabilities as one native progress bar per class, the predicted class in bold: what the
    plotly bar chart showed, without the plotting library the browser must load and lay out for every result."""
    where = where or st
    for c, p in probabilities.items():
        name = f"**{c}**" if c == label else c
        where.progress(min(max(float(p), 0.0), 1.0), text=f"{name}: {p:.1%}")


def trained_on_caption(a: Analysis, where=None) -> None:
    """What the model behind a suggestion was trained on, next to it: real set, size and held-out figure, or a
    visible 'synthetic phantoms only' for the tasks with no real data here; a warning where its answers were
    checked on another set and did not hold there; then how often readings as confident as this one were right on
    held-out images, where the weights record it."""
    where = where or st
    text = a.trained_on or "unknown training data"
    if text.startswith("synthetic"):
        where.caption(f":material/science: `{a.model}` was trained on **{text}**: no real images exist here for "
                      f"this task, so treat this reading as a demonstration.")
    elif OUTSIDE_CAUTION in text:                   # `models.loading.outside_caution`: said as a warning
        where.warning(f"`{a.model}` trained on {text}.", icon=":material/warning:")
    else:
        where.caption(f":material/verified: `{a.model}` trained on {text}.")
    for note in confidence_notes(a):            # `models.loading.confidence_note`: this reading's level, measured
        where.caption(f":material/speed: {note}")


CONFIDENCE_NOTE = "Confidence: "


def confidence_notes(a: Analysis) -> list[str]:
    """The reading's notes on its confidence level as measured on held-out images (shown by `trained_on_caption`)."""
    return [n for n in a.notes if n.startswith(CONFIDENCE_NOTE)]


def weights_caption(model_names: list[str] | None = None) -> None:
    """One caption per model: weights hash and what they were trained on (phantoms for the bundled demo)."""
    manifest = read_manifest()
    status = model_status()
    for name in model_names or sorted(manifest):
        e = manifest.get(name)
        if e and status.get(name) is None:
            st.caption(f"`{name}` weights `{e['sha256'][:12]}` trained on {trained_on(e)}.")


def sidebar_weights() -> None:
    """In the sidebar of every page: which weights are loaded, and what each was trained on (real set or phantoms)."""
    status = model_status()
    manifest = read_manifest()
    loaded = [n for n, why in status.items() if why is None]
    with st.sidebar:
        with st.expander(f"Installed weights: {len(loaded)} of {len(status)} models", icon=":material/memory:"):
            if not loaded:
                st.markdown("No model weights are installed yet. Train one with "
                            "`python -m retina_core train --model NAME --data PATH` (see *Models & evaluation*).")
            for n in loaded:
                e = manifest.get(n, {})
                st.markdown(f"**{n}** `{e.get('sha256', '')[:10]}`  \n{trained_on(e)}")
            st.caption("Some bundled weights were trained on small real public image sets, the others on synthetic "
                       "phantoms only; no figure here is clinical accuracy.")


def pick_image(prefix: str, label: str, sample_kinds: tuple[str, ...] = ("fundus", "oct"),
               types: tuple[str, ...] = ("png", "jpg", "jpeg", "tif", "tiff", "bmp", "dcm"),
               default_sample: str | None = None) -> tuple[str, bytes] | None:
    """An uploader (key `{prefix}_upload`) and a bundled-sample selectbox (key `{prefix}_sample`).

    Returns (name, bytes) of the upload, else of the chosen sample, else None."""
    up = st.file_uploader(label, type=list(types), key=f"{prefix}_upload")
    options = [NO_SAMPLE] + [s for s, (k, _, _) in SAMPLES.items() if k in sample_kinds]
    index = options.index(default_sample) if default_sample in options else 0
    sample = st.selectbox("... or a bundled sample (a synthetic phantom, no patient data)", options, index=index,
                          key=f"{prefix}_sample")
    if up is not None:
        return up.name, up.getvalue()
    if sample != NO_SAMPLE:
        return sample, sample_png(sample)
    return None


def eye_of(img: RetinalImage, key: str) -> str | None:
    """The eye of an image: from the DICOM tag or the file name when present (shown), else the user's choice."""
    if img.laterality:
        source = "DICOM laterality tag" if img.source_format == "dicom" else "file name"
        st.caption(f"Eye: **{img.laterality}** (from the {source})")
        return img.laterality
    label = st.selectbox("Eye (not recorded in the file)", list(EYE_OPTIONS), key=key,
                         help="Used for the report and for the nasal/temporal sides of the ETDRS grid.")
    return EYE_OPTIONS[label]


def show_unavailable(what: str, reason: str) -> None:
    """The standard 'model not available: why' message."""
    st.info(f"**{what} is not available.** {reason}", icon=":material/hourglass_empty:")


# ------------------------------------------------------------------------------------------- images
def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()



# ------------------------------------------------------------------------------------------- shared, non-patient
PAIRED_SAMPLES = {  # label -> (seed, disease)
    "Paired phantom 1: diabetic eye (fundus + OCT)": (3, True),
    "Paired phantom 2: healthy eye (fundus + OCT)": (6, False),
    "Paired phantom 3: macular degeneration (fundus + OCT)": (8, True),
}
VOLUME_SAMPLES = {  # label -> (phantom label, seed)
    "Volume phantom: diabetic macular oedema (DME)": ("DME", 7),
    "Volume phantom: choroidal neovascularisation (CNV)": ("CNV", 8),
    "Volume phantom: normal": ("normal", 9),
}


@st.cache_data(show_spinner=False)
def paired_sample_pngs(label: str) -> tuple[bytes, bytes, dict]:
    """(fundus PNG, OCT PNG, non-identifying facts) of one virtual eye: a bundled phantom pair."""
    from ..phantoms import paired_phantoms

    seed, disease = PAIRED_SAMPLES[label]
    f, o = paired_phantoms(seed, disease=disease)
    facts = {k: f.meta.get(k) for k in ("eye", "fundus_class", "oct_class", "disease_process")}
    return png_bytes(f.image), png_bytes(o.image), facts


@st.cache_data(show_spinner=False)
def sample_volume(label: str):
    """(volume float32 [D, H, W], metadata, eye, class) of a bundled phantom volume (no patient data)."""
    from ..volume import phantom_volume

    cls, seed = VOLUME_SAMPLES[label]
    return phantom_volume(cls, seed=seed)


@st.cache_data(show_spinner=False, max_entries=32)
def phantom_evaluation(name: str, sha256: str, n_per_class: int) -> dict:
    """`evaluate.on_phantoms.evaluate_on_phantoms`, once per (model, weights, size) per server: phantoms hold no
    patient data, so every session shares the result."""
    from ..evaluate.on_phantoms import evaluate_on_phantoms

    return evaluate_on_phantoms(cached_model(name), n_per_class=n_per_class)


def batch_key(files: list[tuple[str, bytes]]) -> str:
    """A key for a set of uploads (names + content), so a rerun finds the screened batch in the session."""
    import hashlib

    h = hashlib.sha256()
    for name, data in files:
        h.update(name.encode("utf-8", "replace"))
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


def quality_of(img: RetinalImage, modality: str | None = None):
    """The quality gate's verdict (with the detected modality), once per image and session."""
    from ..quality import assess_quality

    return memo("quality", (img.content_hash, modality), lambda: assess_quality(img, modality=modality), limit=64)
