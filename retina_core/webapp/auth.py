"""Streamlit glue of sign-in, sign-out and roles (app.py's navigation, the Sign-in, Account and Accounts pages).

Who is signed in lives in this browser session only (`st.session_state`): a random token whose sha256 names a row of
`user_sessions`, checked against the database on every run, so an expired, ended or disabled session is noticed at
the next click. A page reload starts a new browser session, which signs in again. In demo mode (RETINA_MODE=demo)
nobody signs in and nothing is stored: every visitor is the demo visitor.

Single sign-on: when `.streamlit/secrets.toml` has an `[auth]` section (Streamlit's OIDC login), the sign-in page
offers it; the provider's subject / e-mail must belong to an account an admin created (roles stay in this app).
"""
from __future__ import annotations

import streamlit as st

from ..clinic import accounts
from ..clinic.accounts import UserView
from ..errors import RetinaInputError
from .clinic_pages import SESSION_USER as USER
from .clinic_pages import config_or_error, open_cached

TOKEN = "auth_token"
VIEWED = "auth_viewed"


def _clinic():
    cfg = config_or_error()
    if cfg is None or not cfg.persistent:
        return None
    return open_cached(cfg.database_url, str(cfg.data_dir), cfg.mode)


def sso_configured() -> bool:
    """True when Streamlit's OIDC login is set up (an [auth] section in secrets.toml)."""
    try:
        return "auth" in st.secrets
    except Exception:           # no secrets file at all
        return False


def current_user() -> UserView | None:
    """The signed-in account of this browser session, the demo visitor in demo mode, or None (signed out).
    A database that cannot be opened shows its message and stops the page."""
    cfg = config_or_error()
    if cfg is None:
        st.stop()
    if not cfg.persistent:
        return accounts.DEMO_USER
    try:
        clinic = open_cached(cfg.database_url, str(cfg.data_dir), cfg.mode)
    except RetinaInputError as exc:
        st.error(str(exc), icon=":material/error:")
        st.stop()
    token = st.session_state.get(TOKEN)
    user = accounts.session_user(clinic, token) if token else None
    if token and user is None:
        st.session_state.pop(TOKEN, None)
        st.session_state.pop(USER, None)
        st.session_state["auth_flash"] = "Your session ended (signed out, timed out or the account was disabled): " \
                                         "sign in again."
    if user is None and sso_configured() and getattr(st.user, "is_logged_in", False):
        try:
            token, user = accounts.log_in_sso(clinic, str(st.user.get("sub") or ""), st.user.get("email"))
            st.session_state[TOKEN] = token
        except RetinaInputError as exc:
            st.session_state["auth_flash"] = str(exc)
    st.session_state[USER] = user
    return user


def signed_in() -> UserView:
    """The account of this session for a page (app.py has checked it on this run)."""
    user = st.session_state.get(USER)
    if user is None:
        st.error("Sign in first.", icon=":material/lock:")
        st.stop()
    return user


def require(permission: str, what: str) -> UserView:
    """Stop the page with a message unless the signed-in account may do `permission` (app.py's navigation only
    offers pages the account may open; this guards direct links and removed roles)."""
    user = signed_in()
    if not user.can(permission):
        roles = " or ".join(r for r in accounts.ROLES if permission in accounts.PERMISSIONS[r])
        st.error(f"{what} needs the {roles} role; you are signed in as {user.username} "
                 f"({', '.join(user.roles)}).", icon=":material/lock:")
        st.stop()
    return user


def audit_view(action: str, object_type: str, object_id: int | None = None, **details) -> None:
    """Write a page view (or an analysis) of the signed-in account to the audit trail, once per browser session
    per (action, object): reruns of the same page do not flood the trail. Nothing in demo mode."""
    user = st.session_state.get(USER)
    if user is None or user.id is None:            # signed out, or the demo visitor
        return
    key = (action, object_type, object_id, tuple(sorted((k, str(v)) for k, v in details.items())))
    seen = st.session_state.setdefault(VIEWED, set())
    if key in seen:                                # a rerun: nothing to open or write
        return
    clinic = _clinic()
    if clinic is None:
        return
    accounts.record(clinic, user, action, object_type, object_id, **details)
    seen.add(key)


# ------------------------------------------------------------------------------------------------ pages
def login_page() -> None:
    """The Sign-in page (the only page of a signed-out session), or the first-account form of a new install."""
    st.title("Sign in")
    flash = st.session_state.pop("auth_flash", None)
    if flash:
        st.warning(flash, icon=":material/info:")
    cfg = config_or_error()
    clinic = _clinic()
    if cfg is None or clinic is None:
        st.stop()
    if accounts.count_users(clinic) == 0:
        _first_account(clinic, cfg.mode)
        return
    with st.form("login", border=True):
        username = st.text_input("User name", key="login_user", autocomplete="username")
        password = st.text_input("Password", type="password", key="login_password", autocomplete="current-password")
        submitted = st.form_submit_button("Sign in", type="primary", icon=":material/login:")
    if submitted:
        try:
            token, user = accounts.log_in(clinic, username, password)
        except RetinaInputError as exc:
            st.error(str(exc), icon=":material/lock:")
        else:
            _start(token, user)
    if sso_configured():
        st.button("Sign in with your organisation (single sign-on)", key="login_sso", icon=":material/badge:",
                  on_click=st.login)
    st.caption("Accounts are created by an admin (page *Accounts*, or `python -m retina_core clinic user add`). "
               "Five wrong passwords in a row lock an account for 15 minutes. For a demonstration without accounts "
               "or storage, start the app with RETINA_MODE=demo.")


