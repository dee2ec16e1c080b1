"""The one training loop (train/loop.py) drives every recipe: the image classifiers, the OCT volume model and the
fundus + OCT fusion head each hand `fit` their step and validation, and `finish` their logits, on tiny phantoms."""
import json

import numpy as np
import pytest

from retina_core.phantoms import write_dataset
from retina_core.train import engine, loop, multimodal
from retina_core.train.engine import TrainConfig, train
from tests.test_multimodal_train import _write_encoders

WRITTEN = {"manifest.json", "history.json", "splits.json"}

# model, phantom kind (n, size), TrainConfig fields, files besides weights + WRITTEN, the step's named loss parts
RECIPES = [
    pytest.param("oct_resnet18", ("oct-kermany", 24, 48),
                 {"batch_size": 8, "image_size": 32, "max_steps_per_epoch": 2, "healthy_cam_penalty": 1.0},
                 {"last.pt"}, {"healthy_cam_loss"}, id="image"),
    pytest.param("oct_volume_fusion3d_tiny", ("oct-volume", 12, 32),
                 {"batch_size": 4, "image_size": 32, "output_stride": 8, "lesion_seg": 1.0},
                 set(), {"lesion_seg_loss"}, id="volume"),
    pytest.param("fundus_oct_fusion", ("paired", 16, 48), {"batch_size": 8}, set(), set(), id="fusion"),
]


def test_the_recipes_share_one_loop():
    assert engine.fit is multimodal.fit is loop.fit and engine.finish is multimodal.finish is loop.finish


@pytest.mark.parametrize("model, phantoms, fields, own_files, parts", RECIPES)
def test_one_loop_drives_every_recipe(tmp_path, monkeypatch, capsys, model, phantoms, fields, own_files, parts):
    kind, n, size = phantoms
    data = tmp_path / "data"
    write_dataset(kind, n=n, seed=3, out=data, size=size)
    if model == "fundus_oct_fusion":
        fields = {**fields, "encoders_dir": str(_write_encoders(tmp_path / "enc"))}
    calls = {"fit": 0, "step": 0, "eval": 0, "finish": 0, "logits": []}

    def fit(module, train_set, step_fn, eval_fn, cfg_t, ctx, device, **options):
        calls["fit"] += 1

        def step(model, batch):
            calls["step"] += 1
            return step_fn(model, batch)

        def evaluate():
            calls["eval"] += 1
            return eval_fn()

        return loop.fit(module, train_set, step, evaluate, cfg_t, ctx, device, **options)

    def finish(*args, logits, **kw):
        calls["finish"] += 1

        def scored(split):
            calls["logits"].append(split)
            return logits(split)

        return loop.finish(*args, logits=scored, **kw)

    for recipe in (engine, multimodal):
        monkeypatch.setattr(recipe, "fit", fit)
        monkeypatch.setattr(recipe, "finish", finish)
    out = tmp_path / "run"
    result = train(model, data, out, TrainConfig(epochs=2, warmup_epochs=0, **fields))

    history = json.loads((out / "history.json").read_text())["history"]
    entry = json.loads((out / "manifest.json").read_text())[model]
    n_train, bs = entry["splits"]["train"], fields["batch_size"]
    per_epoch = min(n_train // bs if n_train > bs else 1, fields.get("max_steps_per_epoch") or n_train)
    assert calls["fit"] == calls["finish"] == 1
    assert calls["eval"] == len(history) == entry["epochs_run"] == 2 and calls["step"] == 2 * per_epoch
    assert calls["logits"][0] == "val" and set(calls["logits"]) <= {"val", "test"}
    assert all(np.isfinite(h["train_loss"]) and set(h) - {"val_loss"} == {"epoch", "train_loss", "val_accuracy",
                                                                          "val_score", "seconds", *parts}
               for h in history)
    assert 1 <= entry["best_epoch"] <= 2 and result["sha256"] == entry["sha256"]
    assert sorted(p.name for p in out.iterdir()) == sorted(WRITTEN | own_files | {entry["file"]})
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    assert [line.split(" loss ")[0] for line in progress] == ["epoch 1/2", "epoch 2/2"]
