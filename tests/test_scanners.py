"""OCT scanners' own exports (Heidelberg .vol / .e2e, Topcon .fda / .fds, Zeiss .img) and multi-frame DICOM OPT / OP
through `read_image`, the quality gate, and a fuzzer.

Run: .venv/bin/python -m pytest -x -q tests/test_scanners.py
Every file is built here, small (a few B-scans of 64 x 128), and carries a fake patient whose name, ID and dates must
never reach a RetinalImage, a log record or an error message:
- .vol: written with `struct` from the HEYEX VOL export layout (HSF-OCT-103; independent of eyepy), and once with
  eyepy's own `vol_format` as a writer;
- .e2e: written with eyepy's own construct structures (`e2e_format`: version, directories, containers, items);
- Topcon: written with `struct` from the chunk layout oct-converter documents (`fda_binary`, `fds_binary`).
"""

from __future__ import annotations

import datetime
import importlib.util
import io
import logging
import struct

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from retina_core.errors import RetinaInputError
from retina_core.io.decode import RetinalImage, read_image, sniff_format
from retina_core.phantoms import oct_volume
from retina_core.quality import assess_quality

eyepy_utils = pytest.importorskip("eyepy.core.utils")

# the fake patient: each string is looked for in every output
NAME_FIRST, NAME_LAST, PID, VISIT, LABEL = "Zebulon", "Quixotefield", "PID-12345", "VISIT-4242", "Clinic-Label-XYZ"
DOB = datetime.date(1945, 3, 17)
PHI = (NAME_FIRST, NAME_LAST, PID, VISIT, LABEL, "1945-03-17", "19450317", "1945, 3, 17", "2024-01-02")


# --------------------------------------------------------------------------------------------------------------
# pixels
# --------------------------------------------------------------------------------------------------------------

def phantom_u8(n: int = 5, height: int = 64, width: int = 128, seed: int = 1) -> np.ndarray:
    """uint8 [n, height, width] B-scans of one phantom eye (retina_core.phantoms.oct_volume)."""
    vol = oct_volume("normal", seed, n_slices=n, height=height, width=width).image
    return np.rint(np.clip(vol, 0, 1) * 255).astype(np.uint8)


def noise_u8(n: int = 5, height: int = 64, width: int = 128, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width), dtype=np.uint8)


def reflectivity(u8: np.ndarray) -> np.ndarray:
    """HEYEX float32 reflectivity whose display (eyepy's `from_vol_intensity`) is `u8`."""
    return eyepy_utils.to_vol_intensity(u8).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# Heidelberg .vol: the documented HSF-OCT-103 layout, with struct
# --------------------------------------------------------------------------------------------------------------

def _days_1899(d: datetime.date) -> float:
    return float((d - datetime.date(1899, 12, 30)).days)


def _filetime(d: datetime.date) -> int:
    return int((datetime.datetime(d.year, d.month, d.day) - datetime.datetime(1601, 1, 1)).total_seconds() * 10**7)


def vol_bytes(bscans_u8: np.ndarray, *, laterality: str = "OS", scale=(0.0117, 0.0039), distance: float = 0.12,
              slo: tuple[int, int] = (64, 64), pattern: int = 3, n_seg: int = 2, phi: bool = True) -> bytes:
    """A Heidelberg .vol: 2048-byte file header, SLO image, then per B-scan a header (+ segmentation) and float32."""
    n, depth, width = bscans_u8.shape
    bscan_hdr = 256 + n_seg * 4 * width
    h = bytearray(2048)
    struct.pack_into("<12s3i3d2i2did4sQii", h, 0, b"HSF-OCT-103", width, n, depth, scale[0], distance, scale[1],
                     slo[0], slo[1], 0.03, 0.03, 30, 0.0, laterality.encode(), _filetime(datetime.date(2024, 1, 2)),
                     pattern, bscan_hdr)
    struct.pack_into("<16s16si21s", h, 104, b"1234", b"", 77, PID.encode() if phi else b"")
    struct.pack_into("<di24sd", h, 164, _days_1899(DOB) if phi else 0.0, 5, VISIT.encode() if phi else b"",
                     _days_1899(datetime.date(2024, 1, 2)))
    struct.pack_into("<34s", h, 224, b"progression-1")
    parts = [bytes(h), np.full(slo[0] * slo[1], 90, np.uint8).tobytes()]
    for i, b in enumerate(bscans_u8):
        bh = bytearray(bscan_hdr)
        struct.pack_into("<12si4d2ifi", bh, 0, b"HSF-BS-103", bscan_hdr, 0.0, i * distance, width * scale[0],
                         i * distance, n_seg, 256, 25.0, 0)
        bh[256:] = np.tile(np.linspace(10, 40, width, dtype=np.float32), n_seg).tobytes()
        parts += [bytes(bh), reflectivity(b).tobytes()]
    return b"".join(parts)