def _first_account(clinic, mode: str) -> None:
    if mode == "production":
        st.info("No account exists yet. In production the first admin is created on the server: "
                "`python -m retina_core clinic user add NAME --role admin --role clinician`.", icon=":material/key:")
        st.stop()
    st.info("**New install: create the first account.** It administers accounts and, by default, is also a "
            "clinician. Create the others from the *Accounts* page once signed in.", icon=":material/person_add:")
    with st.form("first_account", border=True):
        username = st.text_input("User name (staff code or work e-mail)", key="first_user")
        display = st.text_input("Name shown on reviews", key="first_display")
        password = st.text_input(f"Password (at least {accounts.MIN_PASSWORD} characters)", type="password",
                                 key="first_password", autocomplete="new-password")
        again = st.text_input("Password again", type="password", key="first_again", autocomplete="new-password")
        roles = st.multiselect("Roles", accounts.ROLES, default=["admin", "clinician"], key="first_roles",
                               format_func=lambda r: f"{r}: {accounts.ROLE_HELP[r]}")
        submitted = st.form_submit_button("Create and sign in", type="primary", icon=":material/person_add:")
    if not submitted:
        return
    if password != again:
        st.error("The two passwords differ.", icon=":material/error:")
        return
    try:
        accounts.create_first_admin(clinic, username, password, display, roles)
        token, user = accounts.log_in(clinic, username, password)
    except RetinaInputError as exc:
        st.error(str(exc), icon=":material/error:")
        return
    _start(token, user)


def _start(token: str, user: UserView) -> None:
    st.session_state[TOKEN] = token
    st.session_state[USER] = user
    for k in ("login_password", "first_password", "first_again"):
        st.session_state.pop(k, None)
    st.rerun()


def sign_out() -> None:
    user, token = st.session_state.get(USER), st.session_state.get(TOKEN)
    clinic = _clinic()
    if clinic is not None:
        accounts.log_out(clinic, token, user)
    for k in list(st.session_state):          # everything this session held goes: results, uploads, forms
        st.session_state.pop(k, None)
    st.session_state["auth_flash"] = "Signed out."
    if sso_configured() and getattr(st.user, "is_logged_in", False):
        st.logout()


def sidebar_account(user: UserView) -> None:
    with st.sidebar:
        if user.id is None:
            st.info("**Demo mode**: no sign-in, nothing is stored. Not for patients.", icon=":material/science:")
            return
        st.caption(f":material/person: Signed in as **{user.label}** (`{user.username}`) · {', '.join(user.roles)}")
        st.button("Sign out", key="sign_out", icon=":material/logout:", on_click=sign_out)


def account_page() -> None:
    """Every signed-in account: who am I, my roles, change my password, sign out."""
    user = signed_in()
    st.title("My account")
    st.markdown(f"**{user.label}** · user name `{user.username}` · roles: "
                + "; ".join(f"**{r}** ({accounts.ROLE_HELP[r]})" for r in user.roles))
    if user.last_login_at:
        st.caption(f"Signed in {user.last_login_at:%Y-%m-%d %H:%M} UTC. Sessions end after "
                   f"{int(accounts.session_idle().total_seconds() // 60)} minutes without activity.")
    clinic = _clinic()
    if user.sso:
        st.caption("This account signs in through single sign-on: its password is managed there.")
    elif clinic is not None:
        with st.form("change_password", border=True, clear_on_submit=True):
            st.markdown("**Change my password**")
            old = st.text_input("Current password", type="password", key="pw_old", autocomplete="current-password")
            new = st.text_input(f"New password (at least {accounts.MIN_PASSWORD} characters)", type="password",
                                key="pw_new", autocomplete="new-password")
            again = st.text_input("New password again", type="password", key="pw_again", autocomplete="new-password")
            if st.form_submit_button("Change password", icon=":material/password:"):
                if new != again:
                    st.error("The two new passwords differ.", icon=":material/error:")
                else:
                    try:
                        accounts.change_own_password(clinic, user, old, new)
                        st.success("Password changed.", icon=":material/check_circle:")
                    except RetinaInputError as exc:
                        st.error(str(exc), icon=":material/error:")
    st.button("Sign out", key="account_sign_out", type="primary", icon=":material/logout:", on_click=sign_out)
