"""The CIFAR-10 LightningDataModule: data, split, transforms and loaders, nothing else."""

from __future__ import annotations

import os

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from resnet_lightning.cifar import CifarArrays, load_cifar10
from resnet_lightning.errors import DataError, UsageError

# Per-channel statistics of the training images, and torchvision's ImageNet ones for
# networks whose pretrained weights expect them.
NORMALIZATION = {
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class ImageTensorDataset(Dataset):
    """Views uint8 HWC images through an index (no copy); items go through PIL like
    torchvision's CIFAR10."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: v2.Transform,
        index: torch.Tensor | None = None,
    ):
        self.images, self.labels, self.transform = images, labels, transform
        self.index = torch.arange(len(labels)) if index is None else index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.index[i])
        return self.transform(Image.fromarray(self.images[j].numpy())), int(self.labels[j])


class CifarDataModule(L.LightningDataModule):
    """CIFAR-10 (or any 32 px image-folder data set) with a seeded validation split.

    Args:
        root: cache folder; torchvision downloads here when `path` is None.
        path: an image-folder tree or .tar/.tar.gz/.zip of one, used instead of the download.
        num_classes: expected number of classes; checked against the data.
        batch_size: per device (under DDP each process loads this many).
        val_size: training images held out for validation; 0 validates on the test set.
        split_seed: seed of the validation split, fixed apart from the run's seed so that
            runs with different seeds are validated on the same images.
        image_size: 32, or e.g. 224 to resize for ImageNet-style networks.
        normalization: "cifar" or "imagenet" mean/std.
        augment: random crop (padding 4) and horizontal flip for training.
    """

    def __init__(
        self,
        root: str = "data",
        path: str | None = None,
        num_classes: int = 10,
        batch_size: int = 128,
        num_workers: int = 2,
        pin_memory: bool = True,
        val_size: int = 5000,
        split_seed: int = 0,
        image_size: int = 32,
        normalization: str = "cifar",
        augment: bool = True,
    ):
        super().__init__()
        if batch_size <= 0:
            raise UsageError(f"data.batch_size={batch_size} must be positive, e.g. 128")
        if val_size < 0:
            raise UsageError(f"data.val_size={val_size} must be >= 0 (0 validates on test)")
        if num_workers < 0:
            raise UsageError(f"data.num_workers={num_workers} must be >= 0")
        if normalization not in NORMALIZATION:
            raise UsageError(
                f"data.normalization={normalization!r} is unknown; use one of "
                f"{', '.join(NORMALIZATION)}"
            )
        self.save_hyperparameters()
        self.arrays: CifarArrays | None = None

    @property
    def classes(self) -> list[str]:
        return self.arrays.classes

    def prepare_data(self) -> None:
        # Runs on one process per node: downloads and decodes into the cache.
        load_cifar10(self.hparams.root, self._path())

    def setup(self, stage: str | None = None) -> None:
        if self.arrays is not None:
            return
        self.arrays = load_cifar10(self.hparams.root, self._path())
        found = len(self.arrays.classes)
        if found != self.hparams.num_classes:
            raise DataError(
                f"the data has {found} classes but data.num_classes={self.hparams.num_classes}; "
                f"set data.num_classes={found}"
            )
        n_train, val_size = len(self.arrays.train_labels), self.hparams.val_size
        if val_size >= n_train:
            raise UsageError(
                f"data.val_size={val_size} leaves no training images (the set has {n_train})"
            )
        generator = torch.Generator().manual_seed(self.hparams.split_seed)
        order = torch.randperm(n_train, generator=generator)
        self.train_index, self.val_index = order[val_size:], order[:val_size]

    def _path(self) -> str | None:
        path = self.hparams.path
        return os.path.expanduser(path) if path else None

    def transform(self, train: bool) -> v2.Transform:
        mean, std = NORMALIZATION[self.hparams.normalization]
        steps = []
        if train and self.hparams.augment:
            steps += [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
        if self.hparams.image_size != 32:
            steps.append(v2.Resize(self.hparams.image_size, antialias=True))
        steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        return v2.Compose(steps)

    def _dataset(self, split: str) -> ImageTensorDataset:
        a = self.arrays
        if split == "test" or (split == "val" and self.hparams.val_size == 0):
            return ImageTensorDataset(a.test_images, a.test_labels, self.transform(train=False))
        index = self.train_index if split == "train" else self.val_index
        return ImageTensorDataset(
            a.train_images, a.train_labels, self.transform(split == "train"), index
        )

    def _loader(self, split: str) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            self._dataset(split),
            batch_size=self.hparams.batch_size,
            shuffle=split == "train",
            drop_last=split == "train",
            num_workers=workers,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
