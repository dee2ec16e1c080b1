"""Retina XAI: the Streamlit entry point (page config, sign-in and the pages each role may open; pages call
retina_core). Signed out, the only page is *Sign in*; demo mode (RETINA_MODE=demo) has no sign-in."""
import streamlit as st

from retina_core.webapp import auth, common

st.set_page_config(page_title="Retina XAI", page_icon=":material/visibility:", layout="wide")

# (page, the permission it needs: see retina_core/clinic/accounts.py for which roles hold which)
PAGES = {
    "Diagnose": [
        (st.Page("app_pages/upload.py", title="Upload & diagnose", icon=":material/upload_file:", default=True),
         "analyze"),
        (st.Page("app_pages/batch.py", title="Batch screening", icon=":material/table_view:"), "analyze"),
    ],
    "Clinic": [
        (st.Page("app_pages/worklist.py", title="Worklist", icon=":material/assignment:"), "cases"),
        (st.Page("app_pages/case.py", title="Case review", icon=":material/rate_review:"), "cases"),
    ],
    "Explore one eye": [
        (st.Page("app_pages/compare.py", title="Compare modalities", icon=":material/compare:"), "explore"),
        (st.Page("app_pages/zones.py", title="Attention zones", icon=":material/grid_on:"), "explore"),
        (st.Page("app_pages/ensemble.py", title="Ensemble", icon=":material/groups:"), "explore"),
        (st.Page("app_pages/volume.py", title="Volume viewer", icon=":material/view_in_ar:"), "explore"),
    ],
    "Research": [
        (st.Page("app_pages/models.py", title="Models & evaluation", icon=":material/model_training:"), "models"),
    ],
    "Admin": [
        (st.Page("app_pages/accounts.py", title="Accounts", icon=":material/manage_accounts:"), "accounts"),
        (st.Page("app_pages/audit_trail.py", title="Audit trail", icon=":material/history:"), "audit"),
    ],
}

user = auth.current_user()
if user is None:
    nav = st.navigation([st.Page("app_pages/login.py", title="Sign in", icon=":material/login:")],
                        position="hidden")
else:
    allowed = {section: [page for page, need in items if user.can(need)] for section, items in PAGES.items()}
    allowed = {section: pages for section, pages in allowed.items() if pages}
    if user.id is not None:
        allowed["Me"] = [st.Page("app_pages/account.py", title="My account", icon=":material/person:")]
    nav = st.navigation(allowed)          # without the upload page, the first page allowed opens at "/"
    auth.sidebar_account(user)
    auth.audit_view("view.page", "page", None, page=nav.url_path or "upload")
if user is not None:
    common.sidebar_weights()
nav.run()
