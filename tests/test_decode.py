"""read_image: a corpus of bad inputs, each refused with a clear RetinaInputError or converted correctly.

Run: .venv/bin/python -m pytest -q tests/test_decode.py
Everything is built in tmp_path / memory; the decompression bomb is streamed (a few hundred KB, never 1.6 GB).
"""

from __future__ import annotations

import gzip
import io
import logging
import struct
import zlib

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from retina_core.errors import RetinaInputError
from retina_core.io.decode import RetinalImage, laterality_from_name, read_image, sniff_format

PHI = ("DOE^JOHN", "DOE", "JOHN", "PID-12345", "19450317", "St Elsewhere Eye Clinic", "HOUSE^GREGORY", "ACC-998877")


# --------------------------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------------------------

def gradient_rgb(h: int = 64, w: int = 96) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), np.full_like(xx, 60)], axis=2).astype(np.uint8)


def encode(arr_or_im, fmt: str, **kw) -> bytes:
    im = arr_or_im if isinstance(arr_or_im, Image.Image) else Image.fromarray(arr_or_im)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png_bomb(side: int = 40_000) -> bytes:
    """A valid 1-bit greyscale PNG of side x side zero pixels (200 MB raw), zlib-streamed row block by row block."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    block = row * 500
    parts = [comp.compress(block) for _ in range(side // 500)]
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"".join(parts)) + png_chunk(b"IEND", b"")


def dicom_bytes(pixels: np.ndarray, *, modality: str = "OP", laterality: str | None = "L", phi: bool = True,
                photometric: str | None = None, frames: int | None = None, extra=None) -> bytes:
    """A DICOM file (explicit VR little endian) built with pydicom, optionally carrying patient data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.1" if modality == "OP" else "1.2.840.10008.5.1.4.1.1.77.1.5.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("scan.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    if phi:
        ds.PatientName = "DOE^JOHN"
        ds.PatientID = "PID-12345"
        ds.PatientBirthDate = "19450317"
        ds.InstitutionName = "St Elsewhere Eye Clinic"
        ds.ReferringPhysicianName = "HOUSE^GREGORY"
        ds.AccessionNumber = "ACC-998877"
        ds.StudyDate = "20240102"
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    if laterality:
        ds.ImageLaterality = laterality
    multi = frames is not None
    shape = pixels.shape[1:] if multi else pixels.shape
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    if multi:
        ds.NumberOfFrames = frames
    colour = len(shape) == 3
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric or ("RGB" if colour else "MONOCHROME2")
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.01, 0.012]
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def nifti_bytes(vol: np.ndarray, zooms=None, gz: bool = False) -> bytes:
    img = nib.Nifti1Image(vol, np.eye(4))
    if zooms:
        img.header.set_zooms(zooms)
    raw = img.to_bytes()
    return gzip.compress(raw) if gz else raw


def refuse(src, match: str | None = None, **kw) -> str:
    with pytest.raises(RetinaInputError) as info:
        read_image(src, **kw)
    msg = str(info.value)
    if match:
        assert match.lower() in msg.lower(), msg
    assert len(msg) > 20 and "Traceback" not in msg
    return msg


# --------------------------------------------------------------------------------------------------------------
# empty, renamed, truncated, unknown
# --------------------------------------------------------------------------------------------------------------

def test_empty_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    refuse(p, "empty")


def test_text_renamed_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("Patient seen today, see attached scan.\nNothing else to report.\n" * 5)
    msg = refuse(p, "not a supported image")
    assert "It looks like text." in msg and "Patient seen" not in msg


@pytest.mark.parametrize("blob, hint", [(b"%PDF-1.7\n" + bytes(300), "PDF"), (b"PK\x03\x04" + bytes(300), "ZIP"),
                                        (bytes(range(256)) * 3, "do not match")])
def test_other_unsupported_formats(blob, hint):
    refuse(blob, hint)


def test_missing_path_and_folder(tmp_path):
    refuse(tmp_path / "nope.png", "not found")
    refuse(tmp_path, "folder")


