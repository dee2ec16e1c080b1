"""NIfTI-1/2 volume decoding (nibabel), with the header validated before any voxel is read.

Axis convention: the stored array (nibabel's `img.shape`, i.e. NIfTI i, j, k) is returned as [D, H, W]: D = i
(slices / B-scans), H = j (depth / rows), W = k (columns). So `nib.save(nib.Nifti1Image(vol_dhw, affine), p)`
round-trips a numpy [D, H, W] volume, and `spacing` is the header zooms in the same order (mm).

    vol = read_image("cube.nii.gz").pixels   # float32 [D, H, W] in [0, 1], robust 0.5-99.5 percentile scaling

.nii.gz is decompressed in bounded steps: the header first (to confirm it is NIfTI and learn the implied size),
then exactly the bytes the header promises, never more than a fixed cap.
"""

from __future__ import annotations

import io
import logging
import zlib
from typing import Any

import numpy as np

from retina_core.errors import RetinaInputError
from retina_core.io.image import (SUPPORTED, RetinalImage, check_dimensions, nifti_kind, volume_slice_as_image,
                                  volume_to_unit)

log = logging.getLogger(__name__)

MAX_NONFINITE_FRACTION = 0.01   # NaN/Inf voxels tolerated (replaced) below this share; refused above
_DAMAGED = "This NIfTI file is incomplete or damaged (its data is shorter than its header says). Export it again."


def decode_nifti(data: bytes, *, content_hash: str, max_pixels: int, max_bytes: int, frame: int | None,
                 gzipped: bool) -> RetinalImage:
    """Decode NIfTI (optionally gzip) bytes into a float32 [D, H, W] volume in [0, 1] (or one slice if frame >= 0)."""
    import nibabel as nib

    if gzipped:
        head = _gunzip(data, 540)
        if nifti_kind(head) != "nifti":
            raise RetinaInputError("This is a gzip-compressed file but not a NIfTI volume (.nii.gz). "
                                   f"Supported formats: {SUPPORTED}.")
    else:
        head = data
    header_cls = nib.Nifti2Header if head[4:8] == b"n+2\x00" else nib.Nifti1Header
    try:
        hdr = header_cls.from_fileobj(io.BytesIO(head[:header_cls.sizeof_hdr]), check=False)
    except Exception as exc:  # noqa: BLE001
        log.warning("NIfTI header unreadable: %s", type(exc).__name__)
        raise RetinaInputError("The NIfTI header of this file is damaged. Export the volume again.") from None

    shape = _validated_shape(hdr)
    d, h, w = shape
    check_dimensions(w, h, d, max_pixels, "nifti")
    dtype = _validated_dtype(hdr)
    vox_offset = int(float(hdr["vox_offset"]))
    if vox_offset < header_cls.sizeof_hdr or vox_offset > 2**24:
        raise RetinaInputError("The NIfTI header of this file is damaged (bad data offset). Export the volume again.")
    need = vox_offset + d * h * w * dtype.itemsize
    if gzipped:
        cap = 2 * max_bytes  # decompressed bound: generous for compressible volumes, still bounded
        if need > cap:
            raise RetinaInputError(f"This compressed NIfTI volume unpacks to {need / 2**20:.0f} MB, above the "
                                   f"{cap / 2**20:.0f} MB limit. Export a smaller or cropped volume.")
        raw = _gunzip(data, need)
    else:
        raw = data
    if len(raw) < need:
        raise RetinaInputError(_DAMAGED)

    try:
        img = (nib.Nifti2Image if header_cls is nib.Nifti2Header else nib.Nifti1Image).from_bytes(raw)
        vol = np.asarray(img.dataobj, dtype=np.float64 if dtype.itemsize > 4 else np.float32)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    except RetinaInputError:
        raise
    except Exception as exc:  # noqa: BLE001
        log.warning("NIfTI data unreadable: %s: %s", type(exc).__name__, str(exc)[:200])
        raise RetinaInputError(_DAMAGED) from None
    vol = vol.reshape(shape)  # drops trailing singleton dims (4-D with t=1)
    vol, n_bad = _repair_nonfinite(vol)
    vol01 = volume_to_unit(vol, robust=True)

    spacing = zooms if len(zooms) == 3 and all(np.isfinite(z) and z > 0 for z in zooms) else None
    meta: dict[str, Any] = {"width": w, "height": h, "frames": d, "bits": int(hdr["bitpix"]), "dtype": dtype.name,
                            "nifti_version": 2 if header_cls is nib.Nifti2Header else 1, "axes": "D,H,W = i,j,k",
                            "nonfinite_replaced": n_bad}
    if frame is not None and frame >= 0:
        rgb = volume_slice_as_image(vol01, int(frame), "nifti")
        meta["frame"] = int(frame)
        meta["single_channel"] = True
        return RetinalImage(pixels=rgb, kind="image", source_format="nifti", content_hash=content_hash,
                            grayscale=True, spacing=spacing[1:] if spacing else None, meta=meta)
    return RetinalImage(pixels=vol01, kind="volume", source_format="nifti", content_hash=content_hash,
                        grayscale=True, spacing=spacing, meta=meta)


