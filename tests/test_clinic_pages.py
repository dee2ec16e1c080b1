"""AppTest of the clinic pages on a temporary SQLite database: the worklist (order, filters, opening a case), the
case page (visits, stored heatmaps, change since the last visit, review, sign, a new version), the upload page's
"Save to worklist", demo mode (nothing stored, clearly marked), sign-in (first account, wrong password, lock-out),
and what each role can open (signed out: only the sign-in page; researcher: de-identified, no review; admin:
accounts and the audit trail)."""
import datetime as dt
import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from retina_core.clinic import ClinicConfig, accounts, open_clinic, records
from retina_core.clinic.testing import TEST_PASSWORD, signed_in_state, synthetic_analysis, synthetic_image

APP = str(Path(__file__).resolve().parents[1] / "app.py")
P_CNV = {"CNV": 0.7, "DME": 0.1, "DRUSEN": 0.1, "NORMAL": 0.1}
P_NORMAL = {"CNV": 0.05, "DME": 0.05, "DRUSEN": 0.1, "NORMAL": 0.8}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """RETINA_DATA_DIR -> a temporary folder (SQLite database + content store); RETINA_WEIGHTS_DIR -> test weights
    of the phantom OCT model only (the upload test reads one image with it)."""
    import streamlit as st

    from retina_core.analysis import get_model
    from retina_core.testing import write_test_weights

    data, weights = tmp_path_factory.mktemp("clinic_app"), tmp_path_factory.mktemp("clinic_weights")
    write_test_weights(weights, ["oct_resnet18", "oct_volume_fusion3d_tiny", "fundus_resnet18_head",
                                 "fundus_dr_effnet_b0", "fundus_oct_fusion"])   # the fusion head needs both encoders
    keys = ("RETINA_DATA_DIR", "RETINA_DATABASE_URL", "RETINA_MODE", "RETINA_WEIGHTS_DIR", "RETINA_SITE_SECRET")
    saved = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ.pop(k, None)
    os.environ.update(RETINA_DATA_DIR=str(data), RETINA_WEIGHTS_DIR=str(weights))
    get_model.cache_clear()
    st.cache_resource.clear()
    clinic = open_clinic(ClinicConfig("dev", data, f"sqlite:///{data / 'retina.db'}"))
    try:
        yield clinic
    finally:
        clinic.dispose()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        get_model.cache_clear()
        st.cache_resource.clear()
        st.cache_data.clear()


def _page(path: str, clinic=None, user: str = "dr-test", roles=("clinician",), **state) -> AppTest:
    """`path` opened by a browser session signed in as `user` (an account with `roles`, made on first use), or
    signed out with clinic=None."""
    at = AppTest.from_file(APP, default_timeout=120)
    if clinic is not None:
        state = signed_in_state(clinic, user, roles) | state
    for k, v in state.items():
        at.session_state[k] = v
    at.run()
    at.switch_page(path).run()
    assert not at.exception, at.exception
    return at


def _texts(at) -> str:
    parts = [m.value for m in at.markdown] + [s.value for s in at.subheader] + [c.value for c in at.caption]
    parts += [str(e.value) for kind in (at.error, at.success, at.warning, at.info) for e in kind]
    return "\n".join(parts)


def _save(clinic, ref, seed, probs, date, eye="OD"):
    img = synthetic_image(seed)
    return records.save_reading(clinic, case_ref=ref, eye=eye, visit_date=date, image=img,
                                analyses=[synthetic_analysis(img, probs)], actor="dr-seed")


