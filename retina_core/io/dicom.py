"""DICOM decoding (pydicom) with patient data kept out of everything it returns, logs or raises.

Only an allow-list of technical tags is ever read into Python values we keep: image geometry (Rows, Columns,
NumberOfFrames, Bits*, SamplesPerPixel, PhotometricInterpretation, PixelRepresentation), pixel transforms
(RescaleSlope/Intercept, WindowCenter/Width), Modality / SOPClassUID (mapped to "fundus" | "oct" and to the
header summary `meta["header"]`: the Modality code only when it is a DICOM defined term, the SOP class only by its
standard name; see `header_summary`), laterality and pixel spacing. Names, IDs, dates, institutions, physicians,
accession numbers and instance UIDs are never copied. pydicom's own warnings and log records can quote element
values, so both are silenced for the read and the "pydicom" logger gets a filter that drops record text.

    img = read_image("scan.dcm")     # Modality OP -> modality_hint "fundus", OPT -> "oct"; multi-frame -> volume
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Any

import numpy as np

from retina_core.errors import RetinaInputError
from retina_core.io.image import RetinalImage, check_dimensions, grey_to_rgb, looks_grey, scale_to_uint8
from retina_core.modality import Modality

log = logging.getLogger(__name__)

# Ophthalmic SOP classes (DICOM PS3.4): photography -> fundus, tomography -> OCT.
_SOP_FUNDUS = ("1.2.840.10008.5.1.4.1.1.77.1.5.1", "1.2.840.10008.5.1.4.1.1.77.1.5.2",
               "1.2.840.10008.5.1.4.1.1.77.1.5.5", "1.2.840.10008.5.1.4.1.1.77.1.5.6")
_SOP_OCT = ("1.2.840.10008.5.1.4.1.1.77.1.5.4", "1.2.840.10008.5.1.4.1.1.77.1.5.7",
            "1.2.840.10008.5.1.4.1.1.77.1.5.8")

# Transfer syntax -> (plain name, packages that add a decoder).
_COMPRESSION = {
    "1.2.840.10008.1.2.4.50": ("JPEG baseline", "Pillow or pylibjpeg-libjpeg"),
    "1.2.840.10008.1.2.4.51": ("JPEG extended", "Pillow or pylibjpeg-libjpeg"),
    "1.2.840.10008.1.2.4.57": ("JPEG lossless", "pylibjpeg + pylibjpeg-libjpeg"),
    "1.2.840.10008.1.2.4.70": ("JPEG lossless", "pylibjpeg + pylibjpeg-libjpeg"),
    "1.2.840.10008.1.2.4.80": ("JPEG-LS", "pyjpegls or pylibjpeg-libjpeg"),
    "1.2.840.10008.1.2.4.81": ("JPEG-LS", "pyjpegls or pylibjpeg-libjpeg"),
    "1.2.840.10008.1.2.4.90": ("JPEG 2000", "pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.4.91": ("JPEG 2000", "pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.4.92": ("JPEG 2000 multi-component", "pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.4.93": ("JPEG 2000 multi-component", "pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.4.201": ("High-Throughput JPEG 2000", "pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.4.202": ("High-Throughput JPEG 2000", "pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.4.203": ("High-Throughput JPEG 2000", "pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.5": ("RLE", "pydicom (built in)"),
}
_VIDEO_PREFIX = "1.2.840.10008.1.2.4.10"  # MPEG-2/4, H.264, HEVC

_DAMAGED = ("This DICOM file is incomplete or damaged (it may have been cut off during transfer). "
            "Export it again from the imaging system.")


class _DropRecordText(logging.Filter):
    """pydicom log records may quote element values (patient data): keep level and logger, drop the text."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = "pydicom message suppressed (it may quote DICOM element values)"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        return True


def _install_log_filter() -> None:
    """Filter "pydicom" and its child loggers (logger filters do not apply to records of children)."""
    import pydicom.pixels  # noqa: F401 - creates the pydicom.pixels.* loggers
    names = ["pydicom"] + [n for n in logging.root.manager.loggerDict if n.startswith("pydicom.")]
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRecordText) for f in logger.filters):
            logger.addFilter(_DropRecordText())


_install_log_filter()