def test_truncated_jpeg():
    data = encode(gradient_rgb(128, 128), "JPEG", quality=90)
    refuse(data[: len(data) // 2], "incomplete")
    refuse(data[:-2], "incomplete")  # only the end-of-image marker missing


def test_truncation_refused_even_if_global_flag_is_set(monkeypatch):
    from PIL import ImageFile
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(gradient_rgb(128, 128), "JPEG", quality=90)
    refuse(data[: len(data) // 2], "incomplete")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for whoever set it
    assert read_image(data).pixels.shape == (128, 128, 3)


def test_one_bit_png():
    a = np.zeros((40, 40), bool)
    a[:, 20:] = True
    img = read_image(encode(Image.fromarray(a), "PNG"))
    assert img.grayscale and img.pixels[0, 0, 0] == 0 and img.pixels[0, 39, 0] == 255


def test_truncated_png():
    rng = np.random.default_rng(0)
    data = encode((rng.random((96, 96, 3)) * 255).astype(np.uint8), "PNG")
    refuse(data[: len(data) // 2], "incomplete")
    refuse(data[:-12], "incomplete")  # IEND chunk cut off
    refuse(data[:40], None)           # cut inside the header


def test_size_limit_checked_before_reading(tmp_path):
    data = encode(gradient_rgb(), "PNG")
    refuse(data, "limit", max_bytes=100)
    p = tmp_path / "a.png"
    p.write_bytes(data)
    refuse(p, "limit", max_bytes=100)

    class Upload(io.BytesIO):  # like Streamlit's UploadedFile: knows its size and name
        size, name = 10**12, "huge.png"

        def read(self, *a):
            raise AssertionError("read before the size check")

    refuse(Upload(data), "limit")


# --------------------------------------------------------------------------------------------------------------
# sizes: bomb, tiny, strips
# --------------------------------------------------------------------------------------------------------------

def test_png_decompression_bomb_refused_from_header():
    bomb = png_bomb()
    assert len(bomb) < 1_000_000  # a few hundred KB on disk, 1.6 G pixels declared
    refuse(bomb, "decompression bomb")


def test_pixel_limit_below_pillow_threshold():
    refuse(encode(np.zeros((300, 400), np.uint8), "PNG"), "too large", max_pixels=100_000)


@pytest.mark.parametrize("h, w, word", [(1, 1, "1x1"), (40, 10000, "strip"), (31, 200, "31")])
def test_degenerate_sizes(h, w, word):
    refuse(encode(np.zeros((h, w), np.uint8), "PNG"), word)


# --------------------------------------------------------------------------------------------------------------
# conversions: 16-bit, palette, RGBA, CMYK, EXIF, multi-frame
# --------------------------------------------------------------------------------------------------------------

def test_16bit_png_scaled_by_actual_range():
    a = np.linspace(1000, 5000, 64 * 64).reshape(64, 64).astype(np.uint16)  # 12-bit data in a 16-bit file
    img = read_image(encode(Image.fromarray(a), "PNG"))
    assert img.pixels.dtype == np.uint8 and img.pixels.shape == (64, 64, 3)
    assert img.grayscale and img.meta["bits"] == 16
    g = img.pixels[..., 0].astype(float)
    assert g.min() == 0 and g.max() == 255  # full range used: not clamped at 255, not divided by 256
    expected = (a - 1000.0) / 4000.0 * 255.0
    assert np.abs(g - expected).max() <= 1.0


def test_palette_image():
    rgb = gradient_rgb()
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    img = read_image(encode(pal, "PNG"))
    assert img.pixels.shape == (64, 96, 3) and not img.grayscale
    np.testing.assert_array_equal(img.pixels, np.asarray(pal.convert("RGB")))


def test_rgba_composited_on_black():
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, :32, 3] = 255
    rgba[:, 32:, 3] = 128
    img = read_image(encode(rgba, "PNG"))
    assert tuple(img.pixels[5, 5]) == (200, 100, 50)
    assert np.abs(img.pixels[5, 50].astype(int) - (100, 50, 25)).max() <= 1
    la = Image.fromarray(rgba[..., [0, 3]], mode="LA")
    img = read_image(encode(la, "PNG"))
    assert img.grayscale and img.pixels[5, 50, 0] in (100, 101)


def test_cmyk_jpeg_converted_to_rgb():
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # pure red in print colours
    img = read_image(encode(cmyk, "JPEG", quality=95))
    r, g, b = img.pixels[32, 32].astype(int)
    assert r > 220 and g < 40 and b < 40, (r, g, b)
    assert img.meta["photometric"] == "CMYK"


def test_exif_rotated_jpeg_is_turned_upright():
    a = np.zeros((40, 80, 3), np.uint8)  # stored: 80 wide, 40 tall; left half white
    a[:, :40] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img = read_image(encode(a, "JPEG", quality=95, exif=exif.tobytes()))
    assert img.pixels.shape == (80, 40, 3)  # displayed: 40 wide, 80 tall
    assert img.pixels[:35].mean() > 200 and img.pixels[45:].mean() < 50  # the left half is now on top
    assert img.meta["exif_orientation"] == 6 and (img.meta["width"], img.meta["height"]) == (40, 80)


def test_multiframe_tiff_frames_and_volume():
    frames = [Image.fromarray(np.full((48, 64), v, np.uint8)) for v in (10, 120, 250)]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    data = buf.getvalue()
    first = read_image(data)
    assert first.kind == "image" and first.pixels[0, 0, 0] == 10 and first.meta["frames"] == 3
    assert read_image(data, frame=2).pixels[0, 0, 0] == 250
    vol = read_image(data, frame=-1)
    assert vol.kind == "volume" and vol.pixels.shape == (3, 48, 64) and vol.pixels.dtype == np.float32
    np.testing.assert_allclose(vol.pixels[:, 0, 0], np.array([10, 120, 250]) / 255.0, atol=1e-6)
    refuse(data, "frame 5", frame=5)
    refuse(data, "too large", frame=-1, max_pixels=48 * 64 * 2)


def test_multiframe_gif_and_other_formats():
    frames = [Image.fromarray(np.full((40, 40), v, np.uint8)).convert("P") for v in (0, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert read_image(buf.getvalue(), frame=-1).pixels.shape == (2, 40, 40)
    for fmt in ("BMP", "WEBP", "TIFF"):
        img = read_image(encode(gradient_rgb(), fmt, **({"lossless": True} if fmt == "WEBP" else {})))
        assert img.source_format == fmt.lower() and img.pixels.shape == (64, 96, 3)
        np.testing.assert_array_equal(img.pixels, gradient_rgb())


def test_inputs_path_bytes_filelike_and_laterality(tmp_path):
    data = encode(gradient_rgb(), "PNG")
    p = tmp_path / "1234_left.png"
    p.write_bytes(data)
    a = read_image(p)
    b = read_image(data, name="scan_OD.png")
    up = io.BytesIO(data)
    up.name = "99-right.jpeg"
    c = read_image(up)
    assert read_image(up).content_hash == c.content_hash  # an already-read upload is read again from the start
    assert a.laterality == "OS" and b.laterality == "OD" and c.laterality == "OD"
    assert read_image(data).laterality is None
    assert a.content_hash == b.content_hash == c.content_hash and len(a.content_hash) == 64
    np.testing.assert_array_equal(a.pixels, c.pixels)
    assert isinstance(a, RetinalImage) and a.source_format == "png" and not a.grayscale


@pytest.mark.parametrize("name, want", [("12_left.jpg", "OS"), ("12_right.jpg", "OD"), ("OS_macula.png", "OS"),
                                        ("p3-od.tif", "OD"), ("photos.png", None), ("left_right.png", None),
                                        ("scan_L.png", "OS"), ("Lisa_R_x.png", None), (None, None)])
def test_laterality_from_name(name, want):
    assert laterality_from_name(name) == want


def test_renamed_extension_does_not_matter(tmp_path):
    p = tmp_path / "scan.dcm"  # really a JPEG
    p.write_bytes(encode(gradient_rgb(), "JPEG"))
    assert read_image(p).source_format == "jpeg"


def test_unexpected_internal_error_becomes_input_error(monkeypatch, caplog):
    import retina_core.io.decode as decode

    def boom(im):
        raise KeyError("internal detail")

    monkeypatch.setattr(decode, "_pil_to_rgb", boom)
    with caplog.at_level(logging.ERROR):
        msg = refuse(encode(gradient_rgb(), "PNG"), "could not be decoded")
    assert "internal detail" not in msg
    assert "KeyError" in caplog.text  # the traceback stays in the log


# --------------------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------------------

def test_dicom_with_patient_data_decodes_without_leaking(caplog):
    rgb = gradient_rgb(64, 80)
    data = dicom_bytes(rgb, modality="OP", laterality="L")
    assert b"DOE^JOHN" in data and b"PID-12345" in data
    with caplog.at_level(logging.DEBUG):
        img = read_image(data, name="upload.dcm")
        msgs = []
        for bad in (data[: len(data) - 500], data[:300]):
            with pytest.raises(RetinaInputError) as info:
                read_image(bad)
            msgs.append(str(info.value) + repr(info.value.__cause__) + repr(info.value.__context__))
    np.testing.assert_array_equal(img.pixels, rgb)
    assert img.source_format == "dicom" and img.modality_hint == "fundus" and img.laterality == "OS"
    assert img.spacing == (0.01, 0.012)
    haystack = " ".join([repr(img), str(img.meta), str(vars(img)), caplog.text, *msgs])
    for secret in PHI:
        assert secret not in haystack, secret
    assert set(img.meta) <= {"width", "height", "frames", "bits", "bits_allocated", "samples_per_pixel",
                             "photometric", "transfer_syntax", "modality", "frame", "header"}
    assert img.meta["header"] == {"format": "DICOM", "modality": "OP", "modality_name": "ophthalmic photography",
                                  "sop_class": "Ophthalmic Photography 8 Bit Image Storage", "ophthalmic": True,
                                  "reason": None}


def test_dicom_with_a_tiff_preamble_is_sniffed_as_dicom():
    """A DICOM preamble may hold a TIFF header (dual-format files, pydicom's CT_small.dcm): DICM at 128 wins."""
    data = dicom_bytes(np.zeros((64, 64), np.uint8) + 100, modality="US", phi=False)
    dual = b"II*\x00" + data[4:]
    assert sniff_format(dual) == "dicom"
    img = read_image(dual)
    assert img.source_format == "dicom" and img.meta["header"]["modality"] == "US"
    assert img.meta["header"]["ophthalmic"] is False


def test_truncated_dicom():
    data = dicom_bytes(np.zeros((64, 64), np.uint8) + 100, phi=False)
    refuse(data[: len(data) - 1000], "incomplete")
    refuse(data[:200], None)


def test_dicom_16bit_monochrome1_and_oct_volume():
    a = np.linspace(0, 4095, 48 * 64).reshape(48, 64).astype(np.uint16)
    img = read_image(dicom_bytes(a, modality="OPT", laterality="R", photometric="MONOCHROME1"))
    assert img.modality_hint == "oct" and img.laterality == "OD" and img.grayscale
    g = img.pixels[..., 0].astype(int)
    assert g[0, 0] == 255 and g[-1, -1] == 0  # MONOCHROME1: low values are bright; full range used

    vol = np.stack([np.full((40, 48), v, np.uint8) for v in (0, 100, 200, 255)])
    out = read_image(dicom_bytes(vol, modality="OPT", frames=4, extra={"SliceThickness": 0.047}))
    assert out.kind == "volume" and out.pixels.shape == (4, 40, 48) and out.spacing == (0.047, 0.01, 0.012)
    np.testing.assert_allclose(out.pixels[:, 0, 0], np.array([0, 100, 200, 255]) / 255, atol=1e-6)
    one = read_image(dicom_bytes(vol, modality="OPT", frames=4), frame=2)
    assert one.kind == "image" and one.pixels[0, 0, 0] == 200


def test_dicom_windowing_and_rescale():
    a = np.linspace(0, 1000, 40 * 40).reshape(40, 40).astype(np.uint16)
    img = read_image(dicom_bytes(a, phi=False, extra={"WindowCenter": 500, "WindowWidth": 200}))
    g = img.pixels[..., 0]
    assert g[a < 400].max() == 0 and g[a > 600].min() == 255


def test_dicom_header_limits_checked_before_pixels():
    data = dicom_bytes(np.zeros((64, 64), np.uint8), phi=False)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.Rows = 60000
    ds.Columns = 60000
    buf = io.BytesIO()
    ds.save_as(buf)
    refuse(buf.getvalue(), "too large")


def test_dicom_unsupported_compression_named():
    data = dicom_bytes(np.zeros((64, 64), np.uint8), phi=True)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    from pydicom.encaps import encapsulate
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(100) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf)
    msg = refuse(buf.getvalue(), "JPEG-LS compressed DICOM is not supported here")
    assert "DOE" not in msg


def test_dicom_compressed_jpeg_baseline_and_rle():
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, RLELossless
    rgb = gradient_rgb(64, 80)
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(rgb)))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit  # typical of ophthalmic photography exports
    ds.PixelData = encapsulate([encode(rgb, "JPEG", quality=95)])
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = "YBR_FULL_422"
    buf = io.BytesIO()
    ds.save_as(buf)
    img = read_image(buf.getvalue())
    assert img.meta["transfer_syntax"] == "JPEG baseline" and np.abs(img.pixels.astype(int) - rgb).mean() < 3
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(rgb)))
    ds.compress(RLELossless)
    buf = io.BytesIO()
    ds.save_as(buf)
    np.testing.assert_array_equal(read_image(buf.getvalue()).pixels, rgb)


def test_dicom_without_pixels():
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((64, 64), np.uint8))))
    del ds.PixelData
    del ds.Rows
    buf = io.BytesIO()
    ds.save_as(buf)
    refuse(buf.getvalue(), "no image")