def test_worklist_orders_filters_and_opens_a_case(env):
    a = _save(env, "WL-0001", 1, P_NORMAL, dt.date(2026, 2, 1))
    b = _save(env, "WL-0002", 2, P_CNV, dt.date(2026, 1, 1))
    records.save_review(env, a.analysis_ids[0], "agree", reviewer="dr-wl", sign=True)
    at = _page("app_pages/worklist.py", env)
    assert "not a medical device" in _texts(at) and "pseudonyms" in _texts(at)
    table = at.dataframe[0].value
    mine = table[table["Case"].str.startswith("WL-")]
    assert list(mine["Case"]) == ["WL-0002", "WL-0001"]                 # referable first
    assert list(mine["Status"]) == ["awaiting review (1 of 1)", "reviewed"]
    at.checkbox(key="wl_awaiting").check().run()
    assert "WL-0001" not in set(at.dataframe[0].value["Case"])
    at.checkbox(key="wl_awaiting").uncheck().run()
    at.selectbox(key="wl_reviewer").select("dr-wl").run()
    assert list(at.dataframe[0].value["Case"]) == ["WL-0001"]
    at.selectbox(key="wl_reviewer").select("Anyone").run()
    at.date_input(key="wl_to").set_value(dt.date(2026, 1, 15)).run()
    assert "WL-0001" not in set(at.dataframe[0].value["Case"])
    at.selectbox(key="wl_open").select(b.case_id).run()
    at.button(key="wl_open_button").click().run()
    assert not at.exception
    assert at.session_state["clinic_case_id"] == b.case_id
    assert any(s.value == "Case WL-0002" for s in at.subheader)          # the case page opened on that case


def test_case_page_shows_visits_change_and_records_signed_versions(env):
    _save(env, "CP-0001", 11, P_NORMAL, dt.date(2026, 1, 5))
    second = _save(env, "CP-0001", 12, P_CNV, dt.date(2026, 3, 5))
    at = _page("app_pages/case.py", env, user="dr-case", clinic_case_id=second.case_id)
    text = _texts(at)
    assert "Case CP-0001" in text and "Change since the last visit" in text
    assert any("NORMAL -> CNV" in w.value and "now referable" in w.value for w in at.warning)
    assert [s.value for s in at.subheader if s.value.startswith("Visit")] == ["Visit 2026-03-05", "Visit 2026-01-05"]
    captions = [c for e in at.image for c in e.captions]
    assert sum("gradcam heatmap for 'CNV'" in c for c in captions) == 1           # from the stored heatmap
    assert any("phantoms" in c.value for c in at.caption)                        # what the model was trained on
    aid = second.analysis_ids[0]
    at.radio(key=f"rv_decision_{aid}").set_value("Corrected grade")
    at.selectbox(key=f"rv_grade_{aid}").select("DME")
    at.text_area(key=f"rv_comment_{aid}").input("subretinal fluid")
    at.checkbox(key=f"rv_sign_{aid}").check()
    at.button(key=f"rv_save_{aid}").click().run()
    assert not at.exception and any("version 1 saved and signed" in s.value for s in at.success)
    (a,) = [x for x in records.case_view(env, second.case_id).analyses() if x.id == aid]
    assert (a.signed_review.label, a.signed_review.comment, a.signed_review.reviewer) == ("DME", "subretinal fluid",
                                                                                          "dr-case")
    assert any("v1: dr-case corrected to **DME**" in c.value for c in at.caption)
    at.radio(key=f"rv_decision_{aid}").set_value("Agree")                # a change: a new version, v1 kept
    at.button(key=f"rv_save_{aid}").click().run()
    assert any("version 2 saved (draft)" in s.value for s in at.success), [s.value for s in at.success]
    (a,) = [x for x in records.case_view(env, second.case_id).analyses() if x.id == aid]
    assert [(r.version, r.decision, r.signed_at is not None) for r in a.reviews] == [(1, "corrected", True),
                                                                                     (2, "agree", False)]
    assert any("Reviewer: **dr-case** (signed in)" in c.value for c in at.caption)   # no name to type: the account


def test_upload_page_saves_readings_to_the_worklist(env, oct_png):
    at = _page("app_pages/upload.py", env, user="dr-upload")
    at.file_uploader(key="upload").set_value((oct_png.name, oct_png.read_bytes(), "image/png")).run()
    assert not at.exception and any(e.label == "Save to worklist" for e in at.expander)
    at.text_input(key="save_case_ref").input("John Smith").run()
    at.button(key="save_worklist").click().run()
    assert any("no spaces" in e.value for e in at.error)
    assert records.find_case(env, "John Smith") is None
    at.text_input(key="save_case_ref").input("UP-0001")
    at.button(key="save_worklist").click().run()
    assert not at.exception and any("Saved to case **UP-0001**" in s.value for s in at.success)
    view = records.case_view(env, records.find_case(env, "UP-0001"))
    (stored,) = view.analyses()
    assert stored.model == "oct_resnet18" and stored.heatmap_hash and stored.created_by == "dr-upload"
    assert env.store.has(view.eyes[0].visits[0].images[0].stored_hash)
    at.button(key="save_new_ref").click().run()                           # a generated pseudonym
    assert at.text_input(key="save_case_ref").value.startswith("C-")


