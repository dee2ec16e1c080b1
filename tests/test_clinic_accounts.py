"""Accounts, roles and sessions on SQLite and PostgreSQL: argon2id hashes, lock-out, expiry, role checks in the
records (a researcher cannot sign, a clinician cannot manage accounts), the last admin, single sign-on mapping,
and the audit trail naming the account."""
import datetime as dt

import pytest
from sqlalchemy import select, update

from retina_core.clinic import accounts, records
from retina_core.clinic.accounts import LoginError, PermissionDenied
from retina_core.clinic.schema import AuditEvent, User, UserSession
from retina_core.clinic.testing import synthetic_analysis, synthetic_image
from retina_core.errors import RetinaInputError

PW = "correct horse battery"
P_CNV = {"CNV": 0.7, "DME": 0.1, "DRUSEN": 0.1, "NORMAL": 0.1}


def _reading(clinic, ref="AC-0001", seed=1):
    img = synthetic_image(seed)
    return records.save_reading(clinic, case_ref=ref, eye="OD", visit_date=dt.date(2026, 5, 1), image=img,
                                analyses=[synthetic_analysis(img, P_CNV)], actor="seed")


def test_passwords_are_salted_argon2id_and_sign_in_checks_them(clinic):
    u = accounts.create_user(clinic, "Dr-K", PW, roles=["clinician"], display_name="Dr K")
    assert u.username == "dr-k" and u.roles == ("clinician",) and u.label == "Dr K"
    accounts.create_user(clinic, "dr-j", PW, roles="clinician")
    with clinic.session() as s:
        hashes = list(s.scalars(select(User.password_hash).order_by(User.id)))
    assert all(h.startswith("$argon2id$") for h in hashes) and hashes[0] != hashes[1]      # same password, salted
    assert PW not in "".join(hashes)
    token, user = accounts.log_in(clinic, "DR-K", PW)
    assert user.id == u.id and len(token) >= 40
    assert accounts.session_user(clinic, token).username == "dr-k"
    with clinic.session() as s:                       # only the token's sha256 is stored
        assert s.scalar(select(UserSession.token_hash)) != token
    for name, pw in (("dr-k", "wrong password!"), ("nobody", PW), ("", "")):
        with pytest.raises(LoginError, match="Wrong user name or password"):
            accounts.log_in(clinic, name, pw)
    for bad in ("short", "dr-k"):
        with pytest.raises(RetinaInputError, match="Password"):
            accounts.create_user(clinic, "dr-x", bad, roles=["clinician"])
    with pytest.raises(RetinaInputError, match="taken"):
        accounts.create_user(clinic, "dr-k", PW, roles=["clinician"])
    with pytest.raises(RetinaInputError, match="Role"):
        accounts.create_user(clinic, "dr-y", PW, roles=["surgeon"])


def test_repeated_failures_lock_the_account_until_unlocked(clinic):
    accounts.create_user(clinic, "dr-lock", PW, roles=["clinician"])
    for _ in range(accounts.LOCK_AFTER - 1):
        with pytest.raises(LoginError, match="Wrong"):
            accounts.log_in(clinic, "dr-lock", "not the password")
    with pytest.raises(LoginError, match="locked for"):
        accounts.log_in(clinic, "dr-lock", "not the password")
    with pytest.raises(LoginError, match="is locked"):                # even the right password, while locked
        accounts.log_in(clinic, "dr-lock", PW)
    assert accounts.get_user(clinic, "dr-lock").locked_until is not None
    accounts.unlock(clinic, "dr-lock")
    token, _ = accounts.log_in(clinic, "dr-lock", PW)
    assert accounts.session_user(clinic, token) is not None
    actions = [e["action"] for e in records.audit_trail(clinic, actor="dr-lock")]
    assert "login.lock" in actions and "login.locked" in actions and actions[0] == "login"


def test_sessions_end_on_sign_out_idle_time_lifetime_and_disabling(clinic):
    accounts.create_user(clinic, "admin-1", PW, roles=["admin"])
    accounts.create_user(clinic, "dr-s", PW, roles=["clinician"])
    t_out, u = accounts.log_in(clinic, "dr-s", PW)
    accounts.log_out(clinic, t_out, u)
    assert accounts.session_user(clinic, t_out) is None
    t_idle, _ = accounts.log_in(clinic, "dr-s", PW)
    t_life, _ = accounts.log_in(clinic, "dr-s", PW)
    t_dis, _ = accounts.log_in(clinic, "dr-s", PW)
    past = accounts.utcnow() - accounts.session_idle() - dt.timedelta(minutes=1)
    with clinic.writing() as s:
        s.execute(update(UserSession).where(UserSession.token_hash == accounts._token_hash(t_idle))
                  .values(last_seen_at=past))
        s.execute(update(UserSession).where(UserSession.token_hash == accounts._token_hash(t_life))
                  .values(expires_at=accounts.utcnow() - dt.timedelta(seconds=1)))
    assert accounts.session_user(clinic, t_idle) is None
    assert accounts.session_user(clinic, t_life) is None
    assert accounts.session_user(clinic, t_dis) is not None
    admin = accounts.get_user(clinic, "admin-1")
    accounts.set_active(clinic, "dr-s", False, by=admin)
    assert accounts.session_user(clinic, t_dis) is None
    with pytest.raises(LoginError, match="disabled"):
        accounts.log_in(clinic, "dr-s", PW)
    assert accounts.session_user(clinic, "not-a-token") is None and accounts.session_user(clinic, None) is None


