"""AppTest of every Streamlit page: upload -> prediction + heatmap + report, methods, compare, zones, ensemble,
volume viewer, batch screening, models page; and the 'model not available' path.

Weights: the bundled ones where present, randomly initialised ones for models not trained yet (tests check the
app's behaviour, not the models' accuracy), in a temporary folder named by RETINA_WEIGHTS_DIR.
"""
import contextlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from retina_core.analysis import DEFAULT_MODELS, installed_models
from retina_core.models import get_cfg

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")


@contextlib.contextmanager
def use_test_weights(directory, names=None):
    """RETINA_WEIGHTS_DIR -> `directory` filled by `retina_core.testing.write_test_weights`; the process-wide model
    caches are emptied on entry and exit so no other test sees these weights."""
    import streamlit as st

    from retina_core.analysis import get_model
    from retina_core.testing import write_test_weights

    write_test_weights(directory, names)
    saved = os.environ.get("RETINA_WEIGHTS_DIR")
    os.environ["RETINA_WEIGHTS_DIR"] = str(directory)
    get_model.cache_clear()
    st.cache_resource.clear()
    try:
        yield Path(directory)
    finally:
        if saved is None:
            os.environ.pop("RETINA_WEIGHTS_DIR", None)
        else:
            os.environ["RETINA_WEIGHTS_DIR"] = saved
        get_model.cache_clear()
        st.cache_resource.clear()
        st.cache_data.clear()


@pytest.fixture(scope="module", autouse=True)
def weights(tmp_path_factory):
    import shutil

    with use_test_weights(tmp_path_factory.mktemp("app_weights")) as d:
        # the bundled weights linked there keep their explain-eval evidence (the trust notes read nothing else)
        if (ROOT / "weights" / "evidence").is_dir():
            shutil.copytree(ROOT / "weights" / "evidence", d / "evidence", dirs_exist_ok=True)
        yield d


def _texts(at) -> str:
    parts = [m.value for m in at.markdown] + [s.value for s in at.subheader] + [c.value for c in at.caption]
    parts += [str(e.value) for e in at.error] + [str(e.value) for e in at.success] + [str(w.value) for w in at.warning]
    parts += [str(i.value) for i in at.info]
    return "\n".join(parts)


def _captions(at) -> list[str]:
    """Captions of every st.image on the page."""
    return [c for e in at.image for c in e.captions]


def _page(path=None):
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    assert not at.exception
    if path:
        at.switch_page(path).run()
        assert not at.exception, at.exception
    return at


@pytest.fixture
def app():
    return _page()


def _png(array) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- upload & diagnose
def test_empty_state_explains_what_to_do(app):
    assert "not a medical device" in _texts(app)
    assert any("Upload one or more" in i.value for i in app.info)
    assert any(e.label.startswith("Installed weights") for e in app.expander)


def test_upload_phantom_shows_prediction_and_heatmap(app, oct_png):
    app.file_uploader(key="upload").set_value((oct_png.name, oct_png.read_bytes(), "image/png")).run()
    assert not app.exception
    text = _texts(app)
    assert "Image 1" in text and "oct" in text
    labels = {m.label: m.value for m in app.metric}
    assert labels["Modality"] == "oct" and labels["Quality"] == "gradable"
    assert labels["Suggestion"] in get_cfg(DEFAULT_MODELS["oct"]).classes     # the default (real-data) OCT model
    assert any("heatmap" in c for c in [c.value for c in app.caption]) or "heatmap" in text
    # every installed OCT model reads the scan: the default in full, each other one in an expander with its
    # probabilities (one native bar per class, the predicted class in bold; no plotly chart on this page)
    others = installed_models("oct")[1:]
    bars = [b.proto.text for b in app.get("progress")]
    n_classes = sum(len(get_cfg(m).classes) for m in installed_models("oct"))
    assert len(bars) == n_classes and not app.get("plotly_chart")
    first = bars[:len(get_cfg(DEFAULT_MODELS["oct"]).classes)]       # the default model's, in its class order
    assert sum(f"**{labels['Suggestion']}**" in t for t in first) == 1
    assert [e.label.split(":")[0] for e in app.expander if e.label.split(":")[0] in others] == others
    assert any("trained on" in c.value for c in app.caption)
    assert {"dl_1", "report_pdf", "report_json"} <= {d.key for d in app.get("download_button")}
    # No laterality in the file name: the page asks for the eye.
    assert any(s.label.startswith("Eye") for s in app.selectbox)
    # Moving the opacity slider reuses the cached analysis (no second forward pass).
    cache = app.session_state["_analyses"]
    before = {k: id(v) for k, v in cache.items()}
    placed = {k: id(v) for k, v in app.session_state["_memo"]["placed_heatmap"].items()}
    app.slider(key="alpha").set_value(0.8).run()
    assert not app.exception
    assert {k: id(v) for k, v in app.session_state["_analyses"].items()} == before
    # ... and the heatmaps placed on the image once (results keep them at model resolution) are reused, too
    assert placed and {k: id(v) for k, v in app.session_state["_memo"]["placed_heatmap"].items()} == placed


