"""Accounts, roles and sessions of the clinic (local accounts with argon2id hashes; optional single sign-on).

    user = accounts.create_user(clinic, "dr-k", "a long passphrase", roles=["clinician"], display_name="Dr K")
    token, user = accounts.log_in(clinic, "dr-k", "a long passphrase")    # LoginError: wrong, locked or disabled
    user = accounts.session_user(clinic, token)                            # None once expired or ended
    user.can("sign")                                                        # permissions come from the roles
    accounts.log_out(clinic, token, user)

Roles (one account may hold several, e.g. the first account of a small clinic is admin + clinician):
    clinician   analyse uploads, save readings, see cases with their references, review, sign (and read the
                models page: what each model was trained and measured on)
    researcher  de-identified cases (no references, no free-text comments), models and evaluation, exports
    admin       accounts (create, roles, disable, unlock, reset passwords) and the audit trail

Passwords: argon2id (argon2-cffi's defaults, salted per hash), at least 10 characters; a wrong user name costs the
same hash as a wrong password. After LOCK_AFTER failures in a row an account is locked for LOCK_MINUTES (an admin
can unlock it). Sessions: a random 256-bit token held by the browser session only; the database keeps its sha256.
A session ends on sign-out, after RETINA_SESSION_IDLE_MINUTES without activity (default 30) or
RETINA_SESSION_HOURS after sign-in (default 12), and when its account is disabled.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ..errors import RetinaInputError
from .db import Clinic
from .records import audit as _audit
from .schema import User, UserSession, utcnow

ROLES = ("clinician", "researcher", "admin")
PERMISSIONS: dict[str, frozenset[str]] = {
    "clinician": frozenset({"analyze", "explore", "models", "save", "cases", "identified", "review", "sign"}),
    "researcher": frozenset({"explore", "cases", "models", "export"}),
    "admin": frozenset({"accounts", "audit"}),
}
ROLE_HELP = {"clinician": "upload and analyse, see cases, review and sign",
             "researcher": "de-identified cases, models and evaluation, exports",
             "admin": "accounts and the audit trail"}
# RETINA_MODE=demo: no sign-in, nothing stored; the clinic pages are listed and say that demo mode keeps nothing
DEMO_PERMISSIONS = frozenset({"analyze", "explore", "models", "cases"})
MIN_PASSWORD = 10
LOCK_AFTER = 5
LOCK_MINUTES = 15
TOUCH_EVERY = dt.timedelta(seconds=60)           # a session's last_seen_at is written at most once a minute
USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{1,63}$")


class LoginError(RetinaInputError):
    """A sign-in that did not succeed: the message says why without telling whether the user name exists."""


class PermissionDenied(RetinaInputError):
    """The signed-in account's roles do not allow this."""


@dataclass(frozen=True)
class UserView:
    """An account as the pages and records see it (no hash, safe after the database session closed)."""
    id: int | None                    # None: the demo visitor (RETINA_MODE=demo) or the command line
    username: str
    display_name: str
    roles: tuple[str, ...]
    active: bool = True
    locked_until: dt.datetime | None = None
    last_login_at: dt.datetime | None = None
    sso: bool = False

    @property
    def permissions(self) -> frozenset[str]:
        if self.id is None and self.roles == ("demo",):
            return DEMO_PERMISSIONS
        return frozenset().union(*(PERMISSIONS.get(r, frozenset()) for r in self.roles))

    def can(self, permission: str) -> bool:
        return permission in self.permissions

    def require(self, permission: str, what: str) -> None:
        if not self.can(permission):
            roles = " or ".join(r for r in ROLES if permission in PERMISSIONS[r]) or "no role"
            raise PermissionDenied(f"{what} needs the {roles} role; {self.username} has "
                                   f"{', '.join(self.roles) or 'none'}.")

    @property
    def label(self) -> str:
        """What screens and records show: the display name, else the user name."""
        return self.display_name or self.username


DEMO_USER = UserView(None, "demo", "Demo visitor", ("demo",))
CLI_USER_NAME = "command line"


def _view(u: User) -> UserView:
    return UserView(u.id, u.username, u.display_name, parse_roles(u.roles), u.active, u.locked_until,
                    u.last_login_at, sso=u.password_hash is None)


# ------------------------------------------------------------------------------------------------ settings
def _minutes(name: str, default: float) -> dt.timedelta:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        value = default
    return dt.timedelta(minutes=max(value, 1.0))


def session_idle() -> dt.timedelta:
    return _minutes("RETINA_SESSION_IDLE_MINUTES", 30)


def session_lifetime() -> dt.timedelta:
    return _minutes("RETINA_SESSION_HOURS", 12) * 60


