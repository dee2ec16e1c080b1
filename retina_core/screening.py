"""Batch screening of uploaded bytes (the app's batch page), on the same steps as `retina_core.batch`.

    >>> rows = screen_uploads([("a.png", data_a), ("b.dcm", data_b)], chunk=8, progress=lambda k, n: ...)

`batch.prepare` decodes with `read_image`, which takes bytes as well as paths, so uploads are screened in memory:
nothing is written to disk (a DICOM's header never lands in a temporary file). Rows have `batch.COLUMNS`; `file`
is the uploaded name.
"""
from __future__ import annotations

from typing import Callable

from .batch import COLUMNS, infer, prepare

__all__ = ["COLUMNS", "screen_uploads"]


def screen_uploads(files: list[tuple[str, bytes]], chunk: int = 8, model: str | None = None,
                   progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """One row per (name, bytes): decode + quality gate + preprocess (`batch.prepare`), then batched forwards with
    single-pass Grad-CAM per chunk (`batch.infer`). progress(done, total) is called after every chunk."""
    rows: list[dict] = []
    n = len(files)
    for start in range(0, n, chunk):
        part = files[start:start + chunk]
        items = [prepare(data, model) for _, data in part]   # bytes go straight to read_image
        for (name, _), it in zip(part, items):
            it.file = name
            it.row["file"] = name
        rows.extend(infer(items, None))
        if progress:
            progress(min(n, start + len(part)), n)
    return rows