def test_switching_methods_computes_each_once(app, oct_png):
    app.file_uploader(key="upload").set_value((oct_png.name, oct_png.read_bytes(), "image/png")).run()
    assert len({id(v) for v in app.session_state["_analyses"].values()}) == 1
    app.selectbox(key="method").set_value("gradcam++").run()
    assert not app.exception
    cache = app.session_state["_analyses"]
    assert sorted(k[2] for k in cache) == ["default", "gradcam", "gradcam++"]     # default = gradcam, filed twice
    assert len({id(v) for v in cache.values()}) == 2
    assert any("gradcam++ heatmap" in c for c in _captions(app))
    # every heatmap says how far its method can be trusted on this model (saved explain-eval, or that there is none)
    notes = _captions(app) + [w.value for w in app.warning]
    assert any("gradcam++" in n and ("sanity check" in n or "not evaluated" in n) for n in notes)
    ids = {k: id(v) for k, v in cache.items()}
    app.selectbox(key="method").set_value("gradcam").run()       # back: served from the session cache
    assert {k: id(v) for k, v in app.session_state["_analyses"].items()} == ids
    app.selectbox(key="method").set_value("attention_rollout").run()   # a ViT-only method on a CNN: a message
    assert not app.exception and "does not apply" in app.error[0].value


def test_bundled_sample_needs_no_files(app):
    app.selectbox(key="sample").set_value("Fundus phantom: moderate diabetic retinopathy").run()
    assert not app.exception
    labels = {m.label: m.value for m in app.metric}
    assert labels["Modality"] == "fundus" and labels["Suggestion"] in get_cfg(DEFAULT_MODELS["fundus"]).classes


def test_non_image_upload_gets_a_clear_message(app):
    app.file_uploader(key="upload").set_value(("scan.png", b"hello, not a picture", "image/png")).run()
    assert not app.exception
    assert len(app.error) == 1 and "Traceback" not in app.error[0].value


def test_report_download_button_gives_a_pdf(app, fundus_png, monkeypatch):
    """The report buttons defer building to the click; capture their callables and call them like the server."""
    from streamlit.runtime.media_file_manager import MediaFileManager

    deferred = {}
    original = MediaFileManager.add_deferred

    def spy(self, data_callable, mimetype, coordinates, file_name=None, **kw):
        deferred[file_name] = data_callable
        return original(self, data_callable, mimetype, coordinates, file_name, **kw)

    monkeypatch.setattr(MediaFileManager, "add_deferred", spy)
    name = "patient_scan_right.png"        # laterality from the file name
    app.file_uploader(key="upload").set_value((name, fundus_png.read_bytes(), "image/png")).run()
    assert not app.exception
    assert any("from the file name" in c.value and "OD" in c.value for c in app.caption)
    assert {"report_pdf", "report_json", "report_pdf_OD"} <= {d.key for d in app.get("download_button")}
    pdf = deferred["retina_report_patient.pdf"]()
    assert pdf[:4] == b"%PDF"
    assert deferred["retina_report_OD.pdf"]()[:4] == b"%PDF"
    js = deferred["retina_report_patient.json"]()
    assert b'"OD"' in js and name.encode() not in js and b"patient_scan" not in js


