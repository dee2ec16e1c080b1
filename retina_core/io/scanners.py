"""The OCT scanners' own export files, read through the one decoder (`read_image`) into a `RetinalImage`.

    img = read_image("macula.vol")           # float32 [D, H, W] in [0, 1]; spacing (mm) and laterality from the header
    img = read_image("exam.e2e", frame=20)   # B-scan 20 alone, as uint8 [H, W, 3]

Format (sniffed from magic bytes, never from the extension) -> byte layout from:
- Heidelberg .vol ("HSF-OCT-" at 0) -> eyepy `vol_format` (the HEYEX VOL export layout);
- Heidelberg .e2e, .sdb, .edb ("CMDb" at 0, "MDbMDir" at 36) -> eyepy `e2e_format`; the directory chain is walked
  as LibE2E and oct-converter walk it;
- Topcon .fda / .fds ("FOCT" at 0) -> oct-converter `fda_binary` / `fds_binary` (uocte's description);
- Zeiss Cirrus .img (raw bytes, no header) -> not read: refused with a clear message when its size is exactly a
  Cirrus cube's. See docs/scanner_formats.md for how each one is verified.

Pixels: .vol stores float32 reflectivity and .e2e a 16-bit custom float; both go through eyepy's HEYEX display
transforms (`from_vol_intensity`, `from_e2e_intensity`: log scale, "no data" markers to 0) to uint8 and then / 255.
Topcon stores JPEG slices (/ 255) or uint16 (0.5-99.5 percentile range, as NIfTI). One B-scan -> kind "image".

Order of work as in decode.py: the header and the index first (dimensions, frame counts, every declared block
inside the file), bounded by `max_pixels` and MAX_FRAMES through `check_dimensions`, then pixels.

Privacy: the patient blocks these formats carry are never decoded. .vol: patient ID, birth date, visit ID and
date, exam time, series and progression IDs are read as padding of the same size; .e2e: the patient (name, birth
date, ID), study name, exam-time and B-scan-metadata items are never parsed; Topcon: PATIENT_INFO and
CAPTURE_INFO (date, free-text label) are never parsed, bar CAPTURE_INFO's first byte (the eye). Only geometry,
spacing, laterality and the scan pattern are kept. Library exceptions are logged by type and traceback only (their
messages may quote header bytes) and replaced by a `RetinaInputError` raised outside the handler, so no library
exception travels as its cause or context.
"""

from __future__ import annotations

import functools
import io
import logging
import traceback
from typing import Any

import numpy as np

from retina_core.errors import RetinaInputError
from retina_core.io.image import RetinalImage, full_load, check_dimensions, volume_slice_as_image, volume_to_unit
from retina_core.modality import Modality

log = logging.getLogger(__name__)

LIBRARIES = {"heidelberg-vol": "eyepy", "heidelberg-e2e": "eyepy",
             "topcon": "oct-converter, installed with pip install --no-deps oct-converter"}
PRETTY = {"heidelberg-vol": "Heidelberg .vol", "heidelberg-e2e": "Heidelberg .e2e", "topcon": "Topcon",
          "topcon-fda": "Topcon .fda", "topcon-fds": "Topcon .fds"}
# Zeiss Cirrus raw cubes: 1024 samples per A-scan x A-scans x B-scans, one byte each (oct-converter's IMG reader).
ZEISS_CUBES = {1024 * 512 * 128: "512x128", 1024 * 200 * 200: "200x200"}
E2E_MULTI_PREFIX = b"E2EMultipleVolumeFile"   # such exports carry 64 bytes before the E2E header (oct-converter)
E2E_MAX_ENTRIES = 200_000     # directory entries parsed, empty ones included (512 per directory; a 97-B-scan
                              # volume fills a few thousand): bounds the indexing work (~35 us each) on any file
TOPCON_MAX_CHUNKS = 10_000
_EXPORT_DICOM = "Export the scan from the device software as DICOM (Ophthalmic Tomography) and upload that."


# --------------------------------------------------------------------------------------------------------------
# Sniffing and dispatch (called from decode.py)
# --------------------------------------------------------------------------------------------------------------

