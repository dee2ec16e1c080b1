"""The quality and modality gate measured on folders of real images (`python -m retina_core gate-eval`).

For each set: how often the gate names the expected modality, how many images it passes as gradable, and every
refusal grouped by reason, with the refused files (names relative to the set) for a reader to check. The sets are
split by patient into two halves (a stable hash of the patient id, or of the number in the file name, is even:
"fit", odd: "heldout"), so thresholds fitted on one half can be judged on the other.

    python -m retina_core gate-eval ../shared/realdata/mexico_fundus_dme_dr ../shared/realdata/mexico_oct_dme
    python -m retina_core gate-eval ../shared/realdata --json --contact-sheet /tmp/refused.png
    python -m retina_core gate-eval some/folder --expect oct --limit 50

A set is a folder with `labels.csv` (its `file` column lists the images, relative to the folder) or any folder of
images (walked). A folder holding several such sets (e.g. ../shared/realdata) is expanded into them. The contact
sheet is written only where the user asks: it shows patient images and must not be committed or shared.
"""
from __future__ import annotations

import csv
import hashlib
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from ..errors import RetinaInputError
from ..io.datasets import IMAGE_EXTENSIONS
from ..io.decode import SCREEN_SIDE, read_image
from ..modality import IMAGE_MODALITIES, Modality
from ..quality import GRADABLE, assess_quality, hazy_only

EXPECTABLE = IMAGE_MODALITIES
# words in a set's folder name that say what it holds
_NAME_WORDS = {"oct": Modality.OCT, "bscan": Modality.OCT, "fundus": Modality.FUNDUS, "idrid": Modality.FUNDUS,
               "eye_disease": Modality.FUNDUS, "aptos": Modality.FUNDUS, "messidor": Modality.FUNDUS,
               "eyepacs": Modality.FUNDUS, "odir": Modality.FUNDUS, "drive": Modality.FUNDUS}
# labels only one modality's data sets use
_OCT_LABELS = {"CNV", "DRUSEN", "CSR", "MH", "AMD"}
_FUNDUS_LABELS = {"cataract", "glaucoma", "diabetic_retinopathy", "No DR", "Mild", "Moderate", "Severe",
                  "Proliferative DR"}


