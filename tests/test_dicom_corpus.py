"""pydicom's own test corpus through the decoder and the gate: nothing non-ophthalmic gets a retinal result (#29).

Every `*.dcm` of pydicom's bundled `test_files` (and pydicom-data's, when that package is installed; the files are
never downloaded) goes through `read_image`, the quality gate and, for 2-D images, `analyze`. Only
`RetinaInputError` may be raised; no patient value read by pydicom from the same file appears in any output; no
file whose Modality is non-ophthalmic gets a label or probabilities. The survey behind docs/dicom_corpus.md:

    .venv/bin/python tests/test_dicom_corpus.py          # prints the per-file table and the counts by reason
"""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from retina_core.analysis import analyze
from retina_core.errors import RetinaInputError
from retina_core.io.decode import RetinalImage, read_image
from retina_core.quality import GRADABLE, assess_quality

# Modality codes the DICOM standard gives to ophthalmic equipment (PS3.3 C.7.3.1.1.1; FA/FS are retired terms), and
# the generic captures whose pixels decide. Written out here, apart from retina_core's tables, so the test checks them.
OPHTHALMIC = {"OP", "OPT", "OPTENF", "OPTBSV", "OPM", "OPV", "OAM", "AR", "KER", "LEN", "SRF", "VA", "IOL", "FA", "FS"}
GENERIC = {"", "OT", "SC", "XC"}
# Elements that identify a patient, a visit or a site (DICOM PS3.15 Annex E style), looked for in every output.
PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "OtherPatientIDs",
                "OtherPatientNames", "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName",
                "IssuerOfPatientID", "PatientComments", "PatientAge", "InstitutionName", "InstitutionAddress",
                "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord",
                "NameOfPhysiciansReadingStudy", "AccessionNumber", "StudyID", "StudyDate", "SeriesDate",
                "AcquisitionDate", "ContentDate", "StationName", "DeviceSerialNumber", "StudyInstanceUID",
                "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


def corpus_files() -> list[Path]:
    """pydicom's bundled `test_files/*.dcm`, plus pydicom-data's `*.dcm` if it is installed (no download: pydicom's
    `get_testdata_files` would try to fetch the pydicom-data repository's files)."""
    from pydicom.data.data_manager import DATA_ROOT, DataTypes, external_data_sources

    files = sorted((Path(DATA_ROOT) / "test_files").glob("*.dcm"))
    for source in external_data_sources().values():
        try:
            files += sorted(Path(p) for p in source.get_paths("*.dcm", DataTypes.DATASET))
        except Exception:  # noqa: BLE001 - a broken optional data package must not hide the bundled corpus
            pass
    return files


