"""What 2-D, volume and pair explain-eval share (`audit.common`: the per-map checks and their summaries, the method
loop, the one `resize_volume`) and the counterfactual skeleton the three `*_lesion_reliance` share
(`audit.counterfactual.counterfactual_eyes` / `reliance_report`): one test body over image, volume and pair cases."""
import numpy as np
import pytest

from retina_core.audit import common, trust
from retina_core.audit import counterfactual as cf

pytestmark = pytest.mark.usefixtures("one_torch_thread")     # one torch thread here too (conftest)

# (case, map shape, key suffix): a 2-D image map, a [D, H, W] volume map, one input of a pair (suffixed keys)
CASES = [("image", (32, 32), ""), ("volume", (4, 16, 16), ""), ("pair", (24, 24), "_fundus")]


@pytest.mark.parametrize("case,shape,suffix", CASES, ids=[c[0] for c in CASES])
def test_check_map_and_its_summaries(case, shape, suffix):
    rng = np.random.default_rng(3)
    maps = [rng.random(shape).astype(np.float32) for _ in range(3)]
    calls = []

    def score(hm):                                  # stands in for deletion / insertion of the input
        calls.append(hm)
        return {"deletion_auc": float(hm.mean()), "insertion_auc": float(1.0 - hm.mean())}

    per = {k: [] for k in ("del", "ins", "del_rand", "ins_rand", "rho", "r_empty")}
    stab = common.stability_lists(("noise", "shift"))
    reference: dict = {}
    for run in range(2):                            # two methods: the random-map curves are drawn once per image
        for i, hm in enumerate(maps):
            common.check_map(per, stab, hm, 7 + i, score=score, reference=reference, key=i,
                             randomised=lambda hm=hm: (0.25, False),
                             perturbed=lambda: {"noise": {"ssim": 1.0, "spearman": 0.5},
                                                "shift": {"ssim": 0.5, "spearman": None}})
    assert len(calls) == 2 * len(maps) + len(maps)  # each map twice, each random map once
    for i in range(len(maps)):
        rm = trust.random_map(shape, 7 + i)
        assert per["del_rand"][i] == per["del_rand"][i + len(maps)] == pytest.approx(float(rm.mean()))
    f = common.faithfulness_summary(per, suffix)
    assert f["deletion_auc" + suffix] == pytest.approx(np.mean([m.mean() for m in maps]))
    assert f["faithful_vs_random" + suffix] == (f["deletion_auc" + suffix] < f["deletion_auc_random_map" + suffix])
    assert set(f) == {k + suffix for k in ("deletion_auc", "insertion_auc", "deletion_auc_random_map",
                                           "insertion_auc_random_map", "faithful_vs_random")}
    r = common.randomisation_summary(per, suffix, changed=not suffix)
    assert r["randomisation_abs_spearman" + suffix] == 0.25 and r["randomisation_empty_fraction" + suffix] == 0.0
    assert ("randomisation_changed_fraction" + suffix in r) == (not suffix)
    s = common.stability_summary(stab, suffix)
    assert s["stability" + suffix] == {"noise": {"ssim": 1.0, "spearman": 0.5}, "shift": {"ssim": 0.5,
                                                                                         "spearman": None}}
    assert s["stability_ssim" + suffix] == 0.75 and s["stability_spearman" + suffix] == 0.5
    # nothing asked, nothing collected (a map left out of the checks)
    empty = {k: [] for k in per}
    common.check_map(empty, common.stability_lists(()), maps[0], 0)
    assert not any(empty.values())


@pytest.mark.parametrize("cost_in_wall", [False, True], ids=["2-D", "volume / pair"])
def test_run_methods_times_each_method_once(cost_in_wall):
    costs = []
    res = common.run_methods(["a", "b"], lambda meth: {"x": meth}, lambda meth: costs.append(meth) or 1.5,
                             "m", cost_in_wall)
    assert list(res) == ["a", "b"] and costs == ["a", "b"]
    assert all(r["cost_vs_forward"] == 1.5 and r["wall_seconds"] >= 0 for r in res.values())
    assert list(res["a"])[1:] == (["cost_vs_forward", "wall_seconds"] if cost_in_wall
                                  else ["wall_seconds", "cost_vs_forward"])
    assert common.method_list(" a, b,") == ["a", "b"] == common.method_list(("a", "b"))


