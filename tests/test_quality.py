"""Quality gate: modality detection, refusal of non-retinal photos, gradability of clean vs degraded phantoms.

Run: .venv/bin/python -m pytest -q tests/test_quality.py
"""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from retina_core.errors import RetinaInputError
from retina_core.io.decode import RetinalImage
from retina_core.quality import (GRADABLE, NOT_RETINAL, UNGRADABLE, Quality, assess_quality, degrade, gate_roc,
                                 roc_auc)

phantoms = pytest.importorskip("retina_core.phantoms")


def as_image(a: np.ndarray, hint: str | None = None) -> RetinalImage:
    grey = a.ndim == 2
    rgb = np.repeat(a[..., None], 3, axis=2) if grey else a[..., :3]
    return RetinalImage(np.ascontiguousarray(rgb, dtype=np.uint8), "image", "png", "0" * 64, grey, modality_hint=hint)


def fundus(label="No DR", seed=0, size=256) -> np.ndarray:
    return phantoms.fundus_phantom(label, seed, size=size).image


def oct_scan(label="NORMAL", seed=0, width=256, height=248) -> np.ndarray:
    return phantoms.oct_phantom(label, seed, width=width, height=height).image


def test_real_fundus_photograph_is_gradable():
    q = assess_quality(as_image(data.retina()))
    assert isinstance(q, Quality)
    assert q.modality == "fundus" and q.gradable and q.verdict == GRADABLE and q.score >= 0.9
    assert q.modality_scores["fundus"] > q.modality_scores["oct"]


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "camera", "rocket", "noise", "grey_noise"])
def test_non_retinal_photos_are_refused(name):
    rng = np.random.default_rng(0)
    if name == "noise":
        a = (rng.random((300, 400, 3)) * 255).astype(np.uint8)
    elif name == "grey_noise":
        a = (rng.random((300, 400)) * 255).astype(np.uint8)
    else:
        a = getattr(data, name)()
    q = assess_quality(as_image(a))
    assert q.modality == "not_retinal" and not q.gradable and q.score == 0.0
    assert q.verdict == NOT_RETINAL and q.reasons and all(isinstance(r, str) for r in q.reasons)


@pytest.mark.parametrize("label", ["No DR", "Moderate", "Proliferative DR", "cataract", "glaucoma"])
def test_fundus_phantoms_detected_and_gradable(label):
    q = assess_quality(as_image(fundus(label, seed=3)))
    assert q.modality == "fundus" and q.gradable, (q.reasons, q.features)


@pytest.mark.parametrize("label", ["NORMAL", "CNV", "DME", "DRUSEN", "MH", "CSR"])
def test_oct_phantoms_detected_and_gradable(label):
    q = assess_quality(as_image(oct_scan(label, seed=3)))
    assert q.modality == "oct" and q.gradable, (q.reasons, q.features)


@pytest.mark.parametrize("modality, kind, words", [
    ("fundus", "blur", "blurred"), ("fundus", "dark", "too dark"), ("fundus", "crop", "cut off"),
    ("oct", "blur", "blurred"), ("oct", "dark", "weak"), ("oct", "crop", "cut off")])
def test_degradations_flagged_with_plain_reasons(modality, kind, words):
    clean = fundus(seed=5) if modality == "fundus" else oct_scan(seed=5)
    q = assess_quality(as_image(degrade(clean, kind, modality)))
    assert not q.gradable and q.verdict in (UNGRADABLE, NOT_RETINAL)
    if q.verdict == UNGRADABLE:
        assert q.modality == modality and any(words in r for r in q.reasons), q.reasons


def test_gate_roc_auc_clean_vs_degraded():
    result = gate_roc(n=6, size=192, seed=11)  # 12 clean, 36 degraded phantoms, held-out seeds
    assert result["n_clean"] == 12 and result["n_degraded"] == 36
    assert result["auc"] >= 0.9, result
    assert result["clean_gradable"] >= 0.8 and result["degraded_flagged"] >= 0.8, result


def test_roc_auc_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    pos, neg = list(rng.random(20) + 0.3), list(np.round(rng.random(30), 1))
    expected = roc_auc_score([1] * 20 + [0] * 30, pos + neg)
    assert abs(roc_auc(pos, neg) - expected) < 1e-12