def header_facts(path: Path) -> tuple[str, list[str]]:
    """The Modality code and the patient values of a file, as pydicom itself reads them (independent of retina_core).

    Values shorter than 4 characters ("M", "1", "CT1") or of one repeated character ("----") are left out: they
    would match ordinary words and numbers.
    Person names also count by each component ("DOE^JOHN" -> "DOE", "JOHN") of 4 characters or more."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - unreadable: no facts, retina_core must refuse it anyway
            return "", []
        modality = str(ds.get("Modality", "") or "").strip().upper()
        values: set[str] = set()
        for elem in ds.iterall():
            if elem.keyword not in PHI_KEYWORDS or elem.value in (None, ""):
                continue
            items = elem.value if elem.VM > 1 else [elem.value]
            for item in items:
                text = str(item).strip()
                values.add(text)
                values.update(part.strip() for part in re.split(r"[\^=]", text))
    return modality, sorted(v for v in values if len(v) >= 4 and len(set(v)) > 1)  # not "----", "0000"


def outputs_of(path: Path, caplog) -> dict:
    """Decode, gate and (2-D images) analyze one file; every string a user or a log could see, and the verdict."""
    out: dict = {"texts": [], "error": None, "img": None, "quality": None, "analysis": None}
    with caplog.at_level(logging.DEBUG):
        try:
            img = read_image(path)
        except RetinaInputError as exc:
            out["error"] = str(exc)
            out["texts"].append(str(exc))
        else:
            out["img"] = img
            q = assess_quality(img)
            out["quality"] = q
            out["texts"] += [repr(img), json.dumps(img.meta, default=str), q.verdict, *q.reasons,
                             json.dumps(q.features, default=str)]
            if img.kind == "image":
                a = analyze(img)
                out["analysis"] = a
                out["texts"] += [json.dumps(a.to_dict(), default=str), *a.notes, a.suggestion]
    out["texts"].append(caplog.text)
    return out


FILES = corpus_files()


def test_corpus_is_there():
    assert len(FILES) >= 70, "pydicom's bundled test corpus shrank or moved"
    assert any(p.name == "examples_jpeg2k.dcm" for p in FILES)


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_corpus_file_decodes_or_is_refused_and_never_gets_a_retinal_result(path, caplog):
    modality, phi = header_facts(path)
    out = outputs_of(path, caplog)  # anything but RetinaInputError fails the test here
    for text in out["texts"]:
        leaked = [v for v in phi if v in text]
        assert not leaked, f"patient values {leaked} appear in an output of {path.name}"
    if out["error"] is not None:
        assert len(out["error"]) > 20 and "Traceback" not in out["error"]
        return
    img, q, a = out["img"], out["quality"], out["analysis"]
    header = img.meta.get("header") or {}
    assert set(header) == {"format", "modality", "modality_name", "sop_class", "ophthalmic", "reason"}
    if modality not in OPHTHALMIC | GENERIC:
        assert header["ophthalmic"] is False
        assert q.modality == "not_retinal" and q.verdict != GRADABLE
        assert q.reasons == [f"DICOM Modality is {modality} ({header['modality_name']}), not an ophthalmic modality"]
    # None of pydicom's test files is a retina: whatever the header says, no file gets a result.
    assert not q.gradable
    if a is not None:
        assert a.label is None and a.probabilities == {} and a.heatmap is None


def test_ultrasound_read_as_dme_before_is_refused_even_with_a_modality_override():
    """examples_jpeg2k.dcm (Modality US) was read as an OCT B-scan and suggested DME (issue #29)."""
    path = next(p for p in FILES if p.name == "examples_jpeg2k.dcm")
    img = read_image(path)
    assert img.meta["header"]["modality"] == "US" and img.meta["header"]["sop_class"] == "Ultrasound Image Storage"
    for override in (None, "oct", "fundus"):
        a = analyze(img, modality=override)
        assert a.label is None and a.modality == "not_retinal"
        assert "DICOM Modality is US (ultrasound), not an ophthalmic modality" in a.to_dict()["quality"]["reasons"]
        a = analyze(img, model="oct_resnet18", modality=override)  # an explicit model does not skip the gate
        assert a.label is None


def test_dicom_with_a_tiff_preamble_is_read_as_dicom():
    """CT_small.dcm's 128-byte preamble is a TIFF header (a dual-format file): the DICOM header must still be read."""
    path = next(p for p in FILES if p.name == "CT_small.dcm")
    img = read_image(path)
    assert img.source_format == "dicom" and img.meta["header"]["modality"] == "CT"


# ----------------------------------------------------------------------------------------------------------------
# The header decides: same pixels, different Modality / SOP class
# ----------------------------------------------------------------------------------------------------------------

SOP = {"op": "1.2.840.10008.5.1.4.1.1.77.1.5.1", "opt": "1.2.840.10008.5.1.4.1.1.77.1.5.4",
       "sc": "1.2.840.10008.5.1.4.1.1.7", "us": "1.2.840.10008.5.1.4.1.1.6.1", "ct": "1.2.840.10008.5.1.4.1.1.2",
       "us_mf": "1.2.840.10008.5.1.4.1.1.3.1", "private": "1.2.826.0.1.3680043.9.9999.1"}


def synthetic_dicom(pixels: np.ndarray, modality: str | None, sop: str, frames: int | None = None) -> bytes:
    """A DICOM file built with pydicom around `pixels` (uint8 [H, W], [H, W, 3] or [F, H, W]), carrying patient data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("scan.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "ROE^JANE", "PID-777", "19510203"
    ds.InstitutionName = "Hospital Of Somewhere"
    ds.SOPClassUID, ds.SOPInstanceUID = sop, meta.MediaStorageSOPInstanceUID
    if modality is not None:
        ds.Modality = modality
    shape = pixels.shape[1:] if frames else pixels.shape
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    if frames:
        ds.NumberOfFrames = frames
    colour = len(shape) == 3
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def fundus_rgb():
    from retina_core.phantoms import fundus_phantom
    return fundus_phantom("Moderate", seed=101, size=256).image


@pytest.fixture(scope="module")
def oct_grey():
    from retina_core.phantoms import oct_phantom
    return oct_phantom("DME", seed=7, width=256, height=248).image


# (Modality, SOP class, what the header says, the tag named in the refusal). Same pixels in every row.
HEADER_CASES = [
    ("OP", "op", True, None),
    ("US", "op", False, "DICOM Modality is US (ultrasound)"),       # a non-ophthalmic Modality wins over the class
    ("US", "us", False, "DICOM Modality is US (ultrasound)"),
    ("CT", "sc", False, "DICOM Modality is CT (computed tomography)"),
    ("OT", "ct", False, "DICOM SOP Class is CT Image Storage"),     # a generic Modality, a non-ophthalmic class
    (None, "ct", False, "DICOM SOP Class is CT Image Storage"),
    ("OCT", "sc", False, "DICOM Modality is OCT (optical coherence tomography, non-ophthalmic"),
    ("OCT", "opt", True, None),          # a mislabelled ophthalmic tomography object: graded as OCT, the pixels decide
    ("OT", "sc", None, None),                                       # secondary capture: the pixels decide
    (None, "private", None, None),                                  # nothing known: the pixels decide
    ("ZZ", "sc", None, None),                                       # not a defined term: not kept, pixels decide
]


@pytest.mark.parametrize("modality, sop, ophthalmic, words", HEADER_CASES)
def test_header_summary_table(fundus_rgb, modality, sop, ophthalmic, words):
    img = read_image(synthetic_dicom(fundus_rgb, modality, SOP[sop]))
    header = img.meta["header"]
    assert header["ophthalmic"] is ophthalmic
    assert header["modality"] == (modality if modality not in (None, "ZZ") else None)
    q = assess_quality(img)
    if ophthalmic is False:
        assert q.modality == "not_retinal" and not q.gradable and q.reasons[0].startswith(words)
    elif sop == "opt":  # the class names an OCT: the fundus pixels are graded as an OCT B-scan (and fail there)
        assert q.modality == "oct" and "header_not_ophthalmic" not in q.features
    else:
        assert q.modality == "fundus" and q.gradable, q.reasons  # a clean phantom: the pixels pass
    text = repr(img) + json.dumps(img.meta) + " ".join(q.reasons)
    assert not any(v in text for v in ("ROE", "JANE", "PID-777", "19510203", "Somewhere"))


def test_same_oct_pixels_ultrasound_is_refused_ophthalmic_tomography_is_read(oct_grey):
    """The examples_jpeg2k case made on purpose: an OCT-looking B-scan is read with Modality OPT, refused with US."""
    read_as = {m: analyze(read_image(synthetic_dicom(oct_grey, m, SOP[s]))) for m, s in (("OPT", "opt"), ("US", "us"))}
    assert read_as["OPT"].modality == "oct" and read_as["OPT"].label is not None and read_as["OPT"].probabilities
    us = read_as["US"]
    assert us.modality == "not_retinal" and us.label is None and us.probabilities == {}
    assert us.notes == ["not a retinal image: no result",
                        "DICOM Modality is US (ultrasound), not an ophthalmic modality"]
    assert np.array_equal(read_as["OPT"].image, us.image)  # same pixels, the header alone decided


def test_multiframe_ultrasound_volume_is_refused_by_the_gate(oct_grey):
    vol = np.stack([oct_grey] * 4)
    q = {m: assess_quality(read_image(synthetic_dicom(vol, m, SOP[s], frames=4)))
         for m, s in (("OPT", "opt"), ("US", "us_mf"))}
    assert q["OPT"].modality == "oct_volume"
    assert q["US"].modality == "not_retinal" and not q["US"].gradable
    assert q["US"].reasons == ["DICOM Modality is US (ultrasound), not an ophthalmic modality"]


def test_images_without_a_header_are_judged_by_their_pixels(fundus_rgb):
    img = RetinalImage(fundus_rgb, "image", "png", "", False)
    assert "header" not in img.meta and assess_quality(img).gradable


# ----------------------------------------------------------------------------------------------------------------
# The survey reported in docs/dicom_corpus.md
# ----------------------------------------------------------------------------------------------------------------

_REFUSAL_GROUPS = (("contains no image", "no image (report, plan, waveform, structured document)"),
                   ("at least 32 pixels", "smaller than 32 px on a side"),
                   ("compressed DICOM is not supported", "compression without an installed decoder"),
                   ("incomplete or damaged", "damaged or truncated"),
                   ("not a supported image", "not recognised as DICOM (no preamble, implicit VR / big endian)"))


def survey(files: list[Path] | None = None) -> list[dict]:
    """One row per corpus file: name, Modality (as pydicom reads it), outcome ("refused" | "not retinal" |
    "ungradable" | "gradable"), and the group of its first reason."""
    rows = []
    for path in files or corpus_files():
        modality, _ = header_facts(path)
        try:
            img = read_image(path)
        except RetinaInputError as exc:
            msg = str(exc)
            group = next((g for key, g in _REFUSAL_GROUPS if key in msg), msg.split(".")[0])
            rows.append({"file": path.name, "modality": modality or "-", "outcome": "refused by the decoder",
                         "reason": group})
            continue
        q = assess_quality(img)
        reason = q.reasons[0] if q.reasons else ""
        if q.features.get("header_not_ophthalmic"):
            group = "header: " + reason.split(" (")[0] + " (not ophthalmic)"
        elif img.kind == "volume":
            group = f"volume gate (pixels): {reason}"
        else:
            group = f"image gate (pixels): {reason}"
        outcome = {"not_retinal": "not a retinal image"}.get(q.modality, q.verdict.split(":")[0])
        rows.append({"file": path.name, "modality": modality or "-", "outcome": outcome, "reason": group,
                     "kind": img.kind})
    return rows


def _main() -> None:
    logging.disable(logging.CRITICAL)  # the decoder's warnings (no patient data) would clutter the table
    rows = survey()
    print(f"| file | Modality | outcome | reason |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['modality']} | {r['outcome']} | {r['reason']} |")
    print(f"\n{len(rows)} files")
    for outcome, n in Counter(r["outcome"] for r in rows).most_common():
        print(f"\n{outcome}: {n}")
        for reason, m in Counter(r["reason"] for r in rows if r["outcome"] == outcome).most_common():
            print(f"  {m:3d}  {reason}")
    print("\nModalities:", ", ".join(f"{k} {v}" for k, v in Counter(r["modality"] for r in rows).most_common()))


if __name__ == "__main__":
    _main()
