"""Volume viewer: an OCT volume's B-scans with a slice slider, the en-face projection, the 3D model's result with
the patient's clinical values as inputs, how much the suggestion rests on the image versus each clinical value
(exact Shapley values), and per-slice heatmaps."""
import numpy as np
import streamlit as st

from retina_core import figures
from retina_core.analysis import NO_RESULT
from retina_core.errors import RetinaInputError
from retina_core.explain.attribution import default_method
from retina_core.explain.inputs import input_shapley
from retina_core.explain.overlay import overlay
from retina_core.explain.volume_methods import VOLUME_METHODS
from retina_core.io.decode import VOLUME_EXTENSIONS
from retina_core.modality import Modality
from retina_core.quality import assess_quality
from retina_core.volume import (META_FIELDS, en_face, en_face_rows, map_en_face, per_slice_2d, run_volume_model,
                                slice_rgb, volume_reading)
from retina_core.webapp import auth, clinic_pages, common

DEFAULT_LABEL = "Model's default (from explain-eval)"
SLOW = {"scorecam": "slow: one forward per channel", "integrated_gradients": "slow: 32 forward/backward passes"}
METHOD_LABELS = {DEFAULT_LABEL: DEFAULT_LABEL} | {
    m: m + (f" ({SLOW[m]})" if m in SLOW else "") for m in VOLUME_METHODS if m != "gradcam-reference"}

st.title("Volume viewer")
common.disclaimer()

up = st.file_uploader("OCT volume (NIfTI .nii / .nii.gz, multi-frame DICOM, TIFF stack, Heidelberg .vol / .e2e, "
                      "Topcon .fda / .fds)", type=list(VOLUME_EXTENSIONS),
                      key="vol_upload")
sample = st.selectbox("... or a bundled volume (a synthetic phantom, no patient data)",
                      ["(none)"] + list(common.VOLUME_SAMPLES), key="vol_sample")
from_upload_page = st.session_state.get("volume_input")

vol = meta0 = eye0 = data = q = None
source = ""
try:
    if up is not None:
        data = up.getvalue()
        img = common.decode_upload(data, up.name)
        source, content = up.name, img.content_hash
    elif sample != "(none)":
        img = None
        vol, meta0, eye0, _ = common.sample_volume(sample)
        source, content = sample, f"sample:{sample}"
    elif from_upload_page:
        data = from_upload_page[1]
        img = common.decode_upload(data, from_upload_page[0])
        source, content = f"{from_upload_page[0]} (from Upload & diagnose)", img.content_hash
    else:
        img = None
    if img is not None:
        if img.kind != "volume":
            raise RetinaInputError("This file holds a single image, not a volume: open it in Upload & diagnose.")
        q = assess_quality(img)   # the one gate, before any model
        if q.modality == "not_retinal" or not q.gradable:
            st.error(f"**{NO_RESULT}.** {q.verdict}. " + " ".join(q.reasons), icon=":material/block:")
            st.stop()
        vol, eye0 = img.pixels, img.laterality
except RetinaInputError as exc:
    st.error(str(exc), icon=":material/error:")
    st.stop()

if vol is None:
    st.info("Upload an OCT volume or pick a bundled one. You get a slice slider, the en-face projection, the 3D "
            "model's normal-vs-disease result (with age, sex and clinical values as inputs) and per-slice "
            "heatmaps.", icon=":material/arrow_upward:")
    st.stop()

