"""Optional JSONL audit log: one line per analysis, with nothing that identifies a patient.

    log = AuditLog("audit.jsonl")
    log.record(img.content_hash, "oct_resnet18", weights_sha256, {"label": "CNV", "probabilities": {...}})

Each line: {"time": ISO-8601 UTC, "content_hash": sha256 of the input bytes, "model", "weights_sha256", "outputs"}.
The log never receives patient data (it is called with hashes and model outputs only); as a second line of defence
`outputs` must be JSON scalars, lists and dicts, and pixel arrays are refused rather than written. Appends are
serialised by a lock and written as one `write` per line, so concurrent sessions do not interleave lines.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()
MAX_LINE_BYTES = 64 * 1024  # an audit line summarises outputs; anything bigger is a bug (e.g. a heatmap)


class AuditLog:
    """Append-only JSON Lines audit trail at `path` (parent folders are created)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        with _LOCKS_GUARD:
            self._lock = _LOCKS.setdefault(key, threading.Lock())

    def record(self, content_hash: str, model: str, weights_sha256: str | None, outputs: dict) -> dict:
        """Append one entry and return it. content_hash / weights_sha256: sha256 hex digests."""
        if not isinstance(content_hash, str) or not _HEX64.match(content_hash):
            raise ValueError("content_hash must be a sha256 hex digest")
        if weights_sha256 is not None and (not isinstance(weights_sha256, str) or not _HEX64.match(weights_sha256)):
            raise ValueError("weights_sha256 must be a sha256 hex digest or None")
        if not isinstance(outputs, dict):
            raise TypeError("outputs must be a dict")
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                 "content_hash": content_hash, "model": str(model), "weights_sha256": weights_sha256,
                 "outputs": _jsonable(outputs)}
        line = json.dumps(entry, ensure_ascii=False, sort_keys=True, allow_nan=False) + "\n"
        data = line.encode("utf-8")
        if len(data) > MAX_LINE_BYTES:
            raise ValueError(f"audit entry is {len(data)} bytes (limit {MAX_LINE_BYTES}); log summaries, not arrays")
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        return entry

    def entries(self) -> list[dict]:
        """All entries, oldest first (a missing file is an empty log)."""
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]


def _jsonable(value: Any, depth: int = 0) -> Any:
    """Plain JSON values only: numpy scalars become Python numbers; arrays and other objects are refused."""
    if depth > 8:
        raise ValueError("outputs are nested too deeply for an audit entry")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) > 1000:
            raise ValueError("audit outputs hold a long sequence; log summaries, not arrays")
        return [_jsonable(v, depth + 1) for v in value]
    item = getattr(value, "item", None)  # numpy / torch scalars
    shape = getattr(value, "shape", None)
    if callable(item) and (shape is None or shape == () or shape == []):
        return _jsonable(item(), depth + 1)
    raise TypeError(f"audit outputs cannot hold a {type(value).__name__}; log summaries, not arrays or objects")
