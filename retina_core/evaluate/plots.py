"""Static figures of an evaluation report for documents: confusion matrix and reliability diagram as PNG.

    >>> rep = evaluate("oct_dme_resnet18", "../shared/realdata/mexico_oct_dme", weights_dir="runs/oct")
    >>> write_eval_plots(rep, "docs/figures")        # [confusion PNG, reliability PNG], named by model and split

Only numbers are drawn (counts and calibration bins), never an image of the data set, so the figures may be
committed beside a real data set's metrics. matplotlib's object API (no pyplot state).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["write_eval_plots", "write_risk_coverage_plot"]


def _confusion(ax, cm: np.ndarray, classes: list[str]) -> None:
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = cm.max() or 1
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=9,
                    color="white" if cm[i, j] > top / 2 else "black")


def _reliability(ax, bins: list[dict]) -> None:
    used = [b for b in bins if b.get("count")]
    ax.plot([0, 1], [0, 1], ls="--", color="#888888", lw=1, label="perfect calibration")
    if used:
        conf = [b["confidence"] for b in used]
        acc = [b["accuracy"] for b in used]
        size = np.array([b["count"] for b in used], float)
        ax.scatter(conf, acc, s=20 + 180 * size / size.max(), color="#1f6f8b", alpha=0.8,
                   label="bins (area ~ images)")
        ax.plot(conf, acc, color="#1f6f8b", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, loc="upper left")


def write_eval_plots(report: dict, out_dir: str | Path, stem: str | None = None) -> list[Path]:
    """Write `<stem>_confusion.png` and `<stem>_reliability.png` for an `evaluate` report; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = report["metrics"]
    stem = stem or f"{report['model']}_{report.get('split', 'test')}"
    n = m["n"]
    ci = report.get("ci95") or {}
    auc = m.get("auc_macro")
    auc_txt = f", AUC {auc:.3f}" + (f" [{ci['auc_macro'][0]:.3f}, {ci['auc_macro'][1]:.3f}]" if ci.get("auc_macro")
                                    else "") if auc is not None else ""
    title = f"{report['model']} on {Path(str(report['data'])).name} ({report.get('split')}, n = {n}{auc_txt})"
    paths = []
    for kind in ("confusion", "reliability"):
        fig = Figure(figsize=(5.2, 4.4), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(111)
        if kind == "confusion":
            _confusion(ax, np.asarray(m["confusion_matrix"]), list(m["class_names"]))
        else:
            _reliability(ax, m["reliability_bins"])
            ax.set_title(f"ECE {m['ece']:.3f}", fontsize=8)
        fig.suptitle(title, fontsize=8)
        fig.tight_layout()
        path = out / f"{stem}_{kind}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def write_risk_coverage_plot(record: dict, path: str | Path) -> Path:
    """Accuracy of the most confident readings against the share of readings kept (risk-coverage), one line per
    split of a `confidence_record`, with the chosen level marked; returns the PNG's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(5.2, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    for split, colour in (("val", "#9bb7c4"), ("test", "#1f6f8b")):
        curve = record["curves"].get(split)
        if not curve:
            continue
        band = record[split]
        ax.plot(curve["coverage"], curve["accuracy"], color=colour, lw=1.5, label=f"{split} (n = {band['n']})")
        ax.scatter([band["coverage"]], [band["accuracy_confident"]], color=colour, zorder=3, s=30)
    ax.axhline(record["target_accuracy"], ls="--", color="#888888", lw=1,
               label=f"target {record['target_accuracy']:.2f} (level chosen on val)")
    ax.set_xlim(0, 1)
    ax.set_ylim(max(0.0, min(0.5, ax.get_ylim()[0])), 1.01)
    ax.set_xlabel("share of readings at or above a confidence level (coverage)")
    ax.set_ylabel("accuracy of those readings")
    ax.legend(fontsize=7, loc="lower left")
    test = record["test"]
    fig.suptitle(f"{record['model']} on {record['data']}: confident level {record['threshold']:.2f}\ntest: "
                 f"{test['confident']} of {test['n']} readings confident, accuracy {test['accuracy_confident']:.3f}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path