d, h, w = vol.shape
st.caption(f"{source}: {d} B-scans of {w} x {h} px.")
models3d = common.model_choices(Modality.OCT_VOLUME)
with st.sidebar:
    st.header("3D model and clinical values")
    model_name = st.selectbox("3D model", models3d, key="vol_model") if models3d else None
    meta0 = meta0 or {}
    meta = {}
    for f, (label, unit, lo, hi) in META_FIELDS.items():
        v = meta0.get(f)
        meta[f] = st.number_input(f"{label} ({unit})", lo, hi, float(v) if v is not None else None,
                                  key=f"vol_{f}", placeholder="not recorded")
    sex = st.selectbox("Sex", ["not recorded", "F", "M"], key="vol_sex",
                       index=["not recorded", "F", "M"].index(meta0.get("sex") or "not recorded"))
    meta["sex"] = None if sex == "not recorded" else sex
    eye_opts = {"not recorded": None, "OD (right)": "OD", "OS (left)": "OS"}
    eye_label = st.selectbox("Eye", list(eye_opts), key="vol_eye",
                             index=list(eye_opts.values()).index(eye0 if eye0 in ("OD", "OS") else None))
    eye = eye_opts[eye_label]
    st.caption("Leave a value empty when it is not recorded: the model then uses its training mean. Values are "
               "used for this result only and stored nowhere (Save to worklist keeps the result, not the values).")
    method_label = st.selectbox(
        "Heatmap method", list(METHOD_LABELS), format_func=METHOD_LABELS.get, key="vol_method",
        help="The default is the method `explain-eval` ranked best on held-out phantom volumes among those as fast "
             "as the prediction (the single-pass 3D Grad-CAM, computed with it). The others (pytorch-grad-cam "
             "family, a 3D Score-CAM, Integrated Gradients) run after the prediction; each map's measured trust is "
             "shown under it.")
    alpha = st.slider("Heatmap opacity", 0.0, 1.0, 0.4, 0.05, key="vol_alpha")