def test_user_override_and_dicom_hint():
    q = assess_quality(as_image(data.astronaut()), modality="fundus")  # the user insists: graded, not detected
    assert q.modality == "fundus" and any("set by the user" in r for r in q.reasons)
    q = assess_quality(as_image(oct_scan()), modality="oct")
    assert q.modality == "oct" and q.gradable
    q = assess_quality(as_image(oct_scan(), hint="oct"))
    assert q.modality == "oct" and any("DICOM" in r for r in q.reasons)
    with pytest.raises(RetinaInputError):
        assess_quality(as_image(oct_scan()), modality="xray")


def test_volume_is_graded_as_oct_volume():
    slices = [oct_scan(seed=s).astype(np.float32) / 255 for s in range(5)]
    vol = RetinalImage(np.stack(slices), "volume", "nifti", "0" * 64, True)
    q = assess_quality(vol)
    assert q.modality == "oct_volume" and q.gradable and q.modality_scores["oct_volume"] == 1.0
    dark = RetinalImage(np.stack(slices) * 0.2, "volume", "nifti", "0" * 64, True)
    assert not assess_quality(dark).gradable


def test_quality_works_on_decoded_files():
    import io

    from PIL import Image

    from retina_core.io.decode import read_image
    buf = io.BytesIO()
    Image.fromarray(oct_scan(width=512, height=496)).save(buf, "JPEG", quality=85)  # Kermany-like greyscale JPEG
    img = read_image(buf.getvalue())
    q = assess_quality(img)
    assert img.grayscale and q.modality == "oct" and q.gradable, (q.reasons, q.features)


def test_oct_with_white_registration_padding():
    """Kermany/Spectralis exports often pad the flattened scan with white corners: still an OCT, still gradable."""
    im = oct_scan(seed=4, width=512, height=496).copy()
    h, w = im.shape
    yy, xx = np.mgrid[0:h, 0:w]
    im[yy < 120 - xx * 0.4] = 255
    im[yy < 100 - (w - 1 - xx) * 0.3] = 255
    q = assess_quality(as_image(im))
    assert q.modality == "oct" and q.gradable, (q.reasons, q.features)


def test_fast_filters_equal_scipy():
    """The OpenCV Gaussian and cross-structure erosion / dilation the gate uses equal scipy.ndimage's."""
    from scipy import ndimage as ndi

    from retina_core.quality import _channels, _dilate, _erode, _gauss

    rng = np.random.default_rng(0)
    for t in range(12):
        h, w = (int(v) for v in rng.integers(20, 200, 2))
        g = rng.random((h, w)).astype(np.float32)
        for sigma in (0.5, 1.0, 1.5, 2.0, 4.0):
            assert np.abs(_gauss(g, sigma) - ndi.gaussian_filter(g, sigma)).max() < 1e-6
        m = ndi.gaussian_filter(g, 3) > np.float32(rng.uniform(0.45, 0.55))
        if t == 0:
            m[:] = True   # erosion from the image frame counts too
        for it in (1, 2, 10):
            assert np.array_equal(_erode(m, it), ndi.binary_erosion(m, iterations=it))
            assert np.array_equal(_dilate(m, it), ndi.binary_dilation(m, iterations=it))
    # the field of view: largest component, holes filled, as scipy's label / binary_fill_holes give it
    from retina_core.labels import DR_GRADES
    from retina_core.quality import _field_mask, _otsu

    for seed in range(3):
        work = fundus(DR_GRADES[seed], seed=seed).astype(np.float32) / 255
        work[100:110, 120:130] = 0                                        # a hole inside the field
        vmax = work.max(axis=2)
        t = float(np.clip(_otsu(vmax) * 0.5, 0.015, 0.15))
        m = ndi.binary_opening(vmax > t, iterations=2)
        labels, n = ndi.label(m)
        m = labels == int(np.argmax(ndi.sum(m, labels, index=np.arange(1, n + 1)))) + 1
        assert np.array_equal(_field_mask(work)[0], ndi.binary_fill_holes(m))
        hist = np.histogram(vmax, bins=128, range=(0.0, 1.0))[0]
        centres = (np.arange(128) + 0.5) / 128
        w0, m0 = np.cumsum(hist), np.cumsum(hist * centres)
        between = w0 * (w0[-1] - w0) * (m0 / np.maximum(w0, 1) - (m0[-1] - m0) / np.maximum(w0[-1] - w0, 1)) ** 2
        assert _otsu(vmax) == pytest.approx(centres[int(np.argmax(between))])
    work = rng.random((30, 40, 3)).astype(np.float32)
    hi, lo, mean = _channels(work)
    assert np.array_equal(hi, work.max(axis=2)) and np.array_equal(lo, work.min(axis=2))
    assert np.allclose(mean, work.mean(axis=2), atol=1e-7)