def test_dicom_upload_takes_the_eye_from_its_tag_and_shows_no_patient_data(app, oct_png):
    from retina_core import read_image
    from tests.test_decode import dicom_bytes

    grey = read_image(oct_png).pixels[..., 0].copy()
    data = dicom_bytes(grey, modality="OPT", laterality="L")      # carries DOE^JOHN, PID-12345, ...
    app.file_uploader(key="upload").set_value(("scan.dcm", data, "application/dicom")).run()
    assert not app.exception
    assert any("OS" in c.value and "DICOM laterality tag" in c.value for c in app.caption)
    shown = _texts(app) + " ".join(_captions(app)) + " ".join(str(m.value) for m in app.metric)
    for phi in ("DOE", "JOHN", "PID-12345", "1945", "Elsewhere", "HOUSE"):
        assert phi not in shown


def test_volume_upload_is_routed_to_the_viewer(app):
    from retina_core.phantoms import oct_volume
    from tests.test_decode import nifti_bytes

    vol = oct_volume("DME", seed=3, n_slices=12, height=64, width=64).image
    app.file_uploader(key="upload").set_value(("cube.nii", nifti_bytes(vol), "application/octet-stream")).run()
    assert not app.exception
    assert any("OCT volume" in i.value for i in app.info)
    assert any(p.proto.page.endswith("volume.py") or "volume" in p.proto.label for p in app.get("page_link"))
    assert app.session_state["volume_input"][0] == "cube.nii"
    app.switch_page("app_pages/volume.py").run()
    assert not app.exception
    assert app.slider(key="vol_slice").max == 11 and app.slider(key="vol_slice").value == 6
    assert "from Upload & diagnose" in _texts(app)


# ------------------------------------------------------------------------------------------- other pages
def test_volume_viewer_slider_and_metadata():
    at = _page("app_pages/volume.py")
    assert any("Upload an OCT volume" in i.value for i in at.info)
    at.selectbox(key="vol_sample").set_value("Volume phantom: diabetic macular oedema (DME)").run()
    assert not at.exception
    labels = {m.label: m.value for m in at.metric}
    assert labels["3D model suggestion"] in ("normal", "disease")
    assert at.number_input(key="vol_age").value is not None            # phantom metadata prefilled
    # the bundled 3-D map's measured trust, from the explain-eval evidence kept with its weights: a caption, as it
    # passed (measured on synthetic phantoms only)
    from retina_core.models import read_manifest

    sha = read_manifest(ROOT / "weights")["oct_volume_fusion3d_tiny"]["sha256"]
    report = json.loads((ROOT / "weights" / "evidence" / f"oct_volume_fusion3d_tiny-{sha[:12]}-phantoms.json")
                        .read_text())
    gc = report["methods"]["gradcam"]
    note = [c.value for c in at.caption if "passed the sanity check" in c.value]
    assert len(note) == 1 and f"hit a phantom lesion {gc['pointing_game']:.0%} of the time" in note[0]
    assert "measured on synthetic phantoms only" in note[0] and not re.search(r"\breal\b", note[0])
    assert f"deletion AUC {gc['deletion_auc']:.2f} against {gc['deletion_auc_random_map']:.2f}" in note[0]
    assert not any("rarely points" in w.value or "no more faithful" in w.value for w in at.warning)
    # the report's counterfactual phantoms: classes whose masked lesions the model does not use are named
    from retina_core.audit.evidence import unused_lesions

    for u in unused_lesions(report.get("counterfactual")):
        assert f"{u['class']} ({u['n']}, pointing game {u['pointing_game']:.2f})" in note[0]
    assert ("counterfactual phantoms show why" in note[0]) == bool(unused_lesions(report.get("counterfactual")))
    # what the suggestion rests on: exact Shapley values over the volume and the clinical values, adding up
    (ia,) = at.session_state["_memo"]["volume_inputs"].values()
    assert sum(ia.values.values()) == pytest.approx(ia.p - ia.p_reference, abs=1e-6)
    (vr,) = at.session_state["_memo"]["volume3d"].values()
    assert ia.p == pytest.approx(vr.p_disease, abs=1e-5)
    assert any("Exact Shapley values over the inputs" in c.value for c in at.caption)
    memo = at.session_state["_memo"]["volume3d"]
    ids = {k: id(v) for k, v in memo.items()}
    at.slider(key="vol_slice").set_value(3).run()                        # slider: nothing recomputed
    assert not at.exception
    assert {k: id(v) for k, v in at.session_state["_memo"]["volume3d"].items()} == ids
    assert any(c.startswith("B-scan 3 of") for c in _captions(at))
    at.number_input(key="vol_age").set_value(80.0).run()                 # another age: a new result
    assert not at.exception and len(at.session_state["_memo"]["volume3d"]) == 2
    assert len(at.session_state["_memo"]["volume_inputs"]) == 2
    at.toggle(key="vol_2d").set_value(True).run()                        # the B-scan model on every slice
    assert not at.exception and len(at.session_state["_memo"]["volume2d"]) == 1
    at.selectbox(key="vol_method").set_value("hirescam").run()           # another 3-D method, computed once
    assert not at.exception and len(at.session_state["_memo"]["volume_map"]) == 1
    assert any("3D hirescam of" in c for c in _captions(at))
    (hm,) = at.session_state["_memo"]["volume_map"].values()
    assert hm.shape == vr.maps.shape and hm.dtype == np.float32 and 0 <= hm.min() and hm.max() <= 1
    # a normal volume: when no input moves the score there is nothing to chart, and the page says so
    at.selectbox(key="vol_sample").set_value("Volume phantom: normal").run()
    assert not at.exception
    ia = list(at.session_state["_memo"]["volume_inputs"].values())[-1]
    caps = " ".join(c.value for c in at.caption)
    if abs(ia.p - ia.p_reference) < 0.01:
        assert "Nothing to attribute" in caps and "Exact Shapley values" not in caps
    else:
        assert "Exact Shapley values" in caps and "Nothing to attribute" not in caps


