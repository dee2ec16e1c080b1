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
