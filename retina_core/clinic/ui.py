"""Streamlit glue of the clinic pages (worklist, case review) and of the upload page's "Save to worklist".

One database engine per server process (`st.cache_resource`, opened and migrated on first use: a new install needs
no set-up step); images and heatmaps read back from the content store are kept per session (`retina_core.ui.memo`),
never in a cache shared between users.
"""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import numpy as np
import streamlit as st

from .. import ui
from ..errors import RetinaInputError
from .config import ClinicConfig, ClinicConfigError, load_config, safe_url
from .db import Clinic, open_clinic

DEMO_NOTE = ("**Demo mode**: nothing is stored (RETINA_MODE=demo), so there is no worklist and no review. "
             "Start the app without RETINA_MODE=demo to keep cases in the clinic database.")
REF_HELP = ("A pseudonym from your own key list, e.g. SCR-0042, or press *New reference*. Never a name, birth "
            "date or hospital number: 3-32 letters, digits, '-', '_' or '.', at least one digit.")


@st.cache_resource(show_spinner="Opening the clinic database (schema upgraded if needed)...")
def _open(url: str, data_dir: str, mode: str) -> Clinic:
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
        return _open(cfg.database_url, str(cfg.data_dir), cfg.mode)
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
    return ui.memo("clinic_image", stored_hash, lambda: clinic.store.get_image(stored_hash), limit=64)


def stored_heatmap(clinic: Clinic, heatmap_hash: str, size: tuple[int, int]) -> np.ndarray:
    """float32 [H, W] in [0, 1] of a stored heatmap at `size`, once per session."""
    return ui.memo("clinic_heatmap", (heatmap_hash, size), lambda: clinic.store.get_heatmap(heatmap_hash, size),
                   limit=128)


# ------------------------------------------------------------------------------------------- upload page
def _new_ref() -> None:
    from .privacy import new_case_ref

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
        c1, c2, c3 = st.columns([2, 1, 2])
        c1.text_input("Case reference (pseudonym)", key="save_case_ref", max_chars=32, placeholder="SCR-0042",
                      help=REF_HELP)
        c1.button("New reference", key="save_new_ref", on_click=_new_ref, icon=":material/casino:")
        visit = c2.date_input("Visit date", value=dt.date.today(), key="save_visit_date")
        c3.text_input("Saved by (name or staff code)", key="save_actor", value=st.session_state.get("clinic_name", ""))
        if any(img.source_format == "dicom" for _, img, _, _ in items):
            st.caption(":material/key: DICOM: the PatientID is stored only as a keyed hash (HMAC-SHA256 with the "
                       "site secret), so this patient's studies group together; with no reference typed, the "
                       "patient's latest case is used.")
        if not st.button("Save to worklist", key="save_worklist", type="primary", icon=":material/save:"):
            return
        try:
            saved = _save(cfg, items, st.session_state.get("save_case_ref"), visit, st.session_state.get("save_actor"))
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
        st.page_link("pages/case.py", label="Open the case for review", icon=":material/arrow_forward:")


def _save(cfg: ClinicConfig, items: list, ref: str | None, visit: dt.date, actor: str | None) -> list:
    from . import records
    from .privacy import dicom_patient_key, site_secret

    if actor and actor.strip():
        st.session_state["clinic_name"] = actor.strip()
    try:
        clinic = _open(cfg.database_url, str(cfg.data_dir), cfg.mode)
    except ClinicConfigError as exc:
        raise RetinaInputError(str(exc)) from None
    saved, case_ref = [], ref
    for data, img, found, eye in items:
        key = dicom_patient_key(data, site_secret(cfg)) if img.source_format == "dicom" else None
        s = records.save_reading(clinic, case_ref=case_ref, eye=eye, visit_date=visit, image=img, analyses=found,
                                 actor=actor, patient_key=key)
        case_ref = case_ref or s.case_ref       # later images of this upload join the first one's case
        saved.append(s)
    return saved
