"""Pure-PyTorch model zoo: ResNets, their descendants and the networks they were compared to.

Importing nothing from Lightning, Hydra or the rest of this project keeps this package usable
on its own.
"""

from . import airbench, baselines, cifar_resnet, resnet, resnet9  # noqa: F401  (registers the models)
from .factory import create_model, get_classifier
from .registry import ModelInfo, get_model_info, list_models

__all__ = ["ModelInfo", "create_model", "get_classifier", "get_model_info", "list_models"]