def test_greyscale_image_is_never_a_fundus_but_can_be_graded_as_one():
    """A greyscale image scores 0 as a fundus photograph (no red-dominant field); a red-free photograph the user
    calls a fundus is still graded with the fundus features."""
    red_free = np.ascontiguousarray(fundus("Moderate", seed=2)[..., 1])
    q = assess_quality(as_image(red_free))
    assert q.modality_scores["fundus"] == 0.0 and q.modality != "fundus"
    forced = assess_quality(as_image(red_free), modality="fundus")
    assert forced.modality == "fundus" and "fundus_circle_iou" in forced.features
    assert forced.features["fundus_circle_iou"] > 0.8


def test_convex_hull_from_row_ends_equals_the_hull_of_every_pixel():
    import cv2

    from retina_core.quality import _convex_hull

    def every_pixel(mask):
        out = np.zeros(mask.shape, np.uint8)
        cv2.fillConvexPoly(out, cv2.convexHull(cv2.findNonZero(mask.astype(np.uint8))), 1)
        return out > 0

    rng = np.random.default_rng(1)
    for _ in range(60):
        h, w = rng.integers(5, 200, 2)
        m = rng.random((h, w)) < 0.002
        for _ in range(rng.integers(1, 5)):
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            m[y0:y0 + rng.integers(1, 60), x0:x0 + rng.integers(1, 60)] = True
        assert np.array_equal(_convex_hull(m), every_pixel(m))
    empty = np.zeros((9, 9), bool)
    assert not _convex_hull(empty).any()


def test_hazy_only_means_refused_for_blur_or_low_contrast_alone():
    from retina_core.quality import hazy_only

    def q(gradable, modality="fundus", **subs):
        return Quality(modality, {}, gradable, min(subs.values()), [], GRADABLE if gradable else UNGRADABLE,
                       {f"sub_{k}": v for k, v in subs.items()})

    assert hazy_only(q(False, focus=0.1, illumination=1.0, field=1.0, contrast=0.9))
    assert hazy_only(q(False, focus=0.2, illumination=0.8, field=1.0, contrast=0.3))
    assert not hazy_only(q(False, focus=0.1, illumination=0.2, field=1.0, contrast=0.9))   # dark as well
    assert not hazy_only(q(False, focus=1.0, illumination=1.0, field=0.1, contrast=1.0))   # cut off
    assert not hazy_only(q(True, focus=0.9, illumination=1.0, field=1.0, contrast=0.9))
    assert not hazy_only(q(False, "oct", focus=0.1, signal=1.0, cutoff=1.0, contrast=1.0))


def test_a_hazy_reading_shows_media_opacity_and_withholds_every_other_answer():
    from retina_core.analysis import HAZY_NOTE, Reading, finish_reading, get_model, reads_media_opacity

    model = get_model("fundus_resnet18_head")
    assert reads_media_opacity(model) and not reads_media_opacity(get_model("fundus_dr_effnet_b0"))
    img = RetinalImage(pixels=np.zeros((32, 32, 3), np.uint8), kind="image", source_format="png",
                       content_hash="0" * 64, grayscale=False)
    quality = Quality("fundus", {}, False, 0.1, ["image is blurred"], UNGRADABLE,
                      {"sub_focus": 0.1, "sub_illumination": 1.0, "sub_field": 1.0, "sub_contrast": 1.0})
    plan = Reading(img, quality, model, "gradcam", None, hazy=True)
    classes = list(model.cfg.classes)
    heatmap = np.ones((32, 32), np.float32)
    p = np.full(len(classes), 0.1)
    p[classes.index("cataract")] = 0.7
    a = finish_reading(plan, heatmap, p, classes.index("cataract"))
    assert a.label == "cataract" and a.referable and HAZY_NOTE in a.notes
    p = np.full(len(classes), 0.1)
    p[classes.index("normal")] = 0.7
    a = finish_reading(plan, heatmap, p, classes.index("normal"))
    assert not a.has_result and a.referable is None and "(its answer was normal)" in a.notes[-1]
