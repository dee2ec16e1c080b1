"""Streamlit glue of the clinic pages (worklist, case review) and of the upload page's "Save to worklist".

One database engine per server process (`st.cache_resource`, opened and migrated on first use: a new install needs
no set-up step); images and heatmaps read back from the content store are kept per session (`common.memo`),
never in a cache shared between users.
"""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import numpy as np
import streamlit as st

from ..clinic.config import ClinicConfig, ClinicConfigError, load_config, safe_url
from ..clinic.db import Clinic, open_clinic
from ..errors import RetinaInputError
from . import common

DEMO_NOTE = ("**Demo mode**: nothing is stored (RETINA_MODE=demo), so there is no worklist and no review. "
             "Start the app without RETINA_MODE=demo to keep cases in the clinic database.")
SESSION_USER = "auth_user"      # the signed-in accounts.UserView of this browser session (set by webapp.auth)
REF_HELP = ("A pseudonym from your own key list, e.g. SCR-0042, or press *New reference*. Never a name, birth "
            "date or hospital number: 3-32 letters, digits, '-', '_' or '.', at least one digit.")


@st.cache_resource(show_spinner="Opening the clinic database (schema upgraded if needed)...")
def open_cached(url: str, data_dir: str, mode: str) -> Clinic:
    return open_clinic(ClinicConfig(mode=mode, data_dir=Path(data_dir), database_url=url))


def config_or_error() -> ClinicConfig | None:
    try:
        return load_config()
    except ClinicConfigError as exc:
        st.error(str(exc), icon=":material/error:")
        return None


def clinic_or_stop() -> Clinic:
    """The clinic of this server (from the environment), or a message and `st.stop()` (demo mode, or a database
    that cannot be opened)."""
    cfg = config_or_error()
    if cfg is None:
        st.stop()
    if not cfg.persistent:
        st.info(DEMO_NOTE, icon=":material/science:")
        st.stop()
    try:
        return open_cached(cfg.database_url, str(cfg.data_dir), cfg.mode)
    except ClinicConfigError as exc:
        st.error(str(exc), icon=":material/error:")
        st.stop()


def storage_caption(clinic: Clinic) -> None:
    cfg = clinic.config
    st.caption(f":material/database: Records: `{safe_url(cfg.database_url)}` · images and heatmaps: "
               f"`{cfg.store_dir}` · mode **{cfg.mode}**. No names, birth dates or DICOM identifiers are stored: "
               "cases carry pseudonyms, a DICOM PatientID only a keyed hash.")
    if cfg.mode == "dev" and not os.environ.get("RETINA_SITE_SECRET"):
        st.caption(":material/key: Dev mode: DICOM patient IDs are keyed with a generated per-install secret "
                   "(not for production: set RETINA_SITE_SECRET and RETINA_MODE=production).")


def stored_pixels(clinic: Clinic, stored_hash: str) -> np.ndarray:
    """uint8 [H, W, 3] of a stored image, once per session."""
    return common.memo("clinic_image", stored_hash, lambda: clinic.store.get_image(stored_hash), limit=64)


def stored_heatmap(clinic: Clinic, heatmap_hash: str, size: tuple[int, int]) -> np.ndarray:
    """float32 [H, W] in [0, 1] of a stored heatmap at `size`, once per session."""
    return common.memo("clinic_heatmap", (heatmap_hash, size), lambda: clinic.store.get_heatmap(heatmap_hash, size),
                       limit=128)


def export_labels_button(clinic: Clinic, user) -> None:
    """The researcher's export of signed reviews as a labelled data set (`clinic export`'s layout), zipped in
    memory when the button is clicked (a temporary folder is used and removed)."""
    def build() -> bytes:
        import io
        import tempfile
        import zipfile

        from ..clinic.export import export_labels

        buf = io.BytesIO()
        with tempfile.TemporaryDirectory(prefix="retina_export_") as tmp:
            export_labels(clinic, tmp, actor=user)
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                for f in sorted(Path(tmp).rglob("*")):
                    if f.is_file():
                        zf.write(f, f.relative_to(tmp).as_posix())
        return buf.getvalue()

    st.download_button("Export signed labels as a training set (ZIP)", build, file_name="retina_signed_labels.zip",
                       mime="application/zip", key="export_labels", icon=":material/download:", on_click="ignore",
                       help="One folder per model: labels.csv + images/, the layout `python -m retina_core train "
                            "--data` reads; export.json says what is inside. No references, comments or reviewers.")


