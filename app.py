"""Retina XAI: the Streamlit entry point (page config + navigation only; pages call retina_core)."""
import streamlit as st

from retina_core import ui

st.set_page_config(page_title="Retina XAI", page_icon=":material/visibility:", layout="wide")

pages = {
    "Diagnose": [
        st.Page("pages/upload.py", title="Upload & diagnose", icon=":material/upload_file:", default=True),
        st.Page("pages/batch.py", title="Batch screening", icon=":material/table_view:"),
    ],
    "Clinic": [
        st.Page("pages/worklist.py", title="Worklist", icon=":material/assignment:"),
        st.Page("pages/case.py", title="Case review", icon=":material/rate_review:"),
    ],
    "Explore one eye": [
        st.Page("pages/compare.py", title="Compare modalities", icon=":material/compare:"),
        st.Page("pages/zones.py", title="Attention zones", icon=":material/grid_on:"),
        st.Page("pages/ensemble.py", title="Ensemble", icon=":material/groups:"),
        st.Page("pages/volume.py", title="Volume viewer", icon=":material/view_in_ar:"),
    ],
    "Research": [
        st.Page("pages/models.py", title="Models & evaluation", icon=":material/model_training:"),
    ],
}
nav = st.navigation(pages)
ui.mark_navigation()
ui.sidebar_weights()
nav.run()
