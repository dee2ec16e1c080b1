"""Worklist: the stored cases, referable first; filters: awaiting review, visit dates, reviewer. Opens a case.
Researchers see it de-identified (case numbers, no references) and can export the signed labels as a data set."""
import pandas as pd
import streamlit as st

from retina_core.clinic import records
from retina_core.webapp import auth, clinic_pages, common

st.title("Worklist")
common.disclaimer()
clinic = clinic_pages.clinic_or_stop()
user = auth.require("cases", "The worklist")
deidentified = not user.can("identified")
clinic_pages.storage_caption(clinic)
auth.audit_view("view.worklist", "worklist", None, deidentified=deidentified)
if deidentified:
    st.caption(":material/visibility_off: De-identified view (researcher): case numbers instead of references, "
               "no links between a patient's cases, no free-text comments.")

ANYONE = "Anyone"
f1, f2, f3, f4, f5 = st.columns([1.2, 1.2, 1, 1, 1.4])
awaiting = f1.checkbox("Awaiting review only", key="wl_awaiting")
referable_first = f2.checkbox("Referable first", value=True, key="wl_referable")
date_from = f3.date_input("Visits from", value=None, key="wl_from")
date_to = f4.date_input("Visits to", value=None, key="wl_to")
reviewer = f5.selectbox("Signed by", [ANYONE] + records.reviewers(clinic), key="wl_reviewer")

rows = records.worklist(clinic, awaiting_only=awaiting, referable_first=referable_first, date_from=date_from,
                        date_to=date_to, reviewer=None if reviewer == ANYONE else reviewer, deidentified=deidentified)
if user.can("export"):
    clinic_pages.export_labels_button(clinic, user)
if not rows:
    st.info("No case matches. Readings enter the worklist from *Upload & diagnose* (Save to worklist)."
            if not records.worklist(clinic, limit=1) else "No case matches these filters.", icon=":material/inbox:")
    if user.can("analyze"):
        st.page_link("app_pages/upload.py", label="Upload & diagnose", icon=":material/upload_file:")
    st.stop()

st.dataframe(pd.DataFrame([{
    "Case": r.ref, "Eyes": ", ".join(r.eyes), "Last visit": r.last_visit, "Visits": r.visits, "Images": r.images,
    "Referable": "refer" if r.referable else "", "Low confidence": r.low_confidence or "", "Status": r.status,
    "Signed by": ", ".join(r.reviewers),
    "Same patient as": f"{r.linked_cases} other case(s)" if r.linked_cases else ""} for r in rows]),
    hide_index=True, width="stretch", key="wl_table")
st.caption(f"{len(rows)} case(s). 'Referable' means a suggestion at an eye's latest visit says refer; 'Low "
           "confidence' counts that visit's readings below their model's confident level (review those images "
           "yourself); 'awaiting review' counts the suggestions without a signed review.")

by_id = {r.case_id: r for r in rows}
pick = st.selectbox("Open a case", list(by_id), key="wl_open",
                    format_func=lambda i: f"{by_id[i].ref} · {by_id[i].status}"
                                          + (" · refer" if by_id[i].referable else ""))
if st.button("Open case", key="wl_open_button", type="primary", icon=":material/arrow_forward:"):
    st.session_state["clinic_case_id"] = pick
    st.switch_page("app_pages/case.py")