def sniff_scanner(data: bytes) -> str | None:
    """"heidelberg-vol" | "heidelberg-e2e" | "topcon" from magic bytes; None if none matches.

    Raises RetinaInputError for a file recognised but not supported (a Zeiss Cirrus raw .img cube)."""
    if data[:8] == b"HSF-OCT-":
        return "heidelberg-vol"
    base = 64 if data[:21] == E2E_MULTI_PREFIX else 0
    if data[base:base + 4] == b"CMDb" and data[base + 36:base + 43] == b"MDbMDir":
        return "heidelberg-e2e"
    if data[:4] == b"FOCT":
        return "topcon"
    if len(data) in ZEISS_CUBES:
        raise RetinaInputError(
            "Zeiss .img is recognised but not supported: this file is exactly the size of a Cirrus "
            f"{ZEISS_CUBES[len(data)]} raw cube, which has no header, so its size, eye and spacing cannot be checked "
            f"and its orientation varies between software versions. {_EXPORT_DICOM}")
    return None


def decode_scanner(data: bytes, fmt: str, *, content_hash: str, max_pixels: int, frame: int | None) -> RetinalImage:
    """Decode a sniffed scanner export; only RetinaInputError (or MemoryError) leaves this function."""
    reader = {"heidelberg-vol": _read_vol, "heidelberg-e2e": _read_e2e, "topcon": _read_topcon}[fmt]
    failure = missing = None
    try:
        vol01, out_fmt, spacing, laterality, meta = reader(data, max_pixels=max_pixels)
    except (RetinaInputError, MemoryError):
        raise
    except ImportError:
        missing = LIBRARIES[fmt]
    except Exception as exc:  # noqa: BLE001 - library failures on damaged files become one clear message
        failure = (type(exc).__name__, "".join(traceback.format_tb(exc.__traceback__)))
    # raised here, outside the handlers: no library exception rides along as __context__
    if missing is not None:
        log.error("%s file refused: the %s package is not installed", PRETTY[fmt], missing)
        raise RetinaInputError(f"{PRETTY[fmt]} files are recognised, but the package that reads them ({missing}) is "
                               f"not installed on this server; ask its administrator to install it. Meanwhile: "
                               f"{_EXPORT_DICOM[0].lower()}{_EXPORT_DICOM[1:]}")
    if failure is not None:
        log.warning("%s reader failed: %s (message not logged: it may quote header bytes)\n%s",
                    PRETTY[fmt], failure[0], failure[1])
        raise RetinaInputError(_damaged(fmt, "its structure could not be read"))
    return _result(vol01, out_fmt, content_hash=content_hash, frame=frame, spacing=spacing,
                   laterality=laterality, meta=meta)


def _result(vol01: np.ndarray, fmt: str, *, content_hash: str, frame: int | None,
            spacing: tuple[float, ...] | None, laterality: str | None, meta: dict) -> RetinalImage:
    d, h, w = (int(s) for s in vol01.shape)
    header = {"format": PRETTY[fmt], "modality": "oct", "modality_name": "optical coherence tomography",
              "sop_class": None, "ophthalmic": True, "reason": None}
    meta = {"width": w, "height": h, "frames": d, **meta, "header": header}
    if frame == -1 or (frame is None and d > 1):
        return RetinalImage(pixels=vol01, kind="volume", source_format=fmt, content_hash=content_hash,
                            grayscale=True, modality_hint=Modality.OCT, laterality=laterality, spacing=spacing,
                            meta=meta)
    index = 0 if frame is None else int(frame)
    rgb = volume_slice_as_image(vol01, index, fmt)
    meta["frame"] = index
    meta["single_channel"] = True
    return RetinalImage(pixels=rgb, kind="image", source_format=fmt, content_hash=content_hash, grayscale=True,
                        modality_hint=Modality.OCT, laterality=laterality, spacing=spacing[1:] if spacing else None,
                        meta=meta)


