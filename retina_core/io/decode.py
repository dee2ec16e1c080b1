"""The one safe decoder for every entry point: bytes in, a validated `RetinalImage` out.

    img = read_image("scan.png")                    # path, bytes, or a binary file-like (Streamlit UploadedFile)
    img.pixels                                      # uint8 [H, W, 3] RGB, or float32 [D, H, W] in [0, 1] for volumes

Order of work, chosen so that nothing large is allocated before it is known to be sane:
1. size of the input in bytes (stat / `.size` / seek) is checked before it is read;
2. the format is sniffed from magic bytes (never from the extension);
3. width/height/frames are read from the header and checked before any pixel is decoded;
4. a full decode is forced (truncated files are refused, never padded);
5. orientation (EXIF), bit depth (16-bit scaled by its actual range) and colour mode are normalised.

Every problem a user can cause raises `RetinaInputError` with a message a clinician can act on. Unexpected
decoder failures are logged (traceback, no file contents) and re-raised as `RetinaInputError` too, so callers
only ever need to catch one exception type.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import traceback
import warnings
from typing import Any, BinaryIO, Union

import numpy as np

from retina_core.errors import RetinaInputError
from retina_core.io.dicom import decode_dicom
from retina_core.io.image import (MAX_ASPECT, MAX_FRAMES, MIN_SIDE, SUPPORTED, RetinalImage,  # noqa: F401 - re-exported
                                   check_dimensions, format_name, full_load, grey_to_rgb, looks_grey, nifti_kind,
                                   scale_to_uint8, volume_slice_as_image, volume_to_unit)
from retina_core.io.nifti import decode_nifti
from retina_core.io.scanners import decode_scanner, sniff_scanner

log = logging.getLogger(__name__)

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO]

# File-picker filters for the app's upload widgets (what a browser offers; the decoder still sniffs the bytes)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "tif", "tiff", "bmp", "webp", "dcm")
VOLUME_EXTENSIONS = ("nii", "gz", "dcm", "tif", "tiff", "vol", "e2e", "sdb", "edb", "fda", "fds", "img")


# --------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------

def read_image(src: Source, *, max_bytes: int = 200 * 2**20, max_pixels: int = 80_000_000,
               frame: int | None = None, name: str | None = None, max_side: int | None = None) -> RetinalImage:
    """Decode a path, bytes or binary file-like into a `RetinalImage`, or raise `RetinaInputError`.

    max_bytes: refuse inputs larger than this (checked before reading). max_pixels: refuse images whose
    header announces more pixels (width * height * frames for volumes). frame: for multi-frame files, the
    0-based frame to return as a 2-D image; -1 returns all frames as a volume. Defaults: TIFF/GIF -> frame 0,
    multi-frame DICOM and NIfTI -> volume. name: file name (for laterality) when `src` has none.
    max_side: a 2-D image comes back with its long side at most this many pixels (spacing scaled to match,
    meta["decoded_scale"] the factor); JPEGs are decoded directly at a reduced scale (DCT scaling), so a
    12-megapixel photograph costs a fraction of a full decode. The app reads uploads at `SCREEN_SIDE`, which
    is more than any model input and the screen need; research code reads full size (the default None).
    """
    data, name = _read_bytes(src, max_bytes, name)
    content_hash = hashlib.sha256(data).hexdigest()
    fmt = sniff_format(data)
    try:
        if fmt == "dicom":
            img = decode_dicom(data, content_hash=content_hash, max_pixels=max_pixels, frame=frame)
        elif fmt.startswith(("heidelberg", "topcon")):
            img = decode_scanner(data, fmt, content_hash=content_hash, max_pixels=max_pixels, frame=frame)
        elif fmt in ("nifti", "nifti-gz"):
            img = decode_nifti(data, content_hash=content_hash, max_pixels=max_pixels, max_bytes=max_bytes,
                               frame=frame, gzipped=(fmt == "nifti-gz"))
        else:
            img = _decode_pillow(data, fmt, content_hash=content_hash, max_pixels=max_pixels, frame=frame,
                                 max_side=max_side)
        if max_side and img.kind == "image" and max(img.pixels.shape[:2]) > max_side:
            img = downscale(img, max_side)
    except RetinaInputError:
        raise
    except MemoryError:
        log.error("Out of memory while decoding a %s file (sha256 %s)", fmt, content_hash[:12])
        raise RetinaInputError(f"This {format_name(fmt)} file is too large to decode on this machine. "
                               "Export a smaller version (fewer frames or lower resolution) and try again.") from None
    except Exception as exc:  # noqa: BLE001 - every decoder failure must become a clinician-readable message
        log_internal_error(exc, fmt, content_hash,  # DICOM and scanner messages may quote patient fields
                           include_message=not fmt.startswith(("dicom", "heidelberg", "topcon")))
        raise RetinaInputError(f"This {format_name(fmt)} file could not be decoded; it may be damaged or use a "
                               "variant this app does not support. Re-export it (e.g. as PNG) and try again.") from None
    if img.laterality is None and name:
        img = _replace(img, laterality=laterality_from_name(name))
    return img


# --------------------------------------------------------------------------------------------------------------
# Reading bytes with a size bound
# --------------------------------------------------------------------------------------------------------------

def _too_big(size: int, max_bytes: int) -> RetinaInputError:
    return RetinaInputError(f"This file is {size / 2**20:.1f} MB, above the {max_bytes / 2**20:.0f} MB limit. "
                            "Export a smaller version (e.g. a single image or lower resolution) and try again.")


def _read_bytes(src: Source, max_bytes: int, name: str | None) -> tuple[bytes, str | None]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if len(data) > max_bytes:
            raise _too_big(len(data), max_bytes)
    elif isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        name = name or os.path.basename(path)
        if not os.path.exists(path):
            raise RetinaInputError(f"The file '{os.path.basename(path)}' was not found. Check the path and try again.")
        if os.path.isdir(path):
            raise RetinaInputError(f"'{os.path.basename(path)}' is a folder, not an image file. "
                                   "Choose a single image file.")
        size = os.path.getsize(path)
        if size > max_bytes:
            raise _too_big(size, max_bytes)
        try:
            with open(path, "rb") as fh:
                data = fh.read(max_bytes + 1)
        except OSError:
            raise RetinaInputError(f"The file '{os.path.basename(path)}' could not be read (permission or disk "
                                   "problem). Copy it to a local folder and try again.") from None
    elif hasattr(src, "read"):
        name = name or _basename(getattr(src, "name", None))
        _rewind(src)  # the whole file, even if a page already read it (Streamlit's UploadedFile is re-read)
        size = getattr(src, "size", None)  # Streamlit's UploadedFile knows its size
        if not isinstance(size, int):
            size = _remaining_size(src)
        if size is not None and size > max_bytes:
            raise _too_big(size, max_bytes)
        try:
            data = src.read(max_bytes + 1)
        except Exception:  # noqa: BLE001
            raise RetinaInputError("The uploaded file could not be read. Upload it again.") from None
        if isinstance(data, str):
            raise RetinaInputError("The file was opened as text; open it in binary mode ('rb').")
        data = bytes(data or b"")
    else:
        raise RetinaInputError(f"Cannot read an image from a {type(src).__name__}; give a file path, bytes or an "
                               "uploaded file.")
    if len(data) > max_bytes:
        raise _too_big(len(data), max_bytes)
    if not data:
        raise RetinaInputError("The file is empty (0 bytes). The upload or export probably failed; try again.")
    return data, name


def _rewind(fh: Any) -> None:
    try:
        if fh.seekable():
            fh.seek(0)
    except Exception:  # noqa: BLE001 - unseekable streams are read from where they are
        pass


def _remaining_size(fh: Any) -> int | None:
    try:
        pos = fh.tell()
        end = fh.seek(0, io.SEEK_END)
        fh.seek(pos)
        return int(end - pos)
    except Exception:  # noqa: BLE001 - unseekable streams are bounded by read(max_bytes + 1)
        return None


def _basename(n: Any) -> str | None:
    return os.path.basename(n) if isinstance(n, str) and n else None


# --------------------------------------------------------------------------------------------------------------
# Format sniffing
# --------------------------------------------------------------------------------------------------------------

def sniff_format(data: bytes) -> str:
    """Format from magic bytes: png, jpeg, tiff, bmp, webp, gif, dicom, nifti, nifti-gz, heidelberg-vol,
    heidelberg-e2e, topcon; else RetinaInputError."""
    head = data[:16]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[128:132] == b"DICM":
        return "dicom"  # before TIFF: a DICOM preamble may be a TIFF header (dual-format files, pydicom's CT_small)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"BM") and len(data) >= 26:
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[128:132] == b"DICM" or _looks_like_bare_dicom(data):
        return "dicom"
    scanner = sniff_scanner(data)       # OCT device exports (raises for recognised, unsupported ones)
    if scanner:
        return scanner
    nifti = nifti_kind(data)
    if nifti == "nifti":
        return "nifti"
    if nifti == "analyze":
        raise RetinaInputError("This looks like an Analyze/NIfTI header (.hdr) without its image data. "
                               "Upload a single-file NIfTI volume (.nii or .nii.gz).")
    if head.startswith(b"\x1f\x8b"):
        return "nifti-gz"  # confirmed (or refused) by the NIfTI decoder after a bounded decompression
    raise RetinaInputError(f"This file is not a supported image ({SUPPORTED}). {describe_unknown(data)}")


def _looks_like_bare_dicom(data: bytes) -> bool:
    """DICOM without the 128-byte preamble: starts with a group 0x0002/0x0008 element and an explicit VR."""
    if len(data) < 132 or data[:2] not in (b"\x02\x00", b"\x08\x00") or data[3:4] != b"\x00":
        return False
    vr = data[4:6]
    return vr.isalpha() and vr.isupper()


def describe_unknown(data: bytes) -> str:
    """A short, content-free description of an unsupported file (never echoes its bytes)."""
    head = data[:64]
    if head.startswith(b"%PDF"):
        return "It looks like a PDF document; export the scan itself as PNG or JPEG."
    if head.startswith(b"PK\x03\x04"):
        return "It looks like a ZIP archive (or an Office document); unzip it and upload the image inside."
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1", b"ftypavif", b"ftyphevc"):
        return "It looks like an HEIC/HEIF/AVIF photo (phone format); export it as JPEG or PNG."
    if head[4:8] == b"ftyp" or head[:4] == b"\x1aE\xdf\xa3":
        return "It looks like a video; export a single frame as PNG."
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL "):
        return "It looks like a JPEG XL image; export it as PNG or JPEG."
    if head.startswith(b"\x00\x00\x00\x0cjP  ") or head.startswith(b"\xffO\xffQ"):
        return "It looks like a JPEG 2000 image; export it as PNG or TIFF."
    if head.startswith(b"8BPS"):
        return "It looks like a Photoshop file; export it as PNG or JPEG."
    sample = data[:2048]
    low = sample.lstrip().lower()
    if low.startswith((b"<!doctype html", b"<html")):
        return "It looks like a web page (HTML), not an image."
    if low.startswith(b"<svg") or (low.startswith(b"<?xml") and b"<svg" in low):
        return "It looks like a vector drawing (SVG), not a scan."
    if _is_text(sample):
        return "It looks like text."
    return "Its contents do not match any image format this app knows."


def _is_text(sample: bytes) -> bool:
    if b"\x00" in sample:
        return False
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError:
        try:
            text = sample[:-3].decode("utf-8")  # a multi-byte character cut at the sample boundary
        except UnicodeDecodeError:
            return False
    printable = sum(ch.isprintable() or ch in "\t\r\n" for ch in text)
    return printable >= 0.95 * max(len(text), 1)


# --------------------------------------------------------------------------------------------------------------
# File names and error logging (the shared checks and conversions live in io/image.py)
# --------------------------------------------------------------------------------------------------------------

_LEFT = re.compile(r"(?:^|[^a-z0-9])(left|os|l)(?=$|[^a-z0-9])", re.I)
_RIGHT = re.compile(r"(?:^|[^a-z0-9])(right|od|r)(?=$|[^a-z0-9])", re.I)


def laterality_from_name(name: str | None) -> str | None:
    """'OD' / 'OS' from a file name such as 12_left.jpg, scan_OD.png, 3-right.jpeg; None if absent or ambiguous."""
    if not name:
        return None
    stem = os.path.basename(str(name))
    stem = stem[: stem.find(".")] if "." in stem else stem
    # single letters only count as the last token (e.g. "123_L"), to avoid matching initials or words
    left = [m.group(1).lower() for m in _LEFT.finditer(stem)]
    right = [m.group(1).lower() for m in _RIGHT.finditer(stem)]
    tail = re.split(r"[^a-z0-9]", stem.lower())[-1]
    left = [t for t in left if t != "l" or tail == "l"]
    right = [t for t in right if t != "r" or tail == "r"]
    if left and not right:
        return "OS"
    if right and not left:
        return "OD"
    return None


def log_internal_error(exc: BaseException, fmt: str, content_hash: str, include_message: bool = True) -> None:
    """Log a decoder failure: traceback frames + exception type; the message only when it cannot carry PHI."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    detail = f"{type(exc).__name__}: {str(exc)[:300]}" if include_message else type(exc).__name__
    log.error("Unexpected error decoding a %s file (sha256 %s...): %s\n%s", fmt, content_hash[:12], detail, frames)


