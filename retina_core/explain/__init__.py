"""Explanations: heatmaps (cam, attribution), zone scores (zones), trust checks (trust) and their evaluation (evaluate).

The package itself is callable, so the public interface reads `retina_core.explain(model, image, method=...,
target=...)` (= `attribution.explain`: a float32 [H, W] map in [0, 1]; method None is the model's default).
Names are loaded lazily, so `import retina_core.explain.cam` stays as light as before.
"""
import sys
import types
from importlib import import_module

_EXPORTS = {
    "explain": "attribution", "explain_batch": "attribution", "available_methods": "attribution",
    "default_method": "attribution", "explain_pair": "attribution", "explain_volume": "volume_methods",
    "ALL_METHODS": "attribution", "VIT_METHODS": "attribution", "make_predict_fn": "attribution",
    "centre_lr_shares": "zones", "etdrs_zone_scores": "zones", "etdrs_grid_mask": "zones",
    "optic_disc_zone": "zones", "oct_zone_scores": "zones", "locate_fovea_and_disc": "zones",
    "ETDRS_SUBFIELDS": "zones", "locate_oct_fovea": "zones", "zone_report": "zones",
    "pointing_game": "trust", "energy_pointing_game": "trust", "deletion_insertion_auc": "trust",
    "randomisation_check": "trust", "stability_under_perturbation": "trust", "class_consistency": "trust",
    "centre_attention_vs_confidence": "trust", "correct_vs_misclassified": "trust",
    "explain_eval": "evaluate", "input_shapley": "inputs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    def __call__(self, model, image, method=None, target=None, **kwargs):
        return import_module(f"{__name__}.attribution").explain(model, image, method, target, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