# --------------------------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------------------------

def test_nifti_roundtrip_axes_spacing_and_gzip():
    rng = np.random.default_rng(1)
    vol = rng.random((6, 40, 50)).astype(np.float32)
    for gz in (False, True):
        img = read_image(nifti_bytes(vol, zooms=(0.047, 0.0039, 0.0115), gz=gz))
        assert img.kind == "volume" and img.source_format == "nifti" and img.pixels.shape == (6, 40, 50)
        assert img.pixels.dtype == np.float32 and 0 <= img.pixels.min() and img.pixels.max() <= 1
        assert np.corrcoef(img.pixels.ravel(), vol.ravel())[0, 1] > 0.99
        np.testing.assert_allclose(img.spacing, (0.047, 0.0039, 0.0115), rtol=1e-5)
    assert read_image(nifti_bytes(vol), frame=3).pixels.shape == (40, 50, 3)
    four_d = read_image(nifti_bytes(vol[..., None]))  # 4-D with a last dimension of 1 is a 3-D volume
    assert four_d.pixels.shape == (6, 40, 50)


def test_nifti_absurd_dimensions():
    raw = bytearray(nifti_bytes(np.zeros((4, 40, 40), np.int16)))
    raw[40:56] = struct.pack("<8h", 3, 30000, 30000, 30000, 1, 1, 1, 1)
    refuse(bytes(raw), "too large")
    raw[40:56] = struct.pack("<8h", 3, -5, 40, 40, 1, 1, 1, 1)
    refuse(bytes(raw), "damaged")
    raw[40:56] = struct.pack("<8h", 3, 400, 40, 40, 1, 1, 1, 1)  # plausible dims, data missing
    refuse(bytes(raw), "incomplete")
    refuse(gzip.compress(bytes(raw)), "incomplete")


