"""Accounts (admin): create accounts, set roles, disable / re-enable, unlock, reset a password. Accounts are never
deleted: signed reviews and the audit trail name them."""
import pandas as pd
import streamlit as st

from retina_core.clinic import accounts
from retina_core.errors import RetinaInputError
from retina_core.webapp import auth, clinic_pages

admin = auth.require("accounts", "Managing accounts")
st.title("Accounts")
clinic = clinic_pages.clinic_or_stop()
auth.audit_view("view.accounts", "user")


def done(message: str) -> None:
    st.session_state["accounts_flash"] = message
    st.rerun()


flash = st.session_state.pop("accounts_flash", None)
if flash:
    st.success(flash, icon=":material/check_circle:")

users = accounts.list_users(clinic)
st.dataframe(pd.DataFrame([{
    "User name": u.username, "Name": u.display_name, "Roles": ", ".join(u.roles),
    "Sign-in": "single sign-on" if u.sso else "password", "Active": u.active,
    "Locked until": f"{u.locked_until:%Y-%m-%d %H:%M} UTC" if u.locked_until else "",
    "Last sign-in": f"{u.last_login_at:%Y-%m-%d %H:%M} UTC" if u.last_login_at else "never"} for u in users]),
    hide_index=True, width="stretch", key="accounts_table")
st.caption("Roles: " + " · ".join(f"**{r}**: {h}" for r, h in accounts.ROLE_HELP.items()))

left, right = st.columns(2)
with left.form("new_account", border=True, clear_on_submit=True):
    st.markdown("**New account**")
    username = st.text_input("User name (staff code or work e-mail)", key="new_user")
    display = st.text_input("Name shown on reviews", key="new_display")
    roles = st.multiselect("Roles", accounts.ROLES, default=["clinician"], key="new_roles")
    sso = st.checkbox("Signs in through single sign-on only (no password here; user name = their e-mail)",
                      key="new_sso")
    password = st.text_input(f"First password (at least {accounts.MIN_PASSWORD} characters; tell it to them "
                             "privately)", type="password", key="new_password", autocomplete="new-password")
    if st.form_submit_button("Create account", type="primary", icon=":material/person_add:"):
        try:
            made = accounts.create_user(clinic, username, None if sso else password, roles=roles,
                                        display_name=display, by=admin)
        except RetinaInputError as exc:
            st.error(str(exc), icon=":material/error:")
        else:
            done(f"Account {made.username} created ({', '.join(made.roles)}).")

with right.container(border=True):
    st.markdown("**Change an account**")
    by_name = {u.username: u for u in users}
    name = st.selectbox("Account", list(by_name), key="manage_user")
    u = by_name[name]
    new_roles = st.multiselect("Roles", accounts.ROLES, default=list(u.roles), key=f"manage_roles_{name}")
    c1, c2, c3 = st.columns(3)
    try:
        if c1.button("Save roles", key="manage_save_roles", icon=":material/save:"):
            accounts.set_roles(clinic, name, new_roles, by=admin)
            done(f"{name}: roles {', '.join(new_roles)}.")
        if c2.button("Disable" if u.active else "Re-enable", key="manage_active",
                     icon=":material/block:" if u.active else ":material/check:"):
            accounts.set_active(clinic, name, not u.active, by=admin)
            done(f"{name} {'disabled: its sessions ended' if u.active else 're-enabled'}.")
        if c3.button("Unlock", key="manage_unlock", icon=":material/lock_open:", disabled=u.locked_until is None):
            accounts.unlock(clinic, name, by=admin)
            done(f"{name} unlocked.")
        if not u.sso:
            pw = st.text_input("New password (their sessions end)", type="password", key=f"manage_pw_{name}",
                               autocomplete="new-password")
            if st.button("Reset password", key="manage_reset", icon=":material/password:"):
                accounts.reset_password(clinic, name, pw, by=admin)
                done(f"{name}: password reset.")
    except RetinaInputError as exc:
        st.error(str(exc), icon=":material/error:")
