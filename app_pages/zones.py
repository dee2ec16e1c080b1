"""Attention zones: where each explainer puts its heatmap in zones a clinician names (centre/left/right, the ETDRS
grid on the fovea, the optic disc, the foveal bands of an OCT), several explainers side by side, and how much a map
moves when the image is slightly perturbed (the perturbed image and its map are shown)."""
import pandas as pd
import streamlit as st

from retina_core import attention_zones, figures
from retina_core.audit.evidence import trust_badge
from retina_core.errors import RetinaInputError
from retina_core.explain.overlay import overlay
from retina_core.explain.zones import ETDRS_ABBREVIATIONS
from retina_core.modality import IMAGE_MODALITIES, Modality
from retina_core.webapp import auth, common

SLOW = {"scorecam", "integrated_gradients", "vit_relevance"}
DEFAULT_METHODS = ("gradcam", "multiscale_gradcam", "gradcam++", "attention_rollout")


def view_settings() -> tuple[float, bool]:
    """The sidebar's opacity slider and zone toggle (drawn by `draw_maps`, so moving them reruns only that)."""
    with st.sidebar:
        return (st.slider("Heatmap opacity", 0.0, 1.0, 0.5, 0.05, key="zones_alpha"),
                st.toggle("Draw the zones on the maps", True, key="zones_grid"))


def zone_figures(summaries: dict, modality: str) -> dict:
    """The zone-share bar charts of the methods' summaries: centre/left/right, then the optic disc and the ETDRS
    subfields (fundus) or the foveal bands (OCT) when every summary has them."""
    figs = {"clr": figures.zone_bars({m: s["centre_lr"] for m, s in summaries.items()},
                                     "Centre box vs left / right (share of heatmap)", ["centre", "left", "right"])}
    if modality == Modality.FUNDUS and all("etdrs" in s for s in summaries.values()):
        figs["disc"] = figures.zone_bars({m: {"optic disc": s["disc"], "ETDRS 6 mm circle": 1 - s["etdrs"]["outside"]}
                                          for m, s in summaries.items()}, "Optic disc and macula (share of heatmap)")
        figs["etdrs"] = figures.etdrs_bars({m: s["etdrs"] for m, s in summaries.items()})
    elif modality == Modality.OCT and all("oct_bands" in s for s in summaries.values()):
        figs["bands"] = figures.zone_bars({m: s["oct_bands"] for m, s in summaries.items()},
                                          "Foveal bands of the B-scan (share of heatmap)")
    return figs


@st.fragment
def draw_maps(key: tuple, px, maps: dict, grid, cols: list, stab_method: str, views: list, stab_cells: list,
              captions: dict) -> None:
    """Every map blended over its image, into cells the page laid out: the side-by-side maps (`cols`) and, per
    perturbation, the maps on the original and the perturbed image (`stab_cells`). A fragment, so the opacity
    slider and the zone toggle rerun only this; blends are kept per session under `key` + method + settings,
    so coming back to an opacity recomputes nothing."""
    alpha, show_grid = view_settings()

    def shown(name, image, heatmap, with_grid=False):
        def blend():
            out = overlay(image, heatmap, alpha)
            return attention_zones.paste_layer(out, grid) if with_grid else out
        return common.memo("zones_overlay", (*key, name, alpha, with_grid), blend, limit=16)

    for i, m in enumerate(maps, start=1):
        with cols[i % len(cols)]:
            st.image(shown(m, px, maps[m], show_grid), caption=captions[m], width="stretch")
    for v, (left, right) in zip(views, stab_cells):
        left.image(shown(stab_method, px, maps[stab_method]), caption=f"{stab_method} on the original image",
                   width="stretch")
        right.image(shown((stab_method, v["kind"]), v["image"], v["heatmap"]),
                    caption=f"{stab_method} on the perturbed image", width="stretch")


st.title("Attention zones")
common.disclaimer()

got = common.pick_image("zones", "A fundus photograph or an OCT B-scan")
if got is None:
    st.info("Upload an image or pick a bundled sample. This page compares explanation methods on it: each map's "
            "share in the centre / left / right, in the ETDRS subfields and the optic disc (fundus) or the foveal "
            "bands (OCT), and its stability under small perturbations.", icon=":material/arrow_upward:")
    st.stop()

try:
    img = common.decode_upload(got[1], got[0])
    if img.kind != "image":
        raise RetinaInputError("This is an OCT volume: open it in the volume viewer.")
    q = common.quality_of(img)
except RetinaInputError as exc:
    st.error(str(exc), icon=":material/error:")
    st.stop()
modality = q.modality
if modality not in IMAGE_MODALITIES:
    st.error(f"No zones for this image: {q.verdict}. " + " ".join(q.reasons), icon=":material/block:")
    st.stop()

with st.sidebar:
    st.header("Settings")
    choices = common.model_choices(modality)
    if not choices:
        common.show_unavailable(f"A {modality} model", "No weights are installed for this modality.")
        st.stop()
    model_name = st.selectbox("Model", choices, key="zones_model")
    model = common.cached_model(model_name)
    avail = attention_zones.methods_for(model)
    methods = st.multiselect("Explanation methods", avail, key="zones_methods",
                             default=[m for m in DEFAULT_METHODS if m in avail],
                             format_func=lambda m: m + (" (slow)" if m in SLOW else ""),
                             help="Every method explains the same class (the model's prediction).")