def realdata_root() -> Path:
    """The folder of real data sets: $RETINA_REALDATA, else ../shared/realdata beside the repository."""
    env = os.environ.get("RETINA_REALDATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "realdata"


def resolve_sets(items: list[str]) -> list[Path]:
    """DATA arguments -> set folders. An argument is a set folder, a folder of sets (each with labels.csv), or the
    bare name of a set under `realdata_root()`."""
    sets: list[Path] = []
    for item in items:
        p = Path(item)
        if not p.is_dir() and (realdata_root() / item).is_dir():
            p = realdata_root() / item
        if not p.is_dir():
            raise RetinaInputError(f"{item} is not a folder (give a data set folder, or a set name under "
                                   f"{realdata_root()}).")
        children = sorted(c for c in p.iterdir() if c.is_dir() and (c / "labels.csv").is_file())
        sets.extend(children if children and not (p / "labels.csv").is_file() else [p])
    return sets


def read_rows(set_dir: Path) -> list[dict]:
    """The set's images as rows ({"file": relative path, ...labels.csv columns}): labels.csv when present, else
    every image file under the folder (sorted)."""
    labels = set_dir / "labels.csv"
    if labels.is_file():
        with labels.open(newline="") as f:
            rows = [r for r in csv.DictReader(f)]
        if rows and "file" not in rows[0]:
            raise RetinaInputError(f"{labels} has no 'file' column.")
        return [r for r in rows if r.get("file")]
    files = sorted(p for p in set_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return [{"file": p.relative_to(set_dir).as_posix()} for p in files]


def guess_expected(set_dir: Path, rows: list[dict]) -> str:
    """The modality a set holds, from its folder name, else from its labels; RetinaInputError when unclear."""
    words = set_dir.name.lower()
    for word, modality in _NAME_WORDS.items():
        if re.search(rf"(^|[^a-z]){word}([^a-z]|$)", words):
            return modality
    labels = {r.get("label", "") for r in rows}
    if labels & _OCT_LABELS and not labels & _FUNDUS_LABELS:
        return Modality.OCT
    if labels & _FUNDUS_LABELS and not labels & _OCT_LABELS:
        return Modality.FUNDUS
    raise RetinaInputError(f"Cannot tell which modality {set_dir.name} holds; pass --expect fundus or --expect oct.")


def patient_key(row: dict) -> str:
    """Who the image belongs to: the patient_id column, else the first number in the file name (`1234_left.jpg`
    -> 1234, so both eyes fall in one half), else the file name."""
    if row.get("patient_id"):
        return str(row["patient_id"])
    stem = Path(row["file"]).stem
    m = re.search(r"\d+", stem)
    return m.group(0).lstrip("0") or "0" if m else stem


def half_of(row: dict) -> str:
    """"fit" when the stable hash of the patient key is even, else "heldout" (same split on every machine)."""
    digest = hashlib.sha256(patient_key(row).encode()).digest()
    return "fit" if digest[-1] % 2 == 0 else "heldout"


def reason_group(reason: str) -> str:
    """A reason without its measured numbers ("image is blurred (focus score 0.31 < 0.44)" -> "image is blurred"),
    so equal reasons count together."""
    return re.sub(r"\s+", " ", re.sub(r"\s*\([^)]*\)", "", reason)).strip()


def _sample(rows: list[dict], limit: int | None) -> list[dict]:
    """Every row, or `limit` of them evenly spaced over the list (labels.csv is often sorted by class)."""
    if not limit or limit >= len(rows):
        return rows
    step = len(rows) / limit
    return [rows[int(i * step)] for i in range(limit)]


def assess_file(path: Path, expected: str, max_side: int | None = SCREEN_SIDE) -> dict:
    """One image through `read_image` and `assess_quality`: modality, verdict, gradable, score, reasons, and
    whether a refusal is for haze alone (`quality.hazy_only`: the app still reads it for media opacity). Read as
    the app, `predict` and batch read it (long side at most SCREEN_SIDE; max_side None: full size)."""
    try:
        q = assess_quality(read_image(path, max_side=max_side))
    except RetinaInputError as exc:
        return {"modality": "error", "verdict": "error", "gradable": False, "score": 0.0,
                "reasons": [f"could not be read: {exc}"], "modality_ok": False, "hazy": False}
    return {"modality": q.modality, "verdict": q.verdict, "gradable": q.verdict == GRADABLE, "score": q.score,
            "reasons": list(q.reasons), "modality_ok": q.modality == expected, "hazy": hazy_only(q)}


def summarise(records: list[dict]) -> dict:
    """n, modality right (count, %), gradable (count, %), refusals by verdict and by reason, for per-image records."""
    n = len(records)
    ok = sum(r["modality_ok"] for r in records)
    grad = sum(r["gradable"] for r in records)
    refused = [r for r in records if not r["gradable"]]
    by_reason = Counter(reason_group(x) for r in refused for x in r["reasons"] or ["(no reason given)"])
    pct = (lambda k: round(100.0 * k / n, 1) if n else None)
    return {"n": n, "modality_correct": ok, "modality_pct": pct(ok), "gradable": grad, "gradable_pct": pct(grad),
            "refused": len(refused), "refused_by_verdict": dict(Counter(r["verdict"] for r in refused)),
            # refused for blur or low contrast alone: still read for media opacity (cataract) by the app
            "refused_hazy_only": sum(bool(r.get("hazy")) for r in refused),
            "modality_by_call": dict(Counter(r["modality"] for r in records)),
            "refusals_by_reason": dict(by_reason.most_common())}


def evaluate_set(set_dir: str | Path, expect: str | None = None, limit: int | None = None,
                 progress: Callable[[int, int], None] | None = None, max_side: int | None = SCREEN_SIDE) -> dict:
    """Run the gate on every image of one set (or `limit` evenly spaced ones).

    Returns {"set", "path", "expected", **summarise(all), "halves": {"fit": ..., "heldout": ...}, "refused_files":
    [{"file", "half", "modality", "verdict", "reasons"}], "wrong_modality_files": [...]} (files relative to the set).
    """
    set_dir = Path(set_dir)
    if expect is not None and expect not in EXPECTABLE:
        raise RetinaInputError(f"--expect must be one of {', '.join(EXPECTABLE)}, not {expect!r}.")
    rows = _sample(read_rows(set_dir), limit)
    if not rows:
        raise RetinaInputError(f"{set_dir} holds no images.")
    expected = expect or guess_expected(set_dir, rows)
    records = []
    for i, row in enumerate(rows):
        rec = {"file": row["file"], "half": half_of(row), **assess_file(set_dir / row["file"], expected, max_side)}
        records.append(rec)
        if progress:
            progress(i + 1, len(rows))
    keep = ("file", "half", "modality", "verdict", "score", "reasons", "hazy")
    return {"set": set_dir.name, "path": str(set_dir), "expected": expected, "read_at": max_side or "full size",
            **summarise(records),
            "halves": {h: summarise([r for r in records if r["half"] == h]) for h in ("fit", "heldout")},
            "refused_files": [{k: r[k] for k in keep} for r in records if not r["gradable"]],
            "wrong_modality_files": [{k: r[k] for k in keep} for r in records if not r["modality_ok"]]}


def format_report(results: list[dict]) -> str:
    """Markdown: one table row per set (all / fit half / held-out half), then each set's refusals by reason."""
    lines = ["| set | expected | half | n | modality right | gradable | refused | of which hazy only (read for "
             "cataract) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name, s in (("all", r), ("fit", r["halves"]["fit"]), ("held-out", r["halves"]["heldout"])):
            if not s["n"]:
                continue
            lines.append(f"| {r['set']} | {r['expected']} | {name} | {s['n']} | {s['modality_correct']} "
                         f"({s['modality_pct']}%) | {s['gradable']} ({s['gradable_pct']}%) | {s['refused']} | "
                         f"{s['refused_hazy_only']} |")
    for r in results:
        if r["refusals_by_reason"]:
            lines.append(f"\n{r['set']}: refusals by reason (an image may have several)")
            lines += [f"- {k}: {v}" for k, v in r["refusals_by_reason"].items()]
    return "\n".join(lines)


def contact_sheet(results: list[dict], out: str | Path, thumb: int = 192, cols: int = 6,
                  max_images: int = 240) -> int:
    """A grid PNG of the refused images (each a thumbnail captioned with its set, file and reasons), for a reader
    to judge each refusal. Writes `out` only; returns the number of images shown (the first `max_images`).
    It shows patient images: keep it local, never commit it."""
    import textwrap

    import numpy as np
    from PIL import Image, ImageDraw

    items = [(r, f) for r in results for f in r["refused_files"]][:max_images]
    if not items:
        return 0
    cap_lines, line_h = 7, 11
    cell_w, cell_h = thumb + 8, thumb + 8 + cap_lines * line_h
    rows = (len(items) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (r, f) in enumerate(items):
        x, y = (k % cols) * cell_w + 4, (k // cols) * cell_h + 4
        try:
            img = read_image(Path(r["path"]) / f["file"])
            px = np.asarray(img.pixels)
            if img.kind == "volume":
                px = (np.clip(px[len(px) // 2], 0, 1) * 255).astype(np.uint8)
            im = Image.fromarray(np.ascontiguousarray(px, dtype=np.uint8))
            im.thumbnail((thumb, thumb))
            sheet.paste(im.convert("RGB"), (x, y))
        except (RetinaInputError, ValueError, TypeError):
            draw.rectangle([x, y, x + thumb, y + thumb], outline=(200, 0, 0))
        text = f"{r['set'][:14]}/{f['file']} [{f['modality']}] " + "; ".join(f["reasons"])
        wrapped = textwrap.wrap(text, width=max(10, thumb // 6))[:cap_lines]
        for j, line in enumerate(wrapped):
            draw.text((x, y + thumb + 2 + j * line_h), line, fill=(0, 0, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return len(items)
