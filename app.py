"""Retina XAI: the Streamlit entry point (page config + navigation only; pages call retina_core)."""
import streamlit as st

st.set_page_config(page_title="Retina XAI", page_icon=":material/visibility:", layout="wide")

pages = {
    "Diagnose": [
        st.Page("pages/upload.py", title="Upload & diagnose", icon=":material/upload_file:", default=True),
    ],
    "Research": [
        st.Page("pages/models.py", title="Models & evaluation", icon=":material/model_training:"),
    ],
}
st.navigation(pages).run()