i = st.slider("B-scan (slice)", 0, d - 1, d // 2, key="vol_slice")
result, maps, map_source = None, None, ""
if model_name is None:
    common.show_unavailable("The 3D volume model", "No oct_volume model has weights installed; train one with "
                            "`python -m retina_core train --model oct_volume_fusion3d_tiny --data VOLUMES`.")
    common.unavailable_note(Modality.OCT_VOLUME)
else:
    model = common.cached_model(model_name)
    key = (content, model_name, tuple(sorted((k, v) for k, v in meta.items())), eye)
    with st.spinner("Running the 3D model..."):
        result = common.served("volume3d", key, lambda: run_volume_model(model, vol, meta, eye), limit=8)
    auth.audit_view("analysis.run", "volume", None, content_hash=content, models=[model_name])
    method = default_method(model) if method_label == DEFAULT_LABEL else method_label
    if method == "gradcam":
        maps = result.maps
    else:
        with st.spinner(f"Computing the 3D {method} map..."):
            maps = common.served("volume_map", key + (method,),
                                 lambda: model.explain(vol, method, meta=meta, eye=eye), limit=8)
    map_source = f"3D {'Grad-CAM' if method == 'gradcam' else method} of {model_name} for the disease score"

with st.container(border=True):
    if result is not None:
        c = st.columns(3)
        c[0].metric("3D model suggestion", result.label, f"P(disease) {result.p_disease:.0%}", delta_color="off",
                    delta_arrow="off")
        (c[1].error if result.referable else c[1].success)(
            "Refer to an eye specialist" if result.referable else "Not referable by this model")
        names = {**{f: lab for f, (lab, *_) in META_FIELDS.items()}, "sex": "sex", "eye": "eye"}
        used = ", ".join(f"{names.get(k, k)} {v}" for k, v in result.metadata_used.items() if v is not None)
        missing = [names.get(k, k) for k, v in result.metadata_used.items() if v is None]
        c[2].caption(f"Clinical values used: {used or 'none'}."
                     + (f" Not recorded (training mean used): {', '.join(missing)}." if missing else ""))
        if float(maps.max()) <= 1e-6:
            st.caption("The 3D heatmap is empty: no region of the volume raised the disease score.")
        common.show_trust_note(model_name, model.sha256, method)
        with st.expander("What the suggestion rests on: the image or the clinical values", expanded=True):
            ia = common.served("volume_inputs", key, lambda: input_shapley(model, vol, meta, eye), limit=8)
            if abs(ia.p - ia.p_reference) < 0.01:
                st.caption(f"Nothing to attribute: with every input P(disease) is {ia.p:.0%}, the same as with the "
                           "volume blurred and no clinical values. Neither the image nor the clinical values move "
                           "the score.")
            else:
                st.plotly_chart(figures.input_attribution_bars(ia.values, {"image": "OCT volume", **names,
                                                                           "sex": "Sex", "eye": "Eye"}),
                                width="stretch", key="vol_inputs_fig")
                st.caption(f"Exact Shapley values over the inputs: how far each moves P(disease) from a reference "
                           f"with the volume blurred and no clinical values (P {ia.p_reference:.0%}); they add up to "
                           f"the suggestion's P {ia.p:.0%}. The volume alone gives P {ia.p_image_only:.0%}, the "
                           f"clinical values alone P {ia.p_metadata_only:.0%}. A value not recorded counts zero.")
                called, image_call = ia.p >= 0.5, ia.p_image_only >= 0.5
                if called != image_call:
                    st.warning(f"The volume alone would not give this suggestion (P {ia.p_image_only:.0%} without "
                               f"the clinical values): it rests on the clinical values "
                               f"({1 - ia.shares()['image']:.0%} of the evidence), and the heatmap shows only the "
                               "image's part.", icon=":material/warning:")
                elif ia.shares()["image"] < 0.5:
                    st.caption(f"The clinical values carry most of the evidence ({1 - ia.shares()['image']:.0%}), "
                               "but the volume alone gives the same suggestion.")
    per_slice = st.toggle("Also run the B-scan model on every slice", False, key="vol_2d",
                          help="The OCT B-scan model reads each slice on its own: per-slice probabilities and maps.")
    if per_slice:
        oct_models = common.model_choices(Modality.OCT)
        if not oct_models:
            common.show_unavailable("A B-scan model", "No OCT model has weights installed.")
        else:
            m2 = st.selectbox("B-scan model", oct_models, key="vol_2d_model")

            def read_slices():
                bar = st.progress(0.0, text="Reading every slice...")
                out = per_slice_2d(common.cached_model(m2), vol, run=common.on_service,
                                   progress=lambda f: bar.progress(f, text="Reading every slice..."))
                bar.empty()
                return out

            maps2d, probs2d = common.memo("volume2d", (content, m2), read_slices, limit=4)
            classes = common.get_cfg(m2).classes
            st.line_chart({c: probs2d[:, j] for j, c in enumerate(classes)}, x_label="slice",
                          y_label="probability", height=220)
            st.caption(f"Slice {i}: {m2} suggests {classes[int(np.argmax(probs2d[i]))]} "
                       f"({float(np.max(probs2d[i])):.0%}).")
            if maps is None:
                maps, map_source = maps2d, f"Grad-CAM of {m2} per slice"

left, right = st.columns([3, 2])
with left:
    bscan = slice_rgb(vol, i)
    shown = overlay(bscan, maps[i], alpha) if maps is not None else bscan
    st.image(shown, width="stretch",
             caption=f"B-scan {i} of {d - 1}" + (f" with the {map_source}" if maps is not None else ""))
with right:
    ef = common.memo("en_face", content, lambda: en_face(vol), limit=4)
    if maps is not None:
        ef_map = common.memo("en_face_map", (content, map_source), lambda: map_en_face(maps, ef.shape[0]), limit=4)
        ef_rgb = overlay(np.repeat(ef[..., None], 3, axis=2), ef_map, alpha)
    else:
        ef_rgb = np.repeat(ef[..., None], 3, axis=2)
    row = en_face_rows(d, ef.shape[0])[i]
    ef_rgb = ef_rgb.copy()
    ef_rgb[max(0, row - 1):row + 1, :] = (255, 230, 0)
    st.image(ef_rgb, width="stretch",
             caption="En-face projection (mean along depth; yellow line = the B-scan shown"
                     + ("; colours = the strongest heatmap value along depth)" if maps is not None else ")"))
common.weights_caption([m for m in (model_name,) if m])
if result is not None and img is not None:     # an uploaded volume (not a bundled phantom) can go to the worklist
    picture, reading = common.memo("volume_reading", key + (method,),     # not rebuilt on every slider move
                                   lambda: volume_reading(model, img, result, maps, method, q, eye), limit=4)
    clinic_pages.save_to_worklist([(data, picture, [reading], eye)])
