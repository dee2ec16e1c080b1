"""Compare modalities: a fundus photograph and an OCT B-scan of the same eye, each model's reading and heatmap,
the fusion model's result with one map per modality, and where the modalities agree or disagree."""
import pandas as pd
import streamlit as st

from retina_core.compare_modalities import agreement, fusion_readings, run_fusion
from retina_core.errors import RetinaInputError
from retina_core.explain.overlay import overlay
from retina_core.modality import Modality
from retina_core.webapp import auth, clinic_pages, common

FUSION = "fundus_oct_fusion"

st.title("Compare modalities")
common.disclaimer()
st.markdown("One eye, two modalities: a colour fundus photograph and an OCT B-scan through the macula. Each is read "
            "by its own model; the fusion model reads both together and shows which parts of each image drove its "
            "normal-vs-disease answer.")

pair = st.selectbox("Bundled paired phantom (both images of one virtual eye)", ["(none)"] + list(common.PAIRED_SAMPLES),
                    key="cmp_pair")
inputs = {}
if pair != "(none)":
    f_png, o_png, facts = common.paired_sample_pngs(pair)
    inputs = {"fundus": ("fundus.png", f_png), "oct": ("oct.png", o_png)}
    st.caption(f"Phantom ground truth: fundus {facts['fundus_class']}, OCT {facts['oct_class']} "
               f"({facts['disease_process'].replace('_', ' ')}), eye {facts['eye']}.")
else:
    cf, co = st.columns(2)
    with cf:
        got = common.pick_image("cmp_fundus", "Fundus photograph", sample_kinds=(Modality.FUNDUS,))
        if got:
            inputs["fundus"] = got
    with co:
        got = common.pick_image("cmp_oct", "OCT B-scan of the same eye", sample_kinds=(Modality.OCT,))
        if got:
            inputs["oct"] = got

with st.sidebar:
    st.header("Settings")
    f_models, o_models = common.model_choices(Modality.FUNDUS), common.model_choices(Modality.OCT)
    f_model = st.selectbox("Fundus model", f_models, key="cmp_fundus_model") if f_models else None
    o_model = st.selectbox("OCT model", o_models, key="cmp_oct_model") if o_models else None
    alpha = st.slider("Heatmap opacity", 0.0, 1.0, 0.45, 0.05, key="cmp_alpha")

if not inputs:
    st.info("Pick a bundled paired phantom above, or upload a fundus photograph and an OCT B-scan of the same eye "
            "(one is enough to see its own model's reading; the fusion model needs both).",
            icon=":material/arrow_upward:")
    st.stop()

images, readings = {}, {}
cols = st.columns(2)
for col, (kind, model, title) in zip(cols, (("fundus", f_model, "Fundus photograph"), ("oct", o_model, "OCT B-scan"))):
    with col, st.container(border=True):
        st.subheader(title)
        if kind not in inputs:
            st.info(f"No {title.lower()} yet: add one above to compare.", icon=":material/image:")
            continue
        if model is None:
            common.show_unavailable(f"A {kind} model", "No weights are installed for this modality.")
            continue
        try:
            img = common.decode_upload(inputs[kind][1], inputs[kind][0])
            with st.spinner(f"Reading the {kind} image..."):
                a = common.analysis_for(img, model, None, kind)
                auth.audit_view("analysis.run", "image", None, content_hash=img.content_hash,
                                models=[a.model or ""])
        except RetinaInputError as exc:
            st.error(str(exc), icon=":material/error:")
            continue
        images[kind] = img
        readings[kind] = a
        if not a.has_result:
            st.error(f"No result: {' '.join(a.notes)}", icon=":material/block:")
            st.image(img.pixels, width="stretch")
            continue
        st.metric(f"{model}", a.label, f"{a.probabilities[a.label]:.0%}", delta_color="off", delta_arrow="off")
        common.trained_on_caption(a)
        st.image(overlay(img.pixels, common.heatmap_of(a), alpha), caption=f"Grad-CAM for '{a.target}'",
                 width="stretch")
        common.probability_rows(a.probabilities, a.label)

