"""Shapley values over the inputs of the volume + clinical values model (retina_core.explain.inputs)."""
import numpy as np
import pytest
import torch

from retina_core.errors import RetinaInputError
from retina_core.explain import input_shapley
from retina_core.explain.inputs import shapley_from_coalitions
from retina_core.models import create_model, get_cfg

VOLUME = "oct_volume_fusion3d_tiny"
META = {"age": 71, "sex": "F", "va_logmar": 0.4, "cst_um": 420.0, "hba1c": 8.6}


def _net(fusion="concat", seed=0):
    torch.manual_seed(seed)
    kw = {**get_cfg(VOLUME).builder_kwargs, "fusion": fusion}
    net = create_model(VOLUME, input_size=(1, 8, 16, 16), builder_kwargs=kw).eval()
    net.set_metadata_stats(np.array([60, 0.5, 0.5, 0.2, 280, 5.5]), np.array([15, 0.5, 0.5, 0.2, 60, 1.0]))
    return net


def test_shapley_of_hand_built_games():
    # additive game: each player's value is its own contribution
    w = np.array([0.3, -0.1, 0.5])
    assert np.allclose(shapley_from_coalitions(lambda m: float(np.dot(m, w)), 3), w)
    # unanimity game of players 0 and 1 (player 2 a dummy): they split the unit, the dummy gets nothing
    assert np.allclose(shapley_from_coalitions(lambda m: float(m[0] and m[1]), 3), [0.5, 0.5, 0.0])
    # glove game, one left (0) two right (1, 2): the scarce player gets 2/3
    assert np.allclose(shapley_from_coalitions(lambda m: float(m[0] and (m[1] or m[2])), 3), [2 / 3, 1 / 6, 1 / 6])


def test_input_shapley_adds_up_and_matches_the_model():
    net = _net()
    vol = np.random.default_rng(0).random((8, 16, 16)).astype(np.float32)
    r = input_shapley(net, vol, META, eye="OD")
    assert list(r.values)[0] == "image" and set(r.values) == {"image", *net.meta_features}
    assert sum(r.values.values()) == pytest.approx(r.p - r.p_reference, abs=1e-6)     # efficiency
    assert sum(r.shares().values()) == pytest.approx(1.0)
    # P with every input is the model's own forward
    from retina_core.models.volume3d import encode_metadata, preprocess_volume
    m = torch.from_numpy(encode_metadata(META, "OD", net.meta_features))[None]
    with torch.no_grad():
        p = float(torch.sigmoid(net(preprocess_volume(vol, net.cfg), m)[0, 0]))
    assert r.p == pytest.approx(p, abs=1e-6)
    # a value not recorded is no player: zero, and listed as missing
    r2 = input_shapley(net, vol, {**META, "hba1c": None}, eye="OD")
    assert r2.values["hba1c"] == 0.0 and "hba1c" in r2.missing and r.values["hba1c"] != 0.0
    assert sum(r2.values.values()) == pytest.approx(r2.p - r2.p_reference, abs=1e-6)


def test_image_only_model_gives_the_clinical_values_nothing():
    net = _net("image_only")
    vol = np.random.default_rng(1).random((8, 16, 16)).astype(np.float32)
    r = input_shapley(net, vol, META, eye="OS")
    assert all(v == pytest.approx(0.0, abs=1e-7) for k, v in r.values.items() if k != "image")
    assert r.values["image"] == pytest.approx(r.p - r.p_reference, abs=1e-6)
    assert r.p_metadata_only == pytest.approx(r.p_reference, abs=1e-7)


def test_input_shapley_refuses_other_models_and_shapes():
    with pytest.raises(RetinaInputError, match="OCT volume"):
        input_shapley(create_model("oct_resnet18"), np.zeros((8, 16, 16), np.float32), META)
    with pytest.raises(RetinaInputError, match="one OCT volume"):
        input_shapley(_net(), np.zeros((16, 16), np.float32), META)