def test_nifti_nan_inf_repaired_or_refused():
    vol = np.random.default_rng(2).random((4, 40, 40)).astype(np.float32) + 1.0
    few = vol.copy()
    few[0, 0, :5] = np.nan
    few[1, 1, :3] = np.inf
    few[2, 2, :2] = -np.inf
    img = read_image(nifti_bytes(few))
    assert np.isfinite(img.pixels).all() and img.meta["nonfinite_replaced"] == 10
    assert img.pixels[0, 0, :5].max() == 0.0 and img.pixels[1, 1, :3].min() == 1.0
    many = vol.copy()
    many[0, :5] = np.nan  # 200 of 6400 voxels = 3%
    refuse(nifti_bytes(many), "NaN")


@pytest.mark.parametrize("shape, word", [((64, 64), "2-D"), ((4, 40, 40, 2, 3), "5-D"), ((4, 40, 40, 3), "4-D")])
def test_nifti_wrong_dimensionality(shape, word):
    refuse(nifti_bytes(np.zeros(shape, np.float32)), word)


def test_nifti_bad_voxel_type_and_gzip_not_nifti():
    rgb = np.zeros((4, 40, 40), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    refuse(nifti_bytes(rgb), "colour")
    refuse(gzip.compress(b"hello world, not a volume" * 40), "not a NIfTI")


# --------------------------------------------------------------------------------------------------------------
# fuzz: only RetinaInputError may escape
# --------------------------------------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SEEDS = {
    "png": encode(gradient_rgb(40, 48), "PNG"),
    "jpeg": encode(gradient_rgb(40, 48), "JPEG", quality=80),
    "dicom": dicom_bytes(gradient_rgb(40, 48)[..., 0], phi=True),
    "nifti": nifti_bytes(np.random.default_rng(3).random((3, 40, 40)).astype(np.float32)),
}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(_SEEDS)),
       edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_fuzz_mutated_files_only_raise_input_errors(kind, edits, cut):
    data = bytearray(_SEEDS[kind])
    # bias edits towards the header, where the interesting fields are
    for pos, val in edits:
        data[pos % min(len(data), 400 if pos % 2 else len(data))] = val
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    try:
        img = read_image(bytes(data), max_pixels=4_000_000)
    except RetinaInputError as exc:
        for secret in PHI:
            assert secret not in str(exc)
        return
    assert isinstance(img, RetinalImage)
    if img.kind == "image":
        assert img.pixels.dtype == np.uint8 and img.pixels.ndim == 3 and img.pixels.shape[2] == 3
    else:
        assert img.pixels.dtype == np.float32 and img.pixels.ndim == 3
        assert np.isfinite(img.pixels).all() and img.pixels.min() >= 0 and img.pixels.max() <= 1
    assert "DOE" not in repr(img)


