"""Data: CIFAR-10 decoded once into uint8 tensors, the LightningDataModule that splits,
transforms and loads it, and the fast tensor path. Imports nothing of training."""

from .cifar import CifarArrays, load_cifar10
from .datamodule import NORMALIZATION, CifarDataModule
from .tensor_loader import TensorLoader

__all__ = ["NORMALIZATION", "CifarArrays", "CifarDataModule", "TensorLoader", "load_cifar10"]