eye = common.eye_of(img, key=f"zones_eye_{img.content_hash[:16]}")
a = common.analysis_for(img, model_name, None, modality)
auth.audit_view("analysis.run", "image", None, content_hash=img.content_hash,
                models=[a.model or ""])
if not a.has_result:
    view_settings()          # drawn on every run, so the chosen opacity is kept while there is nothing to show
    st.error(f"No result: {' '.join(a.notes)}", icon=":material/block:")
    st.stop()
st.markdown(f"**{model_name}** suggests **{a.label}** ({a.probabilities[a.label]:.0%}); every map below explains "
            f"'{a.target}'.")
common.trained_on_caption(a)
if not methods:
    view_settings()
    st.info("Choose at least one explanation method in the sidebar.")
    st.stop()

px = img.pixels
lm = common.memo("landmarks", (img.content_hash, modality, eye),
                 lambda: attention_zones.landmarks(px, modality, None, eye))
maps = {}
with st.status("Computing heatmaps...", expanded=False) as status:
    for m in methods:
        status.update(label=f"Computing {m}...")
        maps[m] = common.served("zones_map", (img.content_hash, model_name, m, a.target),
                                lambda m=m: attention_zones.explain_methods(model, px, [m], a.target)[m], limit=32)
    status.update(label=f"{len(maps)} heatmap(s) ready", state="complete")

st.subheader("Explainers side by side")
grid = common.memo("zones_layer", (img.content_hash, modality, eye, False),
                   lambda: attention_zones.zone_layer(px.shape[:2], modality, lm))
grid_box = common.memo("zones_layer", (img.content_hash, modality, eye, True),
                       lambda: attention_zones.zone_layer(px.shape[:2], modality, lm, centre_box=True))
cols = st.columns(min(4, len(methods) + 1))
with cols[0]:
    st.image(attention_zones.paste_layer(px, grid_box), width="stretch",
             caption="Zones: ETDRS grid (white), optic disc (yellow), centre box (cyan)" if modality == Modality.FUNDUS
             else "Zones: fovea (yellow), 0.5 / 1.5 / 3 mm bands (dashed), centre box (cyan)")
if modality == Modality.FUNDUS:
    st.caption(f"Landmarks: fovea and optic disc found by {lm.get('method')} (confidence {lm.get('confidence', 0):.2f}"
               f"{'; below 0.3 treat the grid as approximate' if lm.get('confidence', 1) < 0.3 else ''}). "
               f"Grid scale: one disc diameter = 1.8 mm; nasal is toward the disc.")
else:
    st.caption(f"Fovea: {lm.get('method')} at x = {lm.get('fovea_x', 0):.0f} px; the scan is taken as "
               f"{attention_zones.OCT_SPAN_MM:.0f} mm wide.")

summaries = {m: common.memo("zones_summary", (img.content_hash, model_name, m, a.target, eye),
                            lambda m=m: attention_zones.zone_summary(maps[m], modality, lm), limit=32) for m in methods}
figs = common.memo("zones_figures", (img.content_hash, model_name, a.target, eye, tuple(methods)),
                   lambda: zone_figures(summaries, modality))
st.subheader("Zone shares")
c1, c2 = st.columns(2)
c1.plotly_chart(figs["clr"], width="stretch", key="zones_clr")
if "etdrs" in figs:
    c2.plotly_chart(figs["disc"], width="stretch", key="zones_disc")
    st.plotly_chart(figs["etdrs"], width="stretch", key="zones_etdrs")
    st.caption("ETDRS subfields: " + ", ".join(f"{v} = {k.replace('_', ' ')}" for k, v in ETDRS_ABBREVIATIONS.items()))
elif "bands" in figs:
    c2.plotly_chart(figs["bands"], width="stretch", key="zones_bands")

st.subheader("Stability under perturbation")
st.markdown("Each row perturbs the image slightly (Gaussian noise, 15% brighter, a shift of a few pixels), "
            "recomputes the map for the same class and compares it with the original map: SSIM and Spearman "
            "near 1 mean the map did not move. A map that changes a lot under changes a clinician would not "
            "notice deserves less trust.")
stab_method = st.selectbox("Method to test", methods, key="zones_stab_method")
with st.spinner(f"Perturbing and recomputing {stab_method}..."):
    views = common.served("zones_stab", (img.content_hash, model_name, stab_method, a.target),
                          lambda: attention_zones.perturbation_views(model, px, stab_method, maps[stab_method],
                                                                     a.target), limit=16)
rows, stab_cells = [], []
for v in views:
    c = st.columns([1, 1, 1, 1])
    stab_cells.append((c[0], c[2]))
    c[1].image(v["image"], caption=f"Perturbed: {v['kind']}", width="stretch")
    with c[3]:
        st.metric("SSIM to the original map", f"{v['ssim']:.2f}")
        st.metric("Spearman to the original map", f"{v['spearman']:.2f}")
    rows.append({"perturbation": v["kind"], "SSIM": v["ssim"], "Spearman": v["spearman"]})
evidence = common.method_evidence(model_name, model.sha256)
captions = {m: f"{m} · {trust_badge(evidence.get(m))}" for m in methods}
draw_maps((img.content_hash, model_name, a.target, eye), px, maps, grid, cols, stab_method, views, stab_cells, captions)
st.dataframe(pd.DataFrame(rows), hide_index=True)
common.weights_caption([model_name])
