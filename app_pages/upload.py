"""Upload & diagnose: images in, quality verdict, calibrated probabilities and a heatmap out; reports to download."""
import streamlit as st

from retina_core.analysis import NO_RESULT
from retina_core.errors import RetinaInputError
from retina_core.explain.attribution import ALL_METHODS, VIT_METHODS
from retina_core.explain.overlay import heatmap_to_rgb, overlay, strongest_region
from retina_core.io.decode import IMAGE_EXTENSIONS, VOLUME_EXTENSIONS
from retina_core.modality import Modality
from retina_core.report import EYES, ReportItem, report_json, report_pdf, split_by_eye
from retina_core.webapp import auth, clinic_pages, common

MODALITIES = {"Automatic": None, "Fundus photograph": Modality.FUNDUS, "OCT B-scan": Modality.OCT}
SLOW = ("scorecam", "integrated_gradients")
DEFAULT_LABEL = "Model's default (from explain-eval)"
METHOD_LABELS = {DEFAULT_LABEL: DEFAULT_LABEL} | {
    m: m + (" (slow)" if m in SLOW else " (ViT models only)" if m in VIT_METHODS
            else " (CNN models with a finer stage)" if m == "multiscale_gradcam" else "")
    for m in ALL_METHODS if m != "gradcam-reference"}

st.title("Upload & diagnose")
common.disclaimer()

with st.sidebar:
    st.header("Settings")
    modality_label = st.selectbox("Modality", list(MODALITIES), key="modality",
                                  help="Detected automatically; override it if the detection is wrong.")
    modality = MODALITIES[modality_label]
    models = ["Automatic (by modality)"] + (common.model_choices(modality) if modality
                                            else common.model_choices(Modality.FUNDUS) + common.model_choices(Modality.OCT))
    model_label = st.selectbox("Model", models, key="model")
    model = None if model_label == models[0] else model_label
    method_label = st.selectbox(
        "Heatmap method", list(METHOD_LABELS), format_func=METHOD_LABELS.get, key="method",
        help="The default is each model's best-ranked method in `explain-eval` (localisation on phantom lesions, "
             "faithfulness, sanity, stability) among those fast enough; Grad-CAM and multi-scale Grad-CAM come "
             "from the same pass as the prediction; the others (pytorch-grad-cam family, Integrated Gradients, "
             "ViT attention maps) cost more.")
    method = None if method_label == DEFAULT_LABEL else method_label
    alpha = st.slider("Heatmap opacity", 0.0, 1.0, 0.45, 0.05, key="alpha")

uploads = st.file_uploader("Fundus photographs or OCT B-scans (PNG, JPEG, TIFF, BMP, DICOM); OCT volumes (NIfTI, "
                           "multi-frame DICOM, Heidelberg .vol/.e2e, Topcon .fda/.fds) open in the volume viewer",
                           type=sorted(set(IMAGE_EXTENSIONS + VOLUME_EXTENSIONS)),
                           accept_multiple_files=True, key="upload")
sample = st.selectbox("... or try a bundled sample (a synthetic phantom, no patient data)",
                      ["(none)"] + list(common.SAMPLES), key="sample")

inputs = [(f.name, f.getvalue()) for f in uploads or []]
if not inputs and sample != "(none)":
    inputs = [(sample, common.sample_png(sample))]
if not inputs:
    st.info("Upload one or more fundus photographs or OCT B-scans, or pick a bundled sample above. "
            "Each image gets a quality check, calibrated probabilities and a heatmap of where the model looked; "
            "a PDF report for the patient follows the results.", icon=":material/arrow_upward:")
    st.stop()