def _cut(fmt: str) -> str:
    return (f"This {PRETTY[fmt]} file is incomplete: it ends before the data its header announces (it was probably "
            "cut off during transfer). Export it again from the device.")


def _damaged(fmt: str, what: str) -> str:
    return (f"This {PRETTY[fmt]} file is damaged or uses a variant this app does not read ({what}). "
            f"Export it again; if that does not help, {_EXPORT_DICOM[0].lower()}{_EXPORT_DICOM[1:]}")


def _positive(*values: float) -> bool:
    return all(np.isfinite(v) and v > 0 for v in values)


def _u8_to_unit(frames_u8: np.ndarray) -> np.ndarray:
    return (frames_u8.astype(np.float32) * np.float32(1.0 / 255.0)).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------------------------
# Heidelberg .vol (eyepy's layout; patient fields replaced by padding so they are never decoded)
# --------------------------------------------------------------------------------------------------------------

_VOL_PRIVATE = ("exam_time", "id", "reference_id", "pid", "patient_id", "dob", "vid", "visit_id", "visit_date",
                "prog_id")
_VOL_PATTERNS = {0: "unknown", 1: "line", 2: "circle", 3: "volume", 4: "fast volume", 5: "radial"}


@functools.lru_cache(maxsize=1)
def _vol_structs() -> tuple[Any, Any]:
    """(file header: 2048 bytes, whole file) from eyepy's `vol_format`, identifying fields as opaque padding."""
    import construct as cs
    from eyepy.io.he.vol_reader import vol_format

    subcons = [cs.Padding(sc.sizeof()) if sc.name in _VOL_PRIVATE else sc for sc in vol_format.subcons]
    header, whole = cs.Struct(*subcons[:-2]), cs.Struct(*subcons)  # [-2:] = localizer, B-scans
    if header.sizeof() != 2048:
        raise RuntimeError("eyepy's VOL header layout changed; retina_core.io.scanners needs updating")
    return header, whole


def _read_vol(data: bytes, *, max_pixels: int):
    fmt = "heidelberg-vol"
    header_st, whole_st = _vol_structs()
    if len(data) < 2048:
        raise RetinaInputError(_cut(fmt))
    h = header_st.parse(data[:2048])
    width, depth, n = int(h.size_x), int(h.size_y), int(h.n_bscans)
    check_dimensions(width, depth, n, max_pixels, fmt)
    slo = int(h.size_x_slo) * int(h.size_y_slo)
    hdr = int(h.bscan_hdr_size)
    if slo > max_pixels or hdr < 256 or hdr > 2**24:
        raise RetinaInputError(_damaged(fmt, "impossible localizer or B-scan header size"))
    if len(data) < 2048 + slo + n * (hdr + width * depth * 4):
        raise RetinaInputError(_cut(fmt))
    parsed = whole_st.parse(data)  # the localizer and the B-scans (a few header fields and float32 pixels each)

    from eyepy.core.utils import from_vol_intensity
    frames = np.empty((n, depth, width), np.uint8)
    for i, b in enumerate(parsed.bscans):
        raw = np.array(b.data, dtype=np.float32)  # a copy: the transform works in place
        raw[~np.isfinite(raw) | (raw < 0)] = np.finfo(np.float32).max  # the format's own "no data" marker
        frames[i] = from_vol_intensity(raw)
    del parsed
    spacing = (float(h.distance), float(h.scale_y), float(h.scale_x))
    pattern = _VOL_PATTERNS.get(int(h.scan_pattern), "unknown")
    if not _positive(*spacing) or (n > 1 and pattern in ("radial", "circle")):
        spacing = None  # radial B-scans have no slice spacing
    lat = str(h.scan_position or "").strip("\x00 ").upper()
    return (_u8_to_unit(frames), fmt, spacing, lat if lat in ("OD", "OS") else None,
            {"bits": 32, "scan_pattern": pattern, "version": str(h.version).strip("\x00 ")[:12]})


# --------------------------------------------------------------------------------------------------------------
# Heidelberg .e2e (eyepy's structures; only directory entries, image items and the laterality item are parsed)
# --------------------------------------------------------------------------------------------------------------

