"""Models & evaluation: model cards, provenance of the bundled weights, their phantom metrics."""
import pandas as pd
import streamlit as st

from retina_core import ui
from retina_core.models import get_cfg, list_models, read_manifest

st.title("Models & evaluation")
ui.disclaimer()

manifest = read_manifest()
status = ui.model_status()
for name in list_models():
    cfg, entry = get_cfg(name), manifest.get(name, {})
    with st.container(border=True):
        st.subheader(name)
        st.markdown(f"**{cfg.task}**")
        if status.get(name):
            st.error(f"Unavailable: {status[name]}", icon=":material/error:")
        st.markdown(cfg.card)
        cols = st.columns(4)
        cols[0].metric("Modality", cfg.modality)
        cols[1].metric("Classes", len(cfg.classes))
        cols[2].metric("Input", "x".join(map(str, cfg.input_size[1:])))
        cols[3].metric("Temperature", f"{entry.get('temperature', 1.0):.2f}")
        if entry:
            kind = entry.get("metric_kind", "held-out")
            st.markdown(f"**Trained on:** {entry.get('data')}  \n**Held-out {kind} metrics** "
                        f"(n = {entry.get('heldout_metrics', {}).get('n')}; not clinical accuracy):")
            metrics = {k: v for k, v in entry.get("heldout_metrics", {}).items() if k != "n"}
            st.dataframe(pd.DataFrame([metrics]), hide_index=True)
            st.caption(f"Weights `{entry['file']}` ({entry.get('dtype')}), sha256 `{entry['sha256']}`; "
                       f"trained {entry.get('date')} with `{entry.get('command')}`")
