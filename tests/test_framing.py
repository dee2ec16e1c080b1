"""Fundus framing (models.framing): the field of view, centred and letterboxed, the same in training, inference and
heatmaps, whatever the camera's frame."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from retina_core.models.framing import fov_box, frame_pixels, frame_tensor, map_to_image, uses_fov
from retina_core.models.loading import preprocess_image
from retina_core.models.registry import get_cfg


def _field(h: int, w: int, r: float, cx: float | None = None, cy: float | None = None) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    cx = w / 2 if cx is None else cx
    cy = h / 2 if cy is None else cy
    img = np.zeros((h, w, 3), np.uint8)
    img[(xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 < r * r] = (170, 80, 30)
    return img


def test_box_holds_the_field_whatever_the_frame():
    # a wide frame that cuts the round field at top and bottom (IDRiD-like) and one with black margins
    cut = fov_box(_field(300, 450, 170), (224, 224))
    assert cut.w == cut.h and abs(cut.w - 340) <= 2 and cut.y0 < 0          # letterboxed above and below
    margin = fov_box(_field(400, 600, 150, cx=250), (224, 224))
    assert abs(margin.w - 300) <= 2 and abs(margin.x0 - 100) <= 2 and abs(margin.y0 - 50) <= 2
    # no dark border at all: the whole frame, letterboxed to the input's aspect
    full = fov_box(np.full((100, 200, 3), 120, np.uint8), (64, 64))
    assert (full.x0, full.w, full.h) == (0.0, 200.0, 200.0) and full.y0 == -50.0


def test_same_retina_same_input_in_any_frame():
    """One field photographed in two frames gives (nearly) the same model input: the camera's framing is gone."""
    a, _ = frame_pixels(_field(300, 450, 140), (96, 96))
    b, _ = frame_pixels(_field(500, 380, 140, cx=200, cy=260), (96, 96))
    inside = (a[..., 0] > 20) | (b[..., 0] > 20)
    assert np.mean(np.abs(a[..., 0].astype(int) - b[..., 0].astype(int))[inside] > 40) < 0.03
    assert 0.7 < (a[..., 0] > 20).mean() < 0.82                                  # a round field filling the box


def test_map_returns_to_the_place_it_came_from():
    img = _field(300, 450, 170)
    box = fov_box(img, (224, 224))
    cam = np.zeros((28, 28), np.float32)
    u, v = (320 - box.x0) / box.w * 28, (110 - box.y0) / box.h * 28             # image point (x 320, y 110)
    cam[int(v), int(u)] = 1.0
    hm = map_to_image(cam, box, img.shape[:2])
    y, x = np.unravel_index(hm.argmax(), hm.shape)
    assert hm.shape == (300, 450) and abs(x - 320) <= box.w / 28 and abs(y - 110) <= box.h / 28
    assert hm.max() == pytest.approx(1.0, abs=1e-4) and hm.min() >= 0


def test_masks_framed_like_their_image_and_tiny_lesions_survive():
    img = _field(600, 900, 340)
    mask = np.zeros((600, 900), np.float32)
    mask[300, 500] = 1                                                           # one-pixel microaneurysm
    box = fov_box(img, (64, 64))
    m = frame_tensor(torch.from_numpy(mask)[None], box, (64, 64), mode="max")[0]
    assert m.sum() >= 1
    y, x = (int(i) for i in torch.nonzero(m)[0])
    assert abs((x + 0.5) / 64 * box.w + box.x0 - 500) <= box.w / 64 and abs((y + 0.5) / 64 * box.h + box.y0 - 300) <= box.h / 64