def result_downloads(clinic: Clinic, analysis_id: int, has_heatmap: bool, user, where=st) -> None:
    """The case page's per-analysis results in hospital formats (see docs/result_formats.md): FHIR R4 JSON, a DICOM
    SR and the heatmap as a DICOM object, each built when clicked and written to the audit trail for `user`."""
    from ..clinic import accounts, interop

    def build(fmt: str) -> bytes:
        ctx = interop.result_context(clinic, analysis_id, pixels=fmt != "fhir")
        data = (interop.fhir_json(ctx).encode() if fmt == "fhir" else
                interop.dicom_pair(ctx, heatmap=has_heatmap)[0 if fmt == "sr" else 1])   # SR cites the heatmap
        accounts.record(clinic, user, "export_results", "analysis", analysis_id, formats=[fmt])
        return data

    cols = where.columns(3)
    cols[0].download_button("FHIR R4 report", lambda: build("fhir"), file_name=f"analysis-{analysis_id}.fhir.json",
                            mime="application/fhir+json", key=f"dl_fhir_{analysis_id}", on_click="ignore",
                            icon=":material/data_object:", help="DiagnosticReport + Observations (FHIR R4)")
    cols[1].download_button("DICOM SR", lambda: build("sr"), file_name=f"analysis-{analysis_id}.sr.dcm",
                            mime="application/dicom", key=f"dl_sr_{analysis_id}", on_click="ignore",
                            icon=":material/description:", help="Enhanced SR (TID 1500), in the source study")
    if has_heatmap:
        cols[2].download_button("Heatmap (DICOM)", lambda: build("heatmap"),
                                file_name=f"analysis-{analysis_id}.heatmap.dcm", mime="application/dicom",
                                key=f"dl_hm_{analysis_id}", on_click="ignore", icon=":material/image:",
                                help="Secondary capture of the heatmap over the image, in the source study")


# ------------------------------------------------------------------------------------------- upload page
def _new_ref() -> None:
    from ..clinic.privacy import new_case_ref

    st.session_state["save_case_ref"] = new_case_ref()


def save_to_worklist(items: list) -> None:
    """The upload page's optional "Save to worklist": `items` = [(uploaded bytes, RetinalImage, [Analysis], eye)].
    Nothing is opened or written until the button is pressed."""
    if not items:
        return
    cfg = config_or_error()
    if cfg is None:
        return
    with st.expander("Save to worklist", icon=":material/playlist_add:"):
        if not cfg.persistent:
            st.caption(DEMO_NOTE)
            return
        st.caption("Keeps these readings, heatmaps and images in the clinic database under a case, eye and visit "
                   "date, for review and sign-off on the *Case review* page. " + REF_HELP)
        user = st.session_state.get(SESSION_USER)
        if user is None or not user.can("save"):
            st.caption("Saving readings needs the clinician role.")
            return
        c1, c2, c3 = st.columns([2, 1, 2])
        c1.text_input("Case reference (pseudonym)", key="save_case_ref", max_chars=32, placeholder="SCR-0042",
                      help=REF_HELP)
        c1.button("New reference", key="save_new_ref", on_click=_new_ref, icon=":material/casino:")
        visit = c2.date_input("Visit date", value=dt.date.today(), key="save_visit_date")
        c3.markdown(f"Saved by **{user.label}**")
        if any(img.source_format == "dicom" for _, img, _, _ in items):
            st.caption(":material/key: DICOM: the PatientID is stored only as a keyed hash (HMAC-SHA256 with the "
                       "site secret), so this patient's studies group together; with no reference typed, the "
                       "patient's latest case is used.")
        if not st.button("Save to worklist", key="save_worklist", type="primary", icon=":material/save:"):
            return
        try:
            saved = _save(cfg, items, st.session_state.get("save_case_ref"), visit, user)
        except RetinaInputError as exc:
            st.error(str(exc), icon=":material/error:")
            return
        new = sum(s.new_analyses for s in saved)
        st.success(f"Saved to case **{saved[0].case_ref}**: {len(saved)} image(s), {new} new reading(s)"
                   + ("" if new else " (already saved)") + ".", icon=":material/check_circle:")
        linked = sorted({r for s in saved for r in s.linked_refs})
        if linked:
            st.caption("Same patient (keyed DICOM PatientID) as case(s): " + ", ".join(linked))
        st.session_state["clinic_case_id"] = saved[0].case_id
        st.page_link("app_pages/case.py", label="Open the case for review", icon=":material/arrow_forward:")


def _save(cfg: ClinicConfig, items: list, ref: str | None, visit: dt.date, user) -> list:
    from ..clinic import records
    from ..clinic.interop import dicom_refs_from_bytes
    from ..clinic.privacy import dicom_patient_key, site_secret

    try:
        clinic = open_cached(cfg.database_url, str(cfg.data_dir), cfg.mode)
    except ClinicConfigError as exc:
        raise RetinaInputError(str(exc)) from None
    saved, case_ref = [], ref
    for data, img, found, eye in items:
        dicom = img.source_format == "dicom"
        key = dicom_patient_key(data, site_secret(cfg)) if dicom else None
        s = records.save_reading(clinic, case_ref=case_ref, eye=eye, visit_date=visit, image=img, analyses=found,
                                 user=user, patient_key=key, dicom_refs=dicom_refs_from_bytes(data) if dicom else None)
        case_ref = case_ref or s.case_ref       # later images of this upload join the first one's case
        saved.append(s)
    return saved