_E2E_IMAGE, _E2E_LATERALITY = 1073741824, 11
_E2E_BSCAN = 35652097        # image item subtype: B-scan in the 16-bit custom float (eyepy's `Bscan`)


def _read_e2e(data: bytes, *, max_pixels: int):
    import construct as cs
    from eyepy.core.utils import from_e2e_intensity
    from eyepy.io.he import e2e_format as E

    fmt = "heidelberg-e2e"
    base = 64 if data[:21] == E2E_MULTI_PREFIX else 0
    if len(data) < base + 88:
        raise RetinaInputError(_cut(fmt))
    main = E.header_format.parse(data[base + 36:base + 88])
    entries = _e2e_index(data, base, int(main.current) or int(main.prev), E, cs)

    image_head = cs.Struct(*E.type1073741824_format.subcon.subcons[:5])  # size, type, n_values, height, width
    series: dict[tuple[int, int, int], dict[int, tuple[int, int, int, int]]] = {}
    lat_items: dict[tuple[int, int, int], tuple[int, int]] = {}
    for f in entries:
        key = (int(f.patient_id), int(f.study_id), int(f.series_id))
        if int(f.type) == _E2E_LATERALITY and key not in lat_items:
            lat_items[key] = _e2e_item(data, base, f, E, fmt)
        elif int(f.type) == _E2E_IMAGE:
            start, end = _e2e_item(data, base, f, E, fmt)
            if end - start < 20:
                raise RetinaInputError(_damaged(fmt, "an image item is shorter than its header"))
            ih = image_head.parse(data[start:start + 20])
            if int(ih.type) != _E2E_BSCAN:
                continue  # localizer (fundus) images and others
            hh, ww, nv = int(ih.height), int(ih.width), int(ih.n_values)
            if nv != hh * ww or start + 20 + 2 * nv > end:
                raise RetinaInputError(_damaged(fmt, "a B-scan's size does not match its data"))
            series.setdefault(key, {}).setdefault(int(f.slice_id), (start, end, hh, ww))
    if not series:
        raise RetinaInputError("This Heidelberg .e2e file holds no OCT B-scans (it may hold only fundus or "
                               f"infrared images, or a variant this app does not read). {_EXPORT_DICOM}")
    key = min(series, key=lambda k: (k[2], k[1], k[0]))  # the first series, as eyepy orders them
    slices = [series[key][s] for s in sorted(series[key])]
    shapes = {(hh, ww) for _, _, hh, ww in slices}
    if len(shapes) != 1:
        raise RetinaInputError(_damaged(fmt, "the B-scans of one series have different sizes"))
    height, width = shapes.pop()
    check_dimensions(width, height, len(slices), max_pixels, fmt)

    frames = np.empty((len(slices), height, width), np.uint8)
    for i, (start, end, _, _) in enumerate(slices):
        item = E.type1073741824_format.parse(data[start:end])
        frames[i] = from_e2e_intensity(np.array(item.data, dtype=np.float32))
    laterality = None
    if key in lat_items:
        start, end = lat_items[key]
        if end - start >= 15:
            laterality = {82: "OD", 76: "OS"}.get(data[start + 14])  # eyepy Type11: ASCII 'R' / 'L' at byte 14
    return (_u8_to_unit(frames), fmt, None, laterality,
            {"bits": 16, "series_in_file": len(series), "scan_pattern": "line" if len(slices) == 1 else "volume"})