def test_one_resize_volume_audit_clips():
    from retina_core.explain.volume_methods import resize_volume

    v = np.linspace(-0.5, 1.5, 4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    plain = resize_volume(v, (8, 16, 16))
    assert plain.min() < 0 and plain.max() > 1                          # maps: not clipped
    assert np.array_equal(common.resize_volume(v, (8, 16, 16)), plain.clip(0, 1))
    assert np.array_equal(resize_volume(v, (8, 16, 16), clip=True), plain.clip(0, 1))
    assert common.resize_volume(v, v.shape).dtype == np.float32


# ------------------------------------------------------------------------------------------------ counterfactuals
def _render(case, without):
    """A tiny phantom eye of each kind, re-rendered without `without` (pairs: (fundus part, OCT part))."""
    from retina_core.phantoms.fundus import fundus_phantom
    from retina_core.phantoms.oct import oct_phantom
    from retina_core.phantoms.volume import oct_volume

    if case == "image":
        return oct_phantom("DME", 4, 48, 48, patient_seed=2, without=without).image.astype(np.float32)
    if case == "volume":
        return oct_volume("DME", 4, 4, 32, 32, without=without).image.astype(np.float32)
    return np.concatenate([fundus_phantom("Moderate", 4, 48, without=without[0]).image.astype(np.float32).ravel(),
                           oct_phantom("DME", 4, 48, 48, without=without[1]).image.astype(np.float32).ravel()])


REL_CASES = [("image", cf.VARIANTS), ("volume", cf.VARIANTS), ("pair", cf.PAIR_VARIANTS)]


@pytest.mark.parametrize("case,variants", REL_CASES, ids=[c[0] for c in REL_CASES])
def test_counterfactual_skeleton(case, variants):
    """Records drawn, each re-rendered per variant, the original checked once, unchanged variants None, a stand-in
    P = mean intensity per variant, the pointing game on the original only, per-class summaries and the report."""
    checked, scored = [], []

    def eye_of(r, n_classes):
        if r == "healthy":
            return None                             # skipped records add nothing

        def score(name, v, out):
            scored.append(name)
            out[name] = {"p": float(v.mean()), "called": bool(v.mean() > 0)}
            if name == "original":
                out["pointing_game"] = 1.0

        return cf.Eye("cls", lambda without: _render(case, without), checked.append,
                      lambda v, o: np.array_equal(v, o), score)

    per = cf.counterfactual_eyes(["eye", "healthy", "eye"], variants, eye_of)
    assert list(per) == ["cls"] and len(per["cls"]) == 2 and len(checked) == 2
    originals = _render(case, variants["original"])
    for name, without in variants.items():
        changed = not np.array_equal(_render(case, without), originals)
        for out in per["cls"]:
            assert (out[name] is None) == (name != "original" and not changed)
        assert scored.count(name) == (2 if name == "original" or changed else 0)
    rep = cf.reliance_report("d", "all", case, "gradcam", variants, per, head={"healthy_class": None},
                             tail={"extra": 1}, note="n")
    assert list(rep) == ["data", "split", "modality", "method", "variants", "healthy_class", "n_volumes",
                         "per_class", "extra", "note"]
    s = rep["per_class"]["cls"]
    assert rep["n_volumes"] == s["n"] == 2 and s["pointing_game"] == 1.0
    assert s["original"]["p_disease"] == pytest.approx(float(originals.mean()))
    for name, without in variants.items():
        if name != "original" and s[name] is not None:
            assert s[name]["drop"] == pytest.approx(float(originals.mean() - _render(case, without).mean()), abs=1e-6)


@pytest.mark.parametrize("case,used", [("image", None), ("volume", "test"), ("pair", "all")])
def test_evaluation_samples_and_ranked(case, used):
    from retina_core.errors import RetinaInputError

    items = [f"{case}{i}" for i in range(5)]
    assert common.evaluation_samples(items, None, lambda: items, None, 3, "none") == (items[:3], "3 in-memory phantoms",
                                                                                    None)
    assert common.evaluation_samples(None, "/d", None, lambda: (items, used), 3, "none") == (items, "/d", used)
    with pytest.raises(RetinaInputError, match="needs data_path or phantoms"):
        common.evaluation_samples(None, None, None, None, 3, "none")
    with pytest.raises(RetinaInputError, match=f"no {case}"):
        common.evaluation_samples([], None, lambda: [], None, 3, f"no {case}")
    results = {"a": {"pointing_game": 0.2, "deletion_auc": 0.5}, "b": {"pointing_game": 0.9, "deletion_auc": 0.1}}
    rep = common.ranked(results)
    assert list(rep) == ["methods", "ranking", "recommended_default"] and rep["methods"] is results
    assert [r["method"] for r in rep["ranking"]] == ["b", "a"] and rep["recommended_default"]["method"] == "b"
