"""The model zoo: RetinalFusionNet, RETFound ViT, fundus ResNet + head, fundus+OCT fusion, OCT volume + metadata.

Tiny inputs throughout; full-size variants are built at a tiny input (ViT-L: parameters counted on the meta device,
a 2-block ViT-L-width network runs forward)."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import retina_core as rc
from retina_core.explain.cam import gradcam_single_pass
from retina_core.models import create_model, get_cfg, list_models
from retina_core.models.loading import sha256_file
from retina_core.train.common import RECIPES, TrainConfig, config_from_args, make_optimizer, resolve_recipe
from retina_core.train.loop import _frozen_bn_eval, _set_phase

ZOO = ["retinal_fusion_net", "retinal_fusion_net_atto", "retinal_fusion_net_atto_v4", "retfound_vit",
       "retfound_vit_tiny", "fundus_resnet50", "fundus_resnet18_head", "fundus_oct_fusion", "oct_volume_fusion3d",
       "oct_volume_fusion3d_tiny"]
DEMO = ["retinal_fusion_net_atto", "retinal_fusion_net_atto_v4", "retfound_vit_tiny", "fundus_resnet18_head",
        "fundus_oct_fusion", "oct_volume_fusion3d_tiny"]


def _fusion(size=32):
    return create_model("fundus_oct_fusion", builder_kwargs={**get_cfg("fundus_oct_fusion").builder_kwargs,
                                                             "load_encoders": False,
                                                             "encoder_input_size": (3, size, size)})


def _volume(name="oct_volume_fusion3d_tiny", fusion="concat", size=(1, 8, 32, 32)):
    return create_model(name, input_size=size, builder_kwargs={**get_cfg(name).builder_kwargs, "fusion": fusion})


def test_registry_has_every_family_with_cards_and_target_layers():
    names = list_models()
    for n in ZOO:
        assert n in names
        cfg = get_cfg(n)
        assert cfg.card and cfg.task and cfg.target_layer and set(cfg.referable) <= set(cfg.classes)
        assert cfg.weights == f"{n}.safetensors"
    assert get_cfg("retinal_fusion_net").classes == get_cfg("retinal_fusion_net_atto").classes == rc.labels.OCT8
    assert get_cfg("retfound_vit").classes == rc.labels.FUNDUS4 == get_cfg("fundus_resnet50").classes
    assert get_cfg("fundus_oct_fusion").classes == ("normal", "disease")
    assert get_cfg("oct_volume_fusion3d").modality == "oct_volume"


# (name, cfg overrides, input shape, expected feature shape or None, logits shape)
IMAGE_TABLE = [
    ("retinal_fusion_net", {"input_size": (3, 64, 64)}, (2, 3, 64, 64), (2, 256), (2, 8)),
    ("retinal_fusion_net_atto", {"input_size": (3, 64, 64)}, (2, 3, 64, 64), (2, 160), (2, 8)),
    ("retfound_vit_tiny", {"input_size": (3, 64, 64)}, (2, 3, 64, 64), (2, 65, 192), (2, 4)),
    ("fundus_resnet50", {"input_size": (3, 64, 64)}, (2, 3, 64, 64), (2, 2048, 2, 2), (2, 4)),
    ("fundus_resnet18_head", {"input_size": (3, 64, 64)}, (2, 3, 64, 64), (2, 256, 2, 2), (2, 4)),
]


@pytest.mark.parametrize("name,overrides,shape,feat_shape,out_shape", IMAGE_TABLE)
def test_image_models_output_shapes_and_common_interface(name, overrides, shape, feat_shape, out_shape):
    net = create_model(name, **overrides).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        feats = net.forward_features(x)
        logits = net.forward_head(feats)
        assert torch.allclose(logits, net(x), atol=1e-5)
    assert tuple(feats.shape) == feat_shape and tuple(logits.shape) == out_shape
    # The CAM target layer exists and the single-pass Grad-CAM reads a spatial map from it.
    _, cams = gradcam_single_pass(net, x, net.cfg.target_layer)
    assert cams.ndim == 3 and cams.shape[0] == 2 and np.isfinite(cams).all()


def test_retfound_vit_large_is_vit_l16_with_303m_parameters():
    with torch.device("meta"):
        big = create_model("retfound_vit")
    n = sum(p.numel() for p in big.parameters())
    assert 300e6 < n < 306e6                     # ViT-L/16: 303.3M at 224 px with a 4-class head
    assert big.embed_dim == 1024 and len(big.blocks) == 24 and big.blocks[0].attn.num_heads == 16
    assert big.global_pool == "avg" and isinstance(big.fc_norm, torch.nn.LayerNorm)
    assert big.patch_embed.grid_size == (14, 14) and big.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    # the same width, 2 blocks, at a tiny input, really runs
    cfg = get_cfg("retfound_vit")
    small = create_model("retfound_vit", input_size=(3, 32, 32),
                         builder_kwargs={**cfg.builder_kwargs, "depth": 2}).eval()
    with torch.no_grad():
        assert small(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_fusion_models_output_shapes():
    net = _fusion().eval()
    f, o = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = net.forward_features(f, o)
        assert feats.shape == (2, 1280 + 512) and net.forward_head(feats).shape == (2, 2)
        assert torch.allclose(net(f, o), net.forward_head(feats))
    for name in ("oct_volume_fusion3d", "oct_volume_fusion3d_tiny"):
        v = _volume(name).eval()
        with torch.no_grad():
            assert v(torch.randn(2, 1, 8, 32, 32), torch.randn(2, 6)).shape == (2, 1)
            assert v(torch.randn(2, 1, 8, 32, 32)).shape == (2, 1)     # no metadata: the training means


@pytest.mark.parametrize("mode,expected", [("concat", 1024), ("add", 512), ("multiply", 512), ("image_only", 512)])
def test_volume_fusion_modes_set_the_classifier_input(mode, expected):
    net = _volume(fusion=mode)
    assert net.classifier_in == expected and net.classifier[0].in_features == expected
    assert hasattr(net, "meta_mlp") == (mode != "image_only")
    assert net.classifier[-1].out_features == 1
    feats = net.forward_features(torch.randn(2, 1, 8, 32, 32), torch.randn(2, 6))
    assert feats.shape == (2, expected)
    if mode == "image_only":   # metadata is ignored
        x = torch.randn(2, 1, 8, 32, 32)
        net.eval()
        assert torch.equal(net(x, torch.randn(2, 6)), net(x, torch.randn(2, 6)))


def test_volume_gradcam_gives_per_slice_maps():
    from retina_core.explain.volume_methods import volume_cam

    net = _volume().eval()
    logits, maps = volume_cam(net, torch.randn(2, 1, 8, 32, 32), torch.randn(2, 6))
    assert logits.shape == (2, 1) and maps.shape == (2, 8, 32, 32)
    assert maps.min() >= 0 and maps.max() <= 1 and maps.dtype == np.float32


def test_msfa_lambda_is_a_learnable_scalar_in_unit_interval_and_highpass_is_fixed():
    net = create_model("retinal_fusion_net_atto", input_size=(3, 64, 64))
    gate = net.msfa.gate_logit
    assert isinstance(gate, torch.nn.Parameter) and gate.ndim == 0 and gate.requires_grad
    assert 0.0 < net.fusion_lambda() < 1.0
    names = dict(net.named_parameters())
    assert not any("highpass" in n for n in names)                  # Sobel / Laplacian are not learnable
    assert not any("highpass" in k for k in net.state_dict())
    k = net.edge.highpass.kernels
    assert torch.equal(k[0, 0], torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]))
    before = net.fusion_lambda()
    opt = torch.optim.SGD([gate], lr=10.0)
    net(torch.randn(2, 3, 64, 64)).logsumexp(1).sum().backward()
    assert gate.grad is not None and gate.grad.abs() > 0
    opt.step()
    assert net.fusion_lambda() != before and 0.0 < net.fusion_lambda() < 1.0
    assert set(net.training_report()) == {"fusion_lambda"}


def _loss_drops(step, params, n=12) -> tuple[float, float]:
    opt = torch.optim.AdamW(params, lr=2e-3)
    losses = []
    for _ in range(n):
        loss = step()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], float(np.mean(losses[-3:]))


@pytest.mark.parametrize("name", ["retinal_fusion_net_atto", "retfound_vit_tiny", "fundus_resnet18_head"])
def test_loss_decreases_on_a_tiny_batch_image_models(name):
    torch.manual_seed(0)
    net = create_model(name, input_size=(3, 32, 32)).train()
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % net.cfg.num_classes
    first, last = _loss_drops(lambda: torch.nn.functional.cross_entropy(net(x), y), net.parameters())
    assert last < first * 0.8


def test_loss_decreases_fusion_head_and_volume_model():
    from retina_core.train.losses import FocalLoss

    torch.manual_seed(0)
    fu = _fusion().train()
    f, o, y = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32), torch.arange(8) % 2
    first, last = _loss_drops(lambda: torch.nn.functional.cross_entropy(fu(f, o), y),
                              [p for p in fu.parameters() if p.requires_grad])
    assert last < first * 0.8
    vol = _volume().train()
    x, m, yv = torch.randn(8, 1, 8, 32, 32), torch.randn(8, 6), (torch.arange(8) % 2).float()
    focal = FocalLoss(label_smoothing=0.1)
    first, last = _loss_drops(lambda: focal(vol(x, m).squeeze(1), yv), vol.parameters())
    assert last < first * 0.8


def test_fusion_encoders_are_frozen_and_their_batchnorm_statistics_do_not_move():
    net = _fusion()
    enc_params = list(net.fundus_encoder.parameters()) + list(net.oct_encoder.parameters())
    assert all(not p.requires_grad for p in enc_params)
    assert all(p.requires_grad for p in net.head.parameters())
    net.train()
    assert net.training and net.head.training
    assert not net.fundus_encoder.training and not net.oct_encoder.training
    bn_before = {k: v.clone() for k, v in net.state_dict().items() if "running_" in k}
    p_before = [p.clone() for p in enc_params]
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(net(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)),
                                             torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    after = net.state_dict()
    assert bn_before and all(torch.equal(v, after[k]) for k, v in bn_before.items())
    assert all(torch.equal(a, b) for a, b in zip(p_before, enc_params))
    assert set(net.head_state_dict()) == {f"head.{k}" for k in net.head.state_dict()} | {"encoder_digest"}


def test_fusion_modality_cams():
    from retina_core.explain.pair_methods import modality_cams

    net = _fusion(64).eval()
    logits, cf, co = modality_cams(net, torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 2) and cf.shape[0] == co.shape[0] == 1 and cf.ndim == co.ndim == 3


@pytest.mark.parametrize("name", ["retinal_fusion_net_atto", "retfound_vit_tiny", "fundus_resnet18_head"])
def test_checkpoint_round_trip_through_safetensors_and_manifest(tmp_path, name):
    net = create_model(name, input_size=(3, 64, 64)).eval()
    state = {k: v.half().contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in net.state_dict().items()}
    save_file(state, str(tmp_path / f"{name}.safetensors"))
    entry = {"file": f"{name}.safetensors", "sha256": sha256_file(tmp_path / f"{name}.safetensors"),
             "input_size": [3, 64, 64], "temperature": 1.5}
    (tmp_path / "manifest.json").write_text(json.dumps({name: entry}))
    m = rc.load_model(name, weights_dir=tmp_path, device="cpu")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m.net(x), net.half().float()(x), atol=1e-3)
    assert m.cfg.input_size == (3, 64, 64) and m.temperature == 1.5


def test_two_phase_freezes_backbone_then_unfreezes_layer4():
    net = create_model("fundus_resnet18_head", input_size=(3, 32, 32))
    cfg = resolve_recipe("fundus_resnet18_head", TrainConfig())
    assert cfg.recipe == "two_phase" and cfg.freeze_epochs > 0 and cfg.unfreeze == "net.layer4" and cfg.plateau
    _set_phase(net, 1, cfg)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") for n in trainable)
    net.train()
    _frozen_bn_eval(net)
    assert not net.net.bn1.training and net.head[2].training           # frozen backbone BN keeps its statistics
    _set_phase(net, 2, cfg)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert any(n.startswith("net.layer4.") for n in trainable)
    assert not any(n.startswith(("net.layer3.", "net.conv1")) for n in trainable)


def test_layer_decay_groups_for_the_vit():
    net = create_model("retfound_vit_tiny", input_size=(3, 32, 32))
    cfg = resolve_recipe("retfound_vit_tiny", TrainConfig())
    assert cfg.layer_decay == 0.65 and cfg.drop_path == 0.2 and cfg.label_smoothing == 0.1
    opt = make_optimizer(net, cfg, 1e-3)
    lrs = {g["layer_id"]: g["lr"] for g in opt.param_groups}
    depth = len(net.blocks)
    assert lrs[depth + 1] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-3 * 0.65 ** (depth + 1))


def test_recipes_fill_defaults_and_flags_given_win():
    assert {"v3_specialist", "v4_sprint", "retfound_finetune", "two_phase", "learned_fusion3d"} <= set(RECIPES)
    v3 = resolve_recipe("retinal_fusion_net_atto", TrainConfig())
    v4 = resolve_recipe("retinal_fusion_net_atto", TrainConfig(recipe="v4_sprint", epochs=3))
    assert v3.recipe == "v3_specialist" and v3.label_smoothing == 0.1 and v3.mixup == 0
    assert v4.recipe == "v4_sprint" and v4.mixup > 0 and v4.epochs == 3
    assert resolve_recipe("oct_resnet18", TrainConfig()) == TrainConfig()       # foundation models unchanged
    from retina_core.cli import build_parser
    args = build_parser().parse_args(["train", "--model", "retinal_fusion_net_atto", "--data", "d", "--out", "o",
                                      "--recipe", "v4_sprint", "--epochs", "12", "--lr", "1e-3"])
    cfg = config_from_args(args)
    assert cfg.recipe == "v4_sprint" and cfg.epochs == 12 and cfg.lr == 1e-3 and cfg.mixup == 0.2
    assert resolve_recipe("retinal_fusion_net_atto", cfg) is cfg
    with pytest.raises(rc.RetinaInputError, match="recipe"):
        resolve_recipe("oct_resnet18", TrainConfig(recipe="no_such_recipe"))
    assert replace(resolve_recipe("oct_resnet18", TrainConfig(recipe="none"))).recipe is None