def _replace(img: RetinalImage, **changes: Any) -> RetinalImage:
    from dataclasses import replace
    return replace(img, **changes)


# --------------------------------------------------------------------------------------------------------------
# Pillow formats: PNG, JPEG, TIFF, BMP, WebP, GIF
# --------------------------------------------------------------------------------------------------------------

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF", "bmp": "BMP", "webp": "WEBP", "gif": "GIF"}
_SINGLE_CHANNEL = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_HIGH_DEPTH = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def downscale(img: RetinalImage, max_side: int) -> RetinalImage:
    """A 2-D image with its long side brought down to `max_side` (area interpolation), spacing scaled to match;
    meta["decoded_scale"] says by how much the pixels shown differ from the file's."""
    import cv2

    h, w = img.pixels.shape[:2]
    s = max_side / max(h, w)
    if s >= 1:
        return img
    size = (max(1, round(w * s)), max(1, round(h * s)))
    # area averaging where pixels merge (no aliasing); a mild reduction (after JPEG DCT scaling) is bilinear
    pixels = cv2.resize(img.pixels, size, interpolation=cv2.INTER_AREA if s < 0.5 else cv2.INTER_LINEAR)
    scale = (pixels.shape[0] / h, pixels.shape[1] / w)
    meta = {**img.meta, "decoded_scale": round(float(img.meta.get("decoded_scale", 1.0)) * scale[1], 6)}
    spacing = tuple(float(sp) / sc for sp, sc in zip(img.spacing, scale)) if img.spacing else img.spacing
    return _replace(img, pixels=pixels, meta=meta, spacing=spacing)


