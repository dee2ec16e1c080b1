"""Real-size photographs: decoded at the scale the models and the screen need, analysed, and kept small."""
import io

import numpy as np
import pytest
from PIL import Image

from retina_core.bench import kept_bytes
from retina_core.io.decode import SCREEN_SIDE, read_image


def _jpeg(h: int, w: int, seed: int = 0, exif_rotate: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = np.zeros((h, w, 3), np.uint8)
    field = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (0.45 * h) ** 2
    img[field] = (160, 80, 30)
    img = np.clip(img.astype(int) + rng.integers(-8, 8, img.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(img)
    buf = io.BytesIO()
    if exif_rotate:
        exif = Image.Exif()
        exif[0x0112] = 6                                  # rotate 90 degrees on display
        im.save(buf, format="JPEG", quality=90, exif=exif)
    else:
        im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_large_jpeg_decoded_at_reduced_scale_same_hash_and_header():
    data = _jpeg(2400, 3600)
    full, small = read_image(data), read_image(data, max_side=SCREEN_SIDE)
    assert full.pixels.shape == (2400, 3600, 3)
    assert max(small.pixels.shape[:2]) == SCREEN_SIDE and small.pixels.shape[0] == round(2400 * SCREEN_SIDE / 3600)
    assert small.content_hash == full.content_hash
    assert (small.meta["width"], small.meta["height"]) == (3600, 2400)       # the file's size, as before
    assert small.meta["decoded_scale"] == pytest.approx(SCREEN_SIDE / 3600, rel=0.01)
    # the same picture: the reduced decode matches the full one brought down to the same size
    import cv2
    ref = cv2.resize(full.pixels, small.pixels.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(ref.astype(int) - small.pixels.astype(int)).mean() < 4


def test_small_images_and_volumes_untouched_exif_turn_kept():
    data = _jpeg(600, 800)
    assert read_image(data, max_side=SCREEN_SIDE).pixels.shape == (600, 800, 3)
    turned = read_image(_jpeg(1600, 2400, exif_rotate=True), max_side=SCREEN_SIDE)
    assert turned.pixels.shape[:2] == (SCREEN_SIDE, round(1600 * SCREEN_SIDE / 2400))   # portrait after the turn
    assert (turned.meta["width"], turned.meta["height"]) == (1600, 2400)
    png = io.BytesIO()
    Image.fromarray(np.full((1500, 3000), 90, np.uint8)).save(png, format="PNG")
    img = read_image(png.getvalue(), max_side=SCREEN_SIDE)
    assert img.pixels.shape == (512, 1024, 3) and img.meta["decoded_scale"] == pytest.approx(1024 / 3000, rel=0.01)


def test_truncated_large_jpeg_still_refused():
    from retina_core.errors import RetinaInputError

    data = _jpeg(2400, 3600)
    with pytest.raises(RetinaInputError, match="incomplete|damaged"):
        read_image(data[: len(data) // 2], max_side=SCREEN_SIDE)


def test_analysis_of_a_12_megapixel_photograph_keeps_little(tmp_path):
    """analyze(bytes) of a 4288 x 2848 photograph: a result, a heatmap the size of the image shown, and at most
    8 MB of arrays kept (the full-size image alone is 35 MB)."""
    from retina_core.analysis import analyze
    from retina_core.bench import _real_size_inputs

    data = _real_size_inputs(tmp_path)["fundus"][0].read_bytes()
    a = analyze(data)
    assert a.has_result and a.image.shape[:2] == a.heatmap.shape and max(a.image.shape[:2]) <= SCREEN_SIDE
    assert kept_bytes(a) <= 8 * 2**20


def test_the_least_decode_of_the_bench_floor_covers_the_model_input(tmp_path, monkeypatch):
    """bench's floor decodes a 12-MP JPEG at the smallest DCT scale still covering the model's input: 1/8 here
    (536 x 356 >= 160 x 160), never smaller."""
    from PIL import ImageFile

    from retina_core import bench

    data = bench._real_size_inputs(tmp_path)["fundus"][0].read_bytes()
    seen = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: (seen.append(im.size), real_load(im))[1])
    bench._least_decode(data, (160, 160))
    bench._least_decode(data, (700, 1000))          # (h, w): 1/4 covers it, 1/8 would not
    assert seen == [(536, 356), (1072, 712)]


def test_a_reading_keeps_its_map_at_model_resolution_and_places_it_when_read(tmp_path):
    """The heatmap an Analysis keeps is the model's map (a few KB); reading `heatmap` places it on the image exactly
    as `explain_batch` does, so what is drawn is unchanged while a held or pickled result stays small."""
    import pickle

    from retina_core.analysis import analyze, get_model
    from retina_core.bench import _real_size_inputs
    from retina_core.explain.attribution import explain_batch

    data = _real_size_inputs(tmp_path)["fundus"][0].read_bytes()
    a = analyze(data)
    kept = a.heatmap_at_model
    assert kept is not None and kept.raw.nbytes < 2**16 and kept.shape == a.image.shape[:2]
    placed = explain_batch(get_model(a.model), a.image[None], a.method)[0][0]
    assert np.array_equal(a.heatmap, placed) and a.heatmap.dtype == np.float32
    assert kept_bytes(a) < a.image.nbytes + 2**16                # the image and the small map, nothing placed
    assert len(pickle.dumps(a)) < a.image.nbytes + 2**17
    assert np.array_equal(pickle.loads(pickle.dumps(a)).heatmap, placed)
    assert a.heatmap_empty is False and not any("empty" in n for n in a.notes)


@pytest.mark.parametrize("framed", [False, True])
def test_model_map_emptiness_decided_small_matches_the_placed_map(framed):
    """`ModelMap.is_empty` (mostly decided at the map's own size) says exactly whether the placed map is all zero:
    zero, constant and negative maps, and maps whose only rise lies on the rim of a framed model's round field."""
    from retina_core.explain.attribution import ModelMap
    from retina_core.models.framing import FieldBox

    rng = np.random.default_rng(3)
    box = FieldBox(40.0, -10.0, 300.0, 300.0) if framed else None
    cases = [np.zeros((5, 5)), np.full((5, 5), 0.7), -np.ones((7, 7)), rng.random((5, 5)), rng.random((160, 160))]
    for _ in range(40):                                     # a single raised pixel anywhere, rim included
        m = np.zeros((6, 6))
        m[rng.integers(0, 6), rng.integers(0, 6)] = rng.random() + 0.1
        cases.append(m)
    for raw in cases:
        mm = ModelMap(raw.astype(np.float32), box, (280, 400))
        placed = mm.to_image()
        assert placed.shape == (280, 400) and placed.dtype == np.float32
        assert mm.is_empty() == (not placed.max() > 0), raw
