"""Research auditing of the explanations: explain-eval (evaluate: 2-D images; evaluate_nd: OCT volumes and the
fundus + OCT pair), counterfactual phantoms (counterfactual), trust metrics (trust) and the real-lesion readers
(real_lesions), with the sample readers they score on. What the three explain-eval modules share (samples, the draw
of records, statistics, the ranking of methods) is in `common`, which imports none of them.

This package imports `retina_core.explain` (the heatmaps the app serves); explain never imports it.
Names are loaded lazily, so `import retina_core.audit.trust` stays light.
"""
from importlib import import_module

_EXPORTS = {
    "pointing_game": "trust", "energy_pointing_game": "trust", "deletion_insertion_auc": "trust",
    "randomisation_check": "trust", "stability_under_perturbation": "trust", "class_consistency": "trust",
    "centre_attention_vs_confidence": "trust", "correct_vs_misclassified": "trust",
    "explain_eval": "evaluate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