SCREEN_SIDE = 1024   # px: the long side uploads are read at (more than any model input; the screen shows less)


def _decode_pillow(data: bytes, fmt: str, *, content_hash: str, max_pixels: int, frame: int | None,
                   max_side: int | None = None) -> RetinalImage:
    from PIL import Image

    truncated_msg = (f"This {format_name(fmt)} file is incomplete (truncated or damaged); part of the image is "
                     "missing. Upload the original file again.")
    with warnings.catch_warnings():
        # Not thread-safe by itself, which is why the explicit width*height check below does not depend on it.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]])
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise RetinaInputError(f"This {format_name(fmt)} image declares an enormous size and was refused as a "
                                   "possible decompression bomb. Export the scan at a normal resolution.") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError):
            # header unreadable: truncated inside the header, or a corrupt/unsupported variant
            if len(data) < 64:
                raise RetinaInputError(truncated_msg) from None
            raise RetinaInputError(f"This file starts like a {format_name(fmt)} image but its header is damaged "
                                   "or uses an unsupported variant. Re-export it as PNG and try again.") from None
        with im:
            width, height = im.size
            n_frames = _frame_count(im)
            want_volume = frame == -1
            check_dimensions(width, height, n_frames if want_volume else 1, max_pixels, fmt)
            meta: dict[str, Any] = {"width": width, "height": height, "frames": n_frames,
                                    "photometric": im.mode, "bits": _bits(im.mode)}
            if fmt == "png":
                _verify_png(data)
            try:
                if want_volume:
                    vol, grey_src = _pil_volume(im, n_frames)
                    meta["frames"] = vol.shape[0]
                    return RetinalImage(pixels=vol, kind="volume", source_format=fmt, content_hash=content_hash,
                                        grayscale=grey_src, meta=meta)
                index = 0 if frame is None else int(frame)
                if not 0 <= index < n_frames:
                    raise RetinaInputError(f"Frame {index} was requested but this {format_name(fmt)} file has "
                                           f"{n_frames} frame(s) (0 to {n_frames - 1}).")
                if index:
                    im.seek(index)
                if fmt == "jpeg" and max_side and max(width, height) > max_side:
                    # DCT scaling: decode at 1/2, 1/4 or 1/8 scale, never below max_side on the long side
                    s = max_side / max(width, height)
                    im.draft(im.mode, (max(1, int(np.ceil(width * s))), max(1, int(np.ceil(height * s)))))
                full_load(im)  # raises on truncated data
                oriented = _exif_transpose(im, meta)
                if oriented.size != im.size:
                    meta["width"], meta["height"] = oriented.size
                if im.size != (width, height):               # decoded at a reduced scale
                    meta["decoded_scale"] = round(im.size[0] / width, 6)
                    if oriented.size != im.size:            # a quarter turn: the file's size, turned
                        meta["width"], meta["height"] = height, width
                rgb, single = _pil_to_rgb(oriented)
            except RetinaInputError:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise RetinaInputError(f"This {format_name(fmt)} image was refused as a possible decompression bomb."
                                       ) from None
            except (OSError, SyntaxError, EOFError, ValueError) as exc:
                # A damaged file is the user's problem, not ours: one info line, the traceback only at debug level.
                log.info("Could not decode a %s file (sha256 %s...): %s", fmt, content_hash[:12], type(exc).__name__)
                log.debug("decoder detail", exc_info=exc)
                raise RetinaInputError(truncated_msg) from None
    meta["frame"] = index
    if single:
        meta["single_channel"] = True     # the three channels are copies of one (grey_to_rgb)
    return RetinalImage(pixels=rgb, kind="image", source_format=fmt, content_hash=content_hash,
                        grayscale=single or looks_grey(rgb), meta=meta)


