"""Shared pieces of the phantom engine: the Phantom record, seeded random streams, patient metadata, helpers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image


@dataclass
class Phantom:
    """One synthetic image with its lesion masks.

    image:    fundus uint8 [H,W,3] RGB; OCT B-scan uint8 [H,W]; OCT volume float32 [D,H,W] in [0,1]
    masks:    lesion type -> bool array with the image's spatial shape (only lesions present; may be empty)
    label:    class name (from retina_core.labels, or "glaucoma"/"cataract"/"amd"/"normal"/"disease")
    modality: a Modality: fundus | oct | oct_volume
    meta:     JSON-able dict (seed, patient_id, eye, age, sex, geometry, lesion counts ...)
    """

    image: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    label: str = ""
    modality: str = ""
    meta: dict = field(default_factory=dict)


def _entropy(seed) -> list[int]:
    seed = int(seed)
    return [abs(seed), 1 if seed < 0 else 0]


def streams(seed, n: int, tag: int = 0) -> list[np.random.Generator]:
    """n independent generators derived from (seed, tag); same seed -> same streams.

    Separate streams keep e.g. the camera look identical for one seed whatever the label (no label shortcut).
    """
    ss = np.random.SeedSequence(_entropy(seed) + [int(tag)])
    return [np.random.default_rng(s) for s in ss.spawn(n)]


# age (mean, sd, lo, hi) and P(male) per disease family; correlations are realistic but only live in metadata
_DEMOGRAPHICS = {
    "normal": (55, 15, 20, 90, 0.48),
    "dr": (58, 11, 25, 85, 0.55),
    "dme": (60, 10, 30, 85, 0.55),
    "amd": (75, 7, 55, 95, 0.42),
    "drusen": (70, 8, 50, 92, 0.45),
    "cnv": (76, 7, 50, 95, 0.45),
    "csr": (44, 8, 25, 65, 0.78),
    "mh": (67, 7, 45, 85, 0.3),
    "glaucoma": (66, 10, 35, 92, 0.52),
    "cataract": (70, 9, 40, 95, 0.45),
}


def sample_patient(rng: np.random.Generator, family: str, eye: str | None = None) -> dict:
    mu, sd, lo, hi, p_male = _DEMOGRAPHICS.get(family, _DEMOGRAPHICS["normal"])
    age = int(np.clip(round(rng.normal(mu, sd)), lo, hi))
    sex = "M" if rng.random() < p_male else "F"
    pid = str(int(rng.integers(1_000_000, 9_999_999)))
    e = eye if eye in ("OD", "OS") else ("OD" if rng.random() < 0.5 else "OS")
    return {"patient_id": pid, "eye": e, "age": age, "sex": sex}


def merge_patient(sampled: dict, given: dict | None) -> dict:
    """Override sampled patient fields (patient_id, eye, age, sex) with the given ones (same virtual patient)."""
    out = dict(sampled)
    if given:
        for k in ("patient_id", "eye", "age", "sex"):
            if given.get(k) is not None:
                out[k] = given[k]
    return out


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], grid: tuple[int, int] | int) -> np.ndarray:
    """Zero-mean, ~unit-sd smooth random field: a coarse normal grid upsampled bicubically (fast, via Pillow)."""
    h, w = shape
    if isinstance(grid, int):
        grid = (grid, grid)
    gh, gw = max(2, int(grid[0])), max(2, int(grid[1]))
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    im = Image.fromarray(g).resize((w, h), Image.BICUBIC)
    out = np.asarray(im, dtype=np.float32)
    return out


def smoothstep(e0: float, e1: float, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def wrap_angle(a: float) -> float:
    return (a + math.pi) % (2 * math.pi) - math.pi


def to_jsonable(obj):
    """Convert numpy scalars/arrays/tuples inside meta into plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return round(float(obj), 4)
    if isinstance(obj, float):
        return round(obj, 4)
    return obj
