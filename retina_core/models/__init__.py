"""Model registry, architectures and safe weight loading."""
from . import cnn  # noqa: F401  (registers the CNN families)
from . import retinal_fusion  # noqa: F401  (RetinalFusionNet, OCT-C8)
from . import vit  # noqa: F401  (RETFound ViT)
from . import fundus_resnet  # noqa: F401  (ResNet + Keras-style head, two-phase)
from . import multimodal  # noqa: F401  (fundus + OCT fusion)
from . import volume3d  # noqa: F401  (OCT volume + metadata, 3D ResNet)
from .loading import LoadedModel, load_model, read_manifest, weights_dir
from .registry import ModelCfg, create_model, get_cfg, list_models, register_model

__all__ = ["ModelCfg", "create_model", "get_cfg", "list_models", "register_model",
           "LoadedModel", "load_model", "read_manifest", "weights_dir"]
