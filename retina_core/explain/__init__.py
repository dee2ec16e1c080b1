"""Explanations the app serves: heatmaps (cam, attribution; volume_methods for OCT volumes, pair_methods for the
fundus + OCT pair), input attribution (inputs), overlays (overlay) and zone scores (zones). Their research
auditing (explain-eval, counterfactual phantoms, trust metrics) lives in `retina_core.audit`, which imports this
package; this package never imports it.

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
    "input_shapley": "inputs",
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
