"""Per-eye and per-patient reports: a real PDF, grouped by eye, with provenance and the disclaimer, and no patient
data even when the input was a DICOM full of it."""
import datetime as dt
import json
import re
import zlib

import numpy as np
import pytest

from retina_core import DISCLAIMER, analyze, read_image
from retina_core.report import ReportItem, report_dict, report_json, report_pdf, split_by_eye


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from tests.test_app import use_test_weights

    with use_test_weights(tmp_path_factory.mktemp("weights")) as d:
        yield d


@pytest.fixture(scope="module")
def items(weights, fundus_png, oct_png):
    from tests.test_decode import dicom_bytes

    fundus = analyze(read_image(fundus_png))
    oct_ = analyze(read_image(oct_png))
    grey = np.asarray(read_image(oct_png).pixels[..., 0])
    dicom = analyze(read_image(dicom_bytes(grey, modality="OPT", laterality="L")))   # PatientName DOE^JOHN etc.
    return [ReportItem(oct_, "OS", "Image 2"), ReportItem(fundus, "OD", "Image 1"), ReportItem(dicom, "OS", "Image 3")]


def _pdf_text(pdf: bytes) -> bytes:
    """The text drawn on the PDF's pages: Flate streams inflated, the string pieces of each text object (BT..ET)
    joined (matplotlib kerns glyphs apart and switches fonts for some, e.g. "ff"), one line per text object; plus
    the raw bytes outside the streams (metadata, dictionaries). Stream bodies are left out of the raw part: a
    compressed image is random bytes, which sooner or later spell a short name such as "DOE" by chance."""
    out = [re.sub(rb"stream\r?\n.*?\r?\nendstream", b"stream endstream", pdf, flags=re.S)]
    for m in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", pdf, re.S):
        try:
            body = zlib.decompress(m.group(1))
        except zlib.error:
            body = m.group(1)                                        # an uncompressed stream: read it as it is
        for block in re.finditer(rb"BT(.*?)ET", body, re.S):       # one text object = one line of text
            pieces = re.findall(rb"\(((?:\\.|[^\\)])*)\)", block.group(1))
            out.append(b"".join(p.replace(b"\\(", b"(").replace(b"\\)", b")") for p in pieces))
    return b"\n".join(out)


def test_patient_pdf_is_a_pdf_with_one_page_per_image_plus_summary(items):
    pdf = report_pdf(items, "patient", created=dt.datetime(2025, 1, 2, 3, 4, tzinfo=dt.timezone.utc))
    assert pdf.startswith(b"%PDF")
    text = _pdf_text(pdf)
    assert b"not a medical device" in text and b"2025-01-02 03:04 UTC" in text
    for it in items:
        assert it.analysis.weights_sha256[:16].encode() in text      # model and weights version on the page
    assert len(re.findall(rb"/Type\s*/Page\b", pdf)) == 1 + len(items)


def test_no_patient_data_in_pdf_or_json(items):
    pdf_text = _pdf_text(report_pdf(items, "patient")).upper()
    js = report_json(items, "patient").upper()
    for phi in (b"DOE", b"JOHN", b"PID-12345", b"19450317", b"ELSEWHERE", b"HOUSE", b"ACC-998877"):
        assert phi not in pdf_text and phi not in js
    assert b"IMAGE 3" in pdf_text          # the positive control: the DICOM's page is there, identified by position
    assert b"FUNDUS_MODERATE" not in js and b"OCT_CNV" not in js    # file names are left out too


def test_json_groups_by_eye_with_provenance(items):
    d = report_dict(items, "patient")
    assert d["disclaimer"] == DISCLAIMER and d["contains_patient_data"] is False
    assert list(d["eyes"]) == ["OD", "OS"] and len(d["eyes"]["OS"]) == 2
    first = d["eyes"]["OD"][0]
    assert first["image"] == "Image 1" and first["eye"] == "OD" and "laterality" not in first
    assert abs(sum(first["probabilities"].values()) - 1) < 1e-6
    assert set(d["models"]) == {it.analysis.model for it in items}
    assert all(p["weights_sha256"] for p in d["models"].values())
    json.loads(report_json(items))     # valid JSON bytes


def test_per_eye_reports(items):
    by_eye = split_by_eye(items)
    assert list(by_eye) == ["OD", "OS"]
    pdf = report_pdf(by_eye["OS"], "eye")
    assert pdf.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page\b", pdf)) == 1 + 2
    assert report_dict(by_eye["OD"], "eye")["report"] == "retina_core per-eye report"


def test_ungradable_image_is_reported_as_no_result(weights):
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(buf, format="PNG")
    a = analyze(read_image(buf.getvalue()))
    assert not a.has_result
    pdf = report_pdf([ReportItem(a, None)], "eye")
    assert pdf.startswith(b"%PDF") and b"No heatmap" in _pdf_text(pdf)
    assert report_dict([ReportItem(a, None)])["eyes"]["unspecified"][0]["label"] is None


def test_bad_arguments():
    with pytest.raises(ValueError):
        report_pdf([], "patient")
    with pytest.raises(ValueError):
        report_dict([], "household")


def test_a_long_provenance_shrinks_the_text_to_stay_above_the_footer():
    """A reading's text block (suggestion, provenance with its failed external checks, notes) is set smaller when
    it would otherwise run into the page's footer."""
    import textwrap

    from retina_core.report import TEXT_BOTTOM, TEXT_TOP, _fitting_size

    short = ["Suggestion: normal.", "Quality: gradable"]
    assert _fitting_size(short, TEXT_TOP, TEXT_BOTTOM) == (8.0, 120)
    long = short + ["Model trained on: " + "a check that did not hold elsewhere; " * 20, "Note: " + "x " * 150]
    size, width = _fitting_size(long, TEXT_TOP, TEXT_BOTTOM)
    assert size < 8.0 and width > 120
    used = sum(len(textwrap.wrap(t, width)) * (size * 0.0021 + 0.004) + 0.004 for t in long)
    assert TEXT_TOP - used >= TEXT_BOTTOM
