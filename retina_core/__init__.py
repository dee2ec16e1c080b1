"""retina_core: explainable retinal imaging (fundus photographs, OCT B-scans, OCT volumes).

Research software, not a medical device. Public API:
    list_models(), load_model(name), read_image(path_or_bytes), analyze(image, model, method=None),
    explain(model, sample, method=None, target=None), Modality
Every loaded model answers model.preprocess(sample), model.predict_proba(x) and model.explain(sample), whatever it
reads (a 2-D image, an OCT volume with its record, a fundus + OCT pair). method None is the model's default heatmap
method (Grad-CAM unless `explain-eval --set-default` chose another).
"""
from . import explain
from .about import DISCLAIMER, __version__  # noqa: F401  (__version__: the package version)
from .analysis import DEFAULT_MODELS, Analysis, analyze, analyze_all, get_model
from .errors import RetinaInputError
from .io.decode import RetinalImage, read_image
from .modality import Modality
from .models import create_model, list_models, load_model

__all__ = ["Analysis", "DEFAULT_MODELS", "DISCLAIMER", "Modality", "RetinaInputError", "RetinalImage", "analyze",
           "analyze_all", "create_model", "explain", "get_model", "list_models", "load_model", "read_image"]
