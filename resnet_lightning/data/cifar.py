"""CIFAR-10 and CIFAR-100 as uint8 tensors, decoded once and cached.

Sources: torchvision's checksummed download, or `path`: an image-folder tree
(`train/<class>/*`, `test/<class>/*`) or a .tar / .tar.gz / .zip of one. Archives are read
in memory, never extracted, so a hostile entry name cannot write outside the cache.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
import torchvision.datasets
from PIL import Image, UnidentifiedImageError

from resnet_lightning.atomic_files import write_atomic
from resnet_lightning.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"}
# The split folders of an image-folder tree or archive.
TREE_SPLITS = ("train", "test")
# The data sets torchvision downloads (checksummed), by the name `dataset` takes.
TORCHVISION_SETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
# Bumped whenever the cache layout changes, so stale caches are rebuilt rather than misread.
CACHE_VERSION = 2


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on what reading a tree or archive may take, checked before a file is read, so
    that an archive that expands to far more than it holds is refused before memory fills.

    An image file of CIFAR-10 is a few KB and a large photo a few tens of MB: a "file" of more
    than `max_image_mb` is not an image. `max_total_gb` bounds the whole data set, which is
    held in memory while it is decoded into the cache.
    """

    max_image_mb: float = 64
    max_total_gb: float = 8


@dataclass
class CifarArrays:
    """Images as (N, 32, 32, 3) uint8, HWC like torchvision's CIFAR10.data; labels as int64."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]


def load_cifar10(
    root: str | os.PathLike,
    path: str | os.PathLike | None = None,
    limits: ReadLimits = ReadLimits(),
) -> CifarArrays:
    """Return CIFAR-10 from the cache under `root`, building the cache on first use."""
    return load_cifar(root, path, limits, "cifar10")


def load_cifar(
    root: str | os.PathLike,
    path: str | os.PathLike | None = None,
    limits: ReadLimits = ReadLimits(),
    dataset: str = "cifar10",
) -> CifarArrays:
    """Return `dataset` (a key of TORCHVISION_SETS) from the cache under `root`, building the
    cache on first use; `path` replaces torchvision's download."""
    if dataset not in TORCHVISION_SETS:
        raise DataError(f"dataset={dataset!r} is unknown; use one of {', '.join(TORCHVISION_SETS)}")
    root = Path(root).expanduser()
    cache = root / f"{dataset}-{source_key(path)}.pt"
    if cache.exists():
        try:
            return CifarArrays(**torch.load(cache, weights_only=True, mmap=True))
        except Exception as err:  # a cache from another version or a broken disk: rebuild it
            cache.unlink(missing_ok=True)
            print(f"rebuilding unreadable cache {cache} ({err})")
    try:  # before decoding, which takes a while
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"cannot create data.root={root} ({err}); set data.root to a writable folder"
        ) from None
    if path is None:
        arrays = _read_torchvision(root, dataset)
    else:
        arrays = _read_image_tree(Path(path), limits)
    try:  # atomic: a killed run never leaves a half-written cache
        write_atomic(cache, lambda file: torch.save(vars(arrays), file))
    except (OSError, RuntimeError) as err:  # torch's writer reports a full disk as RuntimeError
        raise DataError(
            f"cannot write the data cache {cache} ({err}); set data.root to a writable folder "
            "with 200 MB free"
        ) from None
    return arrays