def test_bundled_paired_samples_are_what_their_names_say():
    from retina_core.phantoms import paired_phantoms
    from retina_core.webapp import common

    for label, (seed, disease) in common.PAIRED_SAMPLES.items():
        f, _ = paired_phantoms(seed, disease=disease)
        want = ("diabetic" if "diabetic" in label else "macular_degeneration" if "degeneration" in label else "none")
        assert f.meta["disease_process"] == want, label


def test_compare_page_pair_with_fusion_and_agreement():
    at = _page("app_pages/compare.py")
    assert any("paired phantom" in i.value for i in at.info)
    at.selectbox(key="cmp_pair").set_value("Paired phantom 1: diabetic eye (fundus + OCT)").run()
    assert not at.exception
    labels = {m.label: m.value for m in at.metric}
    assert labels["Fusion suggestion"] in ("normal", "disease")
    caps = " ".join(_captions(at))
    assert "fusion model used in the fundus" in caps and "fusion model used in the OCT" in caps
    assert "agree" in " ".join(str(x.value) for x in list(at.success) + list(at.warning))
    # measured trust of each map on its own: the bundled report finds the fundus map faithful; the OCT map no better
    # than chance with the fundus as it is, but faithful where the OCT carries the call (counterfactual pairs)
    assert any("on the fundus image passed" in c.value and "-phantoms.json`" in c.value
               for c in at.caption)
    assert any("on the OCT image" in c.value and "this map is faithful when this image decides" in c.value
               for c in at.caption)
    assert not any("no more faithful than chance" in w.value for w in at.warning)
    assert len(at.dataframe) == 1 and len(at.dataframe[0].value) == 3        # fundus, OCT, fusion rows
    # the fusion maps by Integrated Gradients instead: one map per image, computed once
    at.radio(key="cmp_fusion_method").set_value("integrated_gradients").run()
    assert not at.exception
    (maps,) = at.session_state["_memo"]["fusion_maps"].values()
    assert set(maps) == {"fundus", "oct"} and all(0 <= m.min() and m.max() <= 1 for m in maps.values())
    assert "Integrated Gradients for" in " ".join(_captions(at))