report_items: list[ReportItem] = []
to_save = []     # (bytes, image, readings, eye) for the optional 'Save to worklist'
for i, (name, data) in enumerate(inputs, start=1):
    with st.container(border=True):
        try:
            img = common.decode_upload(data, name)
            if img.kind == "volume":
                st.subheader(f"Image {i} · OCT volume · {img.pixels.shape[0]} slices")
                st.session_state["volume_input"] = (name, data)
                st.info("This file is an OCT volume. The volume viewer shows its slices, an en-face projection "
                        "and the 3D model's result.", icon=":material/view_in_ar:")
                st.page_link("app_pages/volume.py", label="Open it in the volume viewer",
                             icon=":material/arrow_forward:")
                continue
            with st.spinner("Analysing..."):
                found = common.analyses_for(img, model, method, modality)
            auth.audit_view("analysis.run", "image", None, content_hash=img.content_hash,
                            models=sorted({f.model or "" for f in found}))
            a, others = found[0], [o for o in found[1:] if o.has_result]
        except RetinaInputError as exc:
            st.subheader(f"Image {i}")
            st.error(str(exc), icon=":material/error:")
            continue
        h, w = img.pixels.shape[:2]
        w, h = img.meta.get("width", w), img.meta.get("height", h)   # the file's size (shown reduced when large)
        head, eye_col = st.columns([3, 1])
        head.subheader(f"Image {i} · {img.source_format.upper()} {w}x{h} · {a.modality.replace('_', ' ')}")
        with eye_col:
            eye = common.eye_of(img, key=f"eye_{img.content_hash[:16]}")
        report_items.append(ReportItem(a, eye, f"Image {i}"))
        to_save.append((data, img, found, eye))
        c1, c2, c3 = st.columns(3)
        c1.metric("Modality", a.modality.replace("_", " "))
        c2.metric("Quality", "gradable" if a.quality.gradable else "ungradable", f"score {a.quality.score:.2f}",
                  delta_color="off", delta_arrow="off")
        c3.metric("Suggestion", a.label or "no result")
        if not a.has_result:
            st.error(f"**{NO_RESULT}.** " + " ".join(a.notes), icon=":material/block:")
            st.image(img.pixels, caption="The image as read", width=420)
            continue
        (st.error if a.referable else st.success)(a.suggestion)
        common.trained_on_caption(a)
        left, right = st.columns(2)
        left.image(img.pixels, caption="Original", width="stretch")
        hm = common.heatmap_of(a)
        shown = overlay(img.pixels, hm, alpha)
        x0, y0, x1, y1 = strongest_region(hm)
        right.image(shown, caption=f"{a.method} heatmap for '{a.target}' (red = where the model looked most; "
                                   f"opacity {alpha:.2f})", width="stretch")
        common.show_trust_note(a.model, a.weights_sha256, a.method, right, label=a.target)
        chart, zoom = st.columns([3, 2])
        with chart:
            st.markdown("**Calibrated probabilities**")
            common.probability_rows(a.probabilities, a.label)
        with zoom:
            st.markdown("**Strongest heatmap region**")
            st.image(shown[y0:y1, x0:x1], caption=f"x {x0}-{x1}, y {y0}-{y1}", width="stretch")
            st.download_button("Download heatmap (PNG)", lambda hm=hm: common.png_bytes(heatmap_to_rgb(hm)),
                               file_name=f"heatmap_{a.content_hash[:12]}_{a.method}.png", mime="image/png",
                               key=f"dl_{i}", on_click="ignore")   # encoded on click, not on every rerun
        if a.quality.reasons:
            st.caption("Quality notes: " + "; ".join(a.quality.reasons))
        notes = [n for n in a.notes if not n.startswith("Low confidence")   # that one is in the suggestion
                 and n not in common.confidence_notes(a)]                 # and that one under it
        if notes:
            st.caption(" ".join(notes))
        st.caption(f"Model `{a.model}` · weights sha256 `{a.weights_sha256[:16]}` · image hash "
                   f"`{a.content_hash[:16]}`")
        if others:
            st.markdown(f"**Every other reading of this {a.modality.replace('_', ' ')}** "
                        f"({len(others)} more model{'s' if len(others) > 1 else ''})")
        for k, o in enumerate(others):
            report_items.append(ReportItem(o, eye, f"Image {i}"))
            p = o.probabilities[o.label]
            with st.expander(f"{o.model}: {o.label} ({p:.0%}) · {'refer' if o.referable else 'not referable'} · "
                             f"{'real images' if not o.trained_on.startswith('synthetic') else 'phantoms only'}",
                             icon=":material/error:" if o.referable else ":material/check_circle:"):
                st.markdown(o.suggestion)
                common.trained_on_caption(o)
                ol, orr = st.columns(2)
                ol.image(overlay(img.pixels, common.heatmap_of(o), alpha), width="stretch",
                         caption=f"{o.method} heatmap for '{o.target}'")
                common.show_trust_note(o.model, o.weights_sha256, o.method, ol, label=o.target)
                common.probability_rows(o.probabilities, o.label, orr)

if report_items:
    st.subheader("Report")
    st.caption("PDF and JSON with the images, heatmaps, probabilities, quality, model and weights versions and the "
               "date. The patient report covers every image on this page (upload one patient's images at a time); "
               "per-eye reports follow the eye set for each image. No patient data: file names and DICOM "
               "identifiers are left out. Built when you click.")
    cols = st.columns(2 + len(split_by_eye(report_items)))
    cols[0].download_button("Patient report (PDF)", lambda: report_pdf(report_items, "patient"),
                            file_name="retina_report_patient.pdf", mime="application/pdf", key="report_pdf",
                            icon=":material/picture_as_pdf:", on_click="ignore")
    cols[1].download_button("Patient report (JSON)", lambda: report_json(report_items, "patient"),
                            file_name="retina_report_patient.json", mime="application/json", key="report_json",
                            icon=":material/data_object:", on_click="ignore")
    for col, (eye, items) in zip(cols[2:], split_by_eye(report_items).items()):
        col.download_button(f"Per-eye report: {EYES[eye].lower()} (PDF)", lambda items=items: report_pdf(items, "eye"),
                            file_name=f"retina_report_{eye or 'eye'}.pdf", mime="application/pdf",
                            key=f"report_pdf_{eye or 'unspecified'}", on_click="ignore")

clinic_pages.save_to_worklist(to_save)
common.weights_caption(sorted({it.analysis.model for it in report_items if it.analysis.model}) or None)
