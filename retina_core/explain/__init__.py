"""Explanations the app serves: heatmaps (cam, attribution; volume_methods for OCT volumes, pair_methods for the
fundus + OCT pair), input attribution (inputs), overlays (overlay) and zone scores (zones). Their research
auditing (explain-eval, counterfactual phantoms, trust metrics) lives in `retina_core.audit`, which imports this
package; this package never imports it.

The package itself is callable, so the public interface reads `retina_core.explain(model, sample, method=...,
target=...)` (= `attribution.explain`: the modality's maps, float32 in [0, 1] at the sample's size; method None is
the model's default). Importing the package installs it as what `LoadedModel.explain` delegates to
(`models.loading.register_explainer`), so `model.explain(sample)` is the same call while models import nothing
from here. Names are loaded lazily, so `import retina_core.explain.cam` loads no other explainer.
"""
import sys
import types
from importlib import import_module

from ..models.loading import register_explainer

_EXPORTS = {
    "explain": "attribution", "explain_batch": "attribution", "available_methods": "attribution",
    "default_method": "attribution", "explain_pair": "attribution", "explain_volume": "volume_methods",
    "ModelMap": "attribution",
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


def _explain(model, sample, method=None, target=None, **kwargs):
    """`attribution.explain`, imported on first use."""
    return import_module(f"{__name__}.attribution").explain(model, sample, method, target, **kwargs)


class _CallableModule(types.ModuleType):
    def __call__(self, model, sample, method=None, target=None, **kwargs):
        return _explain(model, sample, method, target, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
register_explainer(_explain)
