"""Case review: each eye's images over visits, the stored suggestions with heatmaps, trust and training notes, the
change since the last visit, and a versioned review per suggestion (agree / disagree / corrected grade, sign).
Clinicians review and sign; researchers read the case de-identified, without the review form."""
import streamlit as st

from retina_core.analysis import NO_RESULT
from retina_core.clinic import records
from retina_core.errors import RetinaInputError
from retina_core.explain.overlay import overlay
from retina_core.modality import Modality
from retina_core.webapp import auth, clinic_pages, common

DECISIONS = {"Agree": "agree", "Disagree": "disagree", "Corrected grade": "corrected"}

st.title("Case review")
common.disclaimer()
clinic = clinic_pages.clinic_or_stop()
user = auth.require("cases", "Case review")
deidentified = not user.can("identified")

rows = records.worklist(clinic, referable_first=False, deidentified=deidentified)
if not rows:
    st.info("No cases yet. Readings enter the worklist from *Upload & diagnose* (Save to worklist).",
            icon=":material/inbox:")
    if user.can("analyze"):
        st.page_link("app_pages/upload.py", label="Upload & diagnose", icon=":material/upload_file:")
    st.stop()
by_id = {r.case_id: r for r in rows}
wanted = st.session_state.get("clinic_case_id")
with st.sidebar:
    case_id = st.selectbox("Case", list(by_id), index=list(by_id).index(wanted) if wanted in by_id else 0,
                           format_func=lambda i: by_id[i].ref, key="case_pick")
    alpha = st.slider("Heatmap opacity", 0.0, 1.0, 0.45, 0.05, key="case_alpha")
st.session_state["clinic_case_id"] = case_id

flash = st.session_state.pop("clinic_flash", None)
if flash:
    (st.warning if flash[0] == "warning" else st.success)(flash[1])

view = records.case_view(clinic, case_id)
if deidentified:
    view = records.deidentified(view)
auth.audit_view("view.case", "case", case_id, deidentified=deidentified)
st.subheader(view.ref if deidentified else f"Case {view.ref}")
if deidentified:
    st.caption(":material/visibility_off: De-identified view (researcher): no reference, no links to the patient's "
               "other cases, no comments; reviewing and signing need the clinician role.")
st.caption(f"Created {view.created_at:%Y-%m-%d %H:%M} UTC · {by_id[case_id].status}"
           + (f" · same patient (keyed DICOM PatientID) as {', '.join(view.linked_refs)}" if view.linked_refs else ""))


def review_block(a, key: str) -> None:
    """The review history of one suggestion and the form for its next version."""
    for r in a.reviews:
        what = {"agree": "agrees", "disagree": "disagrees", "corrected": f"corrected to **{r.corrected_label}**"}
        state = (f"signed {r.signed_at:%Y-%m-%d %H:%M} UTC" if r.signed_at else "draft, not signed")
        st.caption(f"v{r.version}: {r.reviewer} {what[r.decision]} · {state}"
                   + (f" · based on v{r.based_on_version}" if r.based_on_version else "")
                   + (f" · \u201c{r.comment}\u201d" if r.comment else ""))
    if not user.can("review"):
        return
    classes = list(a.probabilities)
    with st.form(f"review_{key}", border=True, clear_on_submit=True):   # a fresh form for the next version
        options = list(DECISIONS) if classes else ["Agree", "Disagree"]
        decision = st.radio("Your review", options, horizontal=True, key=f"rv_decision_{key}")
        grade = st.selectbox("Corrected grade (with 'Corrected grade')", classes or ["(no classes)"],
                             key=f"rv_grade_{key}", disabled=not classes)
        comment = st.text_area("Comment (no patient identifiers)", key=f"rv_comment_{key}", max_chars=4000)
        st.caption(f"Reviewer: **{user.label}** (signed in)")
        sign = st.checkbox("Sign: a signed review cannot be changed (a later change is a new version)",
                           key=f"rv_sign_{key}", disabled=not user.can("sign"))
        if st.form_submit_button("Save review", key=f"rv_save_{key}", icon=":material/draw:"):
            latest = a.latest_review
            try:
                saved = records.save_review(clinic, a.id, DECISIONS[decision], user=user,
                                            corrected_label=grade if decision == "Corrected grade" else None,
                                            comment=comment, sign=sign,
                                            based_on_version=latest.version if latest else None)
            except RetinaInputError as exc:
                st.error(str(exc), icon=":material/error:")
                return
            msg = f"Review version {saved.version} saved" + (" and signed." if saved.signed else " (draft).")
            if saved.conflict:
                msg += (" Another reviewer saved a version while you were reviewing: both are kept; see the history "
                        "above.")
            st.session_state["clinic_flash"] = ("warning" if saved.conflict else "success", msg)
            st.rerun()


def suggestion_block(a, pixels, key: str) -> None:
    if a.label is None:
        st.error(f"**{NO_RESULT}.** " + " ".join(a.notes), icon=":material/block:")
    else:
        (st.error if a.referable else st.success)(a.suggestion)
        if a.model:
            common.trained_on_caption(a)
        if a.modality == Modality.OCT_VOLUME and a.notes:
            st.caption(" ".join(a.notes))
    left, right = st.columns(2)
    if a.heatmap_hash:
        hm = clinic_pages.stored_heatmap(clinic, a.heatmap_hash, pixels.shape[:2])
        left.image(overlay(pixels, hm, alpha), width="stretch",
                   caption=f"{a.method} heatmap for '{a.target}' (red = where the model looked most)")
        if a.model and a.weights_sha256:
            common.show_trust_note(a.model, a.weights_sha256, a.method, left, label=a.target)
    if a.probabilities:
        common.probability_rows(a.probabilities, a.label, right)
    st.caption(f"Analysis #{a.id} · model `{a.model}` · weights `{(a.weights_sha256 or '')[:12]}` · "
               f"read {a.created_at:%Y-%m-%d} by "
               f"{a.created_by}" + (f" · quality: {a.quality.get('verdict')}" if a.quality else ""))
    if user.can("identified"):
        clinic_pages.result_downloads(clinic, a.id, bool(a.heatmap_hash), user)
    signed = a.signed_review
    st.markdown("**Review**" + (f" · signed: {signed.decision}"
                                + (f" ({signed.label})" if signed.label else "") if signed else " · awaiting"))
    review_block(a, key)


for eye in view.eyes:
    st.header(eye.name)
    if eye.changes:
        st.markdown("**Change since the last visit**")
        for c in eye.changes:
            (st.warning if c.referable_after and not c.referable_before else st.caption)(c.text)
    elif len(eye.visits) == 1:
        st.caption("One visit so far: change over time appears from the second visit.")
    for visit in reversed(eye.visits):
        st.subheader(f"Visit {visit.visit_date:%Y-%m-%d}")
        for img in visit.images:
            pixels = clinic_pages.stored_pixels(clinic, img.stored_hash)
            with st.container(border=True):
                st.image(pixels, width=360, caption=f"{img.source_format.upper()} {img.width}x{img.height} · "
                                                    f"{img.modality or 'unknown'} · image `{img.content_hash[:12]}`")
                for a in img.analyses:
                    title = (f"{a.model or 'no model'}: {a.label or 'no result'}"
                             + (f" ({a.probabilities[a.label]:.0%})" if a.label else "")
                             + (" · signed" if a.signed_review else " · awaiting review"))
                    with st.expander(title, expanded=a.signed_review is None,
                                     icon=":material/error:" if a.referable else ":material/check_circle:"):
                        suggestion_block(a, pixels, f"{a.id}")