# ------------------------------------------------------------------------------------------------ validation
def parse_roles(roles: str | Iterable[str]) -> tuple[str, ...]:
    items = roles.split(",") if isinstance(roles, str) else list(roles)
    out = []
    for r in items:
        r = str(r).strip().lower()
        if not r:
            continue
        if r not in ROLES:
            raise RetinaInputError(f"Role {r!r}: choose from {', '.join(ROLES)}.")
        if r not in out:
            out.append(r)
    return tuple(sorted(out, key=ROLES.index))


def clean_username(name: str | None) -> str:
    name = (name or "").strip()
    if not USERNAME.match(name):
        raise RetinaInputError("User name: 2-64 letters, digits, '.', '_', '-' or '@', starting with a letter or "
                               "digit (a staff code or work e-mail, not a patient's name).")
    return name.lower()


def check_password(password: str | None, username: str = "") -> str:
    password = password or ""
    if len(password) < MIN_PASSWORD:
        raise RetinaInputError(f"Password: at least {MIN_PASSWORD} characters (a passphrase of a few words is best).")
    if len(password) > 1024:
        raise RetinaInputError("Password: at most 1024 characters.")
    if username and password.strip().lower() == username.lower():
        raise RetinaInputError("Password: must not be the user name.")
    return password


def _hasher():
    from argon2 import PasswordHasher

    return PasswordHasher()        # argon2id, 64 MiB, t=3, p=4, 16-byte random salt (RFC 9106 low-memory profile)


def hash_password(password: str) -> str:
    return _hasher().hash(password)


def _verify(stored: str | None, password: str) -> bool:
    from argon2.exceptions import InvalidHashError, VerificationError

    try:
        return _hasher().verify(stored or _dummy_hash(), password) and stored is not None
    except (VerificationError, InvalidHashError):
        return False


_DUMMY: list[str] = []


def _dummy_hash() -> str:
    """A hash to verify against when the user name is unknown, so both failures take as long."""
    if not _DUMMY:
        _DUMMY.append(hash_password(secrets.token_hex(16)))
    return _DUMMY[0]


# ------------------------------------------------------------------------------------------------ accounts
def count_users(clinic: Clinic) -> int:
    with clinic.session() as s:
        return s.scalar(select(func.count(User.id))) or 0


def create_user(clinic: Clinic, username: str, password: str | None, *, roles: Iterable[str] | str,
                display_name: str = "", by: UserView | None = None, oidc_subject: str | None = None) -> UserView:
    """A new account. `by`: the admin creating it (None: the command line). A single-sign-on account has no
    password (`oidc_subject` or its e-mail as user name identify it)."""
    username = clean_username(username)
    roles = parse_roles(roles)
    if not roles:
        raise RetinaInputError("Give the account at least one role.")
    if by is not None:
        by.require("accounts", "Creating accounts")
    pw_hash = hash_password(check_password(password, username)) if password is not None else None
    with clinic.writing() as s:
        if s.scalar(select(User.id).where(User.username == username)) is not None:
            raise RetinaInputError(f"The user name {username} is taken.")
        u = _add_user(s, username, display_name, roles, pw_hash, oidc_subject)
        _audit(s, by or CLI_USER_NAME, "user.create", "user", u.id, username=username, roles=list(roles),
               sso=pw_hash is None)
        return _view(u)


def _add_user(s: Session, username: str, display_name: str, roles: tuple[str, ...], pw_hash: str | None,
              oidc_subject: str | None = None) -> User:
    u = User(username=username, display_name=" ".join((display_name or "").split())[:128], roles=",".join(roles),
             password_hash=pw_hash, oidc_subject=oidc_subject or None, active=True, failed_logins=0,
             password_changed_at=utcnow() if pw_hash else None)
    s.add(u)
    s.flush()
    return u


def create_first_admin(clinic: Clinic, username: str, password: str, display_name: str = "",
                       roles: Iterable[str] = ("admin", "clinician")) -> UserView:
    """The set-up form of a new install: allowed only while the database holds no account (checked in the same
    write transaction, so two browsers racing cannot both create one)."""
    username = clean_username(username)
    roles = parse_roles(roles)
    if "admin" not in roles:
        raise RetinaInputError("The first account must be an admin (it creates the others).")
    pw_hash = hash_password(check_password(password, username))
    with clinic.writing() as s:
        if s.scalar(select(func.count(User.id))):
            raise PermissionDenied("An account exists already: sign in, or ask an admin to create yours.")
        u = _add_user(s, username, display_name, roles, pw_hash)
        _audit(s, username, "user.create_first", "user", u.id, username=username, roles=list(roles))
        return _view(u)