# --------------------------------------------------------------------------------------------------------------
# fuzz: NIfTI (.nii, .nii.gz) and multi-frame DICOM volumes; only RetinaInputError, and memory stays bounded
# --------------------------------------------------------------------------------------------------------------

_VOLUME_SEEDS = {
    "nifti-gz": nifti_bytes(np.random.default_rng(4).random((3, 40, 40)).astype(np.float32),
                            zooms=(0.1, 0.01, 0.01), gz=True),
    "nifti-int16": nifti_bytes((np.random.default_rng(5).random((4, 40, 48)) * 1000).astype(np.int16)),
    "dicom-multiframe": dicom_bytes(np.stack([gradient_rgb(40, 48)[..., 0]] * 3), modality="OPT", frames=3,
                                    extra={"SliceThickness": 0.05}),
    "dicom-multiframe-16bit": dicom_bytes(np.linspace(0, 4095, 3 * 40 * 48).reshape(3, 40, 48).astype(np.uint16),
                                          modality="OPT", frames=3),
}
VOLUME_FUZZ_PEAK_BYTES = 48 * 2**20  # a few float copies of the 2-megapixel bound below; a bomb would take far more


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(_VOLUME_SEEDS)),
       edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_fuzz_volume_files_only_raise_input_errors_within_memory(kind, edits, cut):
    from retina_core.testing import mutated, read_within_memory

    # edits biased towards the headers (NIfTI: 348 bytes; DICOM: meta and dataset elements)
    img, peak = read_within_memory(mutated(_VOLUME_SEEDS[kind], edits, cut, 700), 2_000_000, PHI)
    assert peak < VOLUME_FUZZ_PEAK_BYTES, peak
    if img is not None:
        assert isinstance(img, RetinalImage) and np.isfinite(img.pixels.astype(np.float32)).all()
        if img.kind == "volume":
            assert img.pixels.dtype == np.float32 and img.pixels.min() >= 0 and img.pixels.max() <= 1
        assert "DOE" not in repr(img)