def _e2e_index(data: bytes, base: int, pos: int, E: Any, cs: Any) -> list:
    """Every non-empty directory entry, following the chain of directories from the main directory backwards."""
    fmt = "heidelberg-e2e"
    entries: list = []
    seen: set[int] = set()
    folder_array = {}
    parsed = 0
    while pos:
        at = base + pos
        if pos in seen:
            raise RetinaInputError(_damaged(fmt, "its directory chain loops"))
        seen.add(pos)
        if at + 52 > len(data):
            raise RetinaInputError(_cut(fmt))
        d = E.header_format.parse(data[at:at + 52])
        n = int(d.num_entries)
        if d.magic2 != "MDbDir" or n > 512:
            raise RetinaInputError(_damaged(fmt, "a directory header is not valid"))
        if at + 52 + 44 * n > len(data):
            raise RetinaInputError(_cut(fmt))
        parsed += 512  # real directories hold 512 entries; counting each as full also bounds the chain's length
        if parsed > E2E_MAX_ENTRIES:
            raise RetinaInputError(f"This Heidelberg .e2e file holds more than {E2E_MAX_ENTRIES} entries, too many "
                                   "to index safely. Export a single examination or series.")
        if n not in folder_array:
            folder_array[n] = cs.Array(n, E.folderheader_format)
        entries += [f for f in folder_array[n].parse(data[at + 52:at + 52 + 44 * n]) if int(f.size) > 0]
        pos = int(d.prev)
    return entries


def _e2e_item(data: bytes, base: int, f: Any, E: Any, fmt: str) -> tuple[int, int]:
    """(start, end) of an entry's item, after checking its container header ("MDbData") and that it fits the file."""
    at = base + int(f.start)
    if at + 60 > len(data):
        raise RetinaInputError(_cut(fmt))
    c = E.containerheader_format.parse(data[at:at + 60])
    if c.magic3 != "MDbData":
        raise RetinaInputError(_damaged(fmt, "a data container header is not valid"))
    end = at + 60 + int(c.size)
    if end > len(data):
        raise RetinaInputError(_cut(fmt))
    return at + 60, end


# --------------------------------------------------------------------------------------------------------------
# Topcon .fda / .fds (oct-converter's structures; patient and capture chunks are never parsed)
# --------------------------------------------------------------------------------------------------------------

def _topcon_chunks(data: bytes) -> dict[bytes, tuple[int, int]]:
    """{chunk name: (data start, size)} (first occurrence): u8 name length, name, u32 size, data (oct-converter)."""
    chunks: dict[bytes, tuple[int, int]] = {}
    pos, count = 15, 0
    while pos < len(data):
        n = data[pos]
        pos += 1
        if n == 0:
            break
        if pos + n + 4 > len(data):
            raise RetinaInputError(_cut("topcon"))
        name = data[pos:pos + n]
        size = int.from_bytes(data[pos + n:pos + n + 4], "little")
        pos += n + 4
        if pos + size > len(data):
            raise RetinaInputError(_cut("topcon"))
        chunks.setdefault(name, (pos, size))
        pos += size
        count += 1
        if count > TOPCON_MAX_CHUNKS:
            raise RetinaInputError(_damaged("topcon", "too many chunks"))
    return chunks


def _read_topcon(data: bytes, *, max_pixels: int):
    import construct as cs
    from oct_converter.readers.binary_structs import fda_binary, fds_binary

    if len(data) < 16:
        raise RetinaInputError(_cut("topcon"))
    fda_binary.header.parse(data[:15])  # "FOCT", file type, versions: raises on a damaged header
    chunks = _topcon_chunks(data)
    if b"@IMG_JPEG" in chunks:
        fmt, frames, width, n = "topcon-fda", *_topcon_jpeg(data, chunks[b"@IMG_JPEG"], fda_binary, max_pixels)
        vol01, bits = _u8_to_unit(frames), 8
    else:
        name = next((k for k in (b"@IMG_MOT_COMP_03", b"@IMG_SCAN_03") if k in chunks), None)
        if name is None:
            raise RetinaInputError("This Topcon file holds no OCT volume this app can read (it may be a fundus-only "
                                   f"capture or a variant such as IMG_SCAN_02). {_EXPORT_DICOM}")
        fmt = "topcon-fda" if name == b"@IMG_MOT_COMP_03" else "topcon-fds"
        head_st = fda_binary.oct_header_2 if name == b"@IMG_MOT_COMP_03" else fds_binary.oct_header
        start, size = chunks[name]
        hsize = head_st.sizeof()
        if size < hsize:
            raise RetinaInputError(_damaged(fmt, "the OCT header is cut short"))
        h = head_st.parse(data[start:start + hsize])
        width, height, n = int(h.width), int(h.height), int(h.number_slices)
        check_dimensions(width, height, n, max_pixels, fmt)
        if hsize + width * height * n * 2 > size:
            raise RetinaInputError(_cut(fmt))
        # oct-converter: reshape(width, height, n, order="F") then height-first, i.e. n slices of height rows
        raw = np.frombuffer(data, dtype="<u2", count=width * height * n, offset=start + hsize)
        vol01, bits = volume_to_unit(raw.reshape(n, height, width), robust=True), 16
    return vol01, fmt, _topcon_spacing(data, chunks, fda_binary, fds_binary, width, n), \
        _topcon_eye(data, chunks, fda_binary, cs), {"bits": bits}