# --------------------------------------------------------------------------------------------------------------
# Heidelberg .e2e: eyepy's own structures as the writer
# --------------------------------------------------------------------------------------------------------------

def _ufloat16_codes(values: np.ndarray) -> np.ndarray:
    """The 16-bit codes of the E2E custom float (no sign, 6-bit exponent, 10-bit mantissa) nearest to `values`."""
    from eyepy.io.he.e2e_format import Bscan
    order = np.argsort(Bscan.LUT)  # eyepy's (and oct-converter's) decoding table, not monotonic in the code
    lut = Bscan.LUT[order]
    idx = np.clip(np.searchsorted(lut, values), 1, len(lut) - 1)
    lower = np.abs(values - lut[idx - 1]) <= np.abs(lut[idx] - values)
    return order[np.where(lower, idx - 1, idx)].astype("<u2")


def e2e_bytes(bscans_u8: np.ndarray, *, laterality: str = "R", phi: bool = True, series_id: int = 3) -> bytes:
    """A one-directory .e2e: patient (Type 9), study name (9000), laterality (11), a localizer and the B-scans."""
    from eyepy.io.he import e2e_format as E

    items = []  # (study, series, slice, ind, type, payload)
    if phi:
        patient = E.Type9(firstname=NAME_FIRST, surname=NAME_LAST, birthdate=2431167, sex="M", patient_id=PID)
        items.append((-1, -1, -1, 0, 9, E.type9_format.build(patient)))
        text = (f"{LABEL} 2024-01-02".encode("utf-16-le")).ljust(128, b"\0")
        items.append((7, -1, -1, 0, 9000, struct.pack("<II", 1, 128) + text))
    items.append((7, series_id, -1, 0, 11, bytes(14) + laterality.encode() + b"\0"))
    localizer = np.full((64, 64), 80, np.uint8)
    items.append((7, series_id, -1, 0, 1073741824,
                  struct.pack("<5I", localizer.size, 33620481, localizer.size, 64, 64) + localizer.tobytes()))
    for i, b in enumerate(bscans_u8):
        h, w = b.shape
        codes = _ufloat16_codes(reflectivity(b))
        items.append((7, series_id, 2 * i, 1, 1073741824,
                      struct.pack("<5I", 2 * codes.size, 35652097, codes.size, h, w) + codes.tobytes()))
    n = len(items)
    dir_at = 36 + 52
    data_at = dir_at + 52 + 44 * n
    version = E.version_format.build(E.Version(name="CMDb", version=100, unknown0=[0] * 10))
    main = E.header_format.build(E.Header(magic2="MDbMDir", version=100, unknown0=[0] * 10, num_entries=n,
                                          current=dir_at, prev=dir_at, unknown1=0))
    directory = E.header_format.build(E.Header(magic2="MDbDir", version=100, unknown0=[0] * 10, num_entries=n,
                                               current=dir_at, prev=0, unknown1=0))
    folders, containers, pos = [], [], data_at
    for k, (study, series, slice_id, ind, typ, payload) in enumerate(items):
        ids = dict(patient_id=1, study_id=study, series_id=series, slice_id=slice_id, ind=ind, type=E.TypesEnum(typ))
        folders.append(E.folderheader_format.build(E.FolderHeader(pos=dir_at + 52 + 44 * k, start=pos,
                                                                  size=len(payload), unknown0=0, unknown1=0,
                                                                  unknown3=0, **ids)))
        head = E.containerheader_format.build(E.ContainerHeader(magic3="MDbData", unknown0=0, header_pos=pos,
                                                                pos=pos, size=len(payload), unknown1=0, unknown2=0,
                                                                unknown3=0, **ids))
        containers.append(head + payload)
        pos += len(head) + len(payload)
    return version + main + directory + b"".join(folders) + b"".join(containers)


# --------------------------------------------------------------------------------------------------------------
# Topcon .fda / .fds: the chunk layout oct-converter documents, with struct
# --------------------------------------------------------------------------------------------------------------

def _chunk(name: bytes, payload: bytes) -> bytes:
    return bytes([len(name)]) + name + struct.pack("<I", len(payload)) + payload