def test_zones_page_methods_plots_and_stability():
    at = _page("app_pages/zones.py")
    at.selectbox(key="zones_sample").set_value("Fundus phantom: moderate diabetic retinopathy").run()
    assert not at.exception
    keys = {c.proto.id for c in at.get("plotly_chart")}
    assert len(at.get("plotly_chart")) == 3 and keys                       # centre/L/R, disc, ETDRS
    assert any(m.label == "SSIM to the original map" for m in at.metric)
    assert any(c.startswith("Perturbed: shift") for c in _captions(at))
    at.multiselect(key="zones_methods").set_value(["gradcam", "layercam"]).run()
    assert not at.exception
    caps = _captions(at)
    assert any(c.startswith("layercam · ") for c in caps) and not any(c.startswith("gradcam++") for c in caps)
    # each map's caption carries its method's sanity-check verdict on this model (or that it was not evaluated)
    assert all("sanity check" in c or "not evaluated" in c for c in caps if c.startswith(("gradcam ·", "layercam ·")))


def test_zones_opacity_slider_recomputes_no_heatmap(monkeypatch):
    """The opacity slider (sidebar, drawn by the maps fragment) only re-blends; a seen opacity is not re-blended."""
    import retina_core.attention_zones as attention_zones
    import retina_core.explain.overlay as overlay_module

    at = _page("app_pages/zones.py")
    at.selectbox(key="zones_sample").set_value("OCT phantom: choroidal neovascularisation (CNV)").run()
    assert not at.exception
    calls = {"explain_methods": 0, "perturbation_views": 0, "overlay": 0}

    def counted(module, name):
        real = getattr(module, name)

        def spy(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)

    counted(attention_zones, "explain_methods")
    counted(attention_zones, "perturbation_views")
    counted(overlay_module, "overlay")
    methods = at.multiselect(key="zones_methods").value
    at.sidebar.slider(key="zones_alpha").set_value(0.8).run()
    assert not at.exception
    assert calls["explain_methods"] == calls["perturbation_views"] == 0
    assert calls["overlay"] > 0                                          # a new opacity: blended again
    caps = _captions(at)
    assert all(any(c.startswith(f"{m} · ") for c in caps) for m in methods)
    assert sum(c.endswith("on the perturbed image") for c in caps) == 3
    at.sidebar.toggle(key="zones_grid").set_value(False).run()
    calls["overlay"] = 0
    at.sidebar.toggle(key="zones_grid").set_value(True).run()           # settings seen before: kept blends
    at.sidebar.slider(key="zones_alpha").set_value(0.5).run()
    assert not at.exception and calls == {"explain_methods": 0, "perturbation_views": 0, "overlay": 0}
    assert _captions(at) == caps


def test_ensemble_members_change_the_vote(tmp_path, monkeypatch):
    import json

    import retina_core.evaluate.ensemble as ensemble

    (tmp_path / "docs").mkdir()
    saved = {"metric": "accuracy", "metric_kind": "phantom", "ablation": [     # the CLI's --ablation --json shape
        {"rank": 1, "members": ["a", "b"], "score": 0.91, "accuracy": 0.91, "auc_macro": 0.97},
        {"rank": 2, "members": ["a"], "score": 0.88, "accuracy": 0.88, "auc_macro": 0.95}]}
    (tmp_path / "docs" / "ensemble_ablation.json").write_text(json.dumps(saved))
    real = ensemble.find_ablation_files
    monkeypatch.setattr(ensemble, "find_ablation_files", lambda: real(base=tmp_path))
    at = _page("app_pages/ensemble.py")
    group = at.selectbox(key="ens_group")
    assert len(at.multiselect(key="ens_members").value) >= 2, "no group with two members"
    modality = "OCT" if group.value.startswith("oct") else "Fundus"
    sample = next(o for o in at.selectbox(key="ens_sample").options if o.startswith(modality))
    at.selectbox(key="ens_sample").set_value(sample).run()
    assert not at.exception
    labels = {m.label: m.value for m in at.metric}
    assert "Ensemble suggestion" in labels and "Disagreement" in labels
    members = at.multiselect(key="ens_members").value
    assert len(members) >= 2 and all(m in at.multiselect(key="ens_members").options for m in members)
    n_maps = sum(1 for c in _captions(at) if "weight" in c)
    assert n_maps == len(members)
    at.multiselect(key="ens_members").set_value(members[:1]).run()
    assert not at.exception
    labels = {m.label: m.value for m in at.metric}
    assert labels["Members agreeing"] == "100%" and labels["Spread"] == "0.00"
    table = at.dataframe[-1].value                                       # the saved ablation, ranked
    assert list(table["members"]) == ["a + b", "a"] and list(table["accuracy"]) == [0.91, 0.88]