def _topcon_jpeg(data: bytes, chunk: tuple[int, int], fda_binary: Any, max_pixels: int):
    """IMG_JPEG: the header, then per slice a u32 size and a JPEG (or JPEG 2000) image. Sizes checked first."""
    from PIL import Image

    fmt = "topcon-fda"
    start, size = chunk
    end = start + size
    hsize = fda_binary.oct_header.sizeof()
    if size < hsize:
        raise RetinaInputError(_damaged(fmt, "the OCT header is cut short"))
    h = fda_binary.oct_header.parse(data[start:start + hsize])
    width, height, n = int(h.width), int(h.height), int(h.number_slices)
    check_dimensions(width, height, n, max_pixels, fmt)
    spans, pos = [], start + hsize
    for _ in range(n):
        if pos + 4 > end:
            raise RetinaInputError(_cut(fmt))
        k = int.from_bytes(data[pos:pos + 4], "little")
        if pos + 4 + k > end:
            raise RetinaInputError(_cut(fmt))
        spans.append((pos + 4, pos + 4 + k))
        pos += 4 + k
    frames, shape = None, None
    for i, (a, b) in enumerate(spans):
        with Image.open(io.BytesIO(data[a:b]), formats=["JPEG", "JPEG2000"]) as im:
            w, hh = im.size
            if shape is None:
                if w * hh != width * height:
                    raise RetinaInputError(_damaged(fmt, "a slice's size does not match the header"))
                shape = (hh, w)
                frames = np.empty((n, hh, w), np.uint8)
            elif (hh, w) != shape:
                raise RetinaInputError(_damaged(fmt, "the slices have different sizes"))
            full_load(im)  # truncated slices raise instead of being padded
            frames[i] = np.asarray(im.convert("L"))
    return frames, shape[1], n


def _topcon_spacing(data: bytes, chunks: dict, fda_binary: Any, fds_binary: Any, width: int,
                    n: int) -> tuple[float, float, float] | None:
    """(slice, row, col) mm from PARAM_SCAN_04 / _02, as oct-converter computes it; None when absent or odd."""
    for name, struct in ((b"@PARAM_SCAN_04", fda_binary.param_scan_04_header),
                         (b"@PARAM_SCAN_02", fda_binary.param_scan_02_header)):
        if name in chunks and chunks[name][1] >= struct.sizeof():
            start = chunks[name][0]
            p = struct.parse(data[start:start + struct.sizeof()])
            spacing = (float(p.y_dimension_mm) / n, float(p.z_resolution_um) / 1000.0, float(p.x_dimension_mm) / width)
            return spacing if _positive(*spacing) and n > 1 else None
    return None


def _topcon_eye(data: bytes, chunks: dict, fda_binary: Any, cs: Any) -> str | None:
    """CAPTURE_INFO(_02)'s first field only (0 right, 1 left): the date and the free-text label are not read."""
    eye_only = cs.Struct(fda_binary.capture_info_02_header.subcons[0])
    for name in (b"@CAPTURE_INFO_02", b"@CAPTURE_INFO"):
        if name in chunks and chunks[name][1] >= 1:
            start = chunks[name][0]
            return {0: "OD", 1: "OS"}.get(int(eye_only.parse(data[start:start + 1]).eye))
    return None