def _jpeg(u8: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    options = {"quality": 95} if fmt == "JPEG" else {"irreversible": False, "no_jp2": True}  # J2K: lossless codestream
    Image.fromarray(u8).save(buf, fmt, **options)
    return buf.getvalue()


def topcon_bytes(bscans_u8: np.ndarray, *, store: str = "jpeg", eye: int = 1, phi: bool = True,
                 dims_mm=(6.0, 6.0, 2.6)) -> bytes:
    """store: "jpeg" | "jpeg2000" (.fda IMG_JPEG), "mot_comp" (.fda IMG_MOT_COMP_03), "scan" (.fds IMG_SCAN_03)."""
    n, h, w = bscans_u8.shape
    out = b"FOCT" + (b"FDS" if store == "scan" else b"FDA") + struct.pack("<II", 8, 1)
    if phi:
        patient = struct.pack("<32s32s32s8sB3H", PID.encode(), NAME_FIRST.encode(), NAME_LAST.encode(), b"", 1,
                              DOB.year, DOB.month, DOB.day).ljust(512, b"\0")
        out += _chunk(b"@PATIENT_INFO_02", patient)
        out += _chunk(b"@CAPTURE_INFO_02", struct.pack("<BBI100s6H", eye, 2, 9, LABEL.encode(), 2024, 1, 2, 9, 30, 0))
    else:
        out += _chunk(b"@CAPTURE_INFO", struct.pack("<B6H", eye, 2024, 1, 2, 9, 30, 0))
    out += _chunk(b"@PARAM_SCAN_04", struct.pack("<3I5d2B", 0, 0, 0, dims_mm[0], dims_mm[1], dims_mm[2], 0, 0, 0, 0))
    if store in ("jpeg", "jpeg2000"):
        codec = "JPEG" if store == "jpeg" else "JPEG2000"
        body = struct.pack("<B6I", 2, 0, 0, w, h, n, 0)
        for b in bscans_u8:
            j = _jpeg(b, codec)
            body += struct.pack("<I", len(j)) + j
        out += _chunk(b"@IMG_JPEG", body)
    else:
        raw = (bscans_u8.astype("<u2") * 257).tobytes()  # n slices of h rows of w values
        name = b"@IMG_MOT_COMP_03" if store == "mot_comp" else b"@IMG_SCAN_03"
        out += _chunk(name, struct.pack("<B4IBI", 2, w, h, 16, n, 0, len(raw)) + raw)
    out += _chunk(b"@IMG_TRC_02", bytes(40))  # a fundus chunk the reader skips
    return out + b"\0"


BUILDERS = {"heidelberg-vol": vol_bytes, "heidelberg-e2e": e2e_bytes, "topcon-fda": topcon_bytes,
            "topcon-fds": lambda b, **kw: topcon_bytes(b, store="scan", **kw)}
# oct-converter is installed with --no-deps (see requirements.txt); without it Topcon files are refused, which
# test_missing_reader_library_is_named checks whatever is installed
needs_oct_converter = pytest.mark.skipif(importlib.util.find_spec("oct_converter") is None,
                                         reason="oct-converter not installed: pip install --no-deps oct-converter")
FORMATS = [pytest.param(f, marks=needs_oct_converter) if f.startswith("topcon") else f for f in sorted(BUILDERS)]


def refuse(data: bytes, *words: str, **kw) -> str:
    with pytest.raises(RetinaInputError) as info:
        read_image(data, **kw)
    msg = str(info.value)
    for w in words:
        assert w.lower() in msg.lower(), msg
    assert len(msg) > 30 and "Traceback" not in msg
    assert info.value.__cause__ is None and (info.value.__context__ is None
                                            or isinstance(info.value.__context__, RetinaInputError)), msg
    return msg


# --------------------------------------------------------------------------------------------------------------
# reading: pixels, spacing, laterality, header, single B-scans
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_scanner_volume_round_trip(fmt):
    bscans = phantom_u8(4)
    img = read_image(BUILDERS[fmt](bscans))
    assert img.kind == "volume" and img.source_format == fmt and img.pixels.shape == (4, 64, 128)
    assert img.pixels.dtype == np.float32 and 0 <= img.pixels.min() and img.pixels.max() <= 1
    assert img.modality_hint == "oct" and img.grayscale
    assert img.meta["header"] == {"format": {"heidelberg-vol": "Heidelberg .vol", "heidelberg-e2e": "Heidelberg .e2e",
                                             "topcon-fda": "Topcon .fda", "topcon-fds": "Topcon .fds"}[fmt],
                                  "modality": "oct", "modality_name": "optical coherence tomography",
                                  "sop_class": None, "ophthalmic": True, "reason": None}
    got = img.pixels * 255
    if fmt in ("heidelberg-vol", "topcon-fda"):   # display transform inverted exactly / JPEG q95
        assert np.abs(got - bscans).max() <= (1.01 if fmt == "heidelberg-vol" else 40)
        assert np.abs(got - bscans).mean() < (0.6 if fmt == "heidelberg-vol" else 3)
    elif fmt == "heidelberg-e2e":                 # plus the 10-bit mantissa of the E2E float
        assert np.abs(got - bscans).max() <= 2
    assert np.corrcoef(got.ravel(), bscans.ravel().astype(float))[0, 1] > 0.99
    want_lat = {"heidelberg-vol": "OS", "heidelberg-e2e": "OD", "topcon-fda": "OS", "topcon-fds": "OS"}[fmt]
    assert img.laterality == want_lat
    if fmt == "heidelberg-vol":
        np.testing.assert_allclose(img.spacing, (0.12, 0.0039, 0.0117))
    elif fmt.startswith("topcon"):
        np.testing.assert_allclose(img.spacing, (6.0 / 4, 2.6 / 1000, 6.0 / 128))
    else:
        assert img.spacing is None  # the E2E header gives angles, not millimetres


@needs_oct_converter
def test_topcon_jpeg2000_slices_and_fds_without_patient_block():
    bscans = phantom_u8(3)
    img = read_image(topcon_bytes(bscans, store="jpeg2000"))
    assert img.source_format == "topcon-fda" and np.abs(img.pixels * 255 - bscans).max() <= 1.01
    img = read_image(topcon_bytes(bscans, store="mot_comp", eye=0, phi=False))
    assert img.laterality == "OD" and img.source_format == "topcon-fda"
    assert np.corrcoef(img.pixels.ravel(), bscans.ravel().astype(float))[0, 1] > 0.999


@pytest.mark.parametrize("fmt", FORMATS)
def test_single_bscan_is_an_image_and_frames_pick_one(fmt):
    bscans = phantom_u8(3)
    one = read_image(BUILDERS[fmt](bscans[1:2]))
    assert one.kind == "image" and one.pixels.shape == (64, 128, 3) and one.pixels.dtype == np.uint8
    data = BUILDERS[fmt](bscans)
    two = read_image(data, frame=2)
    assert two.kind == "image" and two.meta["frame"] == 2 and two.meta["frames"] == 3
    assert np.corrcoef(two.pixels[..., 0].ravel(), bscans[2].ravel())[0, 1] > 0.99
    assert read_image(BUILDERS[fmt](bscans[:1]), frame=-1).pixels.shape == (1, 64, 128)
    refuse(data, "frame 7", frame=7)


def test_eyepy_vol_format_as_writer_gives_the_same_volume():
    """eyepy's own `vol_format` (the structure its HeVolWriter uses) builds a file read like the struct-built one.

    eyepy 0.21's HeVolWriter itself fails on dates (it passes datetimes where its date adapters want ISO strings, and
    its exam-time encoder yields a float), so `exam_time` is written as the raw 64-bit count here."""
    import construct as cs
    from eyepy.io.he.vol_reader import vol_format
    vol_format = cs.Struct(*[("exam_time" / cs.Int64ul) if sc.name == "exam_time" else sc for sc in vol_format.subcons])
    bscans = phantom_u8(3)
    n, depth, width = bscans.shape
    seg = np.zeros((2, width), np.float32)
    built = vol_format.build(dict(
        version="HSF-OCT-103", size_x=width, n_bscans=n, size_y=depth, scale_x=0.0117, distance=0.12,
        scale_y=0.0039, size_x_slo=64, size_y_slo=64, scale_x_slo=0.03, scale_y_slo=0.03, field_size_slo=30,
        scan_focus=0.0, scan_position="OD", exam_time=_filetime(datetime.date(2024, 1, 2)), scan_pattern=3,
        bscan_hdr_size=256 + 2 * 4 * width, id="1234", reference_id="", pid=77, patient_id=PID,
        dob="1945-03-17T00:00:00", vid=5, visit_id=VISIT, visit_date="2024-01-02T00:00:00", grid_type=0,
        grid_offset=0, grid_type1=0, grid_offset1=0, prog_id="p", localizer=np.full((64, 64), 90, np.uint8),
        bscans=[dict(version="HSF-BS-103", bscan_hdr_size=256 + 2 * 4 * width, start_x=0.0, start_y=i * 0.12,
                     end_x=1.5, end_y=i * 0.12, num_seg=2, seg_offset=256, quality=25.0, shift=0,
                     iv_transformation=[0.0] * 6, layer_segmentations=seg, data=reflectivity(b))
                for i, b in enumerate(bscans)]))
    a, b = read_image(built), read_image(vol_bytes(bscans, laterality="OD"))
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert a.laterality == b.laterality == "OD" and a.spacing == b.spacing


def test_eyepy_reads_the_struct_built_vol_the_same_way(tmp_path):
    """Our struct writer and eyepy's own HeVolReader agree on the layout (pixels, scales, laterality)."""
    from eyepy.io.he.vol_reader import HeVolReader
    bscans = phantom_u8(3)
    p = tmp_path / "x.vol"
    p.write_bytes(vol_bytes(bscans))
    ev = HeVolReader(p).volume
    assert ev.shape == (3, 64, 128) and ev.laterality == "OS"
    assert np.abs(ev.data.astype(int) - bscans).max() <= 1
    np.testing.assert_allclose([ev.scale_x, ev.scale_y, ev.scale_z], [0.0117, 0.0039, 0.12])


def test_eyepy_and_oct_converter_read_the_test_e2e_as_we_do(tmp_path):
    """The test-built .e2e read by eyepy's HeE2eReader and by oct-converter's E2E reader: the same B-scans."""
    import contextlib

    from eyepy.io import HeE2eReader
    bscans = phantom_u8(3)
    p = tmp_path / "x.e2e"
    p.write_bytes(e2e_bytes(bscans))
    ours = read_image(p)
    with HeE2eReader(p) as reader:
        (series,) = reader.series
        theirs = np.stack([eyepy_utils.from_e2e_intensity(series.slices[k].get_bscan().astype(np.float32))
                           for k in sorted(series.slices)])
    np.testing.assert_allclose(theirs / 255.0, ours.pixels, atol=1e-6)
    if importlib.util.find_spec("oct_converter") is not None:
        from oct_converter.readers import E2E
        with contextlib.redirect_stdout(io.StringIO()):
            (vol,) = E2E(p).read_oct_volume()
        np.testing.assert_allclose(np.asarray(vol.volume), ours.pixels, atol=0.5 / 255)


@needs_oct_converter
@pytest.mark.parametrize("store", ["jpeg", "mot_comp", "scan"])
def test_oct_converter_reads_the_test_topcon_files_as_we_do(store, tmp_path, monkeypatch):
    """oct-converter's own FDA / FDS readers on the test-built files: same pixels, eye and spacing. Its 0.7.0 readers
    call np.fromstring on bytes, which numpy 2 removed, so the test lends them np.frombuffer."""
    import contextlib

    from oct_converter.readers import FDA, FDS
    monkeypatch.setattr(np, "fromstring", lambda b, dtype=float, **kw: np.frombuffer(b, dtype=dtype))
    data = topcon_bytes(phantom_u8(3), store=store)
    p = tmp_path / "x.topcon"
    p.write_bytes(data)
    ours = read_image(data)
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = (FDS if store == "scan" else FDA)(p).read_oct_volume()
    raw = np.asarray(theirs.volume, dtype=np.float32)
    if store == "jpeg":   # the same decoded JPEG slices
        np.testing.assert_allclose(raw / 255.0, ours.pixels, atol=1e-6)
    else:                 # the same uint16 samples in the same order (ours scaled by their 0.5-99.5 percentiles)
        assert np.corrcoef(raw.ravel(), ours.pixels.ravel())[0, 1] > 0.999
    assert theirs.laterality == "L" and ours.laterality == "OS"
    x, slice_mm, z = theirs.pixel_spacing
    np.testing.assert_allclose(ours.spacing, (slice_mm, z, x))


def test_e2e_multiple_volume_prefix():
    """Exports that start with "E2EMultipleVolumeFile" carry 64 bytes before the E2E header (oct-converter)."""
    bscans = phantom_u8(2)
    plain = e2e_bytes(bscans)
    prefixed = b"E2EMultipleVolumeFile".ljust(64, b"\0") + plain
    np.testing.assert_array_equal(read_image(prefixed).pixels, read_image(plain).pixels)


def test_sniffed_from_bytes_not_extension(tmp_path):
    data = vol_bytes(phantom_u8(2))
    p = tmp_path / "scan.png"
    p.write_bytes(data)
    assert read_image(p).source_format == "heidelberg-vol"
    assert sniff_format(e2e_bytes(phantom_u8(2))) == "heidelberg-e2e"
    assert sniff_format(topcon_bytes(phantom_u8(2))) == "topcon"
    q = tmp_path / "scan.vol"
    q.write_bytes(_jpeg(phantom_u8(1)[0]))
    assert read_image(q).source_format == "jpeg"


def test_missing_reader_library_is_named(monkeypatch):
    import sys
    for name in ["oct_converter", *[m for m in sys.modules if m.startswith("oct_converter.")]]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: importing it raises ImportError
    msg = refuse(topcon_bytes(phantom_u8(2)), "Topcon files are recognised", "oct-converter", "not installed")
    assert "DICOM" in msg


def test_zeiss_img_recognised_but_not_supported():
    msg = refuse(bytes(1024 * 200 * 200), "Zeiss .img is recognised but not supported", "DICOM")
    assert "200x200" in msg


# --------------------------------------------------------------------------------------------------------------
# damaged files: only RetinaInputError, with a clear message
# --------------------------------------------------------------------------------------------------------------

def _set(data: bytes, offset: int, fmt: str, *values) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, *values)
    return bytes(b)


