"""Data: CIFAR-10/100 decoded once into uint8 tensors, image folders decoded file by file, the
LightningDataModules that split, transform and load them, and the fast tensor path. Imports
nothing of training."""

from .cifar import CifarArrays, load_cifar, load_cifar10
from .datamodule import NORMALIZATION, CifarDataModule
from .image_folder import ImageFolderDataModule, image_folder_classes
from .tensor_loader import TensorLoader

__all__ = [
    "NORMALIZATION",
    "CifarArrays",
    "CifarDataModule",
    "ImageFolderDataModule",
    "TensorLoader",
    "image_folder_classes",
    "load_cifar",
    "load_cifar10",
]
