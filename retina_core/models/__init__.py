"""Model registry, architectures and safe weight loading."""
from . import cnn  # noqa: F401  (registers the CNN families)
from .loading import LoadedModel, load_model, read_manifest, weights_dir
from .registry import ModelCfg, create_model, get_cfg, list_models, register_model

__all__ = ["ModelCfg", "create_model", "get_cfg", "list_models", "register_model",
           "LoadedModel", "load_model", "read_manifest", "weights_dir"]
