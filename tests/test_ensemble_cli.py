"""`python -m retina_core ensemble`: soft and weighted voting, exhaustive ablation over 2^k - 1 subsets."""
import json

import pytest
import torch
from safetensors.torch import save_file

from retina_core.cli import main
from retina_core.evaluate.ensemble_cli import parse_members, run_ensemble
from retina_core.models import create_model
from retina_core.models.loading import sha256_file
from retina_core.phantoms import write_dataset


def _member(d, name, seed, size=32):
    """Weights for `name` in folder d (random init with its own seed), as `train` writes them."""
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = create_model(name, input_size=(3, size, size))
    f = d / f"{name}.safetensors"
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()},
              str(f))
    entry = {"file": f.name, "sha256": sha256_file(f), "input_size": [3, size, size], "temperature": 1.0,
             "classes": list(net.cfg.classes), "config": {"seed": 0}}
    (d / "manifest.json").write_text(json.dumps({name: entry}))
    return d


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    data = root / "fundus"
    write_dataset("fundus-4class", n=40, seed=8, out=data, size=48)
    dirs = [_member(root / f"m{i}", "fundus_resnet18_head", seed=i) for i in range(3)]
    _member(root / "vit", "retfound_vit_tiny", seed=5)
    _member(root / "oct", "oct_resnet18", seed=5)
    return root, data, dirs


def test_ablation_enumerates_every_subset_and_ranks_them(setup, capsys):
    root, data, dirs = setup
    members = ",".join(f"fundus_resnet18_head@{d}" for d in dirs)
    assert main(["ensemble", "--models", members, "--data", str(data), "--ablation", "--split", "val", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["models"] == [f"fundus_resnet18_head@m{i}" for i in range(3)]
    assert r["n_subsets"] == 2 ** 3 - 1 == len(r["ablation"])
    subsets = {tuple(e["members"]) for e in r["ablation"]}
    assert len(subsets) == 7 and {len(s) for s in subsets} == {1, 2, 3}
    assert [e["rank"] for e in r["ablation"]] == list(range(1, 8))
    scores = [e["score"] for e in r["ablation"]]
    assert scores == sorted(scores, reverse=True)
    assert isinstance(r["beats_best_member"], bool) and r["best_member"] in r["models"]
    assert r["metric_kind"] == "phantom" and r["n"] > 0 and set(r["members"]) == set(r["models"])
    full = next(e for e in r["ablation"] if len(e["members"]) == 3)
    assert full["accuracy"] == r["soft_vote"]["accuracy"]


def test_weighted_vote_with_one_folder_per_member_and_mixed_architectures(setup):
    root, data, dirs = setup
    r = run_ensemble("fundus_resnet18_head,retfound_vit_tiny", data, weights="0.6,0.4",
                     weights_dirs=f"{dirs[0]},{root / 'vit'}", ablate=True, split="val")
    assert r["weights"] == pytest.approx({"fundus_resnet18_head": 0.6, "retfound_vit_tiny": 0.4})
    assert r["n_subsets"] == 3 and "weighted_vote" in r and 0 <= r["weighted_vote"]["accuracy"] <= 1
    assert r["models"] == ["fundus_resnet18_head", "retfound_vit_tiny"]


def test_members_of_different_tasks_are_refused(setup):
    from retina_core.errors import RetinaInputError

    root, data, dirs = setup
    with pytest.raises(RetinaInputError, match="Members disagree"):
        run_ensemble([f"fundus_resnet18_head@{dirs[0]}", f"oct_resnet18@{root / 'oct'}"], data)
    with pytest.raises(RetinaInputError, match="weights"):
        run_ensemble(f"fundus_resnet18_head@{dirs[0]},fundus_resnet18_head@{dirs[1]}", data, weights="1,2,3")


def test_parse_members():
    assert parse_members("a,b@x") == [("a", None), ("b", "x")]
    assert parse_members("a,b", "d") == [("a", "d"), ("b", "d")]
    assert parse_members("a,b", "d1,d2") == [("a", "d1"), ("b", "d2")]


def test_repeats_report_stability_over_seeds_with_two_phase_training(setup):
    from retina_core.train.engine import TrainConfig, train

    root, data, _ = setup
    out = root / "stab"
    cfg = TrainConfig(repeats=2, epochs=2, freeze_epochs=1, batch_size=8, image_size=32, max_steps_per_epoch=1,
                      recipe="two_phase")
    result = train("fundus_resnet18_head", data, out, cfg)
    entry = json.loads((out / "manifest.json").read_text())["fundus_resnet18_head"]
    stab = entry["stability"]
    assert stab["repeats"] == 2 and stab["seeds"] == [0, 1] and stab["accuracy"]["n"] == 2
    assert stab["accuracy"]["sd"] is not None and result["stability"] == stab
    assert (out / "seed0" / "manifest.json").exists() and (out / "seed1" / "manifest.json").exists()
    runs = json.loads((out / "stability.json").read_text())["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    history = json.loads((out / "seed0" / "history.json").read_text())["history"]
    assert [h.get("phase") for h in history] == [1, 2]                       # head only, then layer4 unfrozen
