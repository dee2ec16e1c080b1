"""The training engine end to end on a tiny phantom data set: weights, manifest, reload, evaluate."""
import json

import numpy as np
import pytest
import torch

import retina_core as rc
from retina_core.cli import main
from retina_core.models.loading import sha256_file
from retina_core.phantoms import write_dataset
from retina_core.train.engine import TrainConfig, train


def test_train_writes_verified_weights_that_reload_and_evaluate(tmp_path, capsys):
    data = tmp_path / "oct"
    write_dataset("oct-kermany", n=48, seed=3, out=data, size=96)
    out = tmp_path / "run"
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, image_size=64, patience=5, max_steps_per_epoch=3)
    result = train("oct_resnet18", data, out, cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["oct_resnet18"]
    assert entry["sha256"] == sha256_file(out / entry["file"]) == result["sha256"]
    assert entry["trained_on_phantoms"] and entry["metric_kind"] == "phantom"
    assert entry["dtype"] == "float16" and entry["temperature"] > 0
    assert set(entry["splits"]) >= {"train", "val"}
    history = json.loads((out / "history.json").read_text())["history"]
    assert len(history) == 2 and all(np.isfinite(h["train_loss"]) for h in history)

    # Resume continues from the checkpoint instead of starting over.
    again = train("oct_resnet18", data, out, TrainConfig(**{**cfg.__dict__, "epochs": 3, "resume": True}))
    assert again["epochs_run"] == 3


def test_evaluate_cli_on_trained_weights(tmp_path, capsys):
    data = tmp_path / "oct"
    write_dataset("oct-kermany", n=40, seed=5, out=data, size=96)
    out = tmp_path / "run"
    train("oct_resnet18", data, out, TrainConfig(epochs=1, batch_size=8, image_size=64, max_steps_per_epoch=2,
                                                 output_stride=16, global_pool="avgmax"))
    entry = json.loads((out / "manifest.json").read_text())["oct_resnet18"]
    assert entry["builder_kwargs"] == {"output_stride": 16, "global_pool": "avgmax"}   # what the weights need
    m16 = rc.load_model("oct_resnet18", weights_dir=out)
    assert m16.net.net.global_pool.pool_type == "avgmax"
    assert rc.explain(m16, np.zeros((64, 64, 3), np.uint8), "gradcam").shape == (64, 64)
    from retina_core.explain.cam import gradcam_single_pass
    _, cams = gradcam_single_pass(m16.net, torch.randn(1, 3, 64, 64), "net.layer4")
    assert cams.shape == (1, 4, 4)                                  # 64 / 16: the dilated last stage
    # Weights trained at 64 px load into the registered 224-px cfg: the network is fully convolutional.
    assert main(["evaluate", "--model", "oct_resnet18", "--data", str(data), "--weights-dir", str(out),
                 "--split", "val", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metric_kind"] == "phantom" and report["metrics"]["n"] > 0
    assert 0.0 <= report["metrics"]["accuracy"] <= 1.0
    m = rc.load_model("oct_resnet18", weights_dir=out)
    assert m.predict_proba(torch.zeros(1, 3, 224, 224)).sum().item() == pytest.approx(1.0, abs=1e-5)


def _healthy_map_relief(net, x, batch_stats: bool = False) -> float:
    """Mean spatial variance of the per-location class evidence W . A(p) on images x (the penalty's quantity);
    batch_stats: normalise with the batch's statistics, as in training (a few steps leave running stats unsettled)."""
    store = {}
    h = net.net.layer4.register_forward_hook(lambda m, i, o: store.update(a=o.detach()))
    with torch.no_grad():
        net.train(batch_stats)(x)
    h.remove()
    z = torch.einsum("kc,bchw->bkhw", net.net.get_classifier().weight.detach().float(), store["a"].float())
    return float(z.var(dim=(2, 3), correction=0).mean())


def test_healthy_cam_penalty_flattens_healthy_maps_and_leaves_logits_alone(tmp_path):
    from retina_core.errors import RetinaInputError
    from retina_core.models import create_model
    from retina_core.train.guidance import HealthyCamPenalty

    # the penalty is the spatial variance of W . A(p) on the healthy rows only, times its weight
    net = create_model("oct_resnet18", input_size=(3, 64, 64)).eval()
    pen = HealthyCamPenalty(net, net.cfg, 2.0)
    assert pen.healthy == net.cfg.classes.index("NORMAL")
    x = torch.randn(4, 3, 64, 64)
    rows = torch.tensor([True, False, True, False])
    manual = 2.0 * _healthy_map_relief(net, x[rows])
    net(x)
    assert float(pen(rows).detach()) == pytest.approx(manual, rel=1e-4)
    net(x)
    assert float(pen(torch.zeros(4, dtype=torch.bool))) == 0.0
    pen.close()
    for name, kw in (("retfound_vit_tiny", {}), ("retinal_fusion_net_atto", {}),      # no avg pool -> Linear head
                     ("oct_resnet18", {"global_pool": "avgmax"})):
        other = create_model(name, **({"builder_kwargs": kw} if kw else {}))
        with pytest.raises(RetinaInputError, match="healthy-cam-penalty"):
            HealthyCamPenalty(other, other.cfg, 1.0)

    # trained with it, the healthy images' maps are flatter than without it (same seed, same steps)
    data = tmp_path / "oct"
    write_dataset("oct-kermany", n=32, seed=7, out=data, size=64)
    from retina_core.io.datasets import load_dataset
    from retina_core.io.decode import read_image
    from retina_core.models.loading import preprocess_image
    healthy = [r.path for r in load_dataset(data).records if r.label == "NORMAL"]
    relief = {}
    for w in (0.0, 1000.0):     # relief is ~1e-3 logit^2 at initialisation: the weight must be large to matter
        out = tmp_path / f"run{w}"
        train("oct_resnet18", data, out, TrainConfig(epochs=3, batch_size=8, lr=5e-3, image_size=64, patience=5,
                                                     warmup_epochs=0, max_steps_per_epoch=4, healthy_cam_penalty=w,
                                                     output_stride=16))
        m = rc.load_model("oct_resnet18", weights_dir=out)
        xs = torch.cat([preprocess_image(read_image(p).pixels, m.cfg, "cpu") for p in healthy])
        relief[w] = _healthy_map_relief(m.net, xs, batch_stats=True)
        history = json.loads((out / "history.json").read_text())["history"]
        assert ("healthy_cam_loss" in history[0]) == (w > 0)
    assert relief[1000.0] < 0.5 * relief[0.0]


def test_augmentation_moves_the_lesion_mask_with_the_image():
    from retina_core.train.engine import augment_image

    torch.manual_seed(0)
    for _ in range(20):
        x = torch.zeros(3, 32, 32)
        x[:, 5, 9] = 1.0                                   # one bright "lesion" pixel
        mask = torch.zeros(32, 32, dtype=torch.uint8)
        mask[5, 9] = 1
        xa, ma = augment_image(x, "fundus", 1.0, mask=mask)
        peak = divmod(int(xa[1].argmax()), 32)
        assert ma.sum() == 1 and divmod(int(ma.flatten().argmax()), 32) == peak


def test_lesion_cam_guidance_loss_and_training(tmp_path):
    import torch.nn.functional as F

    from retina_core.errors import RetinaInputError
    from retina_core.models import create_model
    from retina_core.train.guidance import LesionCamGuidance

    # the loss is -log of the spatial-softmax mass of z_c = W_c . A(p) on cells holding a lesion pixel, averaged over
    # the true and the (non-healthy) predicted class, on diseased rows with a mask only
    net = create_model("oct_resnet18", input_size=(3, 64, 64)).eval()
    guide = LesionCamGuidance(net, net.cfg, 3.0)
    store = {}
    h = net.net.layer4.register_forward_hook(lambda m, i, o: store.update(a=o.detach()))
    x = torch.randn(3, 3, 64, 64)
    y = torch.tensor([0, 1, 2])                            # CNV, DME, DRUSEN; NORMAL is the healthy class
    masks = torch.zeros(3, 64, 64, dtype=torch.uint8)
    masks[0, :16, :16] = 1
    masks[1, 40:, 40:] = 1                                 # row 2 has no mask: not guided
    with torch.enable_grad():
        logits = net(x)
        loss = guide(masks, y, logits)
    h.remove()
    z = torch.einsum("kc,bchw->bkhw", net.net.get_classifier().weight.detach(), store["a"])
    expected = []
    for r in (0, 1):
        cells = F.adaptive_max_pool2d(masks[r][None, None].float(), z.shape[-2:]).flatten() > 0
        pred = int(logits[r].argmax())
        pred = int(y[r]) if pred == guide.healthy else pred
        for c in (int(y[r]), pred):
            p = z[r, c].flatten().softmax(0)
            expected.append(-torch.log(p[cells].sum()))
    assert float(loss.detach()) == pytest.approx(3.0 * float(torch.stack(expected).mean()), rel=1e-4)
    net(x)
    assert float(guide(torch.zeros_like(masks), y, logits)) == 0.0
    guide.close()
    vit = create_model("retfound_vit_tiny")
    with pytest.raises(RetinaInputError, match="lesion-cam-guidance"):
        LesionCamGuidance(vit, vit.cfg, 1.0)

    # it is a loss the network can follow: steps on it alone move the maps' peaks onto the lesions of a fixed batch
    data = tmp_path / "dr"
    write_dataset("fundus-dr", n=40, seed=3, out=data, size=96)
    from retina_core.io.datasets import load_dataset
    from retina_core.train.engine import CachedImages
    recs = [r for r in load_dataset(data).records if r.label != "No DR"]
    torch.manual_seed(0)
    dr = create_model("fundus_dr_effnet_b0", input_size=(3, 96, 96), builder_kwargs={"output_stride": 16}).train()
    ds = CachedImages(recs, dr.cfg.classes, dr.cfg, augment=False, mask_root=data)
    assert all(int(ds[i][2].sum()) > 0 for i in range(len(ds)))          # every diseased phantom has its mask
    xs, ys, ms = (torch.stack([ds[i][k] for i in range(16)]) for k in range(3))
    probe = LesionCamGuidance(dr, dr.cfg, 1.0)
    opt = torch.optim.AdamW(dr.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        step_loss = probe(ms, ys, dr(xs))
        opt.zero_grad()
        step_loss.backward()
        opt.step()
        losses.append(float(step_loss.detach()))
    probe.close()
    assert losses[-1] < 0.2 * losses[0]

    # and train() runs with it, logging its share of the loss per epoch
    out = tmp_path / "guided"
    train("fundus_dr_effnet_b0", data, out, TrainConfig(epochs=1, batch_size=8, image_size=96, warmup_epochs=0,
                                                        max_steps_per_epoch=2, lesion_cam_guidance=0.05))
    history = json.loads((out / "history.json").read_text())["history"]
    assert history[0]["lesion_cam_loss"] > 0
    assert rc.load_model("fundus_dr_effnet_b0", weights_dir=out).cfg.input_size == (3, 96, 96)

    # no masks on disk, or mixup: a clear refusal
    plain = tmp_path / "plain"
    write_dataset("oct-kermany", n=16, seed=1, out=plain, size=64)
    import shutil
    shutil.rmtree(plain / "masks", ignore_errors=True)
    for cfg_kw, msg in (({}, "needs lesion masks"), ({"mixup": 0.2}, "mixup")):
        with pytest.raises(RetinaInputError, match=msg):
            train("oct_resnet18", plain, tmp_path / "refused", TrainConfig(epochs=1, batch_size=8, image_size=64,
                                                                        lesion_cam_guidance=1.0, **cfg_kw))


def test_monitor_val_loss_selects_by_the_whole_validation_objective(tmp_path, capsys):
    """--monitor val_loss: the training objective on the validation split (cross-entropy + the CAM terms on the
    split's masks) picks the best epoch - AUC saturates on easy sets and would keep the first perfect epoch."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from retina_core.io.datasets import load_dataset
    from retina_core.models import create_model
    from retina_core.train.engine import CachedImages, predict_logits, validation_loss
    from retina_core.train.guidance import LesionCamGuidance

    data = tmp_path / "oct"
    write_dataset("oct-kermany", n=24, seed=5, out=data, size=64)
    recs = load_dataset(data).records
    torch.manual_seed(0)
    net = create_model("oct_resnet18", input_size=(3, 64, 64)).eval()
    cfg_t = TrainConfig(label_smoothing=0.1)
    ds = CachedImages(recs, net.cfg.classes, net.cfg, augment=False, mask_root=data)
    loader = DataLoader(ds, batch_size=5)
    # without CAM terms it is the mean cross-entropy of the eval-mode logits
    z, y = predict_logits(net, loader, torch.device("cpu"))
    ce = float(F.cross_entropy(torch.from_numpy(z), torch.from_numpy(y), label_smoothing=0.1))
    assert validation_loss(net, loader, torch.device("cpu"), cfg_t) == pytest.approx(ce, rel=1e-5)
    # with the guidance it adds the guidance term of the masked diseased images (> 0: -log of a mass < 1)
    guide = LesionCamGuidance(net, net.cfg, 1.0)
    assert validation_loss(net, loader, torch.device("cpu"), cfg_t, guide=guide) > ce + 1e-3
    guide.close()
    assert all(p.grad is None for p in net.parameters())   # nothing accumulated or stepped

    out = tmp_path / "run"
    assert main(["train", "--model", "oct_resnet18", "--data", str(data), "--out", str(out), "--epochs", "3",
                 "--batch-size", "8", "--image-size", "64", "--warmup-epochs", "0", "--patience", "3",
                 "--lesion-cam-guidance", "0.5", "--monitor", "val_loss", "--json"]) == 0
    assert "val val_loss" in capsys.readouterr().err
    history = json.loads((out / "history.json").read_text())["history"]
    losses = [h["val_loss"] for h in history]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert all(h["val_score"] == pytest.approx(-h["val_loss"]) for h in history)
    entry = json.loads((out / "manifest.json").read_text())["oct_resnet18"]
    assert entry["best_epoch"] == int(np.argmin(losses)) + 1 and entry["config"]["monitor"] == "val_loss"

    # an unknown monitor is refused before anything is decoded, not silently replaced by accuracy
    assert main(["train", "--model", "oct_resnet18", "--data", str(data), "--out", str(tmp_path / "x"),
                 "--monitor", "auc"]) != 0
    assert "Unknown --monitor 'auc'" in capsys.readouterr().err