def test_demo_mode_stores_nothing_and_says_so(env, monkeypatch):
    monkeypatch.setenv("RETINA_MODE", "demo")
    at = _page("app_pages/worklist.py")
    assert any("Demo mode" in i.value for i in at.info) and not at.dataframe
    at = _page("app_pages/case.py")
    assert any("Demo mode" in i.value for i in at.info)


def test_signed_out_only_the_sign_in_page_is_reachable(env):
    if not _exists(env, "dr-login"):
        accounts.create_user(env, "dr-login", TEST_PASSWORD, roles=["clinician"])
    for path in ("app_pages/worklist.py", "app_pages/case.py", "app_pages/upload.py", "app_pages/accounts.py",
                 "app_pages/models.py"):
        at = AppTest.from_file(APP, default_timeout=120)
        at.run()
        assert [t.value for t in at.title] == ["Sign in"] and not at.dataframe and not at.file_uploader
        with pytest.raises(ValueError, match="Could not find a navigation page"):   # not offered to this session
            at.switch_page(path)
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.text_input(key="login_user").input("dr-login")
    at.text_input(key="login_password").input("wrong password 1")
    at.button[0].click().run()
    assert any("Wrong user name or password" in e.value for e in at.error)
    at.text_input(key="login_user").input("dr-login")
    at.text_input(key="login_password").input(TEST_PASSWORD)
    at.button[0].click().run()
    assert not at.exception and any(t.value == "Upload & diagnose" for t in at.title)
    assert any("Signed in as" in c.value for c in at.sidebar.caption)
    at.sidebar.button(key="sign_out").click().run()
    assert any(t.value == "Sign in" for t in at.title) and any("Signed out" in w.value for w in at.warning)
    trail = [e["action"] for e in records.audit_trail(env, actor="dr-login")]
    assert trail[:3] == ["logout", "view.page", "login"] or {"logout", "login", "login.fail"} <= set(trail)


def _exists(clinic, name) -> bool:
    return any(u.username == name for u in accounts.list_users(clinic))


def test_a_new_install_asks_for_the_first_account(tmp_path, monkeypatch):
    monkeypatch.setenv("RETINA_DATA_DIR", str(tmp_path / "fresh"))
    monkeypatch.delenv("RETINA_MODE", raising=False)
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert any("create the first account" in i.value for i in at.info)
    at.text_input(key="first_user").input("boss")
    at.text_input(key="first_display").input("The Boss")
    at.text_input(key="first_password").input(TEST_PASSWORD)
    at.text_input(key="first_again").input(TEST_PASSWORD)
    at.button[0].click().run()
    assert not at.exception and any(t.value == "Upload & diagnose" for t in at.title)
    at.switch_page("app_pages/accounts.py").run()                 # admin + clinician by default
    assert not at.exception and any(t.value == "Accounts" for t in at.title)
    monkeypatch.setenv("RETINA_MODE", "production")          # production: the first account comes from the CLI
    monkeypatch.setenv("RETINA_DATA_DIR", str(tmp_path / "fresh-prod"))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert any("clinic user add" in i.value for i in at.info) and not at.text_input


def test_researcher_sees_cases_de_identified_and_cannot_review(env):
    saved = _save(env, "RS-SECRET-1", 31, P_CNV, dt.date(2026, 4, 1))
    records.save_review(env, saved.analysis_ids[0], "agree", reviewer="dr-x", comment="private note", sign=True)
    at = _page("app_pages/worklist.py", env, user="res-1", roles=("researcher",))
    cases = set(at.dataframe[0].value["Case"])
    assert f"Case #{saved.case_id}" in cases and "RS-SECRET-1" not in cases
    assert any(b.label.startswith("Export signed labels") for b in at.get("download_button"))
    at = _page("app_pages/case.py", env, user="res-1", roles=("researcher",), clinic_case_id=saved.case_id)
    text = _texts(at)
    assert "RS-SECRET-1" not in text and "private note" not in text and "De-identified view" in text
    assert not [b for b in at.button if str(b.key).startswith("rv_save")]       # no review form
    for path in ("app_pages/upload.py", "app_pages/batch.py", "app_pages/accounts.py"):     # not offered
        with pytest.raises(ValueError, match="Could not find a navigation page"):
            _page(path, env, user="res-1", roles=("researcher",))
    views = records.audit_trail(env, actor="res-1", action="view.case")
    assert views and views[0]["object_id"] == saved.case_id and views[0]["details"]["deidentified"] is True