def test_preprocess_follows_the_cfg_framing():
    cfg = get_cfg("fundus_resnet18_head")
    assert cfg.framing == "stretch" and not uses_fov(cfg)
    fov = replace(cfg, framing="fov", input_size=(3, 64, 64))
    assert uses_fov(fov) and not uses_fov(replace(get_cfg("oct_resnet18"), framing="fov"))
    img = _field(300, 450, 170)
    x = preprocess_image(img, fov)
    ref, _ = frame_pixels(img, (64, 64))
    mean, std = torch.tensor(fov.mean).view(3, 1, 1), torch.tensor(fov.std).view(3, 1, 1)
    back = (x[0] * std + mean) * 255
    assert x.shape == (1, 3, 64, 64)
    assert np.abs(back.permute(1, 2, 0).numpy() - ref.astype(np.float32)).max() <= 1.0
    # stretched: the round field becomes an oval touching the top and bottom rows
    s = preprocess_image(img, replace(cfg, input_size=(3, 64, 64)))
    assert (s[0, 0, 0] > -1.5).any() and not (x[0, 0, 0] > -1.5).any()


def test_explain_batch_maps_back_onto_the_photograph(tmp_path):
    """A fov-framed network explained on a wide frame gives a map the size of the photograph, zero outside the box."""
    from retina_core.explain.attribution import explain_batch
    from retina_core.models.registry import create_model

    net = create_model("fundus_resnet18_head", input_size=(3, 64, 64), framing="fov").eval()
    img = _field(120, 240, 50, cx=150)
    maps, probs, _ = explain_batch(net, img[None], "gradcam")
    box = fov_box(img, (64, 64))
    assert maps.shape == (1, 120, 240) and probs.shape[1] == 4
    assert maps[0, :, : int(box.x0) - 2].max() == 0 and maps[0, :, int(box.x0 + box.w) + 2:].max() == 0


def test_square_crop_and_round_field_give_the_same_outline():
    """A camera that crops the retina to a square (no black corners) and one that leaves a round field on black give
    inputs with the same round outline: the field's outline cannot stand in for the camera."""
    square, _ = frame_pixels(np.full((300, 300, 3), 150, np.uint8), (64, 64))
    disc, _ = frame_pixels(_field(300, 300, 150), (64, 64))
    assert square[0, 0].max() == 0 and square[32, 32].min() == 150
    assert np.mean((square[..., 0] > 20) != (disc[..., 0] > 20)) < 0.02


def test_maps_are_drawn_only_on_the_round_field_the_model_saw():
    from retina_core.models.framing import FieldBox, map_to_image

    cam = np.random.default_rng(0).random((10, 10)).astype(np.float32) + 0.5   # heat everywhere, corners too
    box = FieldBox(0.0, 0.0, 200.0, 200.0)                                     # a square crop filling the frame
    hm = map_to_image(cam, box, (200, 200))
    assert hm[100, 100] > 0 and hm[:, 100].max() > 0
    assert hm[0, 0] == hm[0, 199] == hm[199, 0] == hm[199, 199] == 0.0          # the black corners get no heat
    assert hm[5, 100] >= 0 and (map_to_image(cam, box, (200, 200), round_mask=False)[0, 0] > 0)


def test_contrast_framing_keeps_local_detail_and_drops_the_camera_cast(tmp_path):
    """framing "fov_contrast": the framed field minus its blurred self, so a brighter or tinted exposure of the same
    retina gives the same input; training caches exactly what preprocess_image serves."""
    from retina_core.io.datasets import Record
    from retina_core.models.framing import local_contrast, uses_contrast
    from retina_core.train.engine import CachedImages

    img = _field(300, 450, 170)
    img[60:75, 150:165] = (230, 210, 120)                         # a bright lesion-like spot
    cfg = replace(get_cfg("fundus_resnet18_head"), framing="fov_contrast", input_size=(3, 96, 96))
    assert uses_fov(cfg) and uses_contrast(cfg) and not uses_contrast(replace(cfg, framing="fov"))
    x = preprocess_image(img, cfg)
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    back = ((x[0] * std + mean) * 255).round()
    assert back[:, 0, 0].tolist() == [128.0] * 3 and back[:, 48, 48].sub(128).abs().max() <= 2   # flat: neutral
    assert back[:, 15:40, 20:40].max() > 200                      # the spot stands out
    cast = np.clip(img.astype(int) + np.array([12, 6, 0]) * (img.sum(-1, keepdims=True) > 0), 0, 255).astype(np.uint8)
    y = preprocess_image(cast, cfg)
    inner = torch.zeros(96, 96, dtype=torch.bool)
    inner[20:76, 20:76] = True
    assert (x - y)[0][:, inner].abs().max() < 0.05               # a colour cast leaves the inside unchanged
    framed, _ = frame_pixels(img, (96, 96))
    ref = local_contrast(torch.tensor(framed).permute(2, 0, 1).float()).round()
    assert (back - ref).abs().max() <= 1.0
    from PIL import Image
    Image.fromarray(img).save(tmp_path / "a.png")
    cached = CachedImages([Record(tmp_path / "a.png", "normal")], ("normal",), cfg, augment=False)
    assert (cached.images[0].float() - back).abs().max() <= 1.0


