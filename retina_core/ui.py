"""Streamlit glue shared by the pages: cached model loading, per-session result cache, samples, common widgets.

Pages stay thin: they lay out widgets and plots and call these helpers and the retina_core API.
Nothing patient-specific goes into a shared (cross-session) cache: models and phantom samples are shared,
uploaded images and their analyses live only in the session's own `st.session_state`.
"""
from __future__ import annotations

import io

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from PIL import Image

from . import DISCLAIMER
from .analysis import Analysis, analyze, get_model
from .errors import RetinaInputError
from .io.decode import RetinalImage, read_image
from .models import get_cfg, list_models, read_manifest

SAMPLES = {  # label shown -> (generator, class, seed)
    "Fundus phantom: moderate diabetic retinopathy": ("fundus", "Moderate", 11),
    "Fundus phantom: no diabetic retinopathy": ("fundus", "No DR", 12),
    "Fundus phantom: proliferative diabetic retinopathy": ("fundus", "Proliferative DR", 13),
    "OCT phantom: choroidal neovascularisation (CNV)": ("oct", "CNV", 21),
    "OCT phantom: diabetic macular oedema (DME)": ("oct", "DME", 22),
    "OCT phantom: drusen": ("oct", "DRUSEN", 23),
    "OCT phantom: normal": ("oct", "NORMAL", 24),
}


@st.cache_resource(show_spinner="Loading model weights (once per server)...")
def cached_model(name: str):
    """One read-only model copy per process, shared by all sessions (CUDA when present).

    Wraps `retina_core.get_model`, the same process-wide copy `analyze` uses when it picks a model itself."""
    return get_model(name)


@st.cache_resource
def model_status() -> dict[str, str | None]:
    """Start-up check: model name -> None when its weights load, else the reason it is unavailable."""
    status = {}
    for name in list_models():
        try:
            cached_model(name)
            status[name] = None
        except RetinaInputError as exc:
            status[name] = str(exc)
    return status


@st.cache_data(show_spinner=False)
def sample_png(label: str) -> bytes:
    """PNG bytes of a bundled sample (a deterministic phantom), so a demo needs no files."""
    from .phantoms import fundus_phantom, oct_phantom

    kind, cls, seed = SAMPLES[label]
    ph = fundus_phantom(cls, seed=seed, size=512) if kind == "fundus" else oct_phantom(cls, seed=seed)
    buf = io.BytesIO()
    Image.fromarray(ph.image).save(buf, format="PNG")
    return buf.getvalue()


def disclaimer() -> None:
    """The statement every page carries, with what the loaded weights were trained on."""
    st.warning(DISCLAIMER, icon=":material/science:")


def weights_caption(model_names: list[str] | None = None) -> None:
    manifest = read_manifest()
    for name in model_names or sorted(manifest):
        e = manifest.get(name)
        if e:
            st.caption(f"`{name}` weights `{e['sha256'][:12]}` trained on {e.get('data', 'unknown data')}"
                       f" ({e.get('metric_kind', '')} accuracy {e.get('heldout_metrics', {}).get('accuracy', float('nan')):.2f}).")


def decode_upload(data: bytes, name: str | None) -> RetinalImage:
    """Uploaded bytes -> RetinalImage through the one decoder, memoised per session by content."""
    cache = st.session_state.setdefault("_decoded", {})
    key = (hash(data), name)
    if key not in cache:
        cache[key] = read_image(data, name=name)
    return cache[key]


def analysis_for(img: RetinalImage, model: str | None, method: str, modality: str | None) -> Analysis:
    """Analyse once per (content hash, model, method, modality) in this session; reruns reuse the result."""
    cache = st.session_state.setdefault("_analyses", {})
    key = (img.content_hash, model, method, modality)
    if key not in cache:
        cache[key] = analyze(img, cached_model(model) if model else None, method=method, modality=modality)
    return cache[key]


def probability_chart(a: Analysis) -> go.Figure:
    """Horizontal bars of the calibrated probabilities, the predicted class highlighted."""
    classes = list(a.probabilities)
    probs = [a.probabilities[c] for c in classes]
    colours = ["#1f6f8b" if c == a.label else "#9bb7c4" for c in classes]
    fig = go.Figure(go.Bar(x=probs, y=classes, orientation="h", marker_color=colours,
                           text=[f"{p:.1%}" for p in probs], textposition="outside", cliponaxis=False))
    fig.update_layout(xaxis=dict(range=[0, 1.08], tickformat=".0%", title="calibrated probability"),
                      yaxis=dict(autorange="reversed"), height=60 + 38 * len(classes),
                      margin=dict(l=10, r=30, t=10, b=40))
    return fig


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def model_choices(modality: str | None = None) -> list[str]:
    return [n for n in list_models() if modality is None or get_cfg(n).modality == modality]
