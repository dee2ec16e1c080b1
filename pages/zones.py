"""Attention zones: where each explainer puts its heatmap in zones a clinician names (centre/left/right, the ETDRS
grid on the fovea, the optic disc, the foveal bands of an OCT), several explainers side by side, and how much a map
moves when the image is slightly perturbed (the perturbed image and its map are shown)."""
import pandas as pd
import streamlit as st

from retina_core import attention, figures, ui
from retina_core.errors import RetinaInputError
from retina_core.explain.overlay import overlay
from retina_core.explain.zones import ETDRS_ABBREVIATIONS

ui.require_navigation()

SLOW = {"scorecam", "integrated_gradients", "vit_relevance"}
DEFAULT_METHODS = ("gradcam", "multiscale_gradcam", "gradcam++", "attention_rollout")

st.title("Attention zones")
ui.disclaimer()

got = ui.pick_image("zones", "A fundus photograph or an OCT B-scan")
if got is None:
    st.info("Upload an image or pick a bundled sample. This page compares explanation methods on it: each map's "
            "share in the centre / left / right, in the ETDRS subfields and the optic disc (fundus) or the foveal "
            "bands (OCT), and its stability under small perturbations.", icon=":material/arrow_upward:")
    st.stop()

try:
    img = ui.decode_upload(got[1], got[0])
    if img.kind != "image":
        raise RetinaInputError("This is an OCT volume: open it in the volume viewer.")
    q = ui.quality_of(img)
except RetinaInputError as exc:
    st.error(str(exc), icon=":material/error:")
    st.stop()
modality = q.modality
if modality not in ("fundus", "oct"):
    st.error(f"No zones for this image: {q.verdict}. " + " ".join(q.reasons), icon=":material/block:")
    st.stop()

with st.sidebar:
    st.header("Settings")
    choices = ui.model_choices(modality)
    if not choices:
        ui.show_unavailable(f"A {modality} model", "No weights are installed for this modality.")
        st.stop()
    model_name = st.selectbox("Model", choices, key="zones_model")
    model = ui.cached_model(model_name)
    avail = attention.methods_for(model)
    methods = st.multiselect("Explanation methods", avail, key="zones_methods",
                             default=[m for m in DEFAULT_METHODS if m in avail],
                             format_func=lambda m: m + (" (slow)" if m in SLOW else ""),
                             help="Every method explains the same class (the model's prediction).")
    alpha = st.slider("Heatmap opacity", 0.0, 1.0, 0.5, 0.05, key="zones_alpha")
    show_grid = st.toggle("Draw the zones on the maps", True, key="zones_grid")

eye = ui.eye_of(img, key=f"zones_eye_{img.content_hash[:16]}")
a = ui.analysis_for(img, model_name, None, modality)
if not a.has_result:
    st.error(f"No result: {' '.join(a.notes)}", icon=":material/block:")
    st.stop()
st.markdown(f"**{model_name}** suggests **{a.label}** ({a.probabilities[a.label]:.0%}); every map below explains "
            f"'{a.target}'.")
if not methods:
    st.info("Choose at least one explanation method in the sidebar.")
    st.stop()

px = img.pixels
lm = ui.memo("landmarks", (img.content_hash, modality, eye), lambda: attention.landmarks(px, modality, None, eye))
maps = {}
with st.status("Computing heatmaps...", expanded=False) as status:
    for m in methods:
        status.update(label=f"Computing {m}...")
        maps[m] = ui.memo("zones_map", (img.content_hash, model_name, m, a.target),
                          lambda m=m: attention.explain_methods(model, px, [m], a.target)[m], limit=32)
    status.update(label=f"{len(maps)} heatmap(s) ready", state="complete")

st.subheader("Explainers side by side")
grid = ui.memo("zones_layer", (img.content_hash, modality, eye, False),
               lambda: attention.zone_layer(px.shape[:2], modality, lm))
grid_box = ui.memo("zones_layer", (img.content_hash, modality, eye, True),
                   lambda: attention.zone_layer(px.shape[:2], modality, lm, centre_box=True))
