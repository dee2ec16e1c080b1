"""One interface for every loaded model (issue "One clear house"): an image model, a volume model and a pair model,
each loaded from tiny sha256-checked weights, answer preprocess -> predict_proba -> explain alike, with results equal
to what the older entry points compute; the Modality enum keeps stored values plain strings."""
import datetime as dt
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import retina_core as rc
from retina_core.explain.attribution import explain_batch, to_pixels
from retina_core.explain.pair_methods import pair_maps, resolve_net
from retina_core.explain.volume_methods import explain_volume
from retina_core.modality import Modality
from retina_core.models import (LoadedModel, PairModel, VolumeModel, as_model, create_model, get_cfg, load_model,
                                model_cfg, modality_of)
from retina_core.models.loading import preprocess_image, sha256_file
from retina_core.models.volume3d import encode_metadata, preprocess_volume
from retina_core.phantoms import oct_phantom, oct_volume, paired_phantoms
from retina_core.volume import run_volume_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGE, VOLUME, PAIR = "oct_resnet18", "oct_volume_fusion3d_tiny", "fundus_oct_fusion"
ENCODERS = ("fundus_dr_effnet_b0", "oct_resnet18")


def _write(d, manifest: dict, name: str, net: torch.nn.Module, **entry) -> None:
    state = net.head_state_dict() if hasattr(net, "head_state_dict") else net.state_dict()
    f = d / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(f))
    manifest[name] = {"file": f.name, "sha256": sha256_file(f), "classes": list(net.cfg.classes), **entry}
    (d / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Tiny random weights, as `train` writes them: the B-scan model (also the fusion's OCT encoder) and the fundus
    encoder at 32 px, the volume model at 16 x 32 x 32, and the fusion head tied to those encoders."""
    d = tmp_path_factory.mktemp("tiny_weights")
    manifest: dict = {}
    torch.manual_seed(0)
    for name in ENCODERS:
        _write(d, manifest, name, create_model(name, input_size=(3, 32, 32)), input_size=[3, 32, 32])
    kw = {**get_cfg(VOLUME).builder_kwargs, "conv1_stride": 1}
    _write(d, manifest, VOLUME, create_model(VOLUME, input_size=(1, 16, 32, 32), builder_kwargs=kw),
           input_size=[1, 16, 32, 32], builder_kwargs={"conv1_stride": 1})
    fusion = create_model(PAIR, builder_kwargs={**get_cfg(PAIR).builder_kwargs, "encoders_dir": str(d)})
    _write(d, manifest, PAIR, fusion, head_only=True)
    return d


# ------------------------------------------------------------------------------------ what the older code computed
def _old_image_probs(model, img):
    x = preprocess_image(to_pixels(img), model.cfg)
    with torch.no_grad():
        return torch.softmax(model.net(x).float() / model.temperature, dim=1).numpy()


def _old_image_maps(model, img):
    return explain_batch(model, to_pixels(img)[None])[0][0]


def _old_volume_probs(model, sample):
    vol, meta, eye = sample
    m = torch.from_numpy(encode_metadata(meta, eye, model.net.meta_features))[None]
    with torch.no_grad():
        p = float(torch.sigmoid(model.net(preprocess_volume(vol, model.cfg), m).float()[0, 0] / model.temperature))
    assert run_volume_model(model, vol, meta, eye).p_disease == pytest.approx(p, abs=1e-6)
    return np.array([[1.0 - p, p]])


def _old_volume_maps(model, sample):
    vol, meta, eye = sample
    return explain_volume(model, vol, meta=meta, eye=eye)


def _old_pair_probs(model, pair):
    a, b = model.net.preprocess_pair(to_pixels(pair[0]), to_pixels(pair[1]))
    with torch.no_grad():
        return torch.softmax(model.net(a, b).float() / model.temperature, dim=1).numpy()


def _old_pair_maps(model, pair):
    return pair_maps(resolve_net(model), model.net, to_pixels(pair[0]), to_pixels(pair[1]))[2]


@dataclass
class Case:
    name: str
    cls: type
    modality: Modality
    sample: Callable[[], object]
    old_probs: Callable
    old_maps: Callable


def _volume_sample():
    ph = oct_volume("DME", seed=4, n_slices=12, height=40, width=36)
    return ph.image, {"age": 70, "sex": "F", "hba1c": 8.5}, "OD"


def _pair_sample():
    f, o = paired_phantoms(5, fundus_size=48, oct_width=44, oct_height=40, disease=True)
    return f.image, o.image


CASES = [
    Case(IMAGE, LoadedModel, Modality.OCT, lambda: oct_phantom("CNV", seed=3, width=48, height=40).image,
         _old_image_probs, _old_image_maps),
    Case(VOLUME, VolumeModel, Modality.OCT_VOLUME, _volume_sample, _old_volume_probs, _old_volume_maps),
    Case(PAIR, PairModel, Modality.FUNDUS_OCT, _pair_sample, _old_pair_probs, _old_pair_maps),
]


def _leaves(maps) -> list[tuple[str | None, np.ndarray]]:
    """The maps of one sample as (key, map) pairs: one map (key None), or a pair's per-modality maps."""
    return sorted(maps.items()) if isinstance(maps, dict) else [(None, maps)]


def _inputs(x) -> tuple:
    """`preprocess`'s result as the positional inputs of the older `predict_proba(batch, *extra)` call."""
    return tuple(x) if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_model_answers_preprocess_predict_proba_explain(case, weights, monkeypatch):
    monkeypatch.setenv("RETINA_ENCODERS_DIR", str(weights))           # where the fusion head finds its encoders
    model = load_model(case.name, weights_dir=weights, device="cpu")
    assert type(model) is case.cls and model.modality == case.modality and modality_of(model) == case.modality
    sample = case.sample()

    x = model.preprocess(sample)
    p = model.predict_proba(x)
    assert p.shape == (1, model.cfg.num_classes) and torch.allclose(p.sum(1), torch.ones(1))
    np.testing.assert_allclose(p.numpy(), case.old_probs(model, sample), atol=1e-5)
    assert torch.equal(model.predict_proba(*_inputs(x)), p)               # the older positional form

    maps = model.explain(sample)
    old = case.old_maps(model, sample)
    assert [(k, m.shape) for k, m in _leaves(maps)] == [(k, m.shape) for k, m in _leaves(old)]
    for (_, got), (_, want) in zip(_leaves(maps), _leaves(old)):
        assert got.dtype == np.float32 and 0.0 <= got.min() and got.max() <= 1.0
        np.testing.assert_allclose(got, want, atol=1e-5)
    for (_, got), (_, want) in zip(_leaves(rc.explain(model, sample)), _leaves(maps)):   # the package's entry
        np.testing.assert_array_equal(got, want)


def test_the_sample_sizes_the_maps(weights):
    """Maps come back at each sample's own size: the B-scan's, the volume's, each image of the pair's."""
    image = load_model(IMAGE, weights_dir=weights, device="cpu")
    assert image.explain(CASES[0].sample()).shape == (40, 48)
    volume = load_model(VOLUME, weights_dir=weights, device="cpu")
    vol, meta, eye = _volume_sample()
    assert volume.explain(vol, meta=meta, eye=eye).shape == (12, 40, 36)
    x, record = volume.preprocess(vol, meta, eye)
    assert x.shape == (1, 1, 16, 32, 32) and record.shape == (1, len(volume.net.meta_features))
    pair = load_model(PAIR, weights_dir=weights, device="cpu", encoders_dir=str(weights))
    f, o = _pair_sample()
    maps = pair.explain({"fundus": f, "oct": o})
    assert maps["fundus"].shape == (48, 48) and maps[Modality.OCT].shape == (40, 44)


def test_as_model_wraps_bare_networks_by_modality(tiny_volume_net):
    torch.manual_seed(0)
    image_net = create_model("retinal_fusion_net_atto", input_size=(3, 32, 32)).eval()
    for net, cls in ((image_net, LoadedModel), (tiny_volume_net, VolumeModel)):
        m = as_model(net)
        assert type(m) is cls and m.net is net and m.temperature == 1.0 and m.sha256 is None
        assert model_cfg(m) is model_cfg(net) is net.cfg
        assert as_model(m) is m
    base = LoadedModel("v", tiny_volume_net.cfg, tiny_volume_net, torch.device("cpu"), None, 2.0)
    rewrapped = as_model(base)
    assert type(rewrapped) is VolumeModel and rewrapped.temperature == 2.0
    assert model_cfg(torch.nn.Linear(2, 2)) is None and modality_of("no_such_model") == ""


def test_modality_is_a_str_whose_value_is_what_json_and_csv_write():
    import csv
    import io

    assert Modality.OCT_VOLUME == "oct_volume" and Modality("fundus+oct") is Modality.FUNDUS_OCT
    assert json.dumps({Modality.OCT: [Modality.FUNDUS]}) == '{"oct": ["fundus"]}'
    assert f"{Modality.FUNDUS_OCT}" == str(Modality.FUNDUS_OCT) == "fundus+oct" and type(str(Modality.OCT)) is str
    buf = io.StringIO()
    csv.writer(buf).writerow([Modality.OCT_VOLUME])
    assert buf.getvalue().strip() == "oct_volume"
    assert {m.value for m in Modality} == {get_cfg(n).modality for n in rc.list_models()}


def test_a_reading_stores_its_modality_as_the_plain_string(clinic):
    """Analysis keeps `modality` a plain str (a driver may dump an Enum by name): the database holds the value."""
    from dataclasses import replace

    from retina_core.clinic import records
    from retina_core.clinic.testing import synthetic_analysis, synthetic_image

    img = synthetic_image(3)
    a = replace(synthetic_analysis(img, {"normal": 0.3, "disease": 0.7}), modality=Modality.OCT_VOLUME)
    assert type(a.modality) is str and type(a.to_dict()["modality"]) is str
    saved = records.save_reading(clinic, case_ref="SCR-0077", eye="OD", visit_date=dt.date(2026, 2, 1), image=img,
                                 analyses=[a], actor="dr-a")
    view = records.case_view(clinic, saved.case_id)
    image = view.eyes[0].visits[0].images[0]
    assert image.modality == "oct_volume" and type(image.modality) is str
    assert image.analyses[0].modality == "oct_volume"
