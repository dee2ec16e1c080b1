"""Per-eye and per-patient reports (PDF and JSON) of analysed images.

    >>> items = [ReportItem(analyze(img), eye="OD")]
    >>> pdf = report_pdf(items, scope="patient")        # bytes starting with b"%PDF"
    >>> js = report_json(items, scope="patient")        # UTF-8 JSON bytes

What goes in: the images as shown, the heatmap overlays, calibrated probabilities, the quality verdict, the
suggestion, model names with their weights' sha256, training data and date, the method, the creation time and the
not-a-medical-device statement. What never goes in: patient data. DICOM headers are not read here at all (the
decoder keeps only technical facts), file names are left out (they often carry names or IDs), and images are
identified by their position and a content hash only. Built with matplotlib's PdfPages (object API, no pyplot
state, so concurrent sessions do not share a figure).
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import textwrap
from dataclasses import dataclass

from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from .about import DISCLAIMER, __version__
from .analysis import Analysis
from .explain.overlay import overlay
from .models import read_manifest
from .models.loading import trained_on

EYES = {"OD": "Right eye (OD)", "OS": "Left eye (OS)", None: "Eye not specified"}
A4 = (8.27, 11.69)   # inches, portrait
REPORT_OPACITY = 0.45


@dataclass
class ReportItem:
    """One analysed image in a report. eye: "OD" | "OS" | None (the user's or the file's laterality)."""

    analysis: Analysis
    eye: str | None = None
    title: str = ""          # e.g. "Image 1"; never a file name


def _now(created: _dt.datetime | None) -> _dt.datetime:
    return (created or _dt.datetime.now(_dt.timezone.utc)).replace(microsecond=0)


def _eye_order(items: list[ReportItem]) -> list[ReportItem]:
    rank = {"OD": 0, "OS": 1, None: 2}
    return sorted(items, key=lambda it: rank.get(it.eye, 2))


def model_provenance(names) -> dict:
    """{model: {sha256, trained_on, date, temperature, metric_kind}} from the weights manifest."""
    manifest = read_manifest()
    out = {}
    for n in sorted({n for n in names if n}):
        e = manifest.get(n, {})
        out[n] = {"weights_sha256": e.get("sha256"), "trained_on": trained_on(e), "data": e.get("data"),
                  "date": e.get("date"), "temperature": e.get("temperature"), "metric_kind": e.get("metric_kind"),
                  **({"real_data": e["real_data"]} if e.get("real_data") else {})}
    return out


def report_dict(items: list[ReportItem], scope: str = "patient", created: _dt.datetime | None = None) -> dict:
    """JSON-ready report: one entry per image grouped by eye, the models' provenance and the disclaimer."""
    if scope not in ("patient", "eye"):
        raise ValueError("scope must be 'patient' or 'eye'")
    items = _eye_order(items)
    eyes: dict[str, list] = {}
    for i, it in enumerate(items, 1):
        d = it.analysis.to_dict()
        d.pop("laterality", None)
        d["eye"] = it.eye
        d["image"] = it.title or f"Image {i}"
        d["image_size"] = list(it.analysis.image.shape[:2])
        eyes.setdefault(it.eye or "unspecified", []).append(d)
    return {
        "report": f"retina_core per-{scope} report",
        "created": _now(created).isoformat(),
        "software": f"retina_core {__version__}",
        "disclaimer": DISCLAIMER,
        "contains_patient_data": False,
        "eyes": eyes,
        "models": model_provenance(it.analysis.model for it in items),
    }


def report_json(items: list[ReportItem], scope: str = "patient", created: _dt.datetime | None = None) -> bytes:
    return (json.dumps(report_dict(items, scope, created), indent=2) + "\n").encode("utf-8")


# ------------------------------------------------------------------------------------------------------- PDF
def _footer(fig: Figure, when: str, page: int, pages: int) -> None:
    fig.text(0.06, 0.035, textwrap.fill(DISCLAIMER, 130), fontsize=6.5, color="#7a2e00", va="bottom")
    fig.text(0.06, 0.018, f"retina_core {__version__} · created {when} · page {page} of {pages}",
             fontsize=6.5, color="#555555")