def test_vol_truncated_and_corrupted():
    good = vol_bytes(phantom_u8(3))
    refuse(good[:1000], "incomplete")
    refuse(good[:-1], "incomplete")
    refuse(good[: 2048 + 64 * 64 + 500], "incomplete")
    refuse(_set(good, 16, "<i", 4), "incomplete")                  # one B-scan more than the file holds
    refuse(_set(good, 16, "<i", 5000), "frames")                   # > MAX_FRAMES
    refuse(_set(good, 12, "<i", 60_000), "too large", max_pixels=4_000_000)
    refuse(_set(good, 12, "<i", 0), "empty")
    refuse(_set(good, 100, "<i", 12), "damaged")                   # B-scan header smaller than its fixed part
    refuse(_set(good, 2048 + 64 * 64 + 48, "<i", 10**6), "damaged")  # segmentation count beyond the B-scan header
    refuse(b"HSF-OCT-103" + bytes(range(256)) * 40)


def test_e2e_truncated_and_corrupted():
    good = e2e_bytes(phantom_u8(3))
    refuse(good[:60], "incomplete")
    refuse(good[:-1], "incomplete")
    refuse(good[:400], "incomplete")
    refuse(_set(good, 88 + 44, "<I", 88), "damaged")        # directory's `prev` points at itself: a loop
    refuse(_set(good, 88 + 36, "<I", 9999), "damaged")      # more entries than a directory holds
    refuse(_set(good, 88, "<6s", b"XXXXXX"), "damaged")     # directory magic
    last_folder = 88 + 52 + 44 * 6
    width_at = struct.unpack_from("<I", good, last_folder + 4)[0] + 60 + 16
    refuse(_set(good, width_at, "<I", 1000), "damaged")     # B-scan width does not match its data
    refuse(_set(good, last_folder + 4, "<I", len(good) + 10), "incomplete")
    no_bscans = e2e_bytes(np.zeros((0, 64, 128), np.uint8))
    refuse(no_bscans, "no OCT B-scans")
    refuse(good[:88] + bytes(range(256)) * 20, "damaged")


