"""The CIFAR-10 LightningDataModule: data, split, transforms and loaders, nothing else."""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from resnet_lightning.errors import DataError, InvalidArgument

from .cifar import TORCHVISION_SETS, CifarArrays, ReadLimits, load_cifar
from .mixing import MixedTrainingBatches, batch_mixer
from .policies import ERASING_RATIO, ERASING_SCALE, check_augmentation, torchvision_policy
from .sampling import (
    AUGMENTATION_STREAM,
    EpochKeyedSampler,
    ResumableDataLoader,
    run_seed,
    stream_seed,
)
from .tensor_loader import FLIPS, PAD_MODES, TensorLoader, intra_op_threads

PIPELINES = ("torchvision", "tensor")
# Per-channel statistics of the training images (CIFAR-10's, CIFAR-100's), and torchvision's
# ImageNet ones for networks whose pretrained weights expect them.
NORMALIZATION = {
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class ImageTensorDataset(Dataset):
    """uint8 HWC images (viewed, not copied); items go through PIL like torchvision's
    CIFAR10."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: v2.Transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i].numpy())), int(self.labels[i])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        # A DataLoader fetches each batch through here. With num_workers=0 that is the training
        # process, whose intra-op threads are sized for the model: one image's ops are too
        # small to share, and the threads only contend (docs/performance.md). Worker processes
        # already run single-threaded.
        with intra_op_threads(1):
            return [self[i] for i in indices]


class EpochSeededItems(Dataset):
    """The items of `dataset` by `(epoch, index)` keys (EpochKeyedSampler's), each made with
    torch's generator seeded from (seed, epoch, index) and restored after.

    An item's random augmentation then depends on nothing else: not on the worker process
    that makes it, nor on how many items that worker made before, so a run resumed part-way
    through an epoch (whose workers start afresh) draws what an uninterrupted one drew, with
    any `num_workers`, on every rank. A plain index gives the item as `dataset` makes it.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        epoch, index = key
        # torchvision's transforms draw from the global generator, and take no other.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(
                stream_seed(self.seed, AUGMENTATION_STREAM, epoch, index)
            )
            return self.dataset[index]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        with intra_op_threads(1):  # as ImageTensorDataset's, for either data set
            return [self[key] for key in keys]


def worker_context() -> multiprocessing.context.BaseContext:
    """How loader workers start: by fork where the platform has it (fast; what DataLoader does
    by default on Linux before Python 3.14), else spawn. Named explicitly because a process
    that a job launcher started (joblib's loky: hydra/launcher=parallel) has a default start
    method of its own, which cannot start DataLoader workers."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def seeded_split(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices of `n` items: `val_size` of them held out, drawn from `seed` alone."""
    if val_size >= n:
        raise DataError(f"data.val_size={val_size} leaves no training images (the set has {n})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[val_size:], order[:val_size]


def image_loader(
    dataset: Dataset,
    train: bool,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    trainer: L.Trainer | None,
) -> DataLoader:
    """The DataLoader of a map-style data set of (image, label) items, decoded in workers.

    Training is shuffled by (seed, epoch) so that a resumed run sees the same batches, and
    resumable part-way through an epoch; under DDP each rank gets its shard. Each training
    image's augmentation is drawn from (seed, epoch, index) (EpochSeededItems), whichever
    worker makes it. The loader's own generator keeps its draws off the global RNG.
    """
    seed = run_seed()
    rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
    sampler = None
    if train:
        dataset = EpochSeededItems(dataset, seed)
        sampler = EpochKeyedSampler(dataset, seed, rank, world_size)
    return (ResumableDataLoader if train else DataLoader)(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        generator=torch.Generator().manual_seed(seed),
        drop_last=train,
        num_workers=num_workers,
        multiprocessing_context=worker_context() if num_workers else None,
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


def tensor_placement(trainer: L.Trainer | None) -> dict:
    """tensor_loader's device, rank and world_size under `trainer` (none without one: the CPU,
    one process)."""
    if trainer is None:
        return {}
    return {
        "device": trainer.strategy.root_device,
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
    }


def concrete_device(device: torch.device) -> torch.device:
    """`device` with its index: "cuda" is the current CUDA device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class CifarDataModule(MixedTrainingBatches, L.LightningDataModule):
    """CIFAR-10, CIFAR-100 (or any 32 px image-folder data set) with a seeded validation split.

    Args:
        root: cache folder; torchvision downloads here when `path` is None.
        dataset: "cifar10" or "cifar100" (its 100 fine labels): what torchvision downloads.
        path: an image-folder tree or .tar/.tar.gz/.zip of one, used instead of the download.
        num_classes: expected number of classes; checked against the data.
        batch_size: per device (under DDP each process loads this many).
        val_size: training images held out for validation; 0 validates on the test set.
        split_seed: seed of the validation split, fixed apart from the run's seed so that
            runs with different seeds are validated on the same images.
        image_size: 32, or e.g. 224 to resize for ImageNet-style networks.
        normalization: "cifar" or "imagenet" mean/std.
        augment: random crop and horizontal flip for training.
        padding: with `augment`, the crop's translation range: the image is padded by this
            many pixels and a 32 px window cut at a random offset (4; airbench uses 2).
        pad_mode: what that padding holds: "zeros" or "reflect" (the image mirrored at its
            edges, the edge pixel not repeated: torchvision's padding_mode="reflect").
        flip: with `augment`, "random" (each image mirrored with probability 1/2),
            "alternating" (airbench's derandomised flip: half the images, chosen by the seed,
            mirrored in even epochs and the others in odd ones, so each image in every other
            epoch; pipeline=tensor only) or "none".
        cutout: with `augment`, a square of this side (at 32 px) set to the mean colour in
            each training image (DeVries & Taylor 2017); 0 for none.
        policy: with `augment`, after crop and flip: "none", "autoaugment" (the CIFAR-10
            policy), "randaugment" or "trivialaugment" (TrivialAugmentWide), as torchvision's.
        randaugment_n, randaugment_m: RandAugment's ops per image and their magnitude bin
            (0..30 of torchvision's 31).
        random_erasing: with `augment`, the probability of torchvision's RandomErasing (default
            scale and ratio; the box set to the mean colour), after normalisation; 0 for none.
        pipeline: "torchvision" (PIL, one image at a time, in DataLoader workers) or "tensor"
            (the data set as one uint8 tensor on the training device, batches augmented
            whole: resnet_lightning.data.tensor_loader).
        channels_last: "tensor" pipeline: channels-last batches, for channels-last models.
        max_image_mb, max_total_gb: what reading `path` may take: a file larger than an image
            may be, or a data set larger than memory, is refused before it is read.
        mixup_alpha, cutmix_alpha, mix_prob, mix_switch_prob: Mixup / CutMix of whole
            training batches on the training device, with timm's names and meanings
            (resnet_lightning.data.mixing); their labels become (B, num_classes)
            probabilities. Both alphas 0: off.
    """

    def __init__(
        self,
        root: str = "data",
        path: str | None = None,
        dataset: str = "cifar10",
        num_classes: int = 10,
        batch_size: int = 128,
        num_workers: int = 2,
        pin_memory: bool = True,
        val_size: int = 5000,
        split_seed: int = 0,
        image_size: int = 32,
        normalization: str = "cifar",
        augment: bool = True,
        padding: int = 4,
        pad_mode: str = "zeros",
        flip: str = "random",
        cutout: int = 0,
        policy: str = "none",
        randaugment_n: int = 2,
        randaugment_m: int = 9,
        random_erasing: float = 0.0,
        pipeline: str = "torchvision",
        channels_last: bool = False,
        max_image_mb: float = 64,
        max_total_gb: float = 8,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        mix_switch_prob: float = 0.5,
    ):
        super().__init__()
        if batch_size <= 0:
            raise InvalidArgument("batch_size", batch_size, "must be positive, e.g. 128")
        if val_size < 0:
            raise InvalidArgument("val_size", val_size, "must be >= 0 (0 validates on test)")
        if num_workers < 0:
            raise InvalidArgument("num_workers", num_workers, "must be >= 0")
        if normalization not in NORMALIZATION:
            raise InvalidArgument(
                "normalization", normalization, f"is unknown; use one of {', '.join(NORMALIZATION)}"
            )
        if dataset not in TORCHVISION_SETS:
            raise InvalidArgument(
                "dataset", dataset, f"is unknown; use one of {', '.join(TORCHVISION_SETS)}"
            )
        if pipeline not in PIPELINES:
            raise InvalidArgument(
                "pipeline", pipeline, f"is unknown; use one of {', '.join(PIPELINES)}"
            )
        if not 0 <= padding < 32:
            raise InvalidArgument("padding", padding, "must be in 0..31 pixels, e.g. 4 or 2")
        if pad_mode not in PAD_MODES:
            raise InvalidArgument(
                "pad_mode", pad_mode, f"is unknown; use one of {', '.join(PAD_MODES)}"
            )
        if flip not in FLIPS:
            raise InvalidArgument("flip", flip, f"is unknown; use one of {', '.join(FLIPS)}")
        if flip == "alternating" and pipeline != "tensor":
            # Its flips depend on the epoch, which persistent loader workers do not see.
            raise InvalidArgument(
                "flip", flip, "needs data.pipeline=tensor; set it, or data.flip=random"
            )
        if not 0 <= cutout < 32:
            raise InvalidArgument(
                "cutout", cutout, "must be in 0..31 pixels (0: no cutout), e.g. 8"
            )
        check_augmentation(policy, randaugment_n, randaugment_m, random_erasing)
        for name, value in (("max_image_mb", max_image_mb), ("max_total_gb", max_total_gb)):
            if not value > 0:
                raise InvalidArgument(name, value, "must be positive")
        self.save_hyperparameters()
        self.read_limits = ReadLimits(max_image_mb, max_total_gb)
        self.mixer = batch_mixer(num_classes, mixup_alpha, cutmix_alpha, mix_prob, mix_switch_prob)
        self.arrays: CifarArrays | None = None
        self._placed: CifarArrays | None = None  # the arrays on the tensor pipeline's device

    @property
    def classes(self) -> list[str]:
        return self.arrays.classes

    def prepare_data(self) -> None:
        # Runs on one process per node: downloads and decodes into the cache.
        self._load()

    def setup(self, stage: str | None = None) -> None:
        if self.arrays is not None:
            return
        self.arrays = self._load()
        found = len(self.arrays.classes)
        if found != self.hparams.num_classes:
            raise DataError(
                f"the data has {found} classes but data.num_classes={self.hparams.num_classes}; "
                f"set data.num_classes={found}"
            )
        self.train_index, self.val_index = seeded_split(
            len(self.arrays.train_labels), self.hparams.val_size, self.hparams.split_seed
        )

    def _load(self) -> CifarArrays:
        path = self.hparams.path
        path = os.path.expanduser(path) if path else None
        return load_cifar(self.hparams.root, path, self.read_limits, self.hparams.dataset)

    def transform(self, train: bool) -> v2.Transform:
        mean, std = NORMALIZATION[self.hparams.normalization]
        augment = train and self.hparams.augment
        steps = []
        h = self.hparams
        if augment:
            mode = "constant" if h.pad_mode == "zeros" else h.pad_mode
            steps.append(v2.RandomCrop(32, padding=h.padding, padding_mode=mode))
            steps += [v2.RandomHorizontalFlip()] if h.flip == "random" else []
        policy = torchvision_policy(h.policy, h.randaugment_n, h.randaugment_m) if augment else None
        if policy is not None:
            # On the uint8 tensor, not PIL: torchvision's tensor kernels, which the tensor
            # path's batched ops reproduce exactly.
            steps += [v2.ToImage(), policy]
        if h.image_size != 32:
            steps.append(v2.Resize(h.image_size, antialias=True))
        steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        if augment and h.cutout:
            # One square of fixed side (the same fraction of any image size), anywhere inside.
            area = (h.cutout / 32) ** 2
            steps.append(v2.RandomErasing(p=1.0, scale=(area, area), ratio=(1.0, 1.0), value=0))
        if augment and h.random_erasing:
            erasing = v2.RandomErasing(h.random_erasing, ERASING_SCALE, ERASING_RATIO, value=0)
            steps.append(erasing)
        return v2.Compose(steps)

    def predict_transform(self) -> v2.Transform:
        """Any picture, as a test image: first brought to CIFAR's 32 px."""
        return v2.Compose([v2.Resize((32, 32), antialias=True), self.transform(train=False)])

    def _split(
        self, split: str, arrays: CifarArrays
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Images, labels and the index of `split` in them (None: all)."""
        if split == "test" or (split == "val" and self.hparams.val_size == 0):
            return arrays.test_images, arrays.test_labels, None
        index = self.train_index if split == "train" else self.val_index
        return arrays.train_images, arrays.train_labels, index

    def _dataset(self, split: str) -> Dataset:
        images, labels, index = self._split(split, self.arrays)
        dataset = ImageTensorDataset(images, labels, self.transform(split == "train"))
        return dataset if index is None else Subset(dataset, index.tolist())

    def tensor_loader(
        self, split: str, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1
    ) -> TensorLoader:
        """The `pipeline=tensor` loader of a split, its data on `device`; rank `rank` of
        `world_size` gets its shard of each epoch."""
        images, labels, index = self._split(split, self._arrays_on(torch.device(device)))
        train = split == "train"
        mean, std = NORMALIZATION[self.hparams.normalization]
        return TensorLoader(
            images,
            labels,
            self.hparams.batch_size,
            mean,
            std,
            index=index,
            augment=train and self.hparams.augment,
            padding=self.hparams.padding,
            pad_mode=self.hparams.pad_mode,
            flip=self.hparams.flip,
            cutout=self.hparams.cutout if train and self.hparams.augment else 0,
            policy=self.hparams.policy if train and self.hparams.augment else "none",
            randaugment_n=self.hparams.randaugment_n,
            randaugment_m=self.hparams.randaugment_m,
            random_erasing=self.hparams.random_erasing if train and self.hparams.augment else 0,
            image_size=self.hparams.image_size,
            channels_last=self.hparams.channels_last,
            shuffle=train,
            drop_last=train,
            seed=run_seed(),
            rank=rank,
            world_size=world_size,
        )

    def train_images(self, count: int) -> torch.Tensor:
        """The first `count` training images of the split, normalised and un-augmented as
        evaluation sees them: float (N, 3, S, S) on the CPU (for data-dependent initialisation,
        such as airbench's whitening layer), whichever the pipeline."""
        index = self.train_index[:count]
        mean, std = NORMALIZATION[self.hparams.normalization]
        arrays = self.arrays
        loader = TensorLoader(
            arrays.train_images,
            arrays.train_labels,
            len(index),
            mean,
            std,
            index=index,
            image_size=self.hparams.image_size,
        )
        images, _ = next(iter(loader))
        return images

    def _arrays_on(self, device: torch.device) -> CifarArrays:
        # One copy per device, shared by the train, val and test loaders; on the CPU, none.
        device = concrete_device(device)
        if self._placed is None or self._placed.train_images.device != device:
            a = self.arrays
            tensors = (a.train_images, a.train_labels, a.test_images, a.test_labels)
            self._placed = CifarArrays(*(t.to(device) for t in tensors), a.classes)
        return self._placed

    def _loader(self, split: str) -> DataLoader | TensorLoader:
        if self.hparams.pipeline == "tensor":
            return self.tensor_loader(split, **tensor_placement(self.trainer))
        hp = self.hparams
        return image_loader(
            self._dataset(split),
            split == "train",
            hp.batch_size,
            hp.num_workers,
            hp.pin_memory,
            self.trainer,
        )

    def train_dataloader(self) -> DataLoader | TensorLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | TensorLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader | TensorLoader:
        return self._loader("test")