def _write(fig: Figure, y: float, text: str, size: float = 8.0, width: int = 120, **kw) -> float:
    """Write `text` wrapped to `width` characters downward from y (figure fraction); return the next free y."""
    for line in textwrap.wrap(text, width) or [""]:
        fig.text(0.06, y, line, fontsize=size, **kw)
        y -= size * 0.0021 + 0.004
    return y - 0.004


def _summary_page(fig: Figure, items: list[ReportItem], scope: str, when: str, provenance: dict) -> None:
    fig.text(0.06, 0.95, f"Retinal image report (per {scope})", fontsize=17, weight="bold", color="#1b2a33")
    fig.text(0.06, 0.925, "Research software, not a medical device. For review by a clinician.", fontsize=9.5,
             color="#7a2e00")
    fig.text(0.06, 0.905, f"Created {when}. No patient identifiers are included; images are identified by their "
                          "position and a content hash.", fontsize=8, color="#333333")
    n = min(len(items), 20)
    top_y = 0.88 - 0.028 * (n + 1)
    ax = fig.add_axes([0.06, top_y, 0.88, 0.028 * (n + 1)])
    ax.axis("off")
    rows = []
    for i, it in enumerate(items[:n], 1):
        a = it.analysis
        top = f"{a.probabilities[a.label]:.0%}" if a.has_result else "-"
        rows.append([it.title or f"Image {i}", EYES.get(it.eye, it.eye or "-"), a.modality.replace("_", " "),
                     "gradable" if a.quality.gradable else "ungradable", a.label or "no result", top,
                     a.model or "-"])
    table = ax.table(cellText=rows, colLabels=["Image", "Eye", "Modality", "Quality", "Suggestion", "Prob.",
                                               "Model"], loc="upper left", cellLoc="left", colLoc="left",
                     colWidths=[0.1, 0.14, 0.1, 0.1, 0.17, 0.07, 0.32], bbox=[0, 0, 1, 1])
    table.auto_set_font_size(False)
    table.set_fontsize(7.5)
    y = _write(fig, top_y - 0.04, "Suggestions", 11, weight="bold")
    for i, it in enumerate(items, 1):
        y = _write(fig, y, f"{it.title or f'Image {i}'} ({EYES.get(it.eye, '-')}): {it.analysis.suggestion}")
    y = _write(fig, y - 0.02, "Models and weights", 11, weight="bold")
    for name, p in provenance.items():
        sha = (p.get("weights_sha256") or "unknown")[:16]
        y = _write(fig, y, f"{name}: weights sha256 {sha}..., trained {p.get('date') or '?'} on "
                           f"{p.get('trained_on') or 'unknown data'}; calibration temperature "
                           f"{p.get('temperature') or 1.0}", 7, 125, family="monospace")