def _frame_count(im: Any) -> int:
    try:
        n = int(getattr(im, "n_frames", 1) or 1)
    except Exception:  # noqa: BLE001 - a broken frame chain: treat as single-frame, decode will tell
        return 1
    return max(1, n)


def _bits(mode: str) -> int:
    return {"1": 1, "I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16, "I": 32, "F": 32}.get(mode, 8)


def _verify_png(data: bytes) -> None:
    """Walk every PNG chunk and check its CRC without decompressing (cheap; catches cut/damaged files)."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as probe:
            probe.verify()
    except Exception:  # noqa: BLE001
        raise RetinaInputError("This PNG file is incomplete or damaged (a checksum or the end of the file is "
                               "missing). Upload the original file again.") from None


def _exif_transpose(im: Any, meta: dict) -> Any:
    from PIL import ImageOps
    try:
        orientation = im.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not cost the image
        log.warning("Unreadable EXIF block; orientation left as stored")
        return im
    if orientation and orientation != 1:
        meta["exif_orientation"] = int(orientation)
        try:
            return ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001
            log.warning("EXIF orientation %s could not be applied; orientation left as stored", orientation)
    return im


def _pil_to_rgb(im: Any) -> tuple[np.ndarray, bool]:
    """uint8 [H, W, 3] RGB and whether the source had a single channel."""
    mode = im.mode
    single = mode in _SINGLE_CHANNEL
    if mode in _HIGH_DEPTH:
        a = np.asarray(im)
        return grey_to_rgb(scale_to_uint8(a)), True
    if mode == "1":
        im = im.convert("L")
    elif mode in ("P", "PA"):
        im = im.convert("RGBA")  # applies the palette and any transparency
    elif mode in ("LA", "La"):
        la = np.asarray(im.convert("LA"), dtype=np.uint16)
        return grey_to_rgb(((la[..., 0] * la[..., 1] + 127) // 255).astype(np.uint8)), True
    if im.mode in ("RGBA", "RGBa"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
        # composite on black: transparent parts of a fundus export are outside the field of view
        rgb = ((rgba[..., :3] * rgba[..., 3:4] + 127) // 255).astype(np.uint8)
        return rgb, single
    if im.mode == "L":
        return grey_to_rgb(np.asarray(im)), True
    if im.mode != "RGB":
        im = im.convert("RGB")  # CMYK (Adobe-inverted JPEGs handled by Pillow), YCbCr, LAB...
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8)), single


def _pil_volume(im: Any, n_frames: int) -> tuple[np.ndarray, bool]:
    """All frames as float32 [D, H, W] in [0, 1]; 8-bit frames keep absolute brightness, deeper ones use the range."""
    frames, high_depth, single = [], False, True
    size = im.size
    for i in range(n_frames):
        im.seek(i)
        full_load(im)
        if im.size != size:
            raise RetinaInputError(f"The frames of this file have different sizes ({size[0]}x{size[1]} and "
                                   f"{im.size[0]}x{im.size[1]}); it cannot be read as a volume.")
        if im.mode in _HIGH_DEPTH:
            frames.append(np.asarray(im).astype(np.float32))
            high_depth = True
        else:
            single &= im.mode in _SINGLE_CHANNEL
            rgb, _ = _pil_to_rgb(im)
            # ITU-R 601 luma: the usual grey for colour frames
            grey = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
            frames.append(grey.astype(np.float32))
    vol = np.stack(frames)
    if high_depth:
        return volume_to_unit(vol, robust=False), True
    return (vol / np.float32(255.0)).astype(np.float32), single