def test_admin_manages_accounts_and_reads_the_audit_trail_a_clinician_cannot(env):
    for path in ("app_pages/accounts.py", "app_pages/audit_trail.py"):
        with pytest.raises(ValueError, match="Could not find a navigation page"):
            _page(path, env, user="dr-noadmin", roles=("clinician",))
    at = _page("app_pages/accounts.py", env, user="adm-1", roles=("admin",))
    assert any(t.value == "Accounts" for t in at.title)
    at.text_input(key="new_user").input("res-new")
    at.multiselect(key="new_roles").set_value(["researcher"])
    at.text_input(key="new_password").input(TEST_PASSWORD)
    next(b for b in at.button if b.label == "Create account").click().run()
    assert not at.exception and any("res-new created" in s.value for s in at.success)
    assert accounts.get_user(env, "res-new").roles == ("researcher",)
    at.switch_page("app_pages/audit_trail.py").run()
    table = at.dataframe[0].value
    assert "user.create" in set(table["Action"]) and "adm-1" in set(table["User"])


def test_an_oct_volume_reading_is_saved_as_its_en_face_picture(env):
    from retina_core.phantoms import oct_volume
    from tests.test_decode import nifti_bytes

    vol = oct_volume("DME", seed=4, n_slices=12, height=64, width=64).image
    at = _page("app_pages/volume.py", env, user="dr-vol")
    at.file_uploader(key="vol_upload").set_value(("cube.nii", nifti_bytes(vol), "application/octet-stream")).run()
    assert not at.exception and any(e.label == "Save to worklist" for e in at.expander)
    at.text_input(key="save_case_ref").input("VOL-0001")
    at.button(key="save_worklist").click().run()
    assert not at.exception and any("Saved to case **VOL-0001**" in s.value for s in at.success)
    view = records.case_view(env, records.find_case(env, "VOL-0001"))
    (a,) = view.analyses()
    image = view.eyes[0].visits[0].images[0]
    assert a.modality == "oct_volume" and a.model == "oct_volume_fusion3d_tiny" and a.heatmap_hash
    assert set(a.probabilities) == {"normal", "disease"} and abs(sum(a.probabilities.values()) - 1) < 1e-6
    assert image.source_format == "nifti" and image.width == 64 and "en-face" in " ".join(a.notes)
    at = _page("app_pages/case.py", env, user="dr-vol", clinic_case_id=view.id)
    assert any("en-face projection" in c.value for c in at.caption)


def test_a_fundus_and_oct_pair_is_saved_with_each_image_and_the_fusion_reading(env):
    at = _page("app_pages/compare.py", env, user="dr-pair")
    at.selectbox(key="cmp_pair").set_value(at.selectbox(key="cmp_pair").options[1]).run()
    assert not at.exception and any(e.label == "Save to worklist" for e in at.expander)
    at.text_input(key="save_case_ref").input("PAIR-0001")
    at.button(key="save_worklist").click().run()
    assert not at.exception and any("Saved to case **PAIR-0001**" in s.value for s in at.success)
    view = records.case_view(env, records.find_case(env, "PAIR-0001"))
    (visit,) = [v for e in view.eyes for v in e.visits]
    assert len(visit.images) == 2
    fused = [a for i in visit.images for a in i.analyses if a.modality == "fundus+oct"]
    assert len(fused) == 2 and all(a.model == "fundus_oct_fusion" and a.heatmap_hash for a in fused)
    assert fused[0].probabilities == fused[1].probabilities and "same eye" in fused[0].notes[0]