def _image_page(fig: Figure, it: ReportItem, index: int) -> None:
    a = it.analysis
    h, w = a.image.shape[:2]
    fig.text(0.06, 0.95, f"{it.title or f'Image {index}'} · {EYES.get(it.eye, '-')} · {a.modality.replace('_', ' ')}"
                         f" · {w}x{h}", fontsize=13, weight="bold")
    fig.text(0.06, 0.925, f"Content hash {a.content_hash[:16]}", fontsize=7.5, color="#555555")
    ax1 = fig.add_axes([0.06, 0.58, 0.42, 0.32])
    ax1.imshow(a.image)
    ax1.set_title("Image as analysed", fontsize=9)
    ax1.axis("off")
    ax2 = fig.add_axes([0.52, 0.58, 0.42, 0.32])
    if a.heatmap is not None:
        ax2.imshow(overlay(a.image, a.heatmap, REPORT_OPACITY))
        ax2.set_title(f"{a.method} heatmap for '{a.target}' (red = strongest)", fontsize=9)
    else:
        ax2.text(0.5, 0.5, "No heatmap: no result for this image", ha="center", va="center", fontsize=9)
    ax2.axis("off")
    if a.has_result:
        ax3 = fig.add_axes([0.30, 0.34, 0.60, 0.20])
        classes = list(a.probabilities)
        probs = [a.probabilities[c] for c in classes]
        ax3.barh(classes, probs, color=["#1f6f8b" if c == a.label else "#9bb7c4" for c in classes])
        for yy, p in enumerate(probs):
            ax3.text(min(p + 0.01, 0.9), yy, f"{p:.1%}", va="center", fontsize=7.5)
        ax3.set_xlim(0, 1)
        ax3.invert_yaxis()
        ax3.set_xlabel("calibrated probability", fontsize=8)
        ax3.tick_params(labelsize=7.5)
        ax3.set_title("Calibrated probabilities", fontsize=9)
    q = a.quality
    lines = [
        f"Suggestion: {a.suggestion}",
        f"Model {a.model or '-'} · weights sha256 {(a.weights_sha256 or '-')[:16]} · method {a.method}",
        f"Model trained on: {a.trained_on or 'unknown'}",
        f"Quality: {'gradable' if q.gradable else 'ungradable'} (score {q.score:.2f}) - {q.verdict}",
    ]
    lines += [f"  - {r}" for r in q.reasons]
    lines += [f"Note: {n}" for n in a.notes]
    size, width = _fitting_size(lines, TEXT_TOP, TEXT_BOTTOM)
    y = TEXT_TOP
    for line in lines:
        # hashes in monospace: easier to compare by eye, and no typographic ligature (ff) inside a hash
        y = _write(fig, y, line, size, width, family="monospace" if "sha256" in line else None)


TEXT_TOP, TEXT_BOTTOM = 0.29, 0.075   # an image page's text block: under the probabilities, above the footer


def _fitting_size(lines: list[str], top: float, bottom: float) -> tuple[float, int]:
    """The largest font size (8 pt down to 5.5 pt, wrapped proportionally wider) at which `_write` puts every line
    between top and bottom, so a long provenance or note never runs into the footer."""
    for size in (8.0, 7.5, 7.0, 6.5, 6.0, 5.5):
        width = int(120 * 8.0 / size)
        height = sum(len(textwrap.wrap(t, width) or [""]) * (size * 0.0021 + 0.004) + 0.004 for t in lines)
        if top - height >= bottom:
            break
    return size, width


def report_figures(items: list[ReportItem], scope: str = "patient",
                   created: _dt.datetime | None = None) -> list[Figure]:
    """The report's pages as matplotlib Figures (A4): a summary page, then one page per image."""
    if scope not in ("patient", "eye"):
        raise ValueError("scope must be 'patient' or 'eye'")
    if not items:
        raise ValueError("a report needs at least one analysed image")
    items = _eye_order(items)
    when = _now(created).strftime("%Y-%m-%d %H:%M UTC")
    pages = 1 + len(items)
    fig = Figure(figsize=A4)
    _summary_page(fig, items, scope, when, model_provenance(it.analysis.model for it in items))
    _footer(fig, when, 1, pages)
    figs = [fig]
    for i, it in enumerate(items, 1):
        fig = Figure(figsize=A4)
        _image_page(fig, it, i)
        _footer(fig, when, i + 1, pages)
        figs.append(fig)
    return figs


def report_pdf(items: list[ReportItem], scope: str = "patient", created: _dt.datetime | None = None) -> bytes:
    """The report as PDF bytes (they start with %PDF); metadata carry no patient data either."""
    buf = io.BytesIO()
    meta = {"Title": f"Retinal image report (per {scope})", "Author": "retina_core", "Subject": DISCLAIMER,
            "Creator": f"retina_core {__version__}", "Keywords": "research software; not a medical device"}
    with PdfPages(buf, metadata=meta) as pdf:
        for fig in report_figures(items, scope, created):
            pdf.savefig(fig)
    return buf.getvalue()


def split_by_eye(items: list[ReportItem]) -> dict[str | None, list[ReportItem]]:
    """{eye: items} in the order OD, OS, unspecified (for per-eye reports)."""
    out: dict[str | None, list[ReportItem]] = {}
    for it in _eye_order(items):
        out.setdefault(it.eye, []).append(it)
    return out

