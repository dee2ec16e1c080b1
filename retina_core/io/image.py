"""The decoded scan and the checks and conversions every reader shares (decode.py, dicom.py, nifti.py, scanners.py).

`RetinalImage` is what every reader returns; `check_dimensions` refuses absurd sizes from header values before any
pixel is decoded; the converters map 16-bit / float data and volumes onto the ranges the app uses. Nothing here
imports a reader, so the readers can import this module and `decode.read_image` can import the readers.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from retina_core.errors import RetinaInputError

log = logging.getLogger("retina_core.io.decode")  # the decoder's log name, as before the split

SUPPORTED = "PNG, JPEG, TIFF, BMP, WebP, DICOM, NIfTI, Heidelberg .vol / .e2e, Topcon .fda / .fds"
MIN_SIDE = 32          # px; smaller than this cannot hold a gradable retina
MAX_ASPECT = 8.0       # long side / short side; beyond this it is a strip or a banner, not a scan
MAX_FRAMES = 4096      # frames in one multi-frame file, a bound on header walking work


@dataclass(frozen=True, eq=False)
class RetinalImage:
    """A decoded, validated scan.

    pixels: 2-D image -> uint8 [H, W, 3] RGB (greyscale replicated to 3 channels);
            volume   -> float32 [D, H, W] in [0, 1] (D = slices / B-scans).
    kind: "image" | "volume".  source_format: "png" | "jpeg" | "tiff" | "bmp" | "webp" | "gif" | "dicom" | "nifti"
          | "heidelberg-vol" | "heidelberg-e2e" | "topcon-fda" | "topcon-fds" (OCT exports: io/scanners.py).
    content_hash: sha256 hex of the input bytes (as uploaded; compressed bytes for .nii.gz).
    grayscale: the source had one channel, or three identical ones (typical OCT).
    modality_hint: Modality.FUNDUS | Modality.OCT | None, from DICOM Modality (OP/OPT), SOP class or the scanner format.
    laterality: "OD" | "OS" | None, from DICOM (Image)Laterality or a file name with _left/_right, OD/OS.
    spacing: mm per pixel (row, col) or per voxel (slice, row, col) where known.
    meta: non-identifying technical facts only (width, height, frames, bits, photometric, transfer syntax, ...);
          meta["single_channel"] True: a 2-D image's three channels are exact copies of one (a grey source),
          so preprocessing resizes one channel (`models.loading.preprocess_image`, grey=True).
          meta["header"], where the format's header names a modality (DICOM): what it says, non-identifying
          ({"format", "modality", "modality_name", "sop_class", "ophthalmic": True | False | None, "reason"});
          the quality gate refuses an image whose header says ophthalmic False, before looking at its pixels.
    """

    pixels: np.ndarray
    kind: str
    source_format: str
    content_hash: str
    grayscale: bool
    modality_hint: str | None = None
    laterality: str | None = None
    spacing: tuple[float, ...] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[-2] if self.kind == "volume" else self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[-1] if self.kind == "volume" else self.pixels.shape[1])

    def __repr__(self) -> str:  # short: never dump pixel values into logs
        hint = None if self.modality_hint is None else str(self.modality_hint)    # the value, not the enum's repr
        return (f"RetinalImage(kind={self.kind!r}, shape={tuple(self.pixels.shape)}, dtype={self.pixels.dtype}, "
                f"source_format={self.source_format!r}, grayscale={self.grayscale}, "
                f"modality_hint={hint!r}, laterality={self.laterality!r}, spacing={self.spacing!r}, "
                f"content_hash={self.content_hash[:12]!r}..., meta={self.meta!r})")


def nifti_kind(data: bytes) -> str | None:
    if len(data) < 348:
        return None
    for order in ("<", ">"):
        sizeof_hdr = int(np.frombuffer(data[:4], dtype=order + "i4")[0])
        if sizeof_hdr == 348:
            magic = data[344:348]
            if magic == b"n+1\x00":
                return "nifti"
            return "analyze"  # "ni1" (separate .img) or plain Analyze 7.5
        if sizeof_hdr == 540 and len(data) >= 540 and data[4:8] == b"n+2\x00":
            return "nifti"
    return None


def format_name(fmt: str) -> str:
    return {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF", "bmp": "BMP", "webp": "WebP", "gif": "GIF",
            "dicom": "DICOM", "nifti": "NIfTI", "nifti-gz": "NIfTI", "heidelberg-vol": "Heidelberg .vol",
            "heidelberg-e2e": "Heidelberg .e2e", "topcon": "Topcon", "topcon-fda": "Topcon .fda",
            "topcon-fds": "Topcon .fds"}.get(fmt, fmt.upper())


def check_dimensions(width: int, height: int, frames: int, max_pixels: int, fmt: str) -> None:
    """Refuse absurd or degenerate sizes from header values, before any pixel data is decoded."""
    what = format_name(fmt)
    if width <= 0 or height <= 0 or frames <= 0:
        raise RetinaInputError(f"This {what} file declares an empty image ({width}x{height} pixels); "
                               "it is damaged. Re-export the scan.")
    total = width * height * frames
    if total > max_pixels:
        size = f"{width}x{height}" + (f"x{frames} frames" if frames > 1 else "")
        raise RetinaInputError(f"This {what} image is too large to open safely ({size} = {total / 1e6:.0f} "
                               f"megapixels, limit {max_pixels / 1e6:.0f}). It may be a decompression bomb; "
                               "if it is a genuine scan, export it at a lower resolution.")
    if frames > MAX_FRAMES:
        raise RetinaInputError(f"This {what} file has too many frames ({frames}; limit {MAX_FRAMES}). "
                               "Export fewer frames or a single image.")
    if min(width, height) < MIN_SIDE:
        raise RetinaInputError(f"This image is only {width}x{height} pixels; at least {MIN_SIDE} pixels on each "
                               "side are needed. Upload the full-resolution scan, not a thumbnail or icon.")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise RetinaInputError(f"This image is {width}x{height} pixels, a strip rather than a retinal scan "
                               f"(aspect ratio above {MAX_ASPECT:g}:1). Upload the whole scan.")


def scale_to_uint8(a: np.ndarray) -> np.ndarray:
    """Map the ACTUAL value range [min, max] of `a` onto 0..255 (16-bit, float), never by clamping."""
    a = np.asarray(a, dtype=np.float64)
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, np.nan)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    out = (a - lo) * (255.0 / (hi - lo))
    return np.nan_to_num(np.rint(out), nan=0.0).astype(np.uint8)


def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """uint8 [H, W] -> uint8 [H, W, 3], three copies of the channel (OpenCV's copy: ~5x numpy's repeat)."""
    g = np.ascontiguousarray(grey, dtype=np.uint8)
    if g.ndim == 2 and g.size:
        return cv2.cvtColor(g, cv2.COLOR_GRAY2RGB)
    return np.repeat(g[..., None], 3, axis=2)


def looks_grey(rgb: np.ndarray, tol: int = 2) -> bool:
    """Three channels that are (nearly) identical: a greyscale scan saved as RGB (JPEG chroma adds +-1)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        return True
    # a strided sample keeps this cheap for very large photographs
    step = max(1, int(np.sqrt(rgb.shape[0] * rgb.shape[1] / 1_000_000)))
    s = rgb[::step, ::step].astype(np.int16)
    return bool(np.abs(s[..., 0] - s[..., 1]).max() <= tol and np.abs(s[..., 1] - s[..., 2]).max() <= tol)