cols = st.columns(min(4, len(methods) + 1))
with cols[0]:
    st.image(attention.paste_layer(px, grid_box), width="stretch",
             caption="Zones: ETDRS grid (white), optic disc (yellow), centre box (cyan)" if modality == "fundus"
             else "Zones: fovea (yellow), 0.5 / 1.5 / 3 mm bands (dashed), centre box (cyan)")
for i, m in enumerate(methods, start=1):
    with cols[i % len(cols)]:
        shown = overlay(px, maps[m], alpha)
        st.image(attention.paste_layer(shown, grid) if show_grid else shown, caption=m, width="stretch")
if modality == "fundus":
    st.caption(f"Landmarks: fovea and optic disc found by {lm.get('method')} (confidence {lm.get('confidence', 0):.2f}"
               f"{'; below 0.3 treat the grid as approximate' if lm.get('confidence', 1) < 0.3 else ''}). "
               f"Grid scale: one disc diameter = 1.8 mm; nasal is toward the disc.")
else:
    st.caption(f"Fovea: {lm.get('method')} at x = {lm.get('fovea_x', 0):.0f} px; the scan is taken as "
               f"{attention.OCT_SPAN_MM:.0f} mm wide.")

summaries = {m: ui.memo("zones_summary", (img.content_hash, model_name, m, a.target, eye),
                        lambda m=m: attention.zone_summary(maps[m], modality, lm), limit=32) for m in methods}
st.subheader("Zone shares")
c1, c2 = st.columns(2)
c1.plotly_chart(figures.zone_bars({m: s["centre_lr"] for m, s in summaries.items()},
                                  "Centre box vs left / right (share of heatmap)", ["centre", "left", "right"]),
                width="stretch", key="zones_clr")
if modality == "fundus" and all("etdrs" in s for s in summaries.values()):
    c2.plotly_chart(figures.zone_bars({m: {"optic disc": s["disc"], "ETDRS 6 mm circle": 1 - s["etdrs"]["outside"]}
                                       for m, s in summaries.items()}, "Optic disc and macula (share of heatmap)"),
                    width="stretch", key="zones_disc")
    st.plotly_chart(figures.etdrs_bars({m: s["etdrs"] for m, s in summaries.items()}), width="stretch",
                    key="zones_etdrs")
    st.caption("ETDRS subfields: " + ", ".join(f"{v} = {k.replace('_', ' ')}" for k, v in ETDRS_ABBREVIATIONS.items()))
elif modality == "oct" and all("oct_bands" in s for s in summaries.values()):
    c2.plotly_chart(figures.zone_bars({m: s["oct_bands"] for m, s in summaries.items()},
                                      "Foveal bands of the B-scan (share of heatmap)"),
                    width="stretch", key="zones_bands")

st.subheader("Stability under perturbation")
st.markdown("Each row perturbs the image slightly (Gaussian noise, 15% brighter, a shift of a few pixels), "
            "recomputes the map for the same class and compares it with the original map: SSIM and Spearman "
            "near 1 mean the map did not move. A map that changes a lot under changes a clinician would not "
            "notice deserves less trust.")
stab_method = st.selectbox("Method to test", methods, key="zones_stab_method")
with st.spinner(f"Perturbing and recomputing {stab_method}..."):
    views = ui.memo("zones_stab", (img.content_hash, model_name, stab_method, a.target),
                    lambda: attention.perturbation_views(model, px, stab_method, maps[stab_method], a.target))
rows = []
original = overlay(px, maps[stab_method], alpha)
for v in views:
    c = st.columns([1, 1, 1, 1])
    c[0].image(original, caption=f"{stab_method} on the original image", width="stretch")
    c[1].image(v["image"], caption=f"Perturbed: {v['kind']}", width="stretch")
    c[2].image(overlay(v["image"], v["heatmap"], alpha), caption=f"{stab_method} on the perturbed image",
               width="stretch")
    with c[3]:
        st.metric("SSIM to the original map", f"{v['ssim']:.2f}")
        st.metric("Spearman to the original map", f"{v['spearman']:.2f}")
    rows.append({"perturbation": v["kind"], "SSIM": v["ssim"], "Spearman": v["spearman"]})
st.dataframe(pd.DataFrame(rows), hide_index=True)
ui.weights_caption([model_name])