def test_fov_box_reads_the_channels_maximum():
    """The element-wise channel maximum gives the box numpy's axis=2 maximum gives (one bright channel counts)."""
    rng = np.random.default_rng(0)
    px = np.zeros((300, 400, 3), np.uint8)
    px[40:260, 90:310, 2] = 200          # a field bright in blue only
    px[..., :2] = rng.integers(0, 15, (300, 400, 2))
    box = fov_box(px, (160, 160))
    assert abs(box.w - 220) <= 2 and abs(box.x0 - 90) <= 2 and abs(box.y0 - 40) <= 2


def test_disc_framing_cuts_three_disc_diameters_around_the_disc_everywhere(tmp_path):
    """framing "disc": a square of DISC_VIEW_RADII disc radii centred on the optic disc the landmark finder sees;
    training caches, inference serves and heatmaps return through the same box."""
    from PIL import Image

    from retina_core.io.datasets import Record
    from retina_core.models.framing import DISC_VIEW_RADII, frame_box
    from retina_core.phantoms import fundus_phantom
    from retina_core.train.engine import CachedImages, resolve_framing

    ph = fundus_phantom("normal", 3, 256)
    px = np.asarray(ph.image)
    (dx, dy), r = ph.meta["disc_xy"], ph.meta["disc_radius"]
    box = frame_box(px, (64, 64), "disc")
    assert abs(box.x0 + box.w / 2 - dx) < r and abs(box.y0 + box.h / 2 - dy) < r        # centred on the disc
    assert box.w == box.h and 0.6 * DISC_VIEW_RADII * r < box.w < 1.4 * DISC_VIEW_RADII * r
    assert frame_box(px, (64, 64), "fov") == fov_box(px, (64, 64))
    cfg = get_cfg("fundus_disc_resnet18_head")
    assert cfg.framing == "disc" and uses_fov(cfg) and resolve_framing("auto", cfg.modality, cfg.framing) == "disc"
    cfg = replace(cfg, input_size=(3, 64, 64))
    x = preprocess_image(px, cfg)
    ref = preprocess_image(px, cfg, boxes=[box])
    assert x.shape == (1, 3, 64, 64) and torch.equal(x, ref)
    Image.fromarray(px).save(tmp_path / "a.png")
    cached = CachedImages([Record(tmp_path / "a.png", "normal")], ("normal",), cfg, augment=False)
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    assert (cached.images[0].float() - ((x[0] * std + mean) * 255).round()).abs().max() <= 1.0
    cam = np.zeros((8, 8), np.float32)
    cam[4, 4] = 1.0                                                                     # the view's centre
    hm = map_to_image(cam, box, px.shape[:2])
    y, xx = np.unravel_index(hm.argmax(), hm.shape)
    assert np.hypot(xx - dx, y - dy) < 1.5 * r
    right, below = int(np.ceil(box.x0 + box.w)) + 1, int(np.ceil(box.y0 + box.h)) + 1
    assert hm[:, right:].max(initial=0) == 0 and hm[below:].max(initial=0) == 0          # nothing outside the view
