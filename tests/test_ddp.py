"""Data-parallel training on CPU: two gloo processes on 127.0.0.1 train a tiny model for two steps; the replicas'
parameters (and BatchNorm statistics) agree, and only rank 0 writes."""
import json

import torch
from safetensors.torch import load_file

from retina_core.models import create_model
from retina_core.phantoms import write_dataset
from retina_core.train.distributed import setup, state_digest
from retina_core.train.engine import TrainConfig, spawn_train


def test_two_process_ddp_replicas_agree_and_rank0_writes(tmp_path):
    data = tmp_path / "fundus"
    write_dataset("fundus-4class", n=24, seed=6, out=data, size=48)
    out = tmp_path / "run"
    cfg = TrainConfig(epochs=1, batch_size=4, image_size=32, max_steps_per_epoch=2, recipe="none", augment=False)
    results = spawn_train(2, "fundus_resnet18_head", data, out, cfg)

    assert [r["rank"] for r in results] == [0, 1] and all(r["world_size"] == 2 for r in results)
    assert results[0]["replica_param_digest"] == results[1]["replica_param_digest"]
    assert results[0]["replica_digest"] == results[1]["replica_digest"]
    entry = json.loads((out / "manifest.json").read_text())["fundus_resnet18_head"]
    assert results[0]["sha256"] == results[1]["sha256"] == entry["sha256"]
    assert sorted(p.name for p in out.iterdir()) == ["fundus_resnet18_head.safetensors", "history.json", "last.pt",
                                                     "manifest.json", "splits.json"]   # rank 0 alone writes
    # the replicas trained: their weights are not the seed-0 initialisation
    torch.manual_seed(0)
    init = create_model("fundus_resnet18_head", input_size=(3, 32, 32))
    assert state_digest(init, params_only=True) != results[0]["replica_param_digest"]
    saved = load_file(str(out / entry["file"]))
    assert set(saved) == set(init.state_dict())


def test_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert setup() is None
