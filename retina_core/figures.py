"""Plotly figures for the pages (no Streamlit here): zone shares, ensembles, confusion matrix, ROC, reliability.
(A reading's calibrated probabilities are native progress bars, `webapp.common.probability_rows`: a result page
then needs no plotting library in the browser.)"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from .explain.zones import ETDRS_ABBREVIATIONS

PALETTE = ["#1f6f8b", "#e07b39", "#5a9e6f", "#a05195", "#d45087", "#8c8c3a", "#3a7ca5", "#b5651d"]


def _layout(fig: go.Figure, height: int, **kw) -> go.Figure:
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=40, b=40), legend=dict(orientation="h", y=-0.25),
                      **kw)
    return fig


def zone_bars(shares_by_method: dict[str, dict[str, float]], title: str, order=None,
              labels: dict | None = None) -> go.Figure:
    """Grouped bars: one group per zone, one bar per method (share of the heatmap's mass, %)."""
    zones = list(order or next(iter(shares_by_method.values())))
    fig = go.Figure()
    for i, (meth, shares) in enumerate(shares_by_method.items()):
        fig.add_bar(name=meth, x=[(labels or {}).get(z, z) for z in zones], y=[shares.get(z, 0.0) for z in zones],
                    marker_color=PALETTE[i % len(PALETTE)],
                    hovertemplate="%{x}: %{y:.1%}<extra>" + meth + "</extra>")
    return _layout(fig, 320, title=title, barmode="group", yaxis=dict(tickformat=".0%", title="share of heatmap"))


def etdrs_bars(etdrs_by_method: dict[str, dict[str, float]]) -> go.Figure:
    """ETDRS subfield shares per method, subfields by their usual abbreviations (CSF, SIM, NIM, ...)."""
    order = list(ETDRS_ABBREVIATIONS) + ["outside"]
    labels = {**ETDRS_ABBREVIATIONS, "outside": "outside 6 mm"}
    return zone_bars(etdrs_by_method, "ETDRS subfields (share of heatmap)", order, labels)


def members_vs_ensemble(members: dict[str, dict[str, float]], ensemble: dict[str, float]) -> go.Figure:
    """Per-class probabilities of each member (bars) and of the ensemble (black diamonds)."""
    classes = list(ensemble)
    fig = go.Figure()
    for i, (n, probs) in enumerate(members.items()):
        fig.add_bar(name=n, x=classes, y=[probs[c] for c in classes], marker_color=PALETTE[i % len(PALETTE)],
                    opacity=0.8)
    fig.add_scatter(name="ensemble (soft vote)", x=classes, y=[ensemble[c] for c in classes], mode="markers",
                    marker=dict(symbol="diamond", size=14, color="black"))
    return _layout(fig, 360, barmode="group", yaxis=dict(range=[0, 1], tickformat=".0%",
                                                          title="calibrated probability"))


def confusion_matrix_fig(cm, classes) -> go.Figure:
    cm = np.asarray(cm)
    fig = go.Figure(go.Heatmap(z=cm, x=list(classes), y=list(classes), colorscale="Blues", showscale=False,
                               text=cm, texttemplate="%{text}",
                               hovertemplate="true %{y}, predicted %{x}: %{z}<extra></extra>"))
    return _layout(fig, 120 + 40 * len(classes), title="Confusion matrix", xaxis=dict(title="predicted"),
                   yaxis=dict(title="true", autorange="reversed"))


def roc_fig(roc: dict) -> go.Figure:
    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="#999999"), name="chance")
    for i, (c, r) in enumerate(roc.items()):
        fig.add_scatter(x=r["fpr"], y=r["tpr"], mode="lines", name=f"{c} (AUC {r['auc']:.2f})",
                        line=dict(color=PALETTE[i % len(PALETTE)]))
    return _layout(fig, 380, title="ROC curves (one class vs rest)",
                   xaxis=dict(title="1 - specificity", range=[0, 1]), yaxis=dict(title="sensitivity", range=[0, 1]))


def reliability_fig(bins: list[dict]) -> go.Figure:
    """Reliability diagram: accuracy per confidence bin against the diagonal; bar width = bin, hover = count."""
    used = [b for b in bins if b.get("count")]
    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="#999999"),
                    name="perfect calibration")
    fig.add_bar(x=[(b["lower"] + b["upper"]) / 2 for b in used], y=[b["accuracy"] for b in used],
                width=[b["upper"] - b["lower"] for b in used], name="accuracy in bin", marker_color="#1f6f8b",
                opacity=0.75, customdata=[b["count"] for b in used],
                hovertemplate="confidence %{x:.2f}: accuracy %{y:.2f} (n=%{customdata})<extra></extra>")
    fig.add_scatter(x=[b["confidence"] for b in used], y=[b["accuracy"] for b in used], mode="markers",
                    name="mean confidence", marker=dict(color="#e07b39", size=8))
    return _layout(fig, 380, title="Reliability diagram", xaxis=dict(title="confidence", range=[0, 1]),
                   yaxis=dict(title="accuracy", range=[0, 1]))


def stability_fig(rows: list[dict]) -> go.Figure:
    """Stability of each explanation method under perturbation (SSIM and Spearman; 1 = map unchanged)."""
    fig = go.Figure()
    for i, key in enumerate(("stability_ssim", "stability_spearman")):
        fig.add_bar(name=key.replace("stability_", "").upper() if key.endswith("ssim") else "Spearman",
                    x=[r["method"] for r in rows], y=[r.get(key) for r in rows], marker_color=PALETTE[i])
    return _layout(fig, 320, title="Heatmap stability under perturbation (1 = unchanged)", barmode="group",
                   yaxis=dict(range=[0, 1]))


def input_attribution_bars(values: dict[str, float], labels: dict | None = None) -> go.Figure:
    """Horizontal bars of Shapley values (probability points) per input: towards disease (orange) or away (blue)."""
    names = list(values)[::-1]
    v = [values[n] for n in names]
    fig = go.Figure(go.Bar(x=v, y=[(labels or {}).get(n, n) for n in names], orientation="h",
                           marker_color=[PALETTE[1] if x > 0 else PALETTE[0] for x in v],
                           hovertemplate="%{y}: %{x:+.1%}<extra></extra>"))
    fig = _layout(fig, 60 + 28 * len(names), showlegend=False,
                  xaxis=dict(tickformat="+.0%", title="change in P(disease) (Shapley value)", zeroline=True))
    return fig.update_layout(margin=dict(l=10, r=10, t=10, b=40))