st.subheader("Fusion model: both images together")
fusion, reason = common.model_or_reason(FUSION)
fr = fused = None
if fusion is None:
    common.show_unavailable("The fusion model", reason)
elif len(images) < 2:
    st.info("The fusion model needs both a fundus photograph and an OCT B-scan.", icon=":material/join_inner:")
elif not all(readings[k].quality.gradable for k in ("fundus", "oct")):
    st.warning("The fusion model is not run: one of the images is ungradable (retake or refer).")
else:
    key = (images["fundus"].content_hash, images["oct"].content_hash, fusion.sha256)
    with st.spinner("Running the fusion model..."):
        fr = common.served("fusion", key, lambda: run_fusion(fusion, images["fundus"].pixels, images["oct"].pixels),
                           limit=16)
    c0, c1, c2 = st.columns([1, 2, 2])
    c0.metric("Fusion suggestion", fr.label, f"P(disease) {fr.p_disease:.0%}", delta_color="off",
              delta_arrow="off")
    (c0.error if fr.referable else c0.success)("Refer" if fr.referable else "Not referable")
    fmethod = c0.radio("Maps", ["gradcam", "integrated_gradients"], key="cmp_fusion_method",
                       format_func={"gradcam": "Grad-CAM (same pass)",
                                    "integrated_gradients": "Integrated Gradients (slower)"}.get,
                       help="One map per input. Grad-CAM comes from the pass that gives the suggestion; Integrated "
                            "Gradients (captum, both inputs from black images) costs 32 more passes.")
    fmaps = {"fundus": fr.fundus_map, "oct": fr.oct_map}
    if fmethod != "gradcam":
        with st.spinner("Computing Integrated Gradients on both images..."):
            fmaps = common.served("fusion_maps", key + (fmethod,), lambda: fusion.explain(
                (images["fundus"].pixels, images["oct"].pixels), fmethod, fr.target))
    name = "Grad-CAM" if fmethod == "gradcam" else "Integrated Gradients"
    c1.image(overlay(images["fundus"].pixels, fmaps["fundus"], alpha), width="stretch",
             caption=f"What the fusion model used in the fundus photograph ({name} for '{fr.target}')")
    c2.image(overlay(images["oct"].pixels, fmaps["oct"], alpha), width="stretch",
             caption=f"What the fusion model used in the OCT B-scan ({name} for '{fr.target}')")
    common.show_trust_note(FUSION, fusion.sha256, fmethod, where=c1, modality=Modality.FUNDUS)
    common.show_trust_note(FUSION, fusion.sha256, fmethod, where=c2, modality=Modality.OCT)
    fused = fusion_readings(fusion, images, readings, fr, fmaps, fmethod)

if readings:
    st.subheader("Agreement")
    rows, verdict = agreement({k: readings[k] for k in ("fundus", "oct") if k in readings}, fr)
    (st.success if verdict.startswith("All readings agree") else st.warning)(verdict)
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
                 column_config={"P(disease)": st.column_config.ProgressColumn("P(disease)", min_value=0.0,
                                                                              max_value=1.0, format="%.2f")})
    st.caption("Each model's classes are mapped to normal vs disease (NORMAL, No DR and normal count as normal); "
               "P(disease) sums the probabilities of the disease classes.")
common.weights_caption([m for m in (f_model, o_model, FUSION) if m])
if images:      # both images (or the one read) go to one case, eye and visit, each with its own and the fusion reading
    eye = next((img.laterality for img in images.values() if img.laterality), None)
    clinic_pages.save_to_worklist([(inputs[k][1], images[k], [readings[k]] + ([fused[k]] if fr is not None else []),
                                    eye) for k in ("fundus", "oct") if k in images])