def list_users(clinic: Clinic) -> list[UserView]:
    with clinic.session() as s:
        return [_view(u) for u in s.scalars(select(User).order_by(User.username))]


def get_user(clinic: Clinic, username: str) -> UserView:
    with clinic.session() as s:
        u = s.scalar(select(User).where(User.username == clean_username(username)))
        if u is None:
            raise RetinaInputError(f"There is no account {username!r}.")
        return _view(u)


def _admin_change(clinic: Clinic, username: str, by: UserView | None, action: str, change) -> UserView:
    if by is not None:
        by.require("accounts", "Managing accounts")
    with clinic.writing() as s:
        u = s.scalar(select(User).where(User.username == clean_username(username)))
        if u is None:
            raise RetinaInputError(f"There is no account {username!r}.")
        details = change(s, u) or {}
        _audit(s, by or CLI_USER_NAME, action, "user", u.id, username=u.username, **details)
        return _view(u)


def _admins_left(s: Session, excluding: int) -> int:
    return sum("admin" in parse_roles(r) for r in s.scalars(
        select(User.roles).where(User.active.is_(True), User.id != excluding)))


def set_roles(clinic: Clinic, username: str, roles: Iterable[str] | str, by: UserView | None = None) -> UserView:
    roles = parse_roles(roles)
    if not roles:
        raise RetinaInputError("Give the account at least one role.")

    def change(s, u):
        if "admin" in parse_roles(u.roles) and "admin" not in roles and not _admins_left(s, u.id):
            raise RetinaInputError("This is the last active admin: give another account the admin role first.")
        before = u.roles
        u.roles = ",".join(roles)
        return {"before": before.split(","), "after": list(roles)}

    return _admin_change(clinic, username, by, "user.roles", change)


def set_active(clinic: Clinic, username: str, active: bool, by: UserView | None = None) -> UserView:
    """Disable (its sessions end at once) or re-enable an account. Accounts are never deleted."""
    def change(s, u):
        if not active and "admin" in parse_roles(u.roles) and not _admins_left(s, u.id):
            raise RetinaInputError("This is the last active admin: it cannot be disabled.")
        u.active = active
        if not active:
            s.execute(update(UserSession).where(UserSession.user_id == u.id, UserSession.ended_at.is_(None))
                      .values(ended_at=utcnow()))
        return {"active": active}

    return _admin_change(clinic, username, by, "user.enable" if active else "user.disable", change)


def unlock(clinic: Clinic, username: str, by: UserView | None = None) -> UserView:
    def change(s, u):
        u.failed_logins, u.locked_until = 0, None

    return _admin_change(clinic, username, by, "user.unlock", change)


def reset_password(clinic: Clinic, username: str, new_password: str, by: UserView | None = None) -> UserView:
    """An admin (or the command line) sets a new password; the account's sessions end and it is unlocked."""
    def change(s, u):
        u.password_hash = hash_password(check_password(new_password, u.username))
        u.password_changed_at, u.failed_logins, u.locked_until = utcnow(), 0, None
        s.execute(update(UserSession).where(UserSession.user_id == u.id, UserSession.ended_at.is_(None))
                  .values(ended_at=utcnow()))

    return _admin_change(clinic, username, by, "user.reset_password", change)


def change_own_password(clinic: Clinic, user: UserView, old: str, new: str) -> None:
    """The signed-in user changes their password (the old one is checked; other sessions of theirs end)."""
    check_password(new, user.username)
    with clinic.writing() as s:
        u = s.get(User, user.id)
        if u is None or u.password_hash is None:
            raise RetinaInputError("This account signs in through single sign-on: change the password there.")
        if not _verify(u.password_hash, old):
            raise RetinaInputError("The current password is wrong.")
        u.password_hash, u.password_changed_at = hash_password(new), utcnow()
        _audit(s, user, "user.change_password", "user", u.id)


# ------------------------------------------------------------------------------------------------ sessions
def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _start_session(s: Session, u: User, method: str) -> str:
    token = secrets.token_urlsafe(32)
    now = utcnow()
    s.add(UserSession(token_hash=_token_hash(token), user_id=u.id, created_at=now, last_seen_at=now,
                      expires_at=now + session_lifetime(), method=method))
    u.last_login_at = now
    return token


