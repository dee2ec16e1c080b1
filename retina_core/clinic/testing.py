"""Synthetic readings for tests and demos of the clinic, with no model run: a random image and a made-up
`Analysis` (phantom-like pixels, a smooth heatmap, given probabilities). No patient data."""
from __future__ import annotations

import hashlib

import numpy as np

from ..analysis import Analysis
from ..io.decode import RetinalImage
from ..models.loading import LOW_CONFIDENCE
from ..quality import Quality


def synthetic_image(seed: int, size: tuple[int, int] = (96, 128), grey: bool = True) -> RetinalImage:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=size, dtype=np.uint8)
    pixels = np.repeat(base[..., None], 3, axis=2) if grey else rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    digest = hashlib.sha256(pixels.tobytes() + b"synthetic").hexdigest()
    return RetinalImage(pixels=pixels, kind="image", source_format="png", content_hash=digest, grayscale=grey)


def synthetic_analysis(image: RetinalImage, probabilities: dict[str, float] | None, model: str = "oct_resnet18",
                       referable_classes: tuple[str, ...] = ("CNV", "DME"), method: str = "gradcam") -> Analysis:
    """One reading of `image`; probabilities None gives a "no result" reading (ungradable)."""
    h, w = image.pixels.shape[:2]
    gradable = probabilities is not None
    q = Quality(modality="oct", modality_scores={"oct": 1.0}, gradable=gradable, score=0.9 if gradable else 0.1,
                reasons=[] if gradable else ["image is blurred"],
                verdict="gradable" if gradable else "ungradable: retake or refer")
    if not gradable:
        return Analysis("oct", q, {}, None, None, model, "0" * 64, method, None, None, "No result: retake or refer",
                        image.content_hash, image.laterality, image.pixels, ["image is blurred"], "synthetic phantoms")
    label = max(probabilities, key=probabilities.get)
    yy, xx = np.mgrid[0:h, 0:w]
    heatmap = np.exp(-(((yy - h / 3) / (h / 5)) ** 2 + ((xx - w / 2) / (w / 5)) ** 2)).astype(np.float32)
    referable = label in referable_classes
    suggestion = (f"Refer to an eye specialist: findings suggest {label}." if referable else
                  f"Not referable by this model: findings suggest {label}. Routine follow-up.")
    return Analysis("oct", q, dict(probabilities), label, heatmap, model, "0" * 64, method, label, referable,
                    suggestion, image.content_hash, image.laterality, image.pixels, [],
                    "synthetic phantoms only (no real images)", confident=probabilities[label] >= LOW_CONFIDENCE)


TEST_PASSWORD = "test passphrase 1234"     # for test accounts only


def signed_in_state(clinic, username: str = "test-clinician", roles: tuple[str, ...] = ("clinician",),
                    display_name: str = "") -> dict:
    """Session-state entries of a browser session signed in as `username` (the account is created with
    TEST_PASSWORD if missing), for `AppTest.session_state`: {"auth_token": ...}."""
    from . import accounts

    try:
        accounts.get_user(clinic, username)
    except Exception:
        accounts.create_user(clinic, username, TEST_PASSWORD, roles=roles, display_name=display_name)
    token, _user = accounts.log_in(clinic, username, TEST_PASSWORD)
    return {"auth_token": token}