def _gunzip(data: bytes, limit: int) -> bytes:
    """Decompress at most `limit` bytes of a gzip stream, 1 MB of input at a time (never the whole stream blindly)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = bytearray()
    view = memoryview(data)
    pos, step = 0, 1 << 20
    try:
        while len(out) < limit:
            if d.unconsumed_tail:
                chunk = d.unconsumed_tail
            elif pos < len(view):
                chunk, pos = view[pos:pos + step], pos + step
            else:
                break
            out += d.decompress(chunk, limit - len(out))  # max_length > 0 here: 0 would mean "unbounded"
            if d.eof:
                break
    except zlib.error:
        raise RetinaInputError("This gzip-compressed file is damaged or incomplete. Export it again.") from None
    return bytes(out)


def _validated_shape(hdr: Any) -> tuple[int, int, int]:
    dim = [int(x) for x in hdr["dim"]]
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise RetinaInputError(f"The NIfTI header of this file declares {ndim} dimensions; it is damaged. "
                               "Export the volume again.")
    shape = dim[1:ndim + 1]
    if any(s <= 0 for s in shape):
        raise RetinaInputError(f"The NIfTI header of this file declares an empty or negative size "
                               f"({' x '.join(map(str, shape))}); it is damaged. Export the volume again.")
    if ndim < 3:
        raise RetinaInputError(f"This NIfTI file holds a {ndim}-D image ({' x '.join(map(str, shape))}), not a "
                               "volume. Upload 2-D scans as PNG/JPEG/DICOM, or a 3-D NIfTI volume.")
    extra = shape[3:]
    if any(s != 1 for s in extra):
        raise RetinaInputError(f"This NIfTI file is {ndim}-D ({' x '.join(map(str, shape))}): a time series or "
                               "multi-volume file. Only single 3-D volumes are supported; export one volume.")
    return shape[0], shape[1], shape[2]


def _validated_dtype(hdr: Any) -> np.dtype:
    try:
        dtype = np.dtype(hdr.get_data_dtype())
    except Exception:  # noqa: BLE001
        raise RetinaInputError("This NIfTI file uses an unknown voxel type; it may be damaged. "
                               "Export it again as a scalar (e.g. float32) volume.") from None
    if dtype.fields is not None or dtype.kind == "c":
        raise RetinaInputError("This NIfTI volume stores colour (RGB) or complex voxels, which this app does not "
                               "read. Export a greyscale scalar volume.")
    if dtype.kind not in "uifb" or dtype.itemsize > 8:
        raise RetinaInputError(f"This NIfTI volume uses an unsupported voxel type ({dtype.name}). "
                               "Export it as uint8, int16 or float32.")
    return dtype


def _repair_nonfinite(vol: np.ndarray) -> tuple[np.ndarray, int]:
    """NaN/-Inf -> minimum finite value, +Inf -> maximum, when fewer than 1% of voxels; else refuse."""
    finite = np.isfinite(vol)
    n_bad = int(vol.size - np.count_nonzero(finite))
    if n_bad == 0:
        return vol, 0
    if n_bad >= MAX_NONFINITE_FRACTION * vol.size:
        raise RetinaInputError(f"{100.0 * n_bad / vol.size:.1f}% of this volume's voxels are missing (NaN or "
                               f"infinite); at most {100 * MAX_NONFINITE_FRACTION:g}% can be repaired. "
                               "Export the volume again without masking or failed reconstruction.")
    lo, hi = float(vol[finite].min()), float(vol[finite].max())
    vol = np.where(np.isnan(vol) | np.isneginf(vol), lo, vol)
    vol = np.where(np.isposinf(vol), hi, vol)
    log.info("Replaced %d non-finite voxels (%.3f%%)", n_bad, 100.0 * n_bad / vol.size)
    return vol, n_bad

