"""Every explanation method on the OCT volume model, and one map per input of the fundus + OCT fusion model, through
the one interface `retina_core.explain`: shapes and ranges at the volume's own size, the 3-D Score-CAM against a
hand computation, IG's completeness, the target, a lesion found and a randomised model's map changed with the
bundled volume weights, clear errors."""
import numpy as np
import pytest
import torch
from torch import nn

import retina_core as rc
from retina_core.errors import RetinaInputError
from retina_core.audit import trust
from retina_core.explain.volume_methods import VOLUME_METHODS, SignedLogit, _ig_volume, _library_cam
from retina_core.models import create_model, get_cfg

VOLUME = "oct_volume_fusion3d_tiny"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cnv_volume():
    from retina_core.phantoms import oct_volume

    return oct_volume("CNV", seed=11, n_slices=32, height=128, width=128)


def test_every_volume_method_gives_one_map_per_bscan_at_the_volume_size(tiny_volume_net):
    from retina_core.phantoms import oct_volume

    ph = oct_volume("DME", seed=4, n_slices=20, height=40, width=36)     # not the model's input size
    assert set(rc.explain.available_methods(tiny_volume_net)) == set(VOLUME_METHODS)
    maps = {}
    for meth in VOLUME_METHODS:
        hm = rc.explain(tiny_volume_net, ph.image, meth, meta={"age": 70, "hba1c": 8.5}, eye="OD")
        assert hm.shape == (20, 40, 36) and hm.dtype == np.float32, meth
        assert np.isfinite(hm).all() and hm.min() >= 0 and hm.max() <= 1, meth
        maps[meth] = hm
    # the library's Grad-CAM and ours are the same method on the same layer
    assert np.allclose(maps["gradcam"], maps["gradcam-reference"], atol=1e-4)
    # uint8 volumes are read as intensities / 255; a 2-D image is refused with a clear message
    as_u8 = np.round(ph.image * 255).astype(np.uint8)
    again = rc.explain(tiny_volume_net, as_u8, "gradcam", meta={"age": 70, "hba1c": 8.5}, eye="OD")
    assert trust.spearman(again, maps["gradcam"]) > 0.9        # 1/255 quantisation only
    with pytest.raises(RetinaInputError, match="Expected an OCT volume"):
        rc.explain(tiny_volume_net, ph.image[0], "gradcam")
    with pytest.raises(RetinaInputError, match="Unknown method 'vit_relevance'"):
        rc.explain(tiny_volume_net, ph.image, "vit_relevance")
    with pytest.raises(RetinaInputError, match="Unknown target"):
        rc.explain(tiny_volume_net, ph.image, "gradcam", target="CNV")


def test_normal_target_explains_the_negated_logit(tiny_volume_net):
    from retina_core.explain.volume_methods import volume_attribution

    x = torch.randn(1, 1, 16, 32, 32)
    meta = torch.zeros(1, 6)
    _, dis = volume_attribution(tiny_volume_net, x, meta, "hirescam")
    _, nor = volume_attribution(tiny_volume_net, x, meta, "hirescam", target="normal")
    # HiResCAM is relu(sum_c grad * A): the two targets' raw maps have opposite signs, so where one is
    # positive the other is zero -- they cannot both be high at the same voxel
    assert not np.allclose(dis, nor)
    assert float(np.mean(np.minimum(dis, nor))) < 0.5 * min(float(dis.mean()), float(nor.mean())) + 1e-6


class _TinyConv3d(nn.Module):
    """conv (2 channels, stride 1) -> relu -> mean -> linear: Score-CAM weights can be written by hand."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(2, 1)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3, 4)))


def test_score_cam_3d_matches_a_hand_computation():
    net = _TinyConv3d().eval()
    x = torch.rand(1, 1, 4, 6, 6)
    got = _library_cam(net, x, net.act, "scorecam")[0]
    got = (got - got.min()) / (got.max() - got.min() + 1e-7)
    with torch.no_grad():
        a = net.act(net.conv(x))[0]                                        # [2, 4, 6, 6], at the input size
        norm = [(c - c.min()) / (c.max() - c.min() + 1e-8) for c in a]
        scores = torch.tensor([float(net(x * n[None, None])) for n in norm])
        w = torch.softmax(scores, 0)
        cam = torch.relu((w[:, None, None, None] * a).sum(0)).numpy()
    cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-7)
    assert got.shape == (4, 6, 6)
    assert np.allclose(got, cam, atol=1e-4)


def test_volume_integrated_gradients_are_complete(tiny_volume_net):
    torch.manual_seed(2)
    x = torch.randn(1, 1, 16, 32, 32) * 0.5
    meta = torch.zeros(1, 6)
    model = SignedLogit(tiny_volume_net, meta)
    attr = _ig_volume(model, x, mean=0.15, std=0.2)
    base = torch.full_like(x, -0.15 / 0.2)
    with torch.no_grad():
        delta = float(model(x)[0, 0] - model(base)[0, 0])
    assert attr.shape == (1, 16, 32, 32)
    assert float(attr.sum()) == pytest.approx(delta, rel=0.1, abs=1e-3)     # sum of attributions = f(x) - f(x0)


def test_bundled_volume_maps_find_the_lesion_and_change_when_randomised(cnv_volume):
    import copy

    model = rc.load_model(VOLUME)
    meta = {k: cnv_volume.meta.get(k) for k in ("age", "sex", "va_logmar", "cst_um", "hba1c")}
    lesion = np.any(np.stack(list(cnv_volume.masks.values())), axis=0)
    rnet = trust.randomise_parameters(copy.deepcopy(model.net), seed=0).eval()
    for meth in ("gradcam", "hirescam", "xgradcam", "layercam"):
        hm = rc.explain(model, cnv_volume.image, meth, meta=meta, eye=cnv_volume.meta["eye"])
        assert trust.pointing_game_3d(hm, lesion), meth
        if meth == "layercam":        # positive gradients only: it follows the anatomy (explain-eval, docs)
            continue
        rand = rc.explain(rnet, cnv_volume.image, meth, meta=meta, eye=cnv_volume.meta["eye"])
        assert abs(trust.spearman(hm, rand)) < 0.5, meth


def test_fusion_model_explains_each_input(tmp_path):
    from retina_core.phantoms import paired_phantoms

    torch.manual_seed(0)
    kw = {**get_cfg("fundus_oct_fusion").builder_kwargs, "load_encoders": False, "encoder_input_size": (3, 64, 64)}
    net = create_model("fundus_oct_fusion", builder_kwargs=kw).eval()
    f, o = paired_phantoms(5, fundus_size=80, oct_width=72, oct_height=60, disease=True)
    assert rc.explain.available_methods(net) == ("gradcam", "integrated_gradients")
    for meth in ("gradcam", "integrated_gradients"):
        maps = rc.explain(net, (f.image, o.image), meth)
        assert set(maps) == {"fundus", "oct"}
        assert maps["fundus"].shape == (80, 80) and maps["oct"].shape == (60, 72)
        for m in maps.values():
            assert m.dtype == np.float32 and 0 <= m.min() and m.max() <= 1
    both = rc.explain(net, {"fundus": f.image, "oct": o.image}, "gradcam", target="normal")
    assert set(both) == {"fundus", "oct"}
    with pytest.raises(RetinaInputError, match="explains a pair"):
        rc.explain(net, f.image)
    with pytest.raises(RetinaInputError, match="choose from gradcam, integrated_gradients"):
        rc.explain(net, (f.image, o.image), "layercam")