@needs_oct_converter
def test_topcon_truncated_and_corrupted():
    for store in ("jpeg", "mot_comp", "scan"):
        good = topcon_bytes(phantom_u8(3), store=store)
        refuse(good[:10], "incomplete")
        refuse(good[:-300], "incomplete")
        at = good.index(b"@IMG_") + len(b"@IMG_JPEG" if store == "jpeg" else b"@IMG_SCAN_03" if store == "scan"
                                           else b"@IMG_MOT_COMP_03") + 4
        n_at = at + (17 if store == "jpeg" else 13)
        refuse(_set(good, n_at, "<I", 100_000), "frames")
        refuse(_set(good, n_at, "<I", 5), "incomplete" if store != "jpeg" else "")
    jpeg = topcon_bytes(phantom_u8(3))
    first_slice = jpeg.index(b"\xff\xd8\xff")
    refuse(jpeg[:first_slice + 200] + bytes(len(jpeg) - first_slice - 200), "")  # JPEG data zeroed
    refuse(topcon_bytes(phantom_u8(3)).replace(b"@IMG_JPEG", b"@IMG_XXXX"), "no OCT volume")
    refuse(b"FOCTFDA" + bytes(range(256)) * 8, "")


def test_damaged_scanner_files_log_no_library_message(caplog, monkeypatch):
    """A library failure is logged by type and traceback, never by its message (it may quote header text)."""
    import retina_core.io.scanners as scanners

    def boom(data, **kw):
        raise ValueError(f"patient {NAME_LAST} could not be parsed")

    monkeypatch.setattr(scanners, "_read_vol", boom)
    with caplog.at_level(logging.DEBUG):
        msg = refuse(vol_bytes(phantom_u8(2)), "damaged")
    assert "ValueError" in caplog.text and NAME_LAST not in caplog.text and NAME_LAST not in msg


