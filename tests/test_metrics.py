import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix, f1_score, roc_auc_score

from retina_core.errors import RetinaInputError
from retina_core.evaluate.metrics import classification_metrics


def _data(n=200, c=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 2.0 * np.eye(c)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


def test_matches_sklearn_multiclass():
    y, p = _data()
    names = ["a", "b", "c", "d"]
    m = classification_metrics(y, p, names, ordinal=True)
    pred = p.argmax(1)
    assert m["n"] == 200
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["auc_macro"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    per_f1 = f1_score(y, pred, average=None)
    assert [m["per_class"][k]["f1"] for k in names] == pytest.approx(per_f1)
    assert m["kappa_quadratic"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    # sensitivity = recall; specificity from counts
    cm = np.array(m["confusion_matrix"])
    for i, k in enumerate(names):
        tp, fn, fp = cm[i, i], cm[i].sum() - cm[i, i], cm[:, i].sum() - cm[i, i]
        tn = cm.sum() - tp - fn - fp
        assert m["per_class"][k]["sensitivity"] == pytest.approx(tp / (tp + fn))
        assert m["per_class"][k]["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["sensitivity_macro"] == pytest.approx(np.mean([m["per_class"][k]["sensitivity"] for k in names]))
    assert len(m["reliability_bins"]) == 15 and sum(b["count"] for b in m["reliability_bins"]) == 200
    assert 0 <= m["ece"] <= 1 and m["notes"] == []
    json.dumps(m, allow_nan=False)


def test_kappa_only_when_ordinal():
    y, p = _data()
    assert classification_metrics(y, p, list("abcd"))["kappa_quadratic"] is None


def test_absent_class_is_reported_and_skipped():
    y, p = _data()
    keep = y != 2
    y, p = y[keep], p[keep]
    m = classification_metrics(y, p, list("abcd"))
    assert m["auc_classes"] == ["a", "b", "d"]
    expected = np.mean([roc_auc_score(y == c, p[:, c]) for c in (0, 1, 3)])
    assert m["auc_macro"] == pytest.approx(expected)
    assert m["per_class"]["c"]["sensitivity"] is None and m["per_class"]["c"]["auc"] is None
    assert any("c" in note for note in m["notes"])
    json.dumps(m, allow_nan=False)


def test_binary_two_columns_and_single_probability_agree():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 100)
    p1 = np.clip(0.3 * y + rng.uniform(0, 0.7, 100), 0, 1)
    m1 = classification_metrics(y, p1, ["normal", "disease"])
    m2 = classification_metrics(y, np.stack([1 - p1, p1], 1), ["normal", "disease"])
    assert m1 == m2
    assert m1["auc_macro"] == pytest.approx(roc_auc_score(y, p1))
    assert m1["accuracy"] == pytest.approx(accuracy_score(y, p1 > 0.5))


def test_bad_input_messages():
    y, p = _data(n=10)
    with pytest.raises(RetinaInputError):
        classification_metrics(y[:5], p, list("abcd"))
    with pytest.raises(RetinaInputError):
        classification_metrics(y, p, list("abc"))
    with pytest.raises(RetinaInputError):
        classification_metrics(y + 4, p, list("abcd"))


def test_bootstrap_resample_metrics_equal_sklearns():
    """The bootstrap's per-resample metrics (numpy: confusion counts, rank AUC, F1 from counts) give exactly
    sklearn's values, ties and absent classes included."""
    from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

    from retina_core.evaluate.metrics import _point

    rng = np.random.default_rng(0)
    for t in range(200):
        n, size = int(rng.integers(2, 5)), int(rng.integers(3, 40))
        y = rng.integers(0, n if t % 3 else n - 1, size)          # every third case: the last class absent
        p = rng.random((size, n)) + 0.05
        p = np.round(p, 1) if t % 2 else p                        # every other case: tied scores
        p = p / p.sum(1, keepdims=True)
        got = _point(y, p, n)
        pred = p.argmax(1)
        cm = confusion_matrix(y, pred, labels=list(range(n)))
        aucs = [roc_auc_score(y == c, p[:, c]) for c in range(n) if 0 < (y == c).sum() < size]
        assert got["accuracy"] == pytest.approx((pred == y).mean())
        assert got["f1_macro"] == pytest.approx(f1_score(y, pred, labels=list(range(n)), average="macro",
                                                          zero_division=0), abs=1e-12)
        if (n == 2 and not 0 < (y == 1).sum() < size) or not aucs:
            assert got["auc_macro"] is None                       # undefined: left out of the interval
        else:
            want_auc = roc_auc_score(y == 1, p[:, 1]) if n == 2 else np.mean(aucs)
            assert got["auc_macro"] == pytest.approx(want_auc, abs=1e-12)
        sens = [cm[c, c] / cm[c].sum() for c in range(n) if cm[c].sum()]
        assert got["sensitivity_macro"] == pytest.approx(np.mean(sens), abs=1e-12)
