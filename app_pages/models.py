"""Models & evaluation: model cards and provenance of the weights, and their evaluation on phantoms (confusion
matrix, ROC curves, reliability diagram), computed on demand or read from saved evaluations."""
import pandas as pd
import streamlit as st

from retina_core import figures
from retina_core.audit.evidence import evidence_kind, evidence_reports, stability_table
from retina_core.models import get_cfg, list_models, read_manifest
from retina_core.models.loading import confidence_of, trained_on
from retina_core.webapp import common

st.title("Models & evaluation")
common.disclaimer()

manifest = read_manifest()
status = common.model_status()

st.subheader("Overview")
overview = []
for name in list_models():
    cfg, e = get_cfg(name), manifest.get(name, {})
    hm = e.get("heldout_metrics", {})
    ci = (e.get("heldout_ci95") or {}).get("auc_macro")
    overview.append({"model": name, "reads": cfg.modality.replace("_", " "),
                     "status": "loaded" if status.get(name) is None else "not available",
                     "trained on": trained_on(e) if e else "-",
                     "held-out accuracy": hm.get("accuracy", float("nan")),
                     "held-out AUC": hm.get("auc_macro", float("nan")),
                     "AUC 95% CI": f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else "-", "metric kind": e.get("metric_kind", "-"),
                     "temperature": e.get("temperature", float("nan"))})
df = pd.DataFrame(overview)
st.dataframe(df, hide_index=True, width="stretch", height=38 + 35 * len(df),
             column_config={"held-out accuracy": st.column_config.NumberColumn(format="%.2f"),
                            "held-out AUC": st.column_config.NumberColumn(format="%.2f"),
                            "temperature": st.column_config.NumberColumn(format="%.2f")})
st.caption("Models trained on real public images are scored on a held-out, patient-level test split of their set "
           "(95% bootstrap intervals over patients; docs/real_data.md). Phantom-only models are scored on held-out "
           "synthetic phantoms: that says whether they learned the phantoms, not how they perform on patients. "
           "Neither is clinical accuracy.")

st.subheader("Evaluation")
loaded = [n for n in list_models() if status.get(n) is None]
if not loaded:
    st.info("No model has weights installed, so there is nothing to evaluate. Train one, e.g. "
            "`python -m retina_core train --model oct_resnet18 --data PATH`.", icon=":material/hourglass_empty:")
else:
    c1, c2 = st.columns([2, 1])
    name = c1.selectbox("Model to evaluate", loaded, key="eval_model")
    n_per_class = c2.number_input("Phantoms per class", 2, 40, 6, key="eval_n")
    model = common.cached_model(name)
    key = (name, model.sha256, int(n_per_class))
    have = st.session_state.setdefault("_evals_shown", set())
    if key not in have and st.button(f"Evaluate {name} on {int(n_per_class) * len(model.cfg.classes)} fresh "
                                     "phantoms", key="eval_run", type="primary", icon=":material/play_arrow:"):
        have.add(key)
    if key in have:
        with st.spinner("Generating phantoms and predicting (shared with every session once done)..."):
            r = common.phantom_evaluation(name, model.sha256, int(n_per_class))
        m = r["metrics"]
        c = st.columns(5)
        c[0].metric("Accuracy", f"{m['accuracy']:.2f}")
        c[1].metric("Macro AUC", "-" if m["auc_macro"] is None else f"{m['auc_macro']:.2f}")
        c[2].metric("Sensitivity (macro)", "-" if m["sensitivity_macro"] is None else f"{m['sensitivity_macro']:.2f}")
        c[3].metric("Specificity (macro)", "-" if m["specificity_macro"] is None else f"{m['specificity_macro']:.2f}")
        c[4].metric("ECE", "-" if m["ece"] is None else f"{m['ece']:.3f}")
        g1, g2, g3 = st.columns(3)
        g1.plotly_chart(figures.confusion_matrix_fig(m["confusion_matrix"], m["class_names"]),
                        width="stretch", key="eval_cm")
        g2.plotly_chart(figures.roc_fig(r["roc"]), width="stretch", key="eval_roc")
        g3.plotly_chart(figures.reliability_fig(m["reliability_bins"]), width="stretch", key="eval_rel")
        st.caption(f"{r['n']} phantoms ({r['n_per_class']} per class) from seeds {r['seed']}+, new to the model but "
                   f"from the generator it was trained on: phantom metrics, not clinical accuracy. "
                   + " ".join(m.get("notes", [])))
    else:
        st.caption("Press the button to generate fresh phantoms of every class and score the model on them "
                   "(seconds for the small demo models). The result is cached for every session.")
    stab = evidence_reports(name, model.sha256)    # weights/evidence: real lesion sets first, then phantoms
    if stab:
        for j, (p, o) in enumerate(stab):     # one file per set; each method from its largest run
            rows = stability_table(o)
            ev = o.get("evidence") or {}
            what = (f"real photographs of {ev.get('set_title') or ev.get('set')}" if evidence_kind(o) == "real"
                    else "synthetic phantoms")
            st.markdown(f"**Explanation stability and faithfulness** (`explain-eval` evidence kept with these "
                        f"weights: {o.get('n_images')} {what}, `{p.name}`)")
            st.plotly_chart(figures.stability_fig(rows), width="stretch", key=f"eval_stab_{j}")
            st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key=f"eval_stab_table_{j}")
        with_cf = [o for _, o in stab if o.get("counterfactual")]
        if with_cf:
            from retina_core.audit.counterfactual import describe_variants, table_rows

            cf = with_cf[0]["counterfactual"]
            st.markdown(f"**Does the model use the lesions its map is scored against?** Counterfactual phantoms: "
                        f"{cf['n_volumes']} diseased eyes re-rendered {describe_variants(cf)} (`explain-eval "
                        f"--counterfactual`)")
            st.dataframe(pd.DataFrame(table_rows(cf)).round(2), hide_index=True, width="stretch", key="eval_cf")
            st.caption(cf["note"] + " None: those eyes have no such lesion.")
    else:
        st.caption(f"No explanation evaluation is kept with these weights of {name}. Stability plots (and the "
                   f"trust notes under its heatmaps) appear after `python -m retina_core explain-eval --model {name} "
                   f"--data PATH --methods gradcam,gradcam++`, which keeps its report in the weights' evidence/ "
                   "folder; the Attention zones page shows stability on one image.")

