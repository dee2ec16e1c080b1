"""Single-pass Grad-CAM equals pytorch-grad-cam's GradCAM; heatmaps are shaped and scaled as documented."""
import numpy as np
import pytest
import torch

from retina_core.explain.cam import cam_with_library, gradcam_single_pass, normalise_map
from retina_core.attention_zones import paste_layer
from retina_core.explain.overlay import heatmap_to_rgb, overlay, strongest_region
from retina_core.models import create_model


def frozen_net(name: str, seed: int, size: int = 96):
    """A random-init registry network in eval mode whose parameters need no gradient (as `load_model` leaves it)."""
    torch.manual_seed(seed)
    net = create_model(name, input_size=(3, size, size)).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@pytest.mark.parametrize("name", ["oct_resnet18", "fundus_dr_effnet_b0"])
def test_single_pass_gradcam_equals_pytorch_grad_cam(name):
    net = frozen_net(name, 0)
    x = torch.randn(2, 3, 96, 96)
    logits, cams = gradcam_single_pass(net, x, net.cfg.target_layer, targets=[1, 2])
    with torch.no_grad():
        assert torch.allclose(logits, net(x), atol=1e-5)   # the same forward gives the prediction
    ours = np.stack([normalise_map(c, (96, 96)) for c in cams])
    ref = cam_with_library(net, x, net.cfg.target_layer, "gradcam-reference", [1, 2])
    assert ours.shape == ref.shape == (2, 96, 96)
    assert np.abs(ours - ref).max() < 1e-4
    assert all(not p.requires_grad for p in net.parameters())   # the library call restores the flags


def test_single_pass_needs_no_parameter_gradients():
    net = create_model("oct_resnet18", input_size=(3, 64, 64)).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    _, cams = gradcam_single_pass(net, torch.randn(1, 3, 64, 64), "net.layer4")
    assert all(p.grad is None for p in net.parameters())
    assert cams.shape == (1, 2, 2) and (cams >= 0).all()


def test_normalise_map_range_and_size():
    m = normalise_map(np.array([[0.0, 1.0], [2.0, 4.0]]), (30, 40))
    assert m.shape == (30, 40) and m.dtype == np.float32
    assert m.min() == 0.0 and 0.999 < m.max() <= 1.0
    assert np.all(normalise_map(np.zeros((3, 3)), (5, 5)) == 0)


def test_overlay_and_strongest_region_follow_the_peak():
    img = np.zeros((100, 200, 3), np.uint8)
    hm = np.zeros((100, 200), np.float32)
    hm[70:80, 150:160] = 1.0
    x0, y0, x1, y1 = strongest_region(hm)
    assert x0 <= 155 <= x1 and y0 <= 75 <= y1
    assert overlay(img, hm, 0.0).max() == 0 and overlay(img, hm, 1.0)[75, 155, 0] > 100
    with pytest.raises(ValueError):
        overlay(img, hm[:50], 0.5)


def test_overlay_table_blend_gives_the_bytes_of_the_float_formula():
    rng = np.random.default_rng(0)
    for alpha in [*np.arange(0, 1.0001, 0.05), 0.45, 0.123, -0.2, 1.3]:      # every slider step, odd values
        h, w = rng.integers(1, 120, 2)
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        hm = (rng.random((h, w)) * 1.4 - 0.2).astype(np.float32)
        a = float(np.clip(alpha, 0, 1))
        formula = (1 - a) * img.astype(np.float32) + a * heatmap_to_rgb(hm).astype(np.float32)
        assert np.array_equal(overlay(img, hm, alpha), np.uint8(np.clip(formula + 0.5, 0, 255)))
    layer = np.where(rng.random((50, 60, 1)) < 0.1, rng.integers(0, 256, (50, 60, 3), dtype=np.uint8), 0)
    layer[0, 0] = (1, 0, 0)
    img = rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)
    mask = layer.any(axis=2)
    assert np.array_equal(paste_layer(img, layer), np.where(mask[..., None], layer, img))


@pytest.mark.parametrize("name", ["oct_resnet18", "fundus_dr_effnet_b0"])
def test_multiscale_gradcam_is_the_geometric_mean_of_single_stage_gradcams(name):
    import torch.nn.functional as F

    from retina_core.explain.cam import multiscale_gradcam_single_pass

    net = frozen_net(name, 1)
    x = torch.randn(2, 3, 96, 96)
    layers = [net.cfg.target_layer, net.cfg.fine_layer]
    logits, fused = multiscale_gradcam_single_pass(net, x, layers, targets=[0, 1])
    with torch.no_grad():
        assert torch.allclose(logits, net(x), atol=1e-5)
    _, deep = gradcam_single_pass(net, x, layers[0], targets=[0, 1])
    _, fine = gradcam_single_pass(net, x, layers[1], targets=[0, 1])
    assert fused.shape == fine.shape and fine.shape[1] == 2 * deep.shape[1]   # the finer stage's grid

    def scale(c):
        c = torch.from_numpy(c)
        lo, hi = c.flatten(1).min(1).values[:, None, None], c.flatten(1).max(1).values[:, None, None]
        return (c - lo) / (hi - lo + 1e-7)

    up = F.interpolate(scale(deep)[:, None], size=fine.shape[1:], mode="bilinear", align_corners=False)[:, 0]
    expect = (up.clamp_min(0) * scale(fine)).sqrt().numpy()
    assert np.abs(fused - expect).max() < 1e-5
    assert all(p.grad is None for p in net.parameters())