def test_grey_to_rgb_copies_the_channel_three_times():
    from retina_core.io.image import grey_to_rgb
    g = np.arange(7 * 5, dtype=np.uint8).reshape(7, 5)
    out = grey_to_rgb(g)
    assert out.shape == (7, 5, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert np.array_equal(out, np.repeat(g[..., None], 3, axis=2))
    assert np.array_equal(grey_to_rgb(g[:, ::2]), np.repeat(g[:, ::2, None], 3, axis=2))   # a strided view
    assert grey_to_rgb(np.zeros((0, 4), np.uint8)).shape == (0, 4, 3)


def test_a_grey_source_is_marked_single_channel_and_preprocessed_from_one_channel_alike(tmp_path):
    """A grey PNG's three channels are copies of one (meta single_channel); preprocessing one channel gives
    exactly the tensor preprocessing three gives. A colour PNG is not marked."""
    import torch
    from PIL import Image

    from retina_core.io.decode import read_image
    from retina_core.models.loading import preprocess_image
    from retina_core.models.registry import get_cfg

    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (150, 350), dtype=np.uint8)).save(buf, format="PNG")
    img = read_image(buf.getvalue())
    assert img.meta.get("single_channel") is True
    cfg = get_cfg("oct_dme_resnet18")
    assert torch.equal(preprocess_image(img.pixels, cfg, grey=True), preprocess_image(img.pixels, cfg))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(buf, format="PNG")
    assert not read_image(buf.getvalue()).meta.get("single_channel")
