"""Your own images: an image-folder tree or archive of any classes, sizes and formats, read as a
list of files and decoded item by item in the DataLoader workers (nothing held in memory).

Layouts (the class folders sorted, as torchvision's ImageFolder sorts them):

    train/<class>/*  and  val/<class>/*  and/or  test/<class>/*
    <class>/*        (one tree: data.val_size of it held out for validation)

An archive (.tar, .tar.gz, .zip) is extracted once into data.root, through a temporary folder
renamed when complete; its entries are read as cifar.py reads them (no links, no absolute or
`..` names, within ReadLimits), and one that does not fit on that disk is refused in one line,
leaving nothing (a zip before anything is written: it lists its sizes up front). Every image
is decoded once, in the first run on a set of files, and the unreadable ones are skipped and
counted in one warning (cached, keyed by the files' names, sizes and times, so later runs do
not decode them all again).

data.pipeline=tensor decodes each split once more, to one uint8 (N, S, S, 3) tensor of squares
(S = resize_size: shorter side resized to S, centre cropped), cached beside the others; batches
are then cut and augmented whole on the training device (tensor_loader.TensorLoader).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
from torchvision.transforms import v2

from resnet_lightning.atomic_files import write_atomic, write_json
from resnet_lightning.errors import DataError, InvalidArgument

from .cifar import ReadLimits, iter_files, source_key
from .datamodule import (
    NORMALIZATION,
    PIPELINES,
    concrete_device,
    image_loader,
    seeded_split,
    tensor_placement,
    worker_context,
)
from .mixing import MixedTrainingBatches, batch_mixer
from .policies import ERASING_RATIO, ERASING_SCALE, check_augmentation, torchvision_policy
from .sampling import run_seed
from .tensor_loader import TensorLoader

log = logging.getLogger(__name__)

# The folders a tree may be split into; validation falls back on test/ and test on val/.
SPLIT_FOLDERS = ("train", "val", "test")
# What a file of an image folder (or a predict= folder) may be: what PIL reads.
IMAGE_SUFFIXES = IMG_EXTENSIONS
# Bumped whenever the extracted or checked layout changes, so that old caches are not misread.
CACHE_VERSION = 1
# Left free on the cache's disk besides the extracted archive: logs, checkpoints, the OS.
DISK_MARGIN = 2**30


class ImageFiles(Dataset):
    """(image, label) items of a list of (file, class index), each file decoded when asked for."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable):
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        file, label = self.samples[i]
        with Image.open(file) as image:
            return self.transform(to_rgb(image)), label


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode PIL reads as 8-bit RGB: grey, RGBA, palette (transparency included), CMYK,
    and 16-bit grey scaled to 8 bits (PIL's own conversion clips it to white)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        pixels = np.asarray(image, dtype=np.int64) >> 8
        return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # what PIL asks for palette transparency
    return image.convert("RGB")


def prepare_tree(path: str | os.PathLike, root: str | os.PathLike, limits: ReadLimits) -> Path:
    """The folder holding the data set: `path` itself, or its archive extracted under `root`
    (once), descended into a lone top folder (mydata/train/...)."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        tree = path
    else:  # the key refuses a path that does not exist
        tree = _extracted(path, Path(root).expanduser(), source_key(path), limits)
    while True:
        entries = [e for e in tree.iterdir() if not e.name.startswith(".")]
        if len(entries) != 1 or not entries[0].is_dir() or entries[0].name in SPLIT_FOLDERS:
            return tree
        inner = [e for e in entries[0].iterdir() if not e.name.startswith(".")]
        if not any(e.is_dir() for e in inner):  # a lone class folder: keep it a class
            return tree
        tree = entries[0]


def split_folders(tree: Path) -> dict[str, Path]:
    """{"train": ..., "val": ..., "test": ...} of a split tree (val and test each standing in
    for the other when one is missing), or {"all": tree} for a single tree of classes."""
    found = {s: tree / s for s in SPLIT_FOLDERS if (tree / s).is_dir()}
    if "train" not in found:
        if found:
            raise DataError(
                f"{tree} has {'/'.join(found)}/ but no train/; add train/<class>/ images, or "
                "point data.path at a single tree of <class>/ folders"
            )
        return {"all": tree}
    if len(found) == 1:
        raise DataError(
            f"{tree} has train/ but no val/ or test/; add one, or point data.path at "
            "train/ alone (a tree of <class>/ folders) to split it with data.val_size"
        )
    found.setdefault("val", found.get("test"))
    found.setdefault("test", found["val"])
    return found


def class_folders(folder: Path) -> list[str]:
    """The class names of a folder: its subfolders, sorted (torchvision's ImageFolder order)."""
    return sorted(e.name for e in folder.iterdir() if e.is_dir() and not e.name.startswith("."))


def image_folder_classes(path: str | None, root: str, limits: ReadLimits) -> int:
    """How many classes the data set at `path` has (the archive extracted first)."""
    if not path:
        raise DataError("data=imagefolder needs data.path=<image-folder tree or archive>")
    folders = split_folders(prepare_tree(path, root, limits))
    return len(class_folders(folders.get("train", folders.get("all"))))


def scan_classes(folders: dict[str, Path], path: object) -> tuple[list[str], dict[str, list]]:
    """The class names and {split: [(file, class index), ...]} of each split folder, sorted;
    a class missing from a split, or a class folder without images, is a DataError."""
    classes = class_folders(folders.get("train", folders.get("all")))
    if len(classes) < 2:
        raise DataError(
            f"{path} has {len(classes)} class folder(s); an image-folder data set needs at least "
            "2: <class>/<image> (or train/<class>/<image> and val/<class>/<image>)"
        )
    index = {cls: i for i, cls in enumerate(classes)}
    samples = {}
    for split, folder in folders.items():
        here = class_folders(folder)
        if here != classes:
            missing, extra = sorted(set(classes) - set(here)), sorted(set(here) - set(classes))
            what = f"lacks {missing}" if missing else f"has {extra}, which train/ lacks"
            raise DataError(f"{folder} {what}; every split needs the same class folders as train/")
        try:  # torchvision's own listing: sorted, recursive, by extension
            samples[split] = make_dataset(folder, index, IMAGE_SUFFIXES)
        except FileNotFoundError as err:  # a class folder without images
            raise DataError(
                f"{folder}: {str(err).split('. ')[0]}; add images or remove the folder"
            ) from None
    return classes, samples


def map_files(function: Callable[[str], object], files: Iterable[str], workers: int) -> Iterator:
    """function(file) of each file, in order, computed in `workers` processes (0: here)."""
    if workers == 0:
        yield from map(function, files)
        return
    with worker_context().Pool(workers) as pool:
        yield from pool.imap(function, files, chunksize=64)


def decode_square(file: str, size: int) -> np.ndarray:
    """The image as torchvision's Resize(size) (shorter side, antialiased) + CenterCrop(size):
    (size, size, 3) uint8."""
    with Image.open(file) as image:
        resized = v2.functional.resize(to_rgb(image), size, antialias=True)
    return np.array(v2.functional.center_crop(resized, size))


def square_images(files: Sequence[str], size: int, cache: Path, workers: int) -> torch.Tensor:
    """uint8 (N, size, size, 3): each file as decode_square, in `workers` processes, once;
    kept in `cache` (written whole) for later runs."""
    if cache.exists():
        try:
            images = torch.load(cache, weights_only=True, mmap=True)
            if images.shape == (len(files), size, size, 3):
                return images
        except Exception as err:  # a cache from another version or a broken disk: rebuild it
            log.warning("rebuilding unreadable cache %s (%s)", cache, err)
    images = torch.empty(len(files), size, size, 3, dtype=torch.uint8)
    for i, square in enumerate(map_files(partial(decode_square, size=size), files, workers)):
        images[i] = torch.from_numpy(square)
    try:
        write_atomic(cache, lambda file: torch.save(images, file))
    except OSError as err:
        raise DataError(
            f"cannot write the data cache {cache} ({err}); set data.root to a writable folder"
        ) from None
    return images


def available_memory() -> int:
    """Bytes of memory available now: Linux's MemAvailable (free pages plus the page cache it
    can drop, which a cache file read before fills), else the free pages; elsewhere unbounded."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**63


def readable(
    samples: dict[str, list], root: Path, key: str, workers: int
) -> tuple[dict[str, list], list[tuple[str, str]]]:
    """`samples` less the files PIL cannot decode in full, and those files with the reason.
    Checked once per set of files (the result cached in `root`), in `workers` processes."""
    checked = root / f"imagefolder-{key}-v{CACHE_VERSION}.json"
    files = sorted({f for split in samples.values() for f, _ in split})
    try:
        bad = {f: why for f, why in json.loads(checked.read_text())["unreadable"]}
    except (OSError, ValueError, KeyError):
        reasons = list(map_files(_unreadable_reason, files, workers))
        bad = {f: why for f, why in zip(files, reasons, strict=True) if why}
        write_json(checked, {"unreadable": sorted(bad.items())})
    kept = {split: [s for s in items if s[0] not in bad] for split, items in samples.items()}
    return kept, sorted(bad.items())


def _unreadable_reason(file: str) -> str:
    try:
        with Image.open(file) as image:
            image.load()  # the whole image: a truncated file fails here, not at its header
        return ""
    except Exception as err:  # PIL raises many kinds (OSError, SyntaxError, ValueError, ...)
        return " ".join(str(err).split()) or type(err).__name__


def _extracted(archive: Path, root: Path, key: str, limits: ReadLimits) -> Path:
    """`archive` extracted into root/imagefolder-<key>/, once; a temporary folder renamed when
    complete, so a killed or refused extraction leaves nothing behind."""
    target = root / f"imagefolder-{key}"
    if target.is_dir():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"cannot create data.root={root} ({err}); set data.root to a writable folder"
        ) from None
    tmp = root / f".{target.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    free = shutil.disk_usage(root).free - DISK_MARGIN
    written = 0
    try:
        tmp.mkdir()
        if zipfile.is_zipfile(archive):  # sizes listed up front: refused before any write
            with zipfile.ZipFile(archive) as z:
                _check_fits(sum(i.file_size for i in z.infolist()), free, archive, root)
        for name, data in iter_files(archive, _is_image_name, limits):
            written += len(data)
            _check_fits(written, free, archive, root)
            file = tmp / name
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(data)
        os.replace(tmp, target)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise DataError(
            f"could not read {archive}: {err}; the file is corrupt or incomplete, copy it again"
        ) from None
    except OSError as err:
        if target.is_dir():  # another process (a DDP rank) finished first: use its copy
            return target
        raise DataError(
            f"could not extract {archive} into {root} ({err}); free space there or set "
            "data.root to another folder"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_fits(size: int, free: int, archive: Path, root: Path) -> None:
    if size > free:
        raise DataError(
            f"{archive} does not fit in data.root={root}: it holds more than the "
            f"{max(free, 0) / 2**30:.1f} GB free there (1 GB kept free); free space or set "
            "data.root to a larger disk"
        )


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


class ImageFolderDataModule(MixedTrainingBatches, L.LightningDataModule):
    """An image-folder data set of any classes and image sizes, decoded per item in workers
    (or once, to a tensor of squares: pipeline="tensor"), with torchvision's
    classification-reference transforms.

    Args:
        root: cache folder: archives are extracted here, and which images are unreadable.
        path: an image-folder tree, or a .tar/.tar.gz/.zip of one (see the module's layouts).
        num_classes: expected number of classes; checked against the class folders.
        batch_size: per device (under DDP each process loads this many).
        val_size: training images held out for validation, a fraction (0.1) or a count; None:
            the tree's val/ (or test/) folder, and for a single tree of classes 0.1. Held out
            from a split tree, validation leaves its val/ (or test/) folder to testing.
        split_seed: seed of the held-out validation split, apart from the run's seed.
        image_size: side of the square the network sees.
        resize_size: evaluation resizes the shorter side to this, then crops the centre
            image_size square (256 -> 224: torchvision's reference).
        normalization: "imagenet" (pretrained weights expect it) or "cifar" mean/std.
        augment: training crops a random area and aspect (RandomResizedCrop) and mirrors.
        policy, randaugment_n, randaugment_m: with `augment`, an augmentation policy after
            crop and flip, as CifarDataModule's (AutoAugment with its ImageNet policy);
            torchvision pipeline only.
        random_erasing: with `augment`, the probability of RandomErasing's box, after
            normalisation (both pipelines).
        pipeline: "torchvision" (files decoded per batch in DataLoader workers) or "tensor":
            every image decoded once to a resize_size square, the set held as one uint8
            tensor on the training device (refused when it exceeds max_total_gb or the free
            memory), RandomResizedCrop + flip of the square / its centre crop done per batch.
        channels_last: "tensor" pipeline: channels-last batches, for channels-last models.
        max_image_mb, max_total_gb: what extracting an archive may take; max_total_gb also
            bounds the tensor pipeline's decoded squares.
        mixup_alpha, cutmix_alpha, mix_prob, mix_switch_prob: Mixup / CutMix of whole
            training batches, as CifarDataModule's (resnet_lightning.data.mixing).
    """

    def __init__(
        self,
        root: str = "data",
        path: str | None = None,
        num_classes: int | None = None,
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = True,
        val_size: float | None = None,
        split_seed: int = 0,
        image_size: int = 224,
        resize_size: int = 256,
        normalization: str = "imagenet",
        augment: bool = True,
        policy: str = "none",
        randaugment_n: int = 2,
        randaugment_m: int = 9,
        random_erasing: float = 0.0,
        pipeline: str = "torchvision",
        channels_last: bool = False,
        max_image_mb: float = 64,
        max_total_gb: float = 200,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        mix_switch_prob: float = 0.5,
    ):
        super().__init__()
        if not path:
            raise InvalidArgument("path", path, "is required: an image-folder tree or archive")
        if batch_size <= 0:
            raise InvalidArgument("batch_size", batch_size, "must be positive, e.g. 64")
        if num_workers < 0:
            raise InvalidArgument("num_workers", num_workers, "must be >= 0")
        if val_size is not None and not (0 < val_size < 1 or (val_size >= 1 and val_size % 1 == 0)):
            raise InvalidArgument(
                "val_size", val_size, "must be a fraction in (0, 1), a whole count, or null"
            )
        if image_size < 1 or resize_size < image_size:
            raise InvalidArgument(
                "resize_size", resize_size, f"must be >= image_size={image_size} (e.g. 256, 224)"
            )
        if normalization not in NORMALIZATION:
            raise InvalidArgument(
                "normalization", normalization, f"is unknown; use one of {', '.join(NORMALIZATION)}"
            )
        check_augmentation(policy, randaugment_n, randaugment_m, random_erasing)
        if pipeline == "tensor" and policy != "none":
            raise InvalidArgument(
                "policy",
                policy,
                "needs data.pipeline=torchvision for image folders (the tensor path's policies "
                "take uint8 crops, its RandomResizedCrop gives float ones)",
            )
        if pipeline not in PIPELINES:
            raise InvalidArgument(
                "pipeline", pipeline, f"is unknown; use one of {', '.join(PIPELINES)}"
            )
        for name, value in (("max_image_mb", max_image_mb), ("max_total_gb", max_total_gb)):
            if not value > 0:
                raise InvalidArgument(name, value, "must be positive")
        # Checks the mixing values now; the mixer is built for the class count in setup().
        batch_mixer(num_classes or 2, mixup_alpha, cutmix_alpha, mix_prob, mix_switch_prob)
        self.save_hyperparameters()
        self.read_limits = ReadLimits(max_image_mb, max_total_gb)
        self.classes: list[str] | None = None
        self.samples: dict[str, list[tuple[str, int]]] = {}
        # pipeline=tensor: {split: (uint8 squares, labels)}, and their copy on the device.
        self.squares: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._placed: tuple[torch.device, dict] | None = None
        self._scanned: tuple[dict[str, Path], list[str], dict[str, list]] | None = None
        self.key = ""  # of the data's files (names, sizes, times): its caches' names

    def prepare_data(self) -> None:
        # One process per node: extracts an archive and decodes every image once (and the
        # tensor pipeline's squares).
        if self.hparams.pipeline == "tensor":
            self._squares(self._split()[1])
        else:
            self._scan()

    def setup(self, stage: str | None = None) -> None:
        if self.classes is not None:
            return
        classes, self.samples = self._split()
        hp = self.hparams
        mixing = (hp.mixup_alpha, hp.cutmix_alpha, hp.mix_prob, hp.mix_switch_prob)
        self.mixer = batch_mixer(len(classes), *mixing)
        if hp.pipeline == "tensor":
            self.squares = self._squares(self.samples)
        self.classes = classes

    def _split(self) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
        """The class names and the train/val/test (file, label) lists."""
        hp = self.hparams
        folders, classes, samples = self._scan()
        if hp.num_classes is not None and len(classes) != hp.num_classes:
            raise DataError(
                f"{hp.path} has {len(classes)} classes but data.num_classes={hp.num_classes}; "
                f"set data.num_classes={len(classes)} (or leave it to the data)"
            )
        val_size = hp.val_size
        if val_size is None and "all" in samples:
            val_size = 0.1
        if val_size is None:
            split_samples = {split: samples[split] for split in ("train", "val", "test")}
        else:
            train = samples.get("train", samples.get("all"))
            count = round(len(train) * val_size) if val_size < 1 else int(val_size)
            train_index, val_index = seeded_split(len(train), max(count, 1), hp.split_seed)
            held_out = [train[i] for i in val_index.tolist()]
            split_samples = {
                "train": [train[i] for i in train_index.tolist()],
                "val": held_out,
                "test": samples.get("test", held_out),
            }
        # A fixed shuffle of the evaluation files (sorted by class as found): a run limited to
        # a few validation or test batches still sees every class.
        for split in ("val", "test"):
            items = split_samples[split]
            order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0))
            split_samples[split] = [items[i] for i in order.tolist()]
        return classes, split_samples

    def _squares(self, samples: dict[str, list]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{split: (uint8 (N, S, S, 3) squares, labels)}, S = resize_size, decoded once per
        split into data.root (a split with the same files as an earlier one shares its copy);
        refused before decoding when they would not fit in max_total_gb or in memory."""
        hp = self.hparams
        size = hp.resize_size
        distinct = {}  # split -> the first split with the same files
        for split, items in samples.items():
            distinct[split] = next(s for s in samples if samples[s] == items)
        count = sum(len(samples[s]) for s in set(distinct.values()))
        need, free = count * size * size * 3, available_memory()
        for limit, what in ((hp.max_total_gb * 2**30, "data.max_total_gb"), (free, "free memory")):
            if need > limit:
                raise DataError(
                    f"data.pipeline=tensor needs {need / 2**30:.1f} GB for {count} images at "
                    f"data.resize_size={size}, more than the {limit / 2**30:.1f} GB of {what}; "
                    "use data.pipeline=torchvision (decodes per batch), or a smaller resize_size"
                )
        root, key = Path(hp.root).expanduser(), self.key  # set by _scan
        squares = {}
        for split, items in samples.items():
            if distinct[split] != split:
                squares[split] = squares[distinct[split]]
                continue
            files = [f for f, _ in items]
            digest = hashlib.sha256("\n".join(files).encode()).hexdigest()[:12]
            cache = root / f"imagefolder-{key}-{split}-{size}px-{digest}-v{CACHE_VERSION}.pt"
            images = square_images(files, size, cache, hp.num_workers)
            squares[split] = (images, torch.tensor([label for _, label in items]))
        return squares

    def _scan(self) -> tuple[dict[str, Path], list[str], dict[str, list]]:
        # Once per data module: prepare_data and setup both need it, and listing and keying
        # a large tree (every file's size and time) takes a while.
        if self._scanned is None:
            self._scanned = self._scan_files()
        return self._scanned

    def _scan_files(self) -> tuple[dict[str, Path], list[str], dict[str, list]]:
        hp = self.hparams
        root = Path(hp.root).expanduser()
        folders = split_folders(prepare_tree(hp.path, root, self.read_limits))
        classes, samples = scan_classes(folders, hp.path)
        self.key = source_key(hp.path)
        samples, bad = readable(samples, root, self.key, hp.num_workers)
        if bad:
            file, reason = bad[0]
            log.warning(
                "skipped %d unreadable image(s) of %s (first: %s: %s); remove or replace them",
                len(bad),
                hp.path,
                file,
                reason,
            )
        for split, items in samples.items():
            found = {label for _, label in items}
            if len(found) < len(classes):
                empty = [c for i, c in enumerate(classes) if i not in found]
                raise DataError(
                    f"{folders[split]}: class folder(s) {empty} hold no readable images; add "
                    "images or remove the folder"
                )
        return folders, classes, samples

    def transform(self, train: bool) -> v2.Transform:
        hp = self.hparams
        mean, std = NORMALIZATION[hp.normalization]
        augment = train and hp.augment
        if augment:
            steps = [v2.RandomResizedCrop(hp.image_size, antialias=True), v2.RandomHorizontalFlip()]
            # torchvision's classification reference: the policy on the crop, erasing last.
            policy = torchvision_policy(
                hp.policy, hp.randaugment_n, hp.randaugment_m, v2.AutoAugmentPolicy.IMAGENET
            )
            steps += [policy] if policy is not None else []
        else:
            steps = [v2.Resize(hp.resize_size, antialias=True), v2.CenterCrop(hp.image_size)]
        steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        if augment and hp.random_erasing:
            steps.append(v2.RandomErasing(hp.random_erasing, ERASING_SCALE, ERASING_RATIO, value=0))
        return v2.Compose(steps)

    def predict_transform(self) -> v2.Transform:
        """Any picture, as a test image (the caller opens it as RGB)."""
        return self.transform(train=False)

    def train_images(self, count: int) -> torch.Tensor:
        """The first `count` training images, decoded as evaluation decodes them (resize,
        centre crop, normalisation): float (N, 3, S, S), for data-dependent initialisation
        such as airbench's whitening layer, whichever the pipeline."""
        files = ImageFiles(self.samples["train"][:count], self.transform(train=False))
        return torch.stack([files[i][0] for i in range(len(files))])

    def tensor_loader(
        self, split: str, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1
    ) -> TensorLoader:
        """The `pipeline=tensor` loader of a split, its squares on `device`; rank `rank` of
        `world_size` gets its shard of each epoch."""
        hp = self.hparams
        images, labels = self._squares_on(torch.device(device))[split]
        train = split == "train"
        mean, std = NORMALIZATION[hp.normalization]
        return TensorLoader(
            images,
            labels,
            hp.batch_size,
            mean,
            std,
            augment=train and hp.augment,
            random_resized_crop=True,
            random_erasing=hp.random_erasing if train and hp.augment else 0.0,
            image_size=hp.image_size,
            channels_last=hp.channels_last,
            shuffle=train,
            drop_last=train,
            seed=run_seed(),
            rank=rank,
            world_size=world_size,
        )

    def _squares_on(self, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        # One copy per device, shared by the loaders (and by splits sharing their files).
        device = concrete_device(device)
        if self._placed is None or self._placed[0] != device:
            moved = {}
            for pair in self.squares.values():
                if id(pair) not in moved:
                    moved[id(pair)] = tuple(t.to(device) for t in pair)
            self._placed = (device, {s: moved[id(p)] for s, p in self.squares.items()})
        return self._placed[1]

    def _loader(self, split: str) -> DataLoader | TensorLoader:
        hp = self.hparams
        if hp.pipeline == "tensor":
            return self.tensor_loader(split, **tensor_placement(self.trainer))
        dataset = ImageFiles(self.samples[split], self.transform(split == "train"))
        return image_loader(
            dataset, split == "train", hp.batch_size, hp.num_workers, hp.pin_memory, self.trainer
        )

    def train_dataloader(self) -> DataLoader | TensorLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | TensorLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader | TensorLoader:
        return self._loader("test")