st.subheader("Model cards")
for name in list_models():
    cfg, entry = get_cfg(name), manifest.get(name, {})
    state = "loaded" if status.get(name) is None else "not available"
    with st.expander(f"{name} · {cfg.task} · {state}", icon=":material/description:"):
        st.subheader(name)
        if status.get(name):
            st.error(f"Unavailable: {status[name]}", icon=":material/error:")
        st.markdown(cfg.card)
        cols = st.columns(4)
        cols[0].metric("Modality", cfg.modality.replace("_", " "))
        cols[1].metric("Classes", len(cfg.classes))
        cols[2].metric("Input", "x".join(map(str, (entry.get("input_size") or cfg.input_size)[1:])))
        cols[3].metric("Temperature", f"{entry.get('temperature', 1.0):.2f}")
        st.caption("Classes: " + ", ".join(cfg.classes))
        if entry:
            kind = entry.get("metric_kind", "held-out")
            st.markdown(f"**Trained on:** {trained_on(entry)}  \n**Held-out {kind} metrics** "
                        f"(n = {entry.get('heldout_metrics', {}).get('n')}; not clinical accuracy):")
            metrics = {k: v for k, v in entry.get("heldout_metrics", {}).items() if k != "n"}
            if metrics:
                ci = entry.get("heldout_ci95") or {}
                rows = [metrics] + ([{k: f"{ci[k][0]:.3f}-{ci[k][1]:.3f}" if ci.get(k) else "" for k in metrics}]
                                    if ci else [])
                st.dataframe(pd.DataFrame(rows, index=["estimate", "95% CI"][:len(rows)]))
            conf = confidence_of(entry)
            if conf:
                t, b = conf["test"], conf["threshold"]
                ci = t.get("ci95_confident") or (t["accuracy_confident"],) * 2
                st.markdown(f"**Confident level:** {b:.2f}, the lowest top-class probability at which its "
                            f"{conf['chosen_on']} readings were right {conf['target_accuracy']:.0%} of the time. On "
                            f"the test split, {t['confident']} of {t['n']} readings reached it and were right "
                            f"{t['accuracy_confident']:.1%} ({ci[0]:.1%}-{ci[1]:.1%}); the {t['unsure']} below it "
                            + (f"{t['accuracy_unsure']:.1%}." if t["accuracy_unsure"] is not None else "-.")
                            + f"  \n`{conf.get('command', '')}`")
            real = entry.get("real_data")
            if real:
                st.markdown(f"**Data set:** {real.get('title')}. **Source and attribution:** {real.get('attribution')}."
                            f"  \n**Licence:** {real.get('licence')}.  \n**Caveats:** {real.get('caveats')}.")
                hashes = entry.get("split_sha256") or {}
                st.caption("Patient-level split, file lists recorded as content hashes: " + ", ".join(
                    f"{k} n = {v['n']} `{v['sha256'][:12]}`" for k, v in hashes.items()))
            st.caption(f"Weights `{entry['file']}` ({entry.get('dtype')}), sha256 `{entry['sha256']}`; "
                       f"trained {entry.get('date')} with `{entry.get('command')}`")