def volume_to_unit(vol: np.ndarray, robust: bool) -> np.ndarray:
    """float32 [D, H, W] in [0, 1]: by 0.5/99.5 percentiles when `robust`, else by the actual min..max."""
    v = np.asarray(vol, dtype=np.float32)
    if robust:
        step = max(1, v.size // 2_000_000)
        sample = v.reshape(-1)[::step]
        lo, hi = (float(x) for x in np.percentile(sample, [0.5, 99.5]))
        if hi <= lo:
            lo, hi = float(v.min()), float(v.max())
    else:
        lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.zeros(v.shape, np.float32)
    with np.errstate(over="ignore"):      # values near float32's limits overflow to +-inf; the clip keeps 0..1
        out = (v - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32, copy=False)


def volume_slice_as_image(vol01: np.ndarray, index: int, fmt: str) -> np.ndarray:
    if not -vol01.shape[0] <= index < vol01.shape[0] or index < 0:
        raise RetinaInputError(f"Frame {index} was requested but this {format_name(fmt)} file has "
                               f"{vol01.shape[0]} frames (0 to {vol01.shape[0] - 1}).")
    return grey_to_rgb(np.rint(vol01[index] * 255.0).astype(np.uint8))


_TRUNCATION_LOCK = threading.Lock()


def full_load(im: Any) -> None:
    """Decode every pixel now; truncated files raise (OSError) instead of being padded with grey.

    If some other code set the global PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True, it is switched off for the
    duration of this load (under a lock, restored afterwards) rather than silently accepting partial scans.
    """
    from PIL import ImageFile
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        im.load()
        return
    log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; overriding it for this decode")
    with _TRUNCATION_LOCK:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            im.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = True
