"""Ensemble: several models with the same classes read one image; their soft vote, how much they disagree (an
uncertainty signal), their heatmaps side by side, and the ablation over member subsets from a saved evaluation."""
import pandas as pd
import streamlit as st

from retina_core import figures
from retina_core.errors import RetinaInputError
from retina_core.evaluate.ensemble import ablation_rows, ensemble_groups, ensemble_image, find_ablation_files
from retina_core.explain.overlay import overlay
from retina_core.modality import IMAGE_MODALITIES
from retina_core.webapp import auth, common

st.title("Ensemble")
common.disclaimer()

got = common.pick_image("ens", "A fundus photograph or an OCT B-scan")
img, problem, image_modality = None, None, None
if got is not None:
    try:
        img = common.decode_upload(got[1], got[0])
        if img.kind != "image":
            raise RetinaInputError("This is an OCT volume: open it in the volume viewer.")
        q = common.quality_of(img)
        if q.modality in IMAGE_MODALITIES:
            image_modality = q.modality
        else:
            problem = f"No result: {q.verdict}. " + " ".join(q.reasons)
    except RetinaInputError as exc:
        problem = str(exc)
# Only models that read this image's modality, with the same class list, can vote together.
groups = {g: ms for g, ms in ensemble_groups(common.available_models()).items()
          if common.get_cfg(ms[0]).modality in ((image_modality,) if image_modality else IMAGE_MODALITIES)}

with st.sidebar:
    st.header("Members")
    if not groups:
        common.show_unavailable("An ensemble", f"No {image_modality or 'fundus or OCT'} model has weights installed.")
        st.stop()
    labels = sorted(groups, key=lambda g: -len(groups[g]))
    group = st.selectbox("Models with the same classes", labels, key="ens_group",
                         help="Only models that answer the same question (same class list) can be soft-voted.")
    names = groups[group]
    if any(m not in names for m in st.session_state.get("ens_members", [])):   # the group changed: start afresh
        st.session_state["ens_members"] = names
    members = st.multiselect("Members", names, default=names, key="ens_members")
    weights = {n: st.slider(f"Weight of {n}", 0.0, 1.0, 1.0, 0.05, key=f"ens_w_{n}") for n in members}
    alpha = st.slider("Heatmap opacity", 0.0, 1.0, 0.45, 0.05, key="ens_alpha")
common.unavailable_note(names=[n for n in common.list_models() if common.get_cfg(n).modality in IMAGE_MODALITIES])

if len(names) < 2:
    st.info(f"Only one model of this kind has weights ({names[0]}): an ensemble needs at least two with the same "
            "classes. Its reading is shown as a one-member ensemble.", icon=":material/info:")

if problem:
    st.error(problem, icon=":material/error:")
elif image_modality is None:
    st.info("Upload an image or pick a bundled sample, then choose the members and their weights in the sidebar. "
            "Only models that read the image's modality and share their classes are offered.",
            icon=":material/arrow_upward:")
else:
    st.caption(f"Detected modality: **{image_modality}**; group: {group}.")
    with st.spinner("Reading the image with each member..."):
        results = {n: common.analysis_for(img, n, None, None) for n in members}
        auth.audit_view("analysis.run", "image", None, content_hash=img.content_hash,
                        models=sorted(results))
    if not members:
        st.info("Choose at least one member in the sidebar.")
    elif results and not any(a.has_result for a in results.values()):
        first = next(iter(results.values()))
        st.error(f"No result: {' '.join(first.notes)}", icon=":material/block:")
    elif results:
        try:
            ens = ensemble_image(results, weights)
        except ValueError as exc:
            st.error(str(exc))
            st.stop()
        c = st.columns(4)
        c[0].metric("Ensemble suggestion", ens["label"], f"{ens['probabilities'][ens['label']]:.0%}",
                    delta_color="off", delta_arrow="off")
        c[1].metric("Members agreeing", f"{ens['agreement']:.0%}", help="Weighted share of members whose own top "
                    "class is the ensemble's.")
        c[2].metric("Spread", f"{ens['spread']:.2f}", help="Highest minus lowest member probability for the "
                    "ensemble's class.")
        c[3].metric("Disagreement", f"{ens['mutual_information']:.3f} nats",
                    help="Mutual information: entropy of the averaged prediction minus the members' mean "
                         "entropy; 0 when all members say the same, larger when they contradict each other.")
        if ens["agreement"] < 1.0 or ens["mutual_information"] > 0.1:
            st.warning("The members disagree on this image: treat the suggestion as uncertain and review the "
                       "image yourself.", icon=":material/help:")
        else:
            st.success("The members agree on this image.", icon=":material/check_circle:")
        st.plotly_chart(figures.members_vs_ensemble(ens["members"], ens["probabilities"]), width="stretch",
                        key="ens_chart")
        st.subheader("Members' heatmaps")
        cols = st.columns(max(3, min(4, len(results))))   # at most a third of the page per map
        for i, (n, a) in enumerate(results.items()):
            with cols[i % len(cols)]:
                if a.has_result:
                    st.image(overlay(img.pixels, common.heatmap_of(a), alpha), width="stretch",
                             caption=f"{n}: {a.label} ({a.probabilities[a.label]:.0%}), weight "
                                     f"{ens['weights'].get(n, 0):.2f}")
                else:
                    st.caption(f"{n}: no result")

st.subheader("Ablation over member subsets (saved evaluation)")
saved = find_ablation_files()
if saved:
    choice = st.selectbox("Saved evaluation", [str(p.name) for p, _ in saved], key="ens_ablation_file")
    path, obj = next((p, o) for p, o in saved if p.name == choice)
    rows = ablation_rows(obj)
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    st.caption(f"From `{path.relative_to(path.parents[1])}`: every non-empty subset soft-voted and ranked by "
               f"{obj.get('metric', 'the chosen metric')}; {obj.get('metric_kind', 'phantom')} metrics, not "
               "clinical accuracy.")
else:
    st.info("No saved ablation yet. Make one with\n\n"
            "`python -m retina_core ensemble --models retinal_fusion_net_atto,retinal_fusion_net_atto_v4 "
            "--data PATH --ablation --json > docs/ensemble_ablation.json`\n\n"
            "(any JSON with an `ablation` list in docs/, weights/ or artifacts/ is found here).",
            icon=":material/table_chart:")
common.weights_caption(names)
