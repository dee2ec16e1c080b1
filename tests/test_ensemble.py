import numpy as np
import pytest

from retina_core.evaluate.ensemble import ablation, ensemble_report, soft_vote, stability_summary
from retina_core.evaluate.metrics import classification_metrics

NAMES = ["a", "b", "c"]


def _members(seed=0, n=300):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)

    def member(strength):
        z = rng.normal(size=(n, 3)) + strength * np.eye(3)[y]
        return np.exp(z) / np.exp(z).sum(1, keepdims=True)

    return y, {"m1": member(1.0), "m2": member(1.0), "m3": member(0.3)}


def test_soft_vote_weights_normalised():
    p1 = np.array([[1.0, 0.0], [0.0, 1.0]])
    p2 = np.array([[0.0, 1.0], [0.0, 1.0]])
    assert np.allclose(soft_vote([p1, p2]), [[0.5, 0.5], [0.0, 1.0]])
    assert np.allclose(soft_vote([p1, p2], [3, 1]), [[0.75, 0.25], [0.0, 1.0]])
    assert np.allclose(soft_vote([np.array([0.2, 0.4]), np.array([0.6, 0.8])], [1, 1]), [0.4, 0.6])
    with pytest.raises(ValueError):
        soft_vote([p1, p2], [0, 0])
    with pytest.raises(ValueError):
        soft_vote([p1, p2[:1]])


def test_ablation_every_subset_ranked():
    y, members = _members()
    res = ablation(members, y, NAMES)
    assert len(res) == 7
    assert sorted(tuple(e["members"]) for e in res) == sorted(
        [("m1",), ("m2",), ("m3",), ("m1", "m2"), ("m1", "m3"), ("m2", "m3"), ("m1", "m2", "m3")])
    scores = [e["score"] for e in res]
    assert scores == sorted(scores, reverse=True)
    assert [e["rank"] for e in res] == list(range(1, 8))
    single = next(e for e in res if e["members"] == ["m1"])
    assert single["metrics"] == classification_metrics(y, members["m1"], NAMES)
    pair = next(e for e in res if e["members"] == ["m1", "m3"])
    weighted = ablation(members, y, NAMES, weights={"m1": 3, "m2": 1, "m3": 1})
    wpair = next(e for e in weighted if e["members"] == ["m1", "m3"])
    expected = classification_metrics(y, 0.75 * members["m1"] + 0.25 * members["m3"], NAMES)
    for key in ("accuracy", "auc_macro", "f1_macro", "ece"):
        assert wpair["metrics"][key] == pytest.approx(expected[key])
    assert wpair["metrics"]["confusion_matrix"] == expected["confusion_matrix"]
    assert pair["metrics"]["auc_macro"] != pytest.approx(wpair["metrics"]["auc_macro"])


def test_ablation_lower_is_better_for_ece():
    y, members = _members()
    eces = [e["score"] for e in ablation(members, y, NAMES, metric="ece")]
    assert eces == sorted(eces)


def test_ensemble_report():
    y, members = _members()
    rep = ensemble_report(members, y, NAMES)
    accs = {k: classification_metrics(y, v, NAMES)["accuracy"] for k, v in members.items()}
    assert rep["best_member_score"] == max(accs.values())
    assert rep["best_member"] in ("m1", "m2") and accs[rep["best_member"]] == max(accs.values())
    assert rep["improvement"] == pytest.approx(rep["ensemble_score"] - max(accs.values()))
    assert rep["beats_best_member"] == (rep["improvement"] > 0)
    assert rep["weights"] == pytest.approx({"m1": 1 / 3, "m2": 1 / 3, "m3": 1 / 3})


def test_stability_summary():
    runs = [{"accuracy": 0.9, "per_class": {"a": {"f1": 0.8}}, "confusion_matrix": [[1]], "auc_macro": None},
            {"accuracy": 0.8, "per_class": {"a": {"f1": 0.6}}, "confusion_matrix": [[1]], "auc_macro": 0.7}]
    s = stability_summary(runs)
    assert s["accuracy"]["mean"] == pytest.approx(0.85)
    assert s["accuracy"]["sd"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert s["per_class.a.f1"]["mean"] == pytest.approx(0.7)
    assert s["auc_macro"] == {"mean": 0.7, "sd": None, "min": 0.7, "max": 0.7, "n": 1}
    assert "confusion_matrix" not in s
