"""Model registry in the style of timm: every model has a cfg from which preprocessing and explanation are derived.

    >>> from retina_core.models import list_models, create_model
    >>> net = create_model("oct_resnet18")          # architecture only, random init
    >>> net.cfg.classes
    ('CNV', 'DME', 'DRUSEN', 'NORMAL')
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from torch import nn

from ..errors import RetinaInputError
from ..modality import Modality

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelCfg:
    """Everything a caller needs to feed and read a model; preprocessing is derived from it, never hard-coded."""

    name: str
    arch: str                                   # builder detail, e.g. the timm architecture name
    modality: str                               # a Modality ("" only for a bare network's stand-in cfg)
    classes: tuple[str, ...]
    task: str                                   # one line for people: what the model answers
    input_size: tuple[int, int, int] = (3, 224, 224)   # C, H, W
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    weights: str | None = None                  # file name inside the weights directory
    target_layer: str = ""                      # dotted module path used by the CAM family
    fine_layer: str = ""                        # a finer stage (half the stride) for multiscale_gradcam
    default_method: str = "gradcam"             # heatmap method of `analyze` (the manifest's choice wins)
    referable: tuple[str, ...] = ()             # classes whose suggestion is "refer to a specialist"
    ordinal: bool = False                       # classes are ordered grades (quadratic kappa applies)
    card: str = ""                              # model card text (markdown): architecture, intended use, limits
    builder_kwargs: dict = field(default_factory=dict)
    framing: str = "stretch"                    # "stretch" the frame to input_size, "fov": the field of view
                                                # centred and letterboxed, "disc": the optic disc (models.framing)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


_REGISTRY: dict[str, tuple[ModelCfg, Callable[[ModelCfg], nn.Module]]] = {}


def register_model(cfg: ModelCfg, builder: Callable[[ModelCfg], nn.Module]) -> None:
    if cfg.name in _REGISTRY:
        raise ValueError(f"model {cfg.name!r} registered twice")
    _REGISTRY[cfg.name] = (cfg, builder)


def list_models(modality: Modality | str | None = None) -> list[str]:
    """Names of registered models, optionally only those for one modality."""
    return sorted(n for n, (c, _) in _REGISTRY.items() if modality is None or c.modality == modality)


def get_cfg(name: str) -> ModelCfg:
    try:
        return _REGISTRY[name][0]
    except KeyError:
        raise RetinaInputError(f"Unknown model {name!r}. Available models: {', '.join(list_models())}.") from None


def model_cfg(model) -> ModelCfg | None:
    """The cfg of a LoadedModel, of a network built by `create_model` (its `.cfg`) or of anything that wraps one as
    `.net`; None for a network without one (a bare timm model)."""
    return getattr(model, "cfg", None) or getattr(getattr(model, "net", None), "cfg", None)


def modality_of(model) -> str:
    """The Modality of a registered model name, a LoadedModel or a network with a cfg; "" when unknown."""
    if isinstance(model, str):
        try:
            return get_cfg(model).modality
        except RetinaInputError:
            return ""
    return getattr(model_cfg(model), "modality", "") or ""


def create_model(name: str, **cfg_overrides) -> nn.Module:
    """Build the architecture with random weights; `cfg_overrides` (e.g. input_size) make tiny test variants.

    The returned module carries `.cfg` and exposes `forward_features(x)` and `forward_head(feats)`.
    """
    cfg = get_cfg(name)
    if cfg_overrides:
        cfg = replace(cfg, **cfg_overrides)
    net = _REGISTRY[name][1](cfg)
    net.cfg = cfg
    return net
