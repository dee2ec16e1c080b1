"""A content-addressed store on disk: each object is a file named by the sha256 of its bytes.

    store = ContentStore("var/store")
    h = store.put(png_bytes)                 # sha256 hex; writing the same bytes twice is a no-op
    store.get(h)                             # the bytes, checked against their hash on the way out

Objects are images as shown to the model (metadata-free PNG of the decoded pixels, never the uploaded file, which
for DICOM or JPEG may carry names and dates in its header) and heatmaps (8-bit PNG, value / 255, at most
HEATMAP_SIDE pixels on the long side: the model's grid is coarser than that). Names are hashes, never patient data.
Layout: `<root>/<first two hex digits>/<hash>.png`, written atomically (temporary file, then rename).
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

HEATMAP_SIDE = 256
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ContentStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        if not _HEX64.match(digest or ""):
            raise ValueError("not a sha256 hex digest")
        return self.root / digest[:2] / f"{digest}.png"

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if target.exists():
            return digest
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def get(self, digest: str) -> bytes:
        data = self.path(digest).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise OSError(f"stored object {digest[:12]} is damaged (its bytes no longer match its hash)")
        return data

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    # ----------------------------------------------------------------------------------------- typed objects
    def put_image(self, pixels: np.ndarray) -> str:
        """uint8 [H, W, 3] (or [H, W]) -> hash of its metadata-free PNG; greyscale kept as one channel."""
        arr = np.asarray(pixels)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise ValueError("an image to store is uint8 [H, W] or [H, W, 3]")
        if arr.ndim == 3 and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all():
            arr = arr[..., 0]
        return self.put(_png(arr))

    def get_image(self, digest: str) -> np.ndarray:
        """uint8 [H, W, 3] RGB."""
        with Image.open(io.BytesIO(self.get(digest))) as im:
            return np.asarray(im.convert("RGB"))

    def put_heatmap(self, heatmap: np.ndarray) -> str:
        """float [H, W] in [0, 1] -> hash of an 8-bit PNG at most HEATMAP_SIDE on its long side."""
        hm = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
        if hm.ndim != 2:
            raise ValueError("a heatmap is [H, W]")
        im = Image.fromarray(np.uint8(np.round(hm * 255)))
        h, w = hm.shape
        scale = HEATMAP_SIDE / max(h, w)
        if scale < 1:
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        return self.put(_png(np.asarray(im)))

    def get_heatmap(self, digest: str, size: tuple[int, int] | None = None) -> np.ndarray:
        """float32 [H, W] in [0, 1]; resized (bilinear) to `size` = (H, W) when given."""
        with Image.open(io.BytesIO(self.get(digest))) as im:
            im = im.convert("L")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(im, dtype=np.float32) / 255.0


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
