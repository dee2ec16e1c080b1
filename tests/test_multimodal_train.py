"""Training the two-input models end to end on tiny phantoms: fundus + OCT fusion (true and virtual pairs) and
OCT volume + metadata; head-only weights tied to their encoders; reload through the sha256-checked loader."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import retina_core as rc
from retina_core.cli import main
from retina_core.models import create_model
from retina_core.models.loading import sha256_file
from retina_core.phantoms import write_dataset
from retina_core.train.engine import TrainConfig, train
from retina_core.models.predict import load_multimodal, predict_pairs, predict_volumes

ENCODERS = ("fundus_dr_effnet_b0", "oct_resnet18")


def _write_encoders(d, size=32, seed=0):
    """Stand-in encoder weights (random, but real files with sha256 in a manifest), trained at `size` px."""
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    manifest = {}
    for name in ENCODERS:
        net = create_model(name, input_size=(3, size, size))
        f = d / f"{name}.safetensors"
        save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()},
                  str(f))
        manifest[name] = {"file": f.name, "sha256": sha256_file(f), "input_size": [3, size, size],
                          "classes": list(net.cfg.classes)}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    return _write_encoders(tmp_path_factory.mktemp("enc"))


def test_fusion_on_true_pairs_stores_only_the_head_tied_to_its_encoders(tmp_path, encoders):
    data = tmp_path / "pairs"
    write_dataset("paired", n=24, seed=2, out=data, size=48)
    write_dataset("oct-kermany", n=8, seed=2, out=tmp_path / "singles", size=48)
    out = tmp_path / "run"
    result = train("fundus_oct_fusion", data, out, TrainConfig(epochs=2, batch_size=8, encoders_dir=str(encoders)))
    entry = json.loads((out / "manifest.json").read_text())["fundus_oct_fusion"]
    assert entry["pairing"] == "true pairs" and entry["head_only"] and entry["recipe"] == "fusion_head"
    for name in ENCODERS:
        assert entry["encoders"][name]["sha256"] == sha256_file(encoders / f"{name}.safetensors")
        assert entry["encoders"][name]["input_size"] == [3, 32, 32]
    stored = load_file(str(out / entry["file"]))
    assert set(stored) == {"head.0.weight", "head.0.bias", "head.3.weight", "head.3.bias", "encoder_digest"}
    assert stored["head.0.weight"].shape == (512, 1792) and stored["head.3.weight"].shape == (2, 512)
    assert entry["classes"] == ["normal", "disease"] and result["metrics"]["val"]["n"] > 0

    m = load_multimodal("fundus_oct_fusion", weights_dir=out, encoders_dir=encoders, device="cpu")
    assert m.sha256 == entry["sha256"] and not m.net.training
    rows = [l.split(",") for l in (data / "pairs.csv").read_text().splitlines()[1:4]]
    probs = predict_pairs(m, [data / r[1] for r in rows], [data / r[2] for r in rows])
    assert probs.shape == (3, 2) and np.allclose(probs.sum(1), 1.0)
    from retina_core.evaluate.run import evaluate
    report = evaluate("fundus_oct_fusion", data, split="val", weights_dir=out, encoders_dir=str(encoders))
    assert report["metrics"]["n"] == result["metrics"]["val"]["n"]
    assert report["metrics"]["accuracy"] == pytest.approx(result["metrics"]["val"]["accuracy"], abs=1e-6)
    with pytest.raises(rc.RetinaInputError, match="pairs"):        # a single-image data set: a clear message
        evaluate("fundus_oct_fusion", tmp_path / "singles", weights_dir=out, encoders_dir=str(encoders))

    # other encoder weights than those the head was trained on: refused with a clear message
    other = _write_encoders(tmp_path / "other", seed=1)
    with pytest.raises(rc.RetinaInputError, match="trained on encoder weights"):
        load_multimodal("fundus_oct_fusion", weights_dir=out, encoders_dir=other, device="cpu")


def test_fusion_on_virtual_pairs_from_two_data_sets_via_cli(tmp_path, encoders, capsys):
    fundus, octs = tmp_path / "fundus", tmp_path / "oct"
    write_dataset("fundus-dr", n=20, seed=3, out=fundus, size=48)
    write_dataset("oct-kermany", n=24, seed=3, out=octs, size=48)
    out = tmp_path / "run"
    assert main(["train", "--model", "fundus_oct_fusion", "--data", str(fundus), "--pair-with", str(octs),
                 "--out", str(out), "--encoders-dir", str(encoders), "--epochs", "2", "--json"]) == 0
    entry = json.loads((out / "manifest.json").read_text())["fundus_oct_fusion"]
    assert entry["pairing"] == "virtual pairs" and "virtual pairs" in entry["data"]
    assert entry["trained_on_phantoms"] and entry["config"]["pair_with"] == str(octs)
    assert main(["train", "--model", "fundus_oct_fusion", "--data", str(fundus), "--out", str(tmp_path / "x"),
                 "--encoders-dir", str(encoders), "--epochs", "1"]) == 2          # no pairs.csv, no --pair-with
    assert "--pair-with" in capsys.readouterr().err


def test_virtual_pairs_keep_labels_and_repair_every_epoch():
    from retina_core.train.multimodal import VirtualPairs

    f_y, o_y = torch.tensor([0, 1, 1, 0, 1]), torch.tensor([1, 0, 1, 0, 0, 1, 1, 0])
    vp = VirtualPairs(torch.arange(5.0)[:, None], f_y, 10 + torch.arange(8.0)[:, None], o_y, seed=0)
    assert len(vp) == 8
    first = vp.oi.clone()
    for i in range(len(vp)):
        f, o, y = vp[i]
        assert o_y[int(o.item()) - 10] == f_y[int(f.item())] == y
    vp.set_epoch(1)
    assert not torch.equal(first, vp.oi)


def test_volume_model_trains_with_focal_loss_and_metadata(tmp_path, capsys):
    data = tmp_path / "vol"
    write_dataset("oct-volume", n=16, seed=4, out=data, size=32)
    out = tmp_path / "run"
    assert main(["train", "--model", "oct_volume_fusion3d_tiny", "--data", str(data), "--out", str(out),
                 "--epochs", "2", "--batch-size", "4", "--image-size", "32", "--fusion", "add", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    entry = json.loads((out / "manifest.json").read_text())["oct_volume_fusion3d_tiny"]
    assert summary["sha256"] == entry["sha256"] == sha256_file(out / entry["file"])
    assert entry["fusion"] == "add" and entry["loss"].startswith("focal") and entry["recipe"] == "learned_fusion3d"
    assert entry["meta_features"] == ["age", "sex", "eye", "va_logmar", "cst_um", "hba1c"]
    assert "oct_class" not in entry["meta_features"]                   # names the disease: never a feature
    assert entry["input_size"] == [1, 32, 32, 32] and entry["config"]["label_smoothing"] == 0.1
    history = json.loads((out / "history.json").read_text())["history"]
    assert len(history) == 2 and all(np.isfinite(h["train_loss"]) for h in history)

    m = load_multimodal("oct_volume_fusion3d_tiny", weights_dir=out, device="cpu")
    assert m.net.fusion == "add" and m.net.classifier_in == 512
    assert m.net.meta_mean[0] > 20                                     # age, standardised with training stats
    from retina_core.io.datasets import load_dataset
    recs = load_dataset(data).records[:3]
    p = predict_volumes(m, recs)
    assert p.shape == (3,) and ((p >= 0) & (p <= 1)).all()
    two = m.predict_proba(torch.zeros(2, 1, 32, 32, 32), torch.zeros(2, len(m.net.meta_features)))
    assert two.shape == (2, 2) and torch.allclose(two.sum(1), torch.ones(2))      # one logit -> (normal, disease)

    # `evaluate` reads volumes too, and scores the held-out split as training did
    split = "test" if entry["splits"].get("test") else "val"
    assert main(["evaluate", "--model", "oct_volume_fusion3d_tiny", "--data", str(data), "--weights-dir", str(out),
                 "--split", split, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    held = entry["heldout_metrics"]
    assert report["n"] == held["n"] == entry["splits"][split] and report["metrics"]["accuracy"] == pytest.approx(held["accuracy"], abs=1e-4)
    assert main(["evaluate", "--model", "oct_volume_fusion3d_tiny", "--data", str(tmp_path / "nope"),
                 "--weights-dir", str(out)]) != 0


def _layer4_grids(kw: dict, option: str, values) -> dict:
    """{value: layer4 grid (D, H, W)} of the tiny volume model at 32^3 built with kw + {option: value}; each loads the
    plain model's tensors (strides and dilations change, weight shapes do not)."""
    plain = create_model("oct_volume_fusion3d_tiny", input_size=(1, 32, 32, 32), builder_kwargs=kw)
    grids = {}
    for v in values:
        net = create_model("oct_volume_fusion3d_tiny", input_size=(1, 32, 32, 32), builder_kwargs={**kw, option: v})
        net.load_state_dict(plain.state_dict())
        net.eval()
        store = {}
        net.net.layer4.register_forward_hook(lambda m, i, o: store.update(shape=tuple(o.shape[2:])))
        with torch.no_grad():
            net(torch.rand(1, 1, 32, 32, 32))
        grids[v] = store["shape"]
    return grids


