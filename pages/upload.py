"""Upload & diagnose: images in, quality verdict, calibrated probabilities and a heatmap out."""
import streamlit as st

from retina_core import ui
from retina_core.analysis import NO_RESULT
from retina_core.errors import RetinaInputError
from retina_core.explain.cam import CAM_METHODS
from retina_core.explain.overlay import heatmap_to_rgb, overlay, strongest_region

MODALITIES = {"Automatic": None, "Fundus photograph": "fundus", "OCT B-scan": "oct"}
METHOD_LABELS = {m: m + (" (slow)" if m == "scorecam" else "") for m in CAM_METHODS if m != "gradcam-reference"}

st.title("Upload & diagnose")
ui.disclaimer()

with st.sidebar:
    st.header("Settings")
    modality_label = st.selectbox("Modality", list(MODALITIES), key="modality",
                                  help="Detected automatically; override it if the detection is wrong.")
    modality = MODALITIES[modality_label]
    models = ["Automatic (by modality)"] + ui.model_choices(modality)
    model_label = st.selectbox("Model", models, key="model")
    model = None if model_label == models[0] else model_label
    method = st.selectbox("Heatmap method", list(METHOD_LABELS), format_func=METHOD_LABELS.get, key="method",
                          help="Grad-CAM is computed in the same pass as the prediction; the others are "
                               "pytorch-grad-cam implementations and cost more.")
    alpha = st.slider("Heatmap opacity", 0.0, 1.0, 0.45, 0.05, key="alpha")

uploads = st.file_uploader("Fundus photographs or OCT B-scans (PNG, JPEG, TIFF, BMP, DICOM)",
                           type=["png", "jpg", "jpeg", "tif", "tiff", "bmp", "dcm"], accept_multiple_files=True,
                           key="upload")
sample = st.selectbox("... or try a bundled sample (a synthetic phantom, no patient data)",
                      ["(none)"] + list(ui.SAMPLES), key="sample")

inputs = [(f.name, f.getvalue()) for f in uploads or []]
if not inputs and sample != "(none)":
    inputs = [(sample, ui.sample_png(sample))]
if not inputs:
    st.info("Upload one or more fundus photographs or OCT B-scans, or pick a bundled sample above. "
            "Each image gets a quality check, calibrated probabilities and a heatmap of where the model looked.")
    st.stop()

for i, (name, data) in enumerate(inputs, start=1):
    with st.container(border=True):
        try:
            img = ui.decode_upload(data, name)
            with st.spinner("Analysing..."):
                a = ui.analysis_for(img, model, method, modality)
        except RetinaInputError as exc:
            st.subheader(f"Image {i}")
            st.error(str(exc), icon=":material/error:")
            continue
        h, w = img.pixels.shape[:2]
        st.subheader(f"Image {i} · {img.source_format.upper()} {w}x{h} · {a.modality}"
                     + (f" · {a.laterality}" if a.laterality else ""))
        c1, c2, c3 = st.columns(3)
        c1.metric("Modality", a.modality.replace("_", " "))
        c2.metric("Quality", "gradable" if a.quality.gradable else "ungradable", f"score {a.quality.score:.2f}",
                  delta_color="off")
        c3.metric("Suggestion", a.label or "no result")
        if not a.has_result:
            st.error(f"**{NO_RESULT}.** " + " ".join(a.notes), icon=":material/block:")
            st.image(img.pixels, caption="The image as read", width=420)
            continue
        (st.error if a.referable else st.success)(a.suggestion)
        left, right = st.columns(2)
        left.image(img.pixels, caption="Original", use_container_width=True)
        shown = overlay(img.pixels, a.heatmap, alpha)
        x0, y0, x1, y1 = strongest_region(a.heatmap)
        right.image(shown, caption=f"{a.method} heatmap for '{a.target}' (opacity {alpha:.2f})",
                    use_container_width=True)
        chart, zoom = st.columns([3, 2])
        with chart:
            st.markdown("**Calibrated probabilities**")
            st.plotly_chart(ui.probability_chart(a), use_container_width=True, key=f"probs_{i}")
        with zoom:
            st.markdown("**Strongest heatmap region**")
            st.image(shown[y0:y1, x0:x1], caption=f"x {x0}-{x1}, y {y0}-{y1}", use_container_width=True)
            st.download_button("Download heatmap (PNG)", ui.png_bytes(heatmap_to_rgb(a.heatmap)),
                               file_name=f"heatmap_{a.content_hash[:12]}_{a.method}.png", mime="image/png",
                               key=f"dl_{i}")
        if a.quality.reasons:
            st.caption("Quality notes: " + "; ".join(a.quality.reasons))
        st.caption(f"Model `{a.model}` · weights sha256 `{a.weights_sha256[:16]}` · image hash "
                   f"`{a.content_hash[:16]}`")

ui.weights_caption()