def test_batch_page_screens_uploads_into_a_table_and_csv(fundus_png, oct_png):
    at = _page("app_pages/batch.py")
    assert any("Screen" in i.value for i in at.info)
    files = [("a.png", fundus_png.read_bytes(), "image/png"), ("b.png", oct_png.read_bytes(), "image/png"),
             ("broken.jpg", b"\xff\xd8\xff\xe0 truncated", "image/jpeg")]
    at.file_uploader(key="batch_upload").set_value(files).run()
    assert not at.exception
    at.button(key="batch_run").click().run()
    assert not at.exception
    df = at.dataframe[0].value
    assert list(df["file"]) == ["a.png", "b.png", "broken.jpg"]
    assert df.loc[2, "error"] and df.loc[0, "modality"] == "fundus" and df.loc[1, "modality"] == "oct"
    assert {m.label: m.value for m in at.metric}["Unreadable files"] == "1"
    assert "batch_csv" in {d.key for d in at.get("download_button")}
    at.run()                                                           # rerun: the table stays, nothing recomputed
    assert len(at.dataframe) == 1 and not at.exception


def test_models_page_shows_cards_and_phantom_provenance():
    at = _page("app_pages/models.py")
    text = _texts(at)
    assert "fundus_dr_effnet_b0" in text and "oct_resnet18" in text
    assert "phantom" in text.lower() and "not a medical device" in text
    at.selectbox(key="eval_model").set_value("oct_resnet18").run()
    at.number_input(key="eval_n").set_value(2).run()
    at.button(key="eval_run").click().run()
    assert not at.exception
    assert len(at.get("plotly_chart")) >= 3                             # confusion matrix, ROC, reliability
    assert {m.label for m in at.metric} >= {"Accuracy", "Macro AUC", "ECE"}
    # the volume model's evidence carries counterfactual phantoms: shown as a table, one row per class
    at.selectbox(key="eval_model").set_value("oct_volume_fusion3d_tiny").run()
    assert not at.exception
    from retina_core.models import read_manifest

    sha = read_manifest(ROOT / "weights")["oct_volume_fusion3d_tiny"]["sha256"]
    name = f"oct_volume_fusion3d_tiny-{sha[:12]}-phantoms.json"
    report = json.loads((ROOT / "weights" / "evidence" / name).read_text())
    assert any("Explanation stability" in m.value and name in m.value and "synthetic phantoms" in m.value
               for m in at.markdown)
    if report.get("counterfactual"):
        (cf,) = [d for d in at.dataframe if "eyes" in d.value.columns]
        assert list(cf.value["class"]) == list(report["counterfactual"]["per_class"])
        assert any("Counterfactual phantoms" in m.value for m in at.markdown)


def test_pages_degrade_when_a_model_has_no_weights(tmp_path):
    """Only the two bundled CNNs installed: the fusion, 3D and ensemble parts say what is missing and why."""
    with use_test_weights(tmp_path, ["fundus_dr_effnet_b0", "oct_resnet18"]):
        at = _page("app_pages/compare.py")
        at.selectbox(key="cmp_pair").set_value("Paired phantom 2: healthy eye (fundus + OCT)").run()
        assert not at.exception
        assert any("fusion model is not available" in i.value and "fundus_oct_fusion" in i.value for i in at.info)
        assert len(at.dataframe) == 1                                  # the two single-modality readings still
        at.switch_page("app_pages/volume.py").run()
        at.selectbox(key="vol_sample").set_value("Volume phantom: normal").run()
        assert not at.exception
        assert any("3D volume model is not available" in i.value for i in at.info)
        at.switch_page("app_pages/ensemble.py").run()
        assert not at.exception
        assert any("an ensemble needs at least two" in i.value for i in at.info)