def decode_dicom(data: bytes, *, content_hash: str, max_pixels: int, frame: int | None) -> RetinalImage:
    """Decode DICOM bytes. Multi-frame -> float32 volume [D, H, W] unless `frame` >= 0 picks one frame."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom validation warnings can quote values
        force = data[128:132] != b"DICM"
        try:
            header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=force)
        except Exception as exc:  # noqa: BLE001 - never chain: pydicom messages may quote values
            log.warning("DICOM header unreadable: %s", type(exc).__name__)
            raise RetinaInputError(_DAMAGED) from None
        geom = _geometry(header)
        ts_uid = _transfer_syntax(header)
        if geom["rows"] is None or geom["cols"] is None:
            raise RetinaInputError("This DICOM file contains no image (it may be a report, a measurement or a "
                                   "structured document). Export the image series instead.")
        frames = geom["frames"]
        modality_hint = _modality_hint(header)
        # Multi-frame photography (OP: stereo pairs, angiography series) is a set of photographs, not a stack of
        # B-scans: frame 0 by default, like TIFF / GIF; `frame` picks another, -1 still asks for every frame.
        want_volume = frame == -1 or (frame is None and frames > 1 and modality_hint != Modality.FUNDUS)
        # Decoding materialises every frame, so the whole file is bounded, whatever frame was asked for.
        check_dimensions(geom["cols"], geom["rows"], frames, max_pixels, "dicom")
        if geom["bits_allocated"] not in (1, 8, 16, 32) or geom["samples"] not in (1, 3):
            raise RetinaInputError(f"This DICOM image uses {geom['bits_allocated']}-bit samples with "
                                   f"{geom['samples']} channel(s), which this app does not read. "
                                   "Export it as 8- or 16-bit greyscale or RGB.")
        _check_decoder(ts_uid)
        laterality = _laterality(header)
        spacing = _spacing(header, volume=want_volume)
        meta = {"width": geom["cols"], "height": geom["rows"], "frames": frames, "bits": geom["bits_stored"],
                "bits_allocated": geom["bits_allocated"], "samples_per_pixel": geom["samples"],
                "photometric": geom["photometric"], "transfer_syntax": _ts_name(ts_uid)}
        meta["header"] = header_summary(header)
        meta["modality"] = meta["header"]["modality"]
        del header

        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=force)
        except Exception as exc:  # noqa: BLE001
            log.warning("DICOM dataset unreadable: %s", type(exc).__name__)
            raise RetinaInputError(_DAMAGED) from None
        try:
            if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                raise RetinaInputError("This DICOM file has an image header but no pixel data. "
                                       "Export the image again from the imaging system.")
            _check_length(ds, geom, ts_uid)
            try:
                arr = ds.pixel_array
            except (NotImplementedError, RuntimeError) as exc:
                log.warning("DICOM pixel decode failed: %s", type(exc).__name__)
                raise RetinaInputError(_unsupported_message(ts_uid)) from None
            except (ValueError, EOFError, OSError, IndexError, KeyError, TypeError) as exc:
                log.warning("DICOM pixel data unreadable: %s", type(exc).__name__)
                raise RetinaInputError(_DAMAGED) from None
            frames_u8, colour = _to_uint8_frames(ds, arr, geom)
        finally:
            del ds

    if want_volume:
        grey = frames_u8.astype(np.float32)
        if colour:
            grey = grey[..., 0] * 0.299 + grey[..., 1] * 0.587 + grey[..., 2] * 0.114
        vol = (grey / np.float32(255.0)).astype(np.float32)
        meta["frames"] = int(vol.shape[0])
        return RetinalImage(pixels=vol, kind="volume", source_format="dicom", content_hash=content_hash,
                            grayscale=not colour, modality_hint=modality_hint, laterality=laterality,
                            spacing=spacing, meta=meta)
    index = 0 if frame is None else int(frame)
    if not 0 <= index < frames_u8.shape[0]:
        raise RetinaInputError(f"Frame {index} was requested but this DICOM file has {frames_u8.shape[0]} "
                               f"frame(s) (0 to {frames_u8.shape[0] - 1}).")
    one = frames_u8[index]
    rgb = one if colour else grey_to_rgb(one)
    meta["frame"] = index
    if not colour:
        meta["single_channel"] = True     # the three channels are copies of one (grey_to_rgb)
    return RetinalImage(pixels=np.ascontiguousarray(rgb), kind="image", source_format="dicom",
                        content_hash=content_hash, grayscale=(not colour) or looks_grey(rgb),
                        modality_hint=modality_hint, laterality=laterality, spacing=spacing, meta=meta)


# --------------------------------------------------------------------------------------------------------------
# Header helpers (allow-listed tags only)
# --------------------------------------------------------------------------------------------------------------

def _int(ds: Any, keyword: str, default: int | None = None) -> int | None:
    try:
        value = ds.get(keyword, None)
        if value is None or value == "":
            return default
        return int(value)
    except Exception:  # noqa: BLE001 - malformed numbers are treated as missing
        return default


def _safe_str(ds: Any, keyword: str, allowed: tuple[str, ...]) -> str | None:
    """A coded string, returned only if it is one of the expected codes (never free text)."""
    try:
        value = str(ds.get(keyword, "") or "").strip().upper()
    except Exception:  # noqa: BLE001
        return None
    return value if value in allowed else None


_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "YBR_ICT",
                "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422")


def _geometry(ds: Any) -> dict:
    return {"rows": _int(ds, "Rows"), "cols": _int(ds, "Columns"), "frames": max(1, _int(ds, "NumberOfFrames", 1) or 1),
            "bits_allocated": _int(ds, "BitsAllocated", 8), "bits_stored": _int(ds, "BitsStored", None),
            "samples": _int(ds, "SamplesPerPixel", 1), "signed": _int(ds, "PixelRepresentation", 0) == 1,
            "photometric": _safe_str(ds, "PhotometricInterpretation", _PHOTOMETRIC) or "MONOCHROME2"}


def _transfer_syntax(ds: Any) -> str:
    try:
        return str(ds.file_meta.TransferSyntaxUID)
    except Exception:  # noqa: BLE001 - no file meta: pydicom assumes implicit little endian
        return "1.2.840.10008.1.2"


def _ts_name(uid: str) -> str:
    if uid in _COMPRESSION:
        return _COMPRESSION[uid][0]
    return {"1.2.840.10008.1.2": "Implicit VR Little Endian", "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
            "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
            "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian"}.get(uid, "other")


def _check_decoder(uid: str) -> None:
    if uid.startswith(_VIDEO_PREFIX):
        raise RetinaInputError("This DICOM file holds a video (MPEG/H.264/HEVC), which is not supported here. "
                               "Export single frames or an uncompressed image series.")
    if uid not in _COMPRESSION:
        return
    from pydicom.pixels import get_decoder
    try:
        available = get_decoder(uid).is_available
    except Exception:  # noqa: BLE001
        available = False
    if not available:
        raise RetinaInputError(_unsupported_message(uid))


def _unsupported_message(uid: str) -> str:
    name, packages = _COMPRESSION.get(uid, ("This", ""))
    extra = f", or ask the administrator to install {packages}" if packages else ""
    return (f"{name} compressed DICOM is not supported here: export the scan uncompressed (Explicit VR Little "
            f"Endian) or as PNG{extra}.")


def _check_length(ds: Any, geom: dict, uid: str) -> None:
    """Uncompressed pixel data must hold every declared pixel; otherwise the file was cut off."""
    if uid in _COMPRESSION or "PixelData" not in ds:
        return
    try:
        have = len(ds.PixelData)
    except Exception:  # noqa: BLE001
        raise RetinaInputError(_DAMAGED) from None
    n = geom["rows"] * geom["cols"] * geom["frames"] * geom["samples"]
    need = (n + 7) // 8 if geom["bits_allocated"] == 1 else n * geom["bits_allocated"] // 8
    if geom["photometric"] in ("YBR_FULL_422", "YBR_PARTIAL_422"):
        need = need * 2 // 3
    if have < need:
        raise RetinaInputError(_DAMAGED)


def _modality_hint(ds: Any) -> str | None:
    modality = _safe_str(ds, "Modality", allowed=("OP", "OPT", "OCT", "XC", "SC", "OT"))
    if modality == "OP":
        return Modality.FUNDUS
    if modality in ("OPT", "OCT"):
        return Modality.OCT
    try:
        sop = str(ds.get("SOPClassUID", "") or "")
    except Exception:  # noqa: BLE001
        return None
    if sop in _SOP_FUNDUS:
        return Modality.FUNDUS
    if sop in _SOP_OCT:
        return Modality.OCT
    return None


# Modality (0008,0060) defined terms (DICOM PS3.3 C.7.3.1.1.1; retired terms still met in archives) -> plain name.
# Ophthalmic ones: the pixel gate judges the image. Generic captures (OT, SC, XC) say nothing about the body part:
# the pixel gate judges too. Any other defined term names a non-ophthalmic modality: "not a retinal image".
_OPHTHALMIC_MODALITIES = {
    "OP": "ophthalmic photography", "OPT": "ophthalmic tomography", "OPTENF": "ophthalmic tomography en face",
    "OPTBSV": "ophthalmic tomography B-scan volume analysis", "OPM": "ophthalmic mapping",
    "OPV": "ophthalmic visual field", "OAM": "ophthalmic axial measurements", "AR": "autorefraction",
    "KER": "keratometry", "LEN": "lensometry", "SRF": "subjective refraction", "VA": "visual acuity",
    "IOL": "intraocular lens data", "FA": "fluorescein angiography (retired term)", "FS": "fundoscopy (retired term)",
}
_GENERIC_MODALITIES = {"OT": "other", "SC": "secondary capture (retired term)", "XC": "external-camera photography"}
_OTHER_MODALITIES = {
    "ASMT": "content assessment results", "AU": "audio", "BDUS": "bone densitometry (ultrasound)",
    "BI": "biomagnetic imaging", "BMD": "bone densitometry (X-ray)", "CFM": "confocal microscopy",
    "CR": "computed radiography", "CT": "computed tomography", "CTPROTOCOL": "CT protocol",
    "DG": "diaphanography", "DMS": "dermoscopy", "DOC": "document", "DX": "digital radiography",
    "ECG": "electrocardiography", "EEG": "electroencephalography", "EMG": "electromyography",
    "EOG": "electrooculography", "EPS": "cardiac electrophysiology", "ES": "endoscopy", "FID": "fiducials",
    "GM": "general microscopy", "HC": "hard copy", "HD": "hemodynamic waveform", "IO": "intra-oral radiography",
    "IVOCT": "intravascular optical coherence tomography", "IVUS": "intravascular ultrasound",
    "KO": "key object selection", "LS": "laser surface scan", "MG": "mammography", "MR": "magnetic resonance",
    "M3D": "model for 3D manufacturing", "NM": "nuclear medicine",
    "OCT": "optical coherence tomography, non-ophthalmic by the DICOM standard; retinal OCT is OPT",
    "OSS": "optical surface scan", "PA": "photoacoustic", "PLAN": "plan", "POS": "position sensor",
    "PR": "presentation state", "PT": "positron emission tomography", "PX": "panoramic X-ray",
    "REG": "registration", "RESP": "respiratory waveform", "RF": "radio fluoroscopy",
    "RG": "radiographic imaging", "RTDOSE": "radiotherapy dose", "RTIMAGE": "radiotherapy image",
    "RTINTENT": "radiotherapy intent", "RTPLAN": "radiotherapy plan", "RTRAD": "radiotherapy radiation",
    "RTRECORD": "radiotherapy treatment record", "RTSEGANN": "radiotherapy segment annotation",
    "RTSTRUCT": "radiotherapy structure set", "RWV": "real world value map", "SEG": "segmentation",
    "SM": "slide microscopy", "SMR": "stereometric relationship", "SR": "structured report",
    "STAIN": "automated slide stainer", "TEXTUREMAP": "texture map", "TG": "thermography", "US": "ultrasound",
    "XA": "X-ray angiography", "XAPROTOCOL": "XA protocol", "AS": "angioscopy (retired term)",
    "CD": "color flow Doppler (retired term)", "CF": "cinefluorography (retired term)",
    "CP": "colposcopy (retired term)", "CS": "cystoscopy (retired term)", "DD": "duplex Doppler (retired term)",
    "DF": "digital fluoroscopy (retired term)", "DM": "digital microscopy (retired term)",
    "DS": "digital subtraction angiography (retired term)", "EC": "echocardiography (retired term)",
    "LP": "laparoscopy (retired term)", "MA": "magnetic resonance angiography (retired term)",
    "MS": "magnetic resonance spectroscopy (retired term)", "ST": "single-photon emission CT (retired term)",
    "VF": "videofluorography (retired term)",
}
# SOP classes: ophthalmic image and measurement objects (PS3.4), and general captures whose pixels decide.
_SOP_OPHTHALMIC_PREFIXES = tuple(f"1.2.840.10008.5.1.4.1.1.{n}." for n in ("77.1.5", "78", "79", "80", "81", "82"))
_SOP_GENERIC = ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
                "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4",  # (multi-frame) secondary capture
                "1.2.840.10008.5.1.4.1.1.77.1.4", "1.2.840.10008.5.1.4.1.1.77.1.4.1")  # VL / video photographic


def header_summary(ds: Any) -> dict:
    """What the header says about the kind of scan, non-identifying: recorded as `RetinalImage.meta["header"]`.

    {"format": "DICOM", "modality": "US" | None, "modality_name": "ultrasound" | None,
     "sop_class": "Ultrasound Image Storage" | None, "ophthalmic": True | False | None, "reason": str | None}
    modality: the Modality code only when it is a DICOM defined term (never free text). sop_class: the standard
    name of the SOP Class UID (file meta as fallback); private or unknown UIDs are not kept. ophthalmic: True when
    a tag names an ophthalmic modality or class, False when one names a non-ophthalmic one (`reason` says which
    tag and what it says; the quality gate refuses on it), None when the header says nothing either way (generic
    capture, missing or unknown values: the pixels decide). Modality OCT is "non-ophthalmic OCT" in the standard,
    but is accepted with an ophthalmic SOP class (a mislabelled ophthalmic tomography object).
    """
    from pydicom.uid import UID
    modality = _safe_str(ds, "Modality", allowed=(*_OPHTHALMIC_MODALITIES, *_GENERIC_MODALITIES, *_OTHER_MODALITIES))
    names = {**_OPHTHALMIC_MODALITIES, **_GENERIC_MODALITIES, **_OTHER_MODALITIES}
    sop_uid = ""
    for source, keyword in ((ds, "SOPClassUID"), (getattr(ds, "file_meta", None), "MediaStorageSOPClassUID")):
        try:
            sop_uid = str(source.get(keyword, "") or "").strip() if source is not None else ""
        except Exception:  # noqa: BLE001 - a malformed UID is treated as missing
            sop_uid = ""
        if sop_uid:
            break
    uid = UID(sop_uid) if sop_uid else None
    sop_name = uid.name if uid is not None and uid.keyword and uid.type == "SOP Class" else None
    sop_ophthalmic = bool(sop_name) and sop_uid.startswith(_SOP_OPHTHALMIC_PREFIXES)
    reason = None
    if modality in _OTHER_MODALITIES and not (modality == "OCT" and sop_ophthalmic):
        reason = f"DICOM Modality is {modality} ({names[modality]}), not an ophthalmic modality"
    elif sop_name and not sop_ophthalmic and sop_uid not in _SOP_GENERIC:
        reason = f"DICOM SOP Class is {sop_name}, not an ophthalmic or photographic image class"
    if reason:
        ophthalmic = False
    elif modality in _OPHTHALMIC_MODALITIES or sop_ophthalmic:
        ophthalmic = True
    else:
        ophthalmic = None
    return {"format": "DICOM", "modality": modality, "modality_name": names.get(modality) if modality else None,
            "sop_class": sop_name, "ophthalmic": ophthalmic, "reason": reason}


def _laterality(ds: Any) -> str | None:
    codes = {"R": "OD", "L": "OS", "OD": "OD", "OS": "OS"}
    for keyword in ("ImageLaterality", "Laterality"):
        code = _safe_str(ds, keyword, allowed=tuple(codes))
        if code:
            return codes[code]
    try:  # enhanced multi-frame: Shared Functional Groups > Frame Anatomy > Frame Laterality
        anatomy = ds.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0]
        code = _safe_str(anatomy, "FrameLaterality", allowed=tuple(codes))
        return codes[code] if code else None
    except Exception:  # noqa: BLE001
        return None


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    """The first `n` values of a (multi-valued) DS element as positive finite floats, else None."""
    if value is None:
        return None
    seq = list(value) if hasattr(value, "__iter__") and not isinstance(value, (str, bytes)) else [value]
    try:
        vals = tuple(float(v) for v in seq[:n])
    except Exception:  # noqa: BLE001
        return None
    if len(vals) < n or not all(np.isfinite(v) and v > 0 for v in vals):
        return None
    return vals


def _spacing(ds: Any, volume: bool) -> tuple[float, ...] | None:
    pixel = _floats(ds.get("PixelSpacing", None), 2) if "PixelSpacing" in ds else None
    slice_mm = None
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        if keyword in ds:
            slice_mm = _floats(ds.get(keyword), 1)
            if slice_mm:
                break
    # enhanced multi-frame (Ophthalmic Tomography): Pixel Measures in the shared functional groups or, where the
    # device writes them per frame, in the first frame's
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        try:
            measures = getattr(ds, groups)[0].PixelMeasuresSequence[0]
        except Exception:  # noqa: BLE001 - not an enhanced multi-frame object, or no Pixel Measures there
            continue
        pixel = pixel or (_floats(measures.get("PixelSpacing", None), 2) if "PixelSpacing" in measures else None)
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            if not slice_mm and keyword in measures:
                slice_mm = _floats(measures.get(keyword), 1)
    if pixel is None:
        return None
    if volume:
        return (slice_mm[0], *pixel) if slice_mm else None
    return pixel


# --------------------------------------------------------------------------------------------------------------
# Pixel transforms
# --------------------------------------------------------------------------------------------------------------

def _window(ds: Any) -> tuple[float, float] | None:
    try:
        c, w = ds.get("WindowCenter", None), ds.get("WindowWidth", None)
        if c is None or w is None:
            return None
        c = float(c[0] if hasattr(c, "__len__") and not isinstance(c, str) else c)
        w = float(w[0] if hasattr(w, "__len__") and not isinstance(w, str) else w)
    except Exception:  # noqa: BLE001
        return None
    if not (np.isfinite(c) and np.isfinite(w) and w >= 1):
        return None
    return c - w / 2.0, c + w / 2.0


def _to_uint8_frames(ds: Any, arr: np.ndarray, geom: dict) -> tuple[np.ndarray, bool]:
    """[F, H, W] uint8 (monochrome) or [F, H, W, 3] uint8 (colour), display-ready."""
    colour = geom["samples"] == 3 or geom["photometric"] == "PALETTE COLOR"
    frames = geom["frames"]
    if geom["photometric"] == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut
        arr = apply_color_lut(arr, ds)
    expected_ndim = 2 + (1 if colour else 0)
    if arr.ndim == expected_ndim:
        arr = arr[None]
    if arr.ndim != expected_ndim + 1 or arr.shape[0] != frames and frames > 1:
        raise RetinaInputError(_DAMAGED)
    if colour:
        if arr.dtype == np.uint8:
            return np.ascontiguousarray(arr), True
        return scale_to_uint8(arr), True  # joint range keeps the colour balance
    data = arr
    slope, intercept = _float_tag(ds, "RescaleSlope", 1.0), _float_tag(ds, "RescaleIntercept", 0.0)
    rescaled = slope != 1.0 or intercept != 0.0
    if rescaled:
        data = data.astype(np.float64) * slope + intercept
    window = _window(ds)
    if window is not None:
        lo, hi = window
        out = (np.clip(data.astype(np.float64), lo, hi) - lo) * (255.0 / (hi - lo))
        u8 = np.rint(out).astype(np.uint8)
    elif data.dtype == np.uint8 and not rescaled:
        u8 = data  # 8-bit stored values are display values: keep absolute brightness
    else:
        u8 = scale_to_uint8(data)  # 16-bit etc.: the actual range, not a clamp
    if geom["photometric"] == "MONOCHROME1":
        u8 = 255 - u8  # MONOCHROME1: high values are dark
    return np.ascontiguousarray(u8, dtype=np.uint8), False


def _float_tag(ds: Any, keyword: str, default: float) -> float:
    try:
        value = ds.get(keyword, None)
        value = float(value) if value is not None and value != "" else default
        return value if np.isfinite(value) else default
    except Exception:  # noqa: BLE001
        return default
