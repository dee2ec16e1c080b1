"""AppTest of the clinic pages on a temporary SQLite database: the worklist (order, filters, opening a case), the
case page (visits, stored heatmaps, change since the last visit, review, sign, a new version), the upload page's
"Save to worklist", and demo mode (nothing stored, clearly marked)."""
import datetime as dt
import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from retina_core.clinic import ClinicConfig, open_clinic, records
from retina_core.clinic.testing import synthetic_analysis, synthetic_image

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
    write_test_weights(weights, ["oct_resnet18"])
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


def _page(path: str, **state) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
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
    at = _page("pages/worklist.py")
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
    first = _save(env, "CP-0001", 11, P_NORMAL, dt.date(2026, 1, 5))
    second = _save(env, "CP-0001", 12, P_CNV, dt.date(2026, 3, 5))
    at = _page("pages/case.py", clinic_case_id=second.case_id)
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
    at.text_input(key=f"rv_reviewer_{aid}").input("dr-case")
    at.checkbox(key=f"rv_sign_{aid}").check()
    at.button(key=f"rv_save_{aid}").click().run()
    assert not at.exception and any("version 1 saved and signed" in s.value for s in at.success)
    (a,) = [x for x in records.case_view(env, second.case_id).analyses() if x.id == aid]
    assert (a.signed_review.label, a.signed_review.comment, a.signed_review.reviewer) == ("DME", "subretinal fluid",
                                                                                          "dr-case")
    assert any("v1: dr-case corrected to **DME**" in c.value for c in at.caption)
    at.radio(key=f"rv_decision_{aid}").set_value("Agree")                # a change: a new version, v1 kept
    at.text_input(key=f"rv_reviewer_{aid}").input("dr-case")
    at.button(key=f"rv_save_{aid}").click().run()
    assert any("version 2 saved (draft)" in s.value for s in at.success), [s.value for s in at.success]
    (a,) = [x for x in records.case_view(env, second.case_id).analyses() if x.id == aid]
    assert [(r.version, r.decision, r.signed_at is not None) for r in a.reviews] == [(1, "corrected", True),
                                                                                     (2, "agree", False)]
    at.button(key=f"rv_save_{first.analysis_ids[0]}").click().run()      # no reviewer typed: a clear message
    assert any("name or staff code" in e.value for e in at.error)


def test_upload_page_saves_readings_to_the_worklist(env, oct_png):
    at = _page("pages/upload.py")
    at.file_uploader(key="upload").set_value((oct_png.name, oct_png.read_bytes(), "image/png")).run()
    assert not at.exception and any(e.label == "Save to worklist" for e in at.expander)
    at.text_input(key="save_case_ref").input("John Smith").run()
    at.button(key="save_worklist").click().run()
    assert any("no spaces" in e.value for e in at.error)
    assert records.find_case(env, "John Smith") is None
    at.text_input(key="save_case_ref").input("UP-0001")
    at.text_input(key="save_actor").input("dr-upload")
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
    at = _page("pages/worklist.py")
    assert any("Demo mode" in i.value for i in at.info) and not at.dataframe
    at = _page("pages/case.py")
    assert any("Demo mode" in i.value for i in at.info)