# --------------------------------------------------------------------------------------------------------------
# privacy: the fake patient appears nowhere
# --------------------------------------------------------------------------------------------------------------

def _damaged_variants(data: bytes) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = [data[: len(data) // 2], data[:-7], data[:3000]]
    for _ in range(6):
        b = bytearray(data)
        for pos in rng.integers(0, min(len(b), 4000), 6):
            b[pos] = int(rng.integers(0, 256))
        out.append(bytes(b))
    return out


@pytest.mark.parametrize("fmt", FORMATS + [pytest.param("topcon-jpeg2000", marks=needs_oct_converter)])
def test_patient_fields_never_leave_the_reader(fmt, caplog):
    build = (lambda b: topcon_bytes(b, store="jpeg2000")) if fmt == "topcon-jpeg2000" else BUILDERS[fmt]
    data = build(phantom_u8(3))
    for secret in (NAME_LAST, PID) if "vol" not in fmt else (PID, VISIT):
        assert secret.encode() in data or secret.encode("utf-16-le") in data  # the file really carries them
    texts = []
    with caplog.at_level(logging.DEBUG):
        img = read_image(data, name="upload")
        one = read_image(data, frame=1)
        for bad in _damaged_variants(data):
            try:
                other = read_image(bad)
            except RetinaInputError as exc:
                texts += [str(exc), repr(exc), repr(exc.__cause__), repr(exc.__context__)]
            else:
                texts += [repr(other), str(other.meta)]
    texts += [repr(img), str(img.meta), repr(one), str(one.meta), str(vars(one)), caplog.text,
              str(assess_quality(img))]
    haystack = "\n".join(texts)
    for secret in PHI:
        assert secret not in haystack, secret
    assert set(img.meta) <= {"width", "height", "frames", "bits", "scan_pattern", "version", "series_in_file",
                             "header", "frame"}


# --------------------------------------------------------------------------------------------------------------
# the gate: OCT B-scans in a scanner file pass, noise in the same container does not
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_scanner_volume_goes_through_the_volume_gate(fmt):
    build = BUILDERS[fmt]
    oct_img = read_image(build(phantom_u8(6, seed=2)))
    q = assess_quality(oct_img)   # what `predict` and the Volume page call before any model
    assert q.modality == "oct_volume" and q.gradable, (q.verdict, q.reasons)
    noise = read_image(build(noise_u8(6)))
    q = assess_quality(noise)
    assert q.modality == "not_retinal" or not q.gradable, (q.modality, q.verdict)


def test_noise_in_a_vol_gets_no_volume_result():
    from retina_core.cli import predict_volume
    rec = predict_volume(read_image(vol_bytes(noise_u8(6))), None, None, {}, None, None)
    assert rec["label"] is None and rec["model"] is None


# --------------------------------------------------------------------------------------------------------------
# DICOM Ophthalmic Tomography / Photography, multi-frame
# --------------------------------------------------------------------------------------------------------------

SOP_OPT, SOP_OP = "1.2.840.10008.5.1.4.1.1.77.1.5.4", "1.2.840.10008.5.1.4.1.1.77.1.5.1"


def multiframe_dicom(pixels: np.ndarray, *, sop: str = SOP_OPT, modality: str = "OPT", measures: str = "shared",
                     j2k: bool = False) -> bytes:
    """An enhanced multi-frame OPT (or OP) with a fake patient; Pixel Measures shared, per frame, or absent."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop, generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90" if j2k else ExplicitVRLittleEndian
    ds = FileDataset("x", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop, meta.MediaStorageSOPInstanceUID, modality
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = f"{NAME_LAST}^{NAME_FIRST}", PID, "19450317"
    ds.StudyDate, ds.ImageLaterality = "20240102", "L"
    colour = pixels.ndim == 4
    ds.NumberOfFrames, (ds.Rows, ds.Columns) = pixels.shape[0], pixels.shape[1:3]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (3, "RGB") if colour else (1, "MONOCHROME2")
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    pm = Dataset()
    pm.PixelSpacing, pm.SliceThickness = [0.0039, 0.0117], 0.12
    if measures == "shared":
        group = Dataset()
        group.PixelMeasuresSequence = Sequence([pm])
        ds.SharedFunctionalGroupsSequence = Sequence([group])
    elif measures == "per-frame":
        frames = []
        for _ in range(pixels.shape[0]):
            group = Dataset()
            group.PixelMeasuresSequence = Sequence([pm])
            frames.append(group)
        ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    if j2k:
        from pydicom.encaps import encapsulate
        ds.PixelData = encapsulate([_jpeg(f, "JPEG2000") for f in pixels])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("measures", ["shared", "per-frame"])
def test_dicom_opt_multiframe_volume(measures, caplog):
    bscans = phantom_u8(5, seed=2)
    with caplog.at_level(logging.DEBUG):
        img = read_image(multiframe_dicom(bscans, measures=measures))
    assert img.kind == "volume" and img.pixels.shape == (5, 64, 128) and img.modality_hint == "oct"
    assert img.spacing == (0.12, 0.0039, 0.0117) and img.laterality == "OS"
    np.testing.assert_allclose(img.pixels * 255, bscans, atol=1e-3)
    assert img.meta["header"]["sop_class"] == "Ophthalmic Tomography Image Storage"
    q = assess_quality(img)
    assert q.modality == "oct_volume" and q.gradable
    assert not assess_quality(read_image(multiframe_dicom(noise_u8(5)))).gradable
    haystack = repr(img) + str(img.meta) + caplog.text
    for secret in PHI:
        assert secret not in haystack


def test_dicom_opt_multiframe_jpeg2000():
    bscans = phantom_u8(3, seed=2)
    try:
        img = read_image(multiframe_dicom(bscans, j2k=True))
    except RetinaInputError as exc:  # no JPEG 2000 decoder for pydicom here: the message must say so
        assert "JPEG 2000" in str(exc)
        pytest.skip("no JPEG 2000 decoder available to pydicom")
    assert img.kind == "volume" and np.abs(img.pixels * 255 - bscans).max() <= 1.01


def test_dicom_op_multiframe_is_photographs_not_a_volume():
    rgb = np.stack([np.full((64, 96, 3), (200, 90, 40), np.uint8), np.full((64, 96, 3), (30, 60, 90), np.uint8)])
    data = multiframe_dicom(rgb, sop=SOP_OP, modality="OP", measures="none")
    img = read_image(data)
    assert img.kind == "image" and img.modality_hint == "fundus" and not img.grayscale
    assert tuple(img.pixels[5, 5]) == (200, 90, 40) and img.meta["frames"] == 2 and img.meta["frame"] == 0
    assert tuple(read_image(data, frame=1).pixels[5, 5]) == (30, 60, 90)
    assert read_image(data, frame=-1).kind == "volume"  # every frame, when asked for explicitly


# --------------------------------------------------------------------------------------------------------------
# fuzz: mutated and cut scanner files raise only RetinaInputError, within a memory bound
# --------------------------------------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SMALL = phantom_u8(3, height=40, width=64)
_SEEDS = {"vol": vol_bytes(_SMALL, slo=(32, 32)), "e2e": e2e_bytes(_SMALL),
          "fda-jpeg": topcon_bytes(_SMALL), "fda-raw": topcon_bytes(_SMALL, store="mot_comp"),
          "fds": topcon_bytes(_SMALL, store="scan")}
FUZZ_PEAK_BYTES = 48 * 2**20   # a few copies of the largest volume max_pixels admits, far below what a bomb would take


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(_SEEDS)),
       edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_fuzz_scanner_files_only_raise_input_errors(kind, edits, cut):
    from retina_core.testing import mutated, read_within_memory

    # edits biased towards the headers and directories, where sizes and offsets live
    img, peak = read_within_memory(mutated(_SEEDS[kind], edits, cut, 600), 2_000_000, PHI)
    assert peak < FUZZ_PEAK_BYTES, peak
    if img is not None:
        assert isinstance(img, RetinalImage) and np.isfinite(img.pixels).all()
        assert img.pixels.dtype == (np.float32 if img.kind == "volume" else np.uint8)
        for secret in PHI:
            assert secret not in repr(img)