def test_roles_are_enforced_by_the_records_not_only_the_pages(clinic, tmp_path):
    saved = _reading(clinic)
    aid = saved.analysis_ids[0]
    researcher = accounts.create_user(clinic, "res-1", PW, roles=["researcher"])
    clinician = accounts.create_user(clinic, "dr-r", PW, roles=["clinician"], display_name="Dr R")
    admin = accounts.create_user(clinic, "adm-1", PW, roles=["admin"])
    with pytest.raises(PermissionDenied, match="clinician"):
        records.save_review(clinic, aid, "agree", user=researcher, sign=True)
    with pytest.raises(PermissionDenied):
        records.save_review(clinic, aid, "agree", user=researcher)
    with pytest.raises(PermissionDenied):
        records.save_review(clinic, aid, "agree", user=admin, sign=True)
    img = synthetic_image(5)
    with pytest.raises(PermissionDenied):
        records.save_reading(clinic, case_ref="AC-0002", eye="OS", visit_date=dt.date(2026, 5, 2), image=img,
                             analyses=[synthetic_analysis(img, P_CNV)], user=researcher)
    with pytest.raises(PermissionDenied, match="admin"):
        accounts.create_user(clinic, "new-1", PW, roles=["clinician"], by=clinician)
    with pytest.raises(PermissionDenied):
        accounts.set_roles(clinic, "dr-r", ["admin"], by=clinician)
    with pytest.raises(PermissionDenied, match="researcher"):
        from retina_core.clinic.export import export_labels
        export_labels(clinic, tmp_path / "x", actor=clinician)
    done = records.save_review(clinic, aid, "agree", user=clinician, sign=True)
    (a,) = records.case_view(clinic, saved.case_id).analyses()
    assert done.signed and a.signed_review.reviewer == "Dr R"
    with clinic.session() as s:
        ev = s.scalar(select(AuditEvent).where(AuditEvent.action == "review.sign"))
        assert (ev.actor, ev.user_id) == ("dr-r", clinician.id)
    summary = export_labels(clinic, tmp_path / "export", actor=researcher)
    assert summary.total == 1
    assert records.audit_trail(clinic, action="export")[0]["user_id"] == researcher.id


def test_researchers_see_cases_de_identified(clinic):
    saved = _reading(clinic, ref="SECRET-REF-1")
    records.save_review(clinic, saved.analysis_ids[0], "agree", reviewer="dr-c", comment="seen by Dr Who",
                        sign=True)
    rows = records.worklist(clinic, deidentified=True)
    assert [r.ref for r in rows] == [f"Case #{saved.case_id}"]
    view = records.deidentified(records.case_view(clinic, saved.case_id))
    text = repr(view)
    assert "SECRET-REF-1" not in text and "Dr Who" not in text and view.ref == f"Case #{saved.case_id}"
    assert view.analyses()[0].signed_review.comment == records.HIDDEN_COMMENT


def test_the_last_admin_stays_and_the_first_account_only_once(clinic):
    first = accounts.create_first_admin(clinic, "boss", PW, "The Boss")
    assert first.roles == ("clinician", "admin")
    with pytest.raises(PermissionDenied, match="exists already"):
        accounts.create_first_admin(clinic, "boss2", PW)
    with pytest.raises(RetinaInputError, match="last active admin"):
        accounts.set_roles(clinic, "boss", ["clinician"], by=first)
    with pytest.raises(RetinaInputError, match="last active admin"):
        accounts.set_active(clinic, "boss", False, by=first)
    accounts.create_user(clinic, "boss-2", PW, roles=["admin"], by=first)
    assert accounts.set_roles(clinic, "boss", ["clinician"], by=first).roles == ("clinician",)
    accounts.reset_password(clinic, "boss", "another long passphrase")
    with pytest.raises(LoginError):
        accounts.log_in(clinic, "boss", PW)
    assert accounts.log_in(clinic, "boss", "another long passphrase")[1].username == "boss"


def test_single_sign_on_maps_only_accounts_an_admin_created(clinic):
    accounts.create_user(clinic, "k@clinic.example", None, roles=["clinician"])
    with pytest.raises(LoginError):                                   # an SSO account has no password here
        accounts.log_in(clinic, "k@clinic.example", PW)
    token, user = accounts.log_in_sso(clinic, "sub-123", "K@clinic.example")
    assert user.username == "k@clinic.example" and user.sso and accounts.session_user(clinic, token)
    assert accounts.log_in_sso(clinic, "sub-123", None)[1].id == user.id       # the subject is remembered
    with pytest.raises(LoginError, match="no active account"):
        accounts.log_in_sso(clinic, "sub-999", "stranger@elsewhere.example")


def test_demo_visitor_has_no_clinic_rights():
    demo = accounts.DEMO_USER
    assert demo.can("analyze") and demo.can("explore")
    assert not any(demo.can(p) for p in ("save", "review", "sign", "export", "accounts", "identified"))
