"""AppTest of the Streamlit pages: upload -> prediction + heatmap, samples, slider reruns, models page."""
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def _texts(at) -> str:
    parts = [m.value for m in at.markdown] + [s.value for s in at.subheader] + [c.value for c in at.caption]
    parts += [str(e.value) for e in at.error] + [str(e.value) for e in at.success] + [str(w.value) for w in at.warning]
    return "\n".join(parts)


@pytest.fixture
def app():
    at = AppTest.from_file(APP, default_timeout=240)
    at.run()
    assert not at.exception
    return at


def test_empty_state_explains_what_to_do(app):
    assert "not a medical device" in _texts(app)
    assert any("Upload one or more" in i.value for i in app.info)


def test_upload_phantom_shows_prediction_and_heatmap(app, oct_png):
    app.file_uploader(key="upload").set_value((oct_png.name, oct_png.read_bytes(), "image/png")).run()
    assert not app.exception
    text = _texts(app)
    assert "Image 1" in text and "oct" in text
    labels = {m.label: m.value for m in app.metric}
    assert labels["Modality"] == "oct" and labels["Quality"] == "gradable"
    assert labels["Suggestion"] in ("CNV", "DME", "DRUSEN", "NORMAL")
    assert any("heatmap" in c for c in [c.value for c in app.caption]) or "heatmap" in text
    assert len(app.get("plotly_chart")) == 1
    assert len(app.get("download_button")) == 1
    # Moving the opacity slider reuses the cached analysis (no second forward pass).
    cache = app.session_state["_analyses"]
    before = {k: id(v) for k, v in cache.items()}
    app.slider(key="alpha").set_value(0.8).run()
    assert not app.exception
    assert {k: id(v) for k, v in app.session_state["_analyses"].items()} == before


def test_bundled_sample_needs_no_files(app):
    app.selectbox(key="sample").set_value("Fundus phantom: moderate diabetic retinopathy").run()
    assert not app.exception
    labels = {m.label: m.value for m in app.metric}
    assert labels["Modality"] == "fundus" and labels["Suggestion"] in (
        "No DR", "Mild", "Moderate", "Severe", "Proliferative DR")


def test_non_image_upload_gets_a_clear_message(app):
    app.file_uploader(key="upload").set_value(("scan.png", b"hello, not a picture", "image/png")).run()
    assert not app.exception
    assert len(app.error) == 1 and "Traceback" not in app.error[0].value


def test_models_page_shows_cards_and_phantom_provenance():
    at = AppTest.from_file(APP, default_timeout=240)
    at.run()
    at.switch_page("pages/models.py").run()
    assert not at.exception
    text = _texts(at)
    assert "fundus_dr_effnet_b0" in text and "oct_resnet18" in text
    assert "phantom" in text.lower() and "not a medical device" in text