def log_in(clinic: Clinic, username: str, password: str) -> tuple[str, UserView]:
    """Check a user name and password; a new session token and the account, or LoginError."""
    wrong = LoginError("Wrong user name or password.")
    try:
        name = clean_username(username)
    except RetinaInputError:
        _verify(None, password or "")
        raise wrong from None
    now = utcnow()
    with clinic.writing() as s:
        u = s.scalar(select(User).where(User.username == name))
        if u is None or u.password_hash is None:
            _verify(None, password or "")
            _audit(s, name if u is not None else "unknown", "login.fail", "user", u.id if u else None,
                   reason="unknown user" if u is None else "single sign-on account")
            failure = wrong
        elif u.locked_until is not None and u.locked_until > now:
            mins = max(1, round((u.locked_until - now).total_seconds() / 60))
            _audit(s, u.username, "login.locked", "user", u.id)
            failure = LoginError(f"This account is locked after {LOCK_AFTER} failed sign-ins: try again in {mins} "
                                 "minute(s), or ask an admin to unlock it.")
        elif not _verify(u.password_hash, password or ""):
            u.failed_logins = (u.failed_logins or 0) + 1
            if u.failed_logins >= LOCK_AFTER:
                u.locked_until, u.failed_logins = now + dt.timedelta(minutes=LOCK_MINUTES), 0
                _audit(s, u.username, "login.lock", "user", u.id, minutes=LOCK_MINUTES)
                failure = LoginError(f"Wrong password {LOCK_AFTER} times: the account is locked for {LOCK_MINUTES} "
                                     "minutes (an admin can unlock it).")
            else:
                _audit(s, u.username, "login.fail", "user", u.id, reason="wrong password")
                failure = wrong
        elif not u.active:
            _audit(s, u.username, "login.fail", "user", u.id, reason="disabled")
            failure = LoginError("This account is disabled: ask an admin.")
        else:
            u.failed_logins, u.locked_until = 0, None
            token = _start_session(s, u, "password")
            _audit(s, _view(u), "login", "user", u.id, method="password")
            return token, _view(u)
    raise failure       # after the commit: the failure count and the audit event are kept


def log_in_sso(clinic: Clinic, subject: str, email: str | None) -> tuple[str, UserView]:
    """Single sign-on (Streamlit's OIDC login): the identity provider vouched for `subject` (and `email`). Only
    accounts an admin created can sign in: by `oidc_subject`, or by a user name equal to the e-mail (the subject
    is then remembered). LoginError otherwise."""
    subject = (subject or "").strip()
    if not subject:
        raise LoginError("The identity provider returned no subject.")
    with clinic.writing() as s:
        u = s.scalar(select(User).where(User.oidc_subject == subject))
        if u is None and email:
            u = s.scalar(select(User).where(User.username == email.strip().lower()))
            if u is not None and u.oidc_subject is None:
                u.oidc_subject = subject
        if u is None or not u.active:
            _audit(s, "unknown" if u is None else u.username, "login.fail", "user", u.id if u else None,
                   method="oidc", reason="no account" if u is None else "disabled")
            failure = LoginError("You are signed in with your organisation, but this app has no active account for "
                                 "you: ask an admin to create one with your e-mail as user name.")
        else:
            token = _start_session(s, u, "oidc")
            _audit(s, _view(u), "login", "user", u.id, method="oidc")
            return token, _view(u)
    raise failure


def session_user(clinic: Clinic, token: str | None) -> UserView | None:
    """The account of a live session token, or None (unknown, ended, expired, idle too long, account disabled).
    A live session's last_seen_at is moved on (at most once a minute)."""
    if not token:
        return None
    now = utcnow()
    with clinic.session() as s:
        row = s.scalar(select(UserSession).where(UserSession.token_hash == _token_hash(token)))
        if row is None or row.ended_at is not None:
            return None
        u = row.user
        expired = row.expires_at <= now or row.last_seen_at + session_idle() <= now or not u.active
        view = _view(u)
        stale = now - row.last_seen_at >= TOUCH_EVERY
        sid = row.id
    if expired:
        with clinic.writing() as s:
            s.execute(update(UserSession).where(UserSession.id == sid, UserSession.ended_at.is_(None))
                      .values(ended_at=now))
            _audit(s, view, "session.expire", "user", view.id)
        return None
    if stale:
        with clinic.writing() as s:
            s.execute(update(UserSession).where(UserSession.id == sid).values(last_seen_at=now))
    return view


def log_out(clinic: Clinic, token: str | None, user: UserView | None) -> None:
    if not token:
        return
    with clinic.writing() as s:
        s.execute(update(UserSession).where(UserSession.token_hash == _token_hash(token),
                                            UserSession.ended_at.is_(None)).values(ended_at=utcnow()))
        if user is not None:
            _audit(s, user, "logout", "user", user.id)


def record(clinic: Clinic, user: UserView, action: str, object_type: str, object_id: int | None = None,
           **details) -> None:
    """Append one event to the audit trail for `user` (page views, analyses, exports); details: ids, hashes,
    labels and counts only, never identifiers or free text."""
    with clinic.writing() as s:
        _audit(s, user, action, object_type, object_id, **details)