def test_volume_output_stride_dilates_the_last_stages_and_is_trained_and_reloaded_as_such(tmp_path, capsys):
    from retina_core.models.volume3d import dilate_last_stages

    kw = dict(create_model("oct_volume_fusion3d_tiny").cfg.builder_kwargs)
    grids = _layer4_grids(kw, "output_stride", (32, 16, 8, 4))
    assert grids == {32: (1, 1, 1), 16: (2, 2, 2), 8: (4, 4, 4), 4: (8, 8, 8)}
    with pytest.raises(ValueError, match="output_stride"):
        dilate_last_stages(create_model("oct_volume_fusion3d_tiny").net, 12, stem_stride=4)

    # trained dilated (and with a finer stride across slices), recorded in the manifest, rebuilt as such:
    # re-evaluation reproduces the held-out ECE
    data = tmp_path / "vol"
    write_dataset("oct-volume", n=16, seed=5, out=data, size=32)
    out = tmp_path / "run"
    assert main(["train", "--model", "oct_volume_fusion3d_tiny", "--data", str(data), "--out", str(out),
                 "--epochs", "1", "--batch-size", "4", "--image-size", "32", "--fusion", "image_only",
                 "--output-stride", "8", "--slice-stride", "2", "--global-pool", "avgmax", "--json"]) == 0
    capsys.readouterr()
    entry = json.loads((out / "manifest.json").read_text())["oct_volume_fusion3d_tiny"]
    assert entry["builder_kwargs"] == {"output_stride": 8, "slice_stride": 2, "global_pool": "avgmax"}
    m = load_multimodal("oct_volume_fusion3d_tiny", weights_dir=out, device="cpu")
    assert m.net.net.avgpool.pool_type == "avgmax"
    assert m.net.net.layer4[0].conv2.dilation == (4, 4, 4) and m.net.net.layer4[0].conv1.stride == (1, 1, 1)
    assert m.net.net.layer2[0].conv1.stride == (1, 2, 2) and m.net.net.maxpool.stride == (1, 2, 2)
    assert m.net.net.conv1.stride == (2, 2, 2)
    split = "test" if entry["splits"].get("test") else "val"
    assert main(["evaluate", "--model", "oct_volume_fusion3d_tiny", "--data", str(data), "--weights-dir", str(out),
                 "--split", split, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metrics"]["ece"] == pytest.approx(entry["heldout_metrics"]["ece"], abs=1e-4)
    # --split all scores every volume (a data set the model never saw); an unknown split is named, not a traceback
    assert main(["evaluate", "--model", "oct_volume_fusion3d_tiny", "--data", str(data), "--weights-dir", str(out),
                 "--split", "all", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 16
    assert main(["evaluate", "--model", "oct_volume_fusion3d_tiny", "--data", str(data), "--weights-dir", str(out),
                 "--split", "tset"]) != 0
    assert "Unknown split 'tset'" in capsys.readouterr().err

    # a pooling the volume model does not have is refused by name, not silently dropped
    assert main(["train", "--model", "oct_volume_fusion3d_tiny", "--data", str(data), "--out", str(tmp_path / "r2"),
                 "--epochs", "1", "--global-pool", "median"]) != 0
    assert "--global-pool must be one of avg, max, avgmax" in capsys.readouterr().err


def test_volume_global_pool_avg_is_monais_pooling_and_max_lets_one_cell_carry_the_evidence():
    torch.manual_seed(0)
    a = torch.rand(2, 8, 4, 5, 6)
    nets = {p: create_model("oct_volume_fusion3d_tiny", input_size=(1, 16, 32, 32),
                            builder_kwargs={**create_model("oct_volume_fusion3d_tiny").cfg.builder_kwargs,
                                            "global_pool": p}) for p in ("avg", "max", "avgmax")}
    pool = {p: n.net.avgpool for p, n in nets.items()}
    assert torch.allclose(pool["avg"](a), torch.nn.AdaptiveAvgPool3d(1)(a), atol=1e-6)
    assert torch.allclose(pool["max"](a), torch.nn.AdaptiveMaxPool3d(1)(a))
    assert torch.allclose(pool["avgmax"](a), 0.5 * (pool["avg"](a) + pool["max"](a)))
    # one hot cell in an empty map: the mean dilutes it by the number of cells, the max keeps it whole
    spot = torch.zeros(1, 1, 8, 8, 8)
    spot[0, 0, 3, 4, 5] = 1.0
    assert pool["avg"](spot).item() == pytest.approx(1 / 512) and pool["max"](spot).item() == 1.0
    # parameter-free: one set of weights loads into every pooling, and the default is unchanged
    assert set(nets["avg"].state_dict()) == set(nets["avgmax"].state_dict())
    assert create_model("oct_volume_fusion3d_tiny").net.avgpool.pool_type == "avg"
    with pytest.raises(ValueError, match="global_pool"):
        create_model("oct_volume_fusion3d_tiny", builder_kwargs={"global_pool": "median"})


def test_volume_slice_stride_keeps_slices_apart_and_is_refused_for_2d_models(tmp_path, capsys):
    from retina_core.models.volume3d import keep_slices

    kw = {**create_model("oct_volume_fusion3d_tiny").cfg.builder_kwargs, "output_stride": 8}
    grids = _layer4_grids(kw, "slice_stride", (8, 4, 2, 1))
    # finer across slices only; in-plane the grid stays at output stride 8
    assert grids == {8: (4, 4, 4), 4: (8, 4, 4), 2: (16, 4, 4), 1: (32, 4, 4)}
    with pytest.raises(ValueError, match="slice_stride"):
        keep_slices(create_model("oct_volume_fusion3d_tiny", builder_kwargs=kw).net, 3)

    data = tmp_path / "vol"
    write_dataset("oct-volume", n=4, seed=6, out=data, size=32)
    # a 2-D model has no slices: refused with the flag named
    assert main(["train", "--model", "oct_resnet18", "--data", str(data), "--out", str(tmp_path / "r2"),
                 "--epochs", "1", "--slice-stride", "2"]) != 0
    assert "--slice-stride" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ lesion-CAM guidance
def _tiny_volume_net(seed=0, fusion="concat"):
    """The tiny volume model at 32^3 with output stride 8: a 4 x 4 x 4 layer4 grid."""
    torch.manual_seed(seed)
    kw = dict(create_model("oct_volume_fusion3d_tiny").cfg.builder_kwargs)
    return create_model("oct_volume_fusion3d_tiny", input_size=(1, 32, 32, 32),
                        builder_kwargs={**kw, "output_stride": 8, "fusion": fusion})


def test_volume_lesion_cam_guidance_is_the_grad_cam_loss_computed_by_hand():
    import torch.nn.functional as F

    from retina_core.explain.cam import gradcam_single_pass
    from retina_core.models.volume3d import WithMeta
    from retina_core.train.guidance import VolumeLesionCamGuidance

    net = _tiny_volume_net().eval()
    guide = VolumeLesionCamGuidance(net, net.cfg.target_layer, 3.0)
    store = {}
    h = net.net.layer4.register_forward_hook(lambda m, i, o: store.update(a=o.detach()))
    torch.manual_seed(1)
    x, meta = torch.randn(3, 1, 32, 32, 32), torch.randn(3, 6)
    y = torch.tensor([1, 1, 0])                                    # row 2 is normal: never guided, even with a mask
    masks = torch.zeros(3, 32, 32, 32, dtype=torch.bool)
    masks[0, 2:5, 3:6, 20:22] = True                               # one 8^3 cell
    masks[1, 20:, 9:17, :3] = True                                 # 2 x 2 x 1 cells
    masks[2, :8, :8, :8] = True
    logits = net(x, meta).squeeze(1)
    loss = guide(logits, masks, y)
    h.remove()
    guide.close()

    # by hand: the head only, from the pooled layer4 features as a leaf; alpha = d(logit)/d(pooled) / #cells (the
    # spatial mean of d(logit)/dA, as average pooling spreads it evenly)
    a = store["a"]
    pooled = a.mean((2, 3, 4)).requires_grad_(True)
    feats = torch.cat([net.image_proj(pooled), net.meta_mlp(net.standardise(meta, 3, pooled))], dim=1)
    (grad,) = torch.autograd.grad(net.forward_head(feats)[:, 0].sum(), pooled)
    alpha = grad / a[0, 0].numel()
    cam = torch.einsum("bk,bkdhw->bdhw", alpha, a)
    expected = []
    for r in (0, 1):
        cells = F.adaptive_max_pool3d(masks[r][None, None].float(), cam.shape[1:]).flatten() > 0
        assert int(cells.sum()) == (1 if r == 0 else 4)
        expected.append(-torch.log(cam[r].flatten().softmax(0)[cells].sum()))
    assert float(loss.detach()) == pytest.approx(3.0 * float(torch.stack(expected).mean()), rel=1e-4)

    # its map is the Grad-CAM the app shows (volume_cam's single pass), before the ReLU
    _, app_cams = gradcam_single_pass(WithMeta(net, meta), x, "net." + net.cfg.target_layer, [0, 0, 0])
    assert torch.allclose(torch.relu(cam[:2]), torch.from_numpy(app_cams[:2]), atol=1e-5)

    # no guided row (no mask, or normal): exactly zero, and the stored activations are consumed either way
    guide = VolumeLesionCamGuidance(net, net.cfg.target_layer, 3.0)
    out = guide(net(x, meta).squeeze(1), masks * torch.tensor([False, False, True]).view(3, 1, 1, 1), y)
    assert float(out) == 0.0 and not guide.store
    with torch.no_grad():
        net(x, meta)
    assert not guide.store                                         # no-grad forwards are not kept
    guide.close()


def test_volume_lesion_cam_guidance_can_be_followed_and_masks_move_with_augmentation(tmp_path):
    from retina_core.io.datasets import load_dataset
    from retina_core.models.predict import decode_volumes, metadata_matrix, volume_lesion_mask
    from retina_core.train.guidance import VolumeLesionCamGuidance
    from retina_core.train.multimodal import VolumeSet

    data = tmp_path / "vol"
    write_dataset("oct-volume", n=16, seed=4, out=data, size=32)
    recs = [r for r in load_dataset(data).records if r.label == "disease"][:6]
    net = _tiny_volume_net(seed=0)
    vols, masks = decode_volumes(recs, net.cfg, dtype=torch.float32, mask_root=data)
    assert masks.shape == (6, 32, 32, 32) and masks.dtype == torch.bool
    assert all(int(m.sum()) > 0 for m in masks)                    # every diseased phantom has its lesion masks
    meta = metadata_matrix(recs, net.meta_features)
    net.set_metadata_stats(np.nanmean(meta.numpy(), 0), np.nanstd(meta.numpy(), 0))
    y = torch.ones(6, dtype=torch.long)

    # a few optimiser steps on the guidance loss alone, on a fixed batch: it is differentiable and correctly signed
    net.train()
    guide = VolumeLesionCamGuidance(net, net.cfg.target_layer, 1.0)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = guide(net(vols, meta).squeeze(1), masks, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    guide.close()
    assert losses[-1] < 0.2 * losses[0], losses

    # the training set's flips and shifts move the mask with the volume
    vol = torch.zeros(1, 1, 8, 16, 16)
    vol[0, 0, 3, 2, 13] = 5.0
    mask = torch.zeros(1, 8, 16, 16, dtype=torch.bool)
    mask[0, 3, 2, 13] = True
    ds = VolumeSet(vol, torch.zeros(1, 6), torch.ones(1, dtype=torch.long), augment=True, strength=1.0, masks=mask)
    torch.manual_seed(0)
    moved = set()
    for _ in range(12):
        xa, _, _, ma = ds[0]
        assert int(ma.sum()) == 1 and int(ma.flatten().byte().argmax()) == int(xa.flatten().argmax())
        moved.add(int(ma.flatten().byte().argmax()))
    assert len(moved) > 3
    assert len(VolumeSet(vol, torch.zeros(1, 6), torch.ones(1), augment=True, strength=1.0)[0]) == 3

    # masks resized to the input size keep a one-voxel lesion (any lesion voxel in an input voxel's footprint)
    rel = recs[0].path
    small = volume_lesion_mask(data, rel, (32, 32, 32), (32, 8, 8))
    full = volume_lesion_mask(data, rel, (32, 32, 32), (32, 32, 32))
    assert small.shape == (32, 8, 8) and small.any() and torch.equal(full, masks[0])


def test_volume_meta_dropout_hides_clinical_values_only_in_training_and_is_refused_elsewhere(tmp_path, capsys):
    from retina_core.train.multimodal import VolumeSet

    n = 400
    vols, metas, ys = torch.zeros(n, 1, 2, 4, 4), torch.arange(n * 6, dtype=torch.float32).view(n, 6), torch.ones(n)
    torch.manual_seed(0)
    hidden = torch.stack([torch.isnan(VolumeSet(vols, metas, ys, augment=True, strength=1.0, meta_dropout=0.5)[i][1])
                          for i in range(n)])
    whole = hidden.all(1).float().mean()
    assert 0.40 < whole < 0.62                                      # whole record hidden with p (+ p/2 ^ 6 by chance)
    part = hidden[~hidden.all(1)].float().mean()
    assert 0.15 < part < 0.35                                       # otherwise each value with p / 2
    # without the option (and so for validation and test sets) the record is left as it is
    assert all(torch.equal(VolumeSet(vols, metas, ys, augment=True, strength=1.0)[i][1], metas[i]) for i in range(8))
    # values that are kept are the recorded ones
    got = torch.stack([VolumeSet(vols, metas, ys, True, 1.0, meta_dropout=0.5)[i][1] for i in range(n)])
    assert torch.equal(got[~got.isnan()], metas[~got.isnan()])

    data = tmp_path / "vol"
    write_dataset("oct-volume", n=16, seed=4, out=data, size=32)
    for bad in (["--meta-dropout", "1.5"], ["--meta-dropout", "-0.1"]):
        assert main(["train", "--model", "oct_volume_fusion3d_tiny", "--data", str(data), "--out",
                     str(tmp_path / "r"), "--epochs", "1", *bad]) != 0
        assert "--meta-dropout" in capsys.readouterr().err


def test_volume_training_with_lesion_cam_guidance_and_the_refusals(tmp_path, capsys):
    data = tmp_path / "vol"
    write_dataset("oct-volume", n=16, seed=4, out=data, size=32)
    out = tmp_path / "guided"
    train("oct_volume_fusion3d_tiny", data, out, TrainConfig(epochs=1, batch_size=4, image_size=32, output_stride=8,
                                                             lesion_cam_guidance=0.1))
    history = json.loads((out / "history.json").read_text())["history"]
    assert len(history) == 1 and history[0]["lesion_cam_loss"] > 0 and np.isfinite(history[0]["train_loss"])
    entry = json.loads((out / "manifest.json").read_text())["oct_volume_fusion3d_tiny"]
    assert "lesion-CAM guidance 0.1" in entry["loss"] and entry["config"]["lesion_cam_guidance"] == 0.1
    m = load_multimodal("oct_volume_fusion3d_tiny", weights_dir=out, device="cpu")
    assert m.net.net.layer4[0].conv2.dilation == (4, 4, 4)

    # refusals, not silently dropped flags
    import shutil
    shutil.rmtree(data / "masks")
    with pytest.raises(rc.RetinaInputError, match="needs lesion masks"):
        train("oct_volume_fusion3d_tiny", data, tmp_path / "r1", TrainConfig(epochs=1, batch_size=4, image_size=32,
                                                                             lesion_cam_guidance=0.1))
    with pytest.raises(rc.RetinaInputError, match="--healthy-cam-penalty is not implemented"):
        train("oct_volume_fusion3d_tiny", data, tmp_path / "r2", TrainConfig(epochs=1, healthy_cam_penalty=0.1))
    for flag in ("--lesion-cam-guidance", "--healthy-cam-penalty"):
        assert main(["train", "--model", "fundus_oct_fusion", "--data", str(tmp_path / "nope"), "--out",
                     str(tmp_path / "r3"), "--epochs", "1", flag, "0.1"]) != 0
        assert f"{flag} is not implemented for fundus_oct_fusion" in capsys.readouterr().err


def test_volume_monitor_val_loss_includes_the_validation_guidance(tmp_path, capsys):
    data = tmp_path / "vol"
    write_dataset("oct-volume", n=20, seed=6, out=data, size=32)
    out = tmp_path / "run"
    train("oct_volume_fusion3d_tiny", data, out, TrainConfig(epochs=3, batch_size=4, image_size=32, output_stride=8,
                                                             lesion_cam_guidance=1.0, monitor="val_loss"))
    history = json.loads((out / "history.json").read_text())["history"]
    losses = [h["val_loss"] for h in history]
    assert all(np.isfinite(losses)) and all(h["val_score"] == pytest.approx(-h["val_loss"]) for h in history)
    entry = json.loads((out / "manifest.json").read_text())["oct_volume_fusion3d_tiny"]
    assert entry["best_epoch"] == int(np.argmin(losses)) + 1
    # the guidance is part of it: the same run without guidance has a smaller validation loss at the same epoch 1
    # start (a -log of a softmax mass < 1 is added on every masked diseased volume)
    plain = tmp_path / "plain"
    train("oct_volume_fusion3d_tiny", data, plain, TrainConfig(epochs=1, batch_size=4, image_size=32,
                                                               output_stride=8, monitor="val_loss"))
    first = json.loads((plain / "history.json").read_text())["history"][0]["val_loss"]
    assert np.isfinite(first) and first < losses[0]


def test_volume_attention_mining_masks_what_the_map_marks_and_trains(tmp_path):
    """GAIN's attention mining: the marked voxels are swapped for a blur through a soft mask, P(disease) of what is
    left is the loss; it back-propagates into the map (double backward) and runs in train() with or without masks."""
    from retina_core.train.guidance import VolumeAttentionMining, VolumeLesionCamGuidance

    net = _tiny_volume_net().eval()              # eval: no dropout, so the hand computation sees the same net
    x = torch.rand(2, 1, 16, 32, 32)
    meta = torch.zeros(2, len(net.meta_features))
    guide = VolumeLesionCamGuidance(net, "net.layer4", 0.0)
    logits = net(x, meta)
    cam = guide.cam(logits, torch.tensor([True, True]))
    mining = VolumeAttentionMining(2.0)
    loss = mining(net, x, meta, cam, logits[:, 0])
    # by hand: the same soft mask and the same blur
    c = torch.relu(cam)
    c = c / (c.flatten(1).amax(1).view(-1, 1, 1, 1) + 1e-6)
    t = torch.sigmoid(10 * (torch.nn.functional.interpolate(c[:, None], size=(16, 32, 32), mode="trilinear",
                                                             align_corners=False) - 0.5))
    x_am = x * (1 - t) + torch.nn.functional.avg_pool3d(x, 5, 1, 2, count_include_pad=False) * t
    with torch.no_grad():
        expected = 2.0 * torch.sigmoid(net(x_am, meta)[:, 0] - logits[:, 0]).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(t.detach().max()) > 0.9 and float(t.detach().min()) < 0.1  # the mask marks part of the volume
    loss.backward()
    head = [p for n, p in net.named_parameters() if "layer4" in n and p.grad is not None]
    assert head and any(float(p.grad.abs().sum()) > 0 for p in head)
    with torch.no_grad():    # relative to the volume's own score: moving the output bias leaves the term as it was
        fc = [mod for mod in net.modules() if isinstance(mod, torch.nn.Linear)][-1]
        fc.bias += 3.0
        shifted = mining(net, x, meta, cam.detach(), net(x, meta)[:, 0])
    assert float(shifted) == pytest.approx(float(expected), rel=1e-4)
    # ... and in the gradient: the output bias gets none from this term
    net.zero_grad()
    logits = net(x, meta)
    mining(net, x, meta, guide.cam(logits, torch.tensor([True, True])), logits[:, 0]).backward()
    assert float(fc.bias.grad.abs().max()) < 1e-6
    guide.close()

    data = tmp_path / "vol"
    write_dataset("oct-volume", n=16, seed=4, out=data, size=32)
    for extra in ({}, {"lesion_cam_guidance": 0.5}):
        out = tmp_path / f"am{len(extra)}"
        train("oct_volume_fusion3d_tiny", data, out, TrainConfig(epochs=1, batch_size=4, image_size=32,
                                                                 output_stride=8, attention_mining=0.5,
                                                                 monitor="val_loss", **extra))
        h = json.loads((out / "history.json").read_text())["history"][0]
        assert h["attention_mining_loss"] > 0 and np.isfinite(h["val_loss"])
        assert ("lesion_cam_loss" in h) == bool(extra)
        assert "attention mining 0.5 (GAIN)" in json.loads((out / "manifest.json").read_text())[
            "oct_volume_fusion3d_tiny"]["loss"]
    with pytest.raises(rc.RetinaInputError, match="--attention-mining is not implemented"):
        train("oct_resnet18", data, tmp_path / "r", TrainConfig(epochs=1, attention_mining=0.5))


# ------------------------------------------------------------------------------------------------ dense lesion read-out
def test_volume_lesion_head_reads_out_cells_and_starts_from_the_weights_it_was_given():
    import math

    import torch.nn.functional as F

    from retina_core.train.multimodal import lesion_seg_loss

    plain = _tiny_volume_net(seed=1).eval()
    kw = {**plain.cfg.builder_kwargs, "lesion_head": True}
    net = create_model("oct_volume_fusion3d_tiny", input_size=(1, 32, 32, 32), builder_kwargs=kw).eval()
    # weights trained without the head load into it and give the same outputs (its projection starts at zero)
    missing, unexpected = net.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["lesion_proj.bias", "lesion_proj.weight", "net.avgpool.head.bias",
                               "net.avgpool.head.weight"] and not unexpected
    x, meta = torch.randn(2, 1, 32, 32, 32), torch.full((2, 6), float("nan"))
    with torch.no_grad():
        assert torch.allclose(net(x, meta), plain(x, meta), atol=1e-5)
        s = net.lesion_logits()
        assert s.shape == (2, 4, 4, 4)
        # the evidence is the log-mean-exp of the cell logits: raising one cell raises it
        out = net.net(x)
        assert out.shape == (2, net.net.in_planes + 1)
        assert torch.allclose(out[:, -1], torch.logsumexp(s.flatten(1), 1) - math.log(64), atol=1e-5)

    # loss: class-balanced BCE on the grid cells; normal volumes count as lesion-free, unmarked diseased ones are
    # left out
    logits = torch.full((3, 4, 4, 4), -2.0)
    logits[0, 1, 2, 3] = 3.0
    masks = torch.zeros(3, 32, 32, 32, dtype=torch.bool)
    masks[0, 9:11, 17:19, 25:27] = True           # inside cell (1, 2, 3) of the 4 x 4 x 4 grid
    y = torch.tensor([1, 0, 1])                    # volume 2: diseased, no mask -> not used
    got = lesion_seg_loss(logits, masks, y, weight=2.0)
    pos = F.binary_cross_entropy_with_logits(torch.tensor(3.0), torch.tensor(1.0))
    neg = F.binary_cross_entropy_with_logits(torch.tensor(-2.0), torch.tensor(0.0))
    assert got.item() == pytest.approx(2.0 * 0.5 * (pos + neg).item(), rel=1e-5)
    # a better read-out has a lower loss; only normal / unmarked volumes -> the negative term alone, or nothing
    better = logits.clone()
    better[0, 1, 2, 3] = 6.0
    assert lesion_seg_loss(better, masks, y, 2.0) < got
    assert lesion_seg_loss(logits[1:2], masks[1:2], y[1:2], 1.0).item() == pytest.approx(neg.item(), rel=1e-5)
    assert lesion_seg_loss(logits[2:], masks[2:], y[2:], 1.0).item() == 0.0


def test_volume_read_out_only_image_branch_its_grad_cam_is_the_read_out():
    """`lesion_head="only"` (`train --lesion-only`): the image says only how much lesion the read-out finds, so
    the disease logit's Grad-CAM on layer4 is the read-out itself, ReLU(s(p) - b) up to scale: alpha_k =
    y'(e) w_k / N for every channel k (the log-mean-exp's softmax weights sum to 1)."""
    import torch.nn.functional as F

    from retina_core.explain.volume_methods import volume_cam

    kw = {**_tiny_volume_net().cfg.builder_kwargs, "lesion_head": "only"}
    torch.manual_seed(3)
    net = create_model("oct_volume_fusion3d_tiny", input_size=(1, 32, 32, 32), builder_kwargs=kw).eval()
    assert net.lesion_only and net.lesion_proj.weight.abs().sum() > 0     # not a dead (zero) start
    x, meta = torch.randn(1, 1, 32, 32, 32), torch.full((1, 6), float("nan"))
    with torch.no_grad():
        before = net(x, meta)
        net.image_proj[0].weight.mul_(5.0)        # the pooled features do not reach the decision
        assert torch.allclose(net(x, meta), before)
    # make the logit rise with the evidence (flip the last layer if it falls), so the map is the read-out
    def slope() -> float:
        e = net.net(x)[:, -1:].detach().requires_grad_(True)
        y = net.forward_head(net.fuse(net.image_proj[1](net.lesion_proj(e)), meta))
        return torch.autograd.grad(y.sum(), e)[0].item()

    if slope() < 0:
        with torch.no_grad():
            net.classifier[-1].weight.neg_()
    assert slope() > 0
    _, maps = volume_cam(net, x, meta)
    s = net.lesion_logits()[0]                    # [4, 4, 4]
    head = net.net.avgpool.head
    grid = torch.relu(s - head.bias.detach()[0])[None, None]
    want = F.interpolate(grid, size=(32, 32, 32), mode="trilinear", align_corners=False)[0, 0].detach().numpy()
    want = want / want.max()
    assert np.corrcoef(maps[0].ravel(), want.ravel())[0, 1] > 0.999
    with pytest.raises(ValueError, match="lesion_head"):
        create_model("oct_volume_fusion3d_tiny", input_size=(1, 32, 32, 32), builder_kwargs={**kw, "lesion_head": 2})


def test_volume_training_with_the_lesion_read_out_learns_it_and_reloads(tmp_path, capsys):
    data = tmp_path / "vol"
    write_dataset("oct-volume", n=16, seed=4, out=data, size=32)
    out = tmp_path / "seg"
    train("oct_volume_fusion3d_tiny", data, out, TrainConfig(epochs=2, batch_size=4, image_size=32, output_stride=8,
                                                             lesion_seg=1.0, monitor="val_loss"))
    history = json.loads((out / "history.json").read_text())["history"]
    assert len(history) == 2 and all(h["lesion_seg_loss"] > 0 and np.isfinite(h["val_loss"]) for h in history)
    entry = json.loads((out / "manifest.json").read_text())["oct_volume_fusion3d_tiny"]
    assert entry["builder_kwargs"]["lesion_head"] is True and "dense lesion read-out 1" in entry["loss"]
    m = load_multimodal("oct_volume_fusion3d_tiny", weights_dir=out, device="cpu")
    assert m.net.lesion_head and m.net.lesion_proj.weight.abs().sum() > 0     # the evidence was learnt into use
    from retina_core.volume import run_volume_model

    vol = rc.read_image(sorted((data / "volumes").glob("*.nii.gz"))[0]).pixels
    r = run_volume_model(m, vol, {"age": 70, "hba1c": 6.0})
    assert r.maps.shape == vol.shape and 0.0 <= r.p_disease <= 1.0 and 0.5 < r.maps.max() <= 1.0

    # refusals: no masks at all, and 2-D models
    import shutil
    shutil.rmtree(data / "masks")
    with pytest.raises(rc.RetinaInputError, match="--lesion-seg needs lesion masks"):
        train("oct_volume_fusion3d_tiny", data, tmp_path / "r1", TrainConfig(epochs=1, image_size=32, lesion_seg=1.0))
    assert main(["train", "--model", "oct_resnet18", "--data", str(data), "--out", str(tmp_path / "r2"),
                 "--epochs", "1", "--lesion-seg", "1"]) != 0
    assert "--lesion-seg" in capsys.readouterr().err
    with pytest.raises(rc.RetinaInputError, match="--lesion-only .* needs the read-out trained"):
        train("oct_volume_fusion3d_tiny", data, tmp_path / "r3", TrainConfig(epochs=1, image_size=32, lesion_only=True))
