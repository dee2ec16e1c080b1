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
    from retina_core.train.engine import HealthyCamPenalty

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
