"""Model registry, architectures and safe weight loading, behind one interface for every modality:
`load_model(name)` returns a LoadedModel (2-D images), VolumeModel or PairModel that answers `preprocess`,
`predict_proba` and `explain` alike."""
from ..modality import Modality
from . import cnn  # noqa: F401  (registers the CNN families)
from . import retinal_fusion  # noqa: F401  (RetinalFusionNet, OCT-C8)
from . import vit  # noqa: F401  (RETFound ViT)
from . import fundus_resnet  # noqa: F401  (ResNet + Keras-style head, two-phase)
from . import multimodal  # noqa: F401  (fundus + OCT fusion)
from . import volume3d  # noqa: F401  (OCT volume + metadata, 3D ResNet)
from .loading import LoadedModel, as_model, load_model, read_manifest, weights_dir
from .multimodal import PairModel
from .registry import ModelCfg, create_model, get_cfg, list_models, modality_of, model_cfg, register_model
from .volume3d import VolumeModel

__all__ = ["ModelCfg", "Modality", "create_model", "get_cfg", "list_models", "register_model", "model_cfg",
           "modality_of", "LoadedModel", "VolumeModel", "PairModel", "as_model", "load_model", "read_manifest",
           "weights_dir"]