def source_key(path: str | os.PathLike | None) -> str:
    """A name for what `path` holds now (its files' names, sizes and times), for caches."""
    if path is None:
        return f"torchvision-v{CACHE_VERSION}"
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise DataError(
            f"data.path={path} does not exist; point data.path at an image-folder tree or "
            "archive (or, for CIFAR, set data.path=null to download it into data.root)"
        )
    # A folder's own size and time do not change when an image inside it does: key on all.
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    stats = [(f.as_posix(), (st := f.stat()).st_size, st.st_mtime_ns) for f in files]
    ident = f"{path}|{stats}|{CACHE_VERSION}"
    return f"{path.name.split('.')[0]}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def _read_torchvision(root: Path, dataset: str) -> CifarArrays:
    # torchvision checks the download's md5s; CIFAR100's targets are its 100 fine labels.
    reader = getattr(torchvision.datasets, TORCHVISION_SETS[dataset])
    try:
        train = reader(str(root), train=True, download=True)
        test = reader(str(root), train=False, download=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise DataError(
            f"{reader.__name__} is not in {root} and downloading it failed ({err}); point "
            "data.path at a copy: an image-folder tree (train/<class>/*, test/<class>/*) or a "
            ".tar/.tar.gz/.zip of one, e.g. data.path=/data/cifar10-jpeg.tar.gz"
        ) from err
    return CifarArrays(
        train_images=torch.from_numpy(train.data),
        train_labels=torch.tensor(train.targets),
        test_images=torch.from_numpy(test.data),
        test_labels=torch.tensor(test.targets),
        classes=list(train.classes),
    )


def _read_image_tree(path: Path, limits: ReadLimits) -> CifarArrays:
    """Decode every image of a tree or archive, keyed by the split and class folders."""
    images: dict[str, list[tuple[str, str, bytes]]] = {split: [] for split in TREE_SPLITS}
    try:
        for name, data in iter_files(path, _is_image, limits):
            parts = PurePosixPath(name).parts
            # The split folder may sit under a top folder (cifar10/train/cat/0001.jpg).
            for i, part in enumerate(parts[:-2]):
                if part in TREE_SPLITS:
                    images[part].append((parts[i + 1], name, data))
                    break
        classes = sorted({cls for cls, _, _ in images["train"]})
        if not classes or not images["test"]:
            raise DataError(
                f"{path} has no train/<class>/<image> and test/<class>/<image> files; "
                "point data.path at a CIFAR image-folder tree or an archive of one"
            )
        unknown = {cls for cls, _, _ in images["test"]} - set(classes)
        if unknown:
            raise DataError(f"{path}: test classes {sorted(unknown)} are not in train")
        index = {cls: i for i, cls in enumerate(classes)}
        arrays = {}
        for split in TREE_SPLITS:
            # Sorted, then a fixed shuffle: the same order on every machine, and classes mixed
            # as in the original batches, so a run limited to a few test batches sees them all.
            entries = sorted(images[split], key=lambda e: e[1])
            order = torch.randperm(len(entries), generator=torch.Generator().manual_seed(0))
            entries = [entries[i] for i in order]
            arrays[f"{split}_images"] = torch.stack([_decode(path, n, d) for _, n, d in entries])
            arrays[f"{split}_labels"] = torch.tensor([index[cls] for cls, _, _ in entries])
    except (
        tarfile.TarError,
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        UnidentifiedImageError,
        OSError,
    ) as err:
        raise DataError(
            f"could not read {path}: {err}; the file is corrupt or incomplete, copy it again"
        ) from err
    return CifarArrays(**arrays, classes=classes)


def _decode(path: Path, name: str, data: bytes) -> torch.Tensor:
    try:
        image = Image.open(io.BytesIO(data))  # reads the header alone
        size = image.size
        if size == (32, 32):  # checked first: a small file can declare a huge image
            image = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        reason = str(err).split(" <_io.BytesIO")[0]  # PIL names the buffer, not the file
        raise DataError(
            f"{path}: {name} is not a readable image ({reason}); remove or replace that file"
        ) from None
    if size != (32, 32):
        raise DataError(f"{name} is {size[0]}x{size[1]}, CIFAR images are 32x32")
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(32, 32, 3)


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def iter_files(
    path: Path, wanted: Callable[[str], bool], limits: ReadLimits
) -> Iterator[tuple[str, bytes]]:
    """(relative posix name, bytes) of every regular file of a folder or an archive whose
    name is `wanted` (the others are not read), each within `limits` before it is read."""
    budget = ReadBudget(path, limits)
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.is_file() and wanted(name := file.relative_to(path).as_posix()):
                budget.take(name, file.stat().st_size)
                yield name, file.read_bytes()
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise link_refused(path, info.filename)
                if not info.is_dir() and wanted(name := safe_name(path, info.filename)):
                    budget.take(name, info.file_size)
                    with archive.open(info) as member:  # stops at the size it declared
                        yield name, member.read(info.file_size)
    elif tarfile.is_tarfile(path):
        with tarfile.open(path) as archive:
            for member in archive:
                if member.issym() or member.islnk():
                    raise link_refused(path, member.name)
                if member.isfile() and wanted(name := safe_name(path, member.name)):
                    budget.take(name, member.size)
                    yield name, archive.extractfile(member).read()
                archive.members.clear()  # tarfile keeps every header read; streamed, none is needed
    else:
        raise DataError(
            f"could not read {path}: not a folder, .tar, .tar.gz or .zip (corrupt or incomplete?); "
            "copy it again or point data.path at an image-folder tree"
        )


class ReadBudget:
    """Counts the bytes a read takes against ReadLimits, refusing a file before it is read."""

    def __init__(self, path: Path, limits: ReadLimits):
        self.path, self.limits, self.total = path, limits, 0

    def take(self, name: str, size: int) -> None:
        if size > self.limits.max_image_mb * 2**20:
            raise DataError(
                f"{self.path}: {name} is {size / 2**20:g} MB, more than an image may be "
                f"(data.max_image_mb={self.limits.max_image_mb:g}); remove it, or raise "
                "data.max_image_mb if it really is an image"
            )
        self.total += size
        if self.total > self.limits.max_total_gb * 2**30:
            raise DataError(
                f"{self.path}: its images add up to more than data.max_total_gb="
                f"{self.limits.max_total_gb:g} (at {name}); raise data.max_total_gb if the data "
                "set really is that large (CIFAR: and fits in memory)"
            )


def link_refused(archive: Path, name: str) -> DataError:
    return DataError(
        f"{archive} holds a link ({name}); links are refused in data archives, repack it with "
        "plain files"
    )


def safe_name(archive: Path, name: str) -> str:
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts:
        raise DataError(
            f"{archive} holds an unsafe entry {name!r} (absolute path or '..'); "
            "refusing to read it, repack the archive with relative paths"
        )
    return posix.as_posix()
