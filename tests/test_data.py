"""The data path on real CIFAR-10 images: sources, cache, split, transforms and errors."""

from __future__ import annotations

import io
import itertools
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from collections import Counter
from urllib.error import URLError

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10

from resnet_lightning.data import NORMALIZATION, CifarDataModule, load_cifar10
from resnet_lightning.data.datamodule import PIPELINES, EpochSeededItems
from resnet_lightning.errors import DataError
from resnet_lightning.training.config import instantiate_group
from tests.cli_harness import (
    REPO,
    SHARED_CIFAR,
    chi_square_agrees,
    cli_env,
    compose_config,
    make_datamodule,
    make_image_archive,
)


def test_archive_decodes_to_cifar_shapes(data_root, cifar_archive):
    arrays = load_cifar10(data_root, cifar_archive)
    assert arrays.train_images.dtype == torch.uint8
    assert arrays.train_images.shape[1:] == (32, 32, 3)
    assert arrays.classes[0] == "airplane" and len(arrays.classes) == 10
    counts = arrays.train_labels.bincount()
    assert len(counts) == 10 and (counts == counts[0]).all()  # balanced classes
    if cifar_archive == SHARED_CIFAR:
        assert arrays.train_images.shape[0] == 50_000 and arrays.test_images.shape[0] == 10_000
        # The channel means the data README measured on this copy.
        mean = arrays.train_images.float().mean((0, 1, 2)) / 255
        torch.testing.assert_close(mean, torch.tensor([0.4913, 0.4821, 0.4465]), atol=2e-4, rtol=0)


def test_cache_is_reused_and_fast(data_root, cifar_archive):
    caches = list(data_root.glob("cifar10-*.pt"))
    assert len(caches) == 1
    stamp = caches[0].stat().st_mtime_ns
    start = time.perf_counter()
    arrays = load_cifar10(data_root, cifar_archive)
    assert time.perf_counter() - start < 5  # a cache hit, not a decode (~10 s on the real set)
    assert caches[0].stat().st_mtime_ns == stamp
    assert arrays.test_labels.shape[0] == arrays.test_images.shape[0]


def test_folder_tree_and_zip_give_the_same_arrays(tmp_path):
    archive = make_image_archive(tmp_path / "small.tar.gz", train_per_class=3, test_per_class=2)
    tree = tmp_path / "tree"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    zipped = tmp_path / "small.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        for file in sorted(tree.rglob("*.png")):
            z.writestr(file.relative_to(tree).as_posix(), file.read_bytes())
    ref = load_cifar10(tmp_path / "c1", archive)
    for source, cache in ((tree, "c2"), (zipped, "c3")):
        other = load_cifar10(tmp_path / cache, source)
        assert ref.classes == other.classes
        for name in ("train_images", "train_labels", "test_images", "test_labels"):
            assert torch.equal(getattr(ref, name), getattr(other, name)), name


def test_corrupt_archive_is_a_clear_error_and_leaves_no_cache(tmp_path, cifar_archive):
    truncated = tmp_path / "broken.tar.gz"
    truncated.write_bytes(cifar_archive.read_bytes()[:200_000])
    root = tmp_path / "cache"
    with pytest.raises(DataError, match="corrupt or incomplete"):
        load_cifar10(root, truncated)
    assert not root.exists() or not any(root.iterdir())


def test_offline_without_data_says_where_it_looked(tmp_path, monkeypatch):
    def offline(self):
        raise URLError("no network")

    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(DataError, match="data.path") as err:
        load_cifar10(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value)
    assert not list((tmp_path / "empty").glob("cifar10-*.pt"))


def test_an_edited_image_folder_is_decoded_again(tmp_path):
    archive = make_image_archive(tmp_path / "small.tar.gz", train_per_class=3, test_per_class=2)
    tree = tmp_path / "tree"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    before = load_cifar10(tmp_path / "cache", tree)
    image = next((tree / "cifar" / "train" / "cat").glob("*.png"))
    Image.new("RGB", (32, 32), (255, 0, 0)).save(image)  # the folders' own stats stay
    after = load_cifar10(tmp_path / "cache", tree)
    assert not torch.equal(before.train_images, after.train_images)
    assert (after.train_images == torch.tensor([255, 0, 0], dtype=torch.uint8)).all(-1).any()


def test_unwritable_data_root_is_a_clear_error_before_decoding(tmp_path, cifar_archive):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(DataError, match="set data.root to a writable folder"):
        load_cifar10(blocked / "cache", cifar_archive)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_cifar10(tmp_path, tmp_path / "nope.tar.gz")


def test_unsafe_archive_entries_are_refused(tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../train/cat/0.png")
        tar.addfile(info)
    with pytest.raises(DataError, match="unsafe entry"):
        load_cifar10(tmp_path / "cache", evil)
    linked = tmp_path / "link.tar"
    with tarfile.open(linked, "w") as tar:
        info = tarfile.TarInfo("train/cat/0.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DataError, match="link"):
        load_cifar10(tmp_path / "cache", linked)


def test_seeded_validation_split(data_root, cifar_archive):
    n_train = len(load_cifar10(data_root, cifar_archive).train_labels)
    val_size = n_train // 10
    a = make_datamodule(data_root, cifar_archive, val_size=val_size)
    b = make_datamodule(data_root, cifar_archive, val_size=val_size)
    c = make_datamodule(data_root, cifar_archive, val_size=val_size, split_seed=1)
    assert len(a.val_dataloader().dataset) == val_size
    assert len(a.train_dataloader().dataset) == n_train - val_size
    assert not set(a.train_index.tolist()) & set(a.val_index.tolist())
    assert torch.equal(a.val_index, b.val_index) and not torch.equal(a.val_index, c.val_index)
    # val_size=0 validates on the test set.
    d = make_datamodule(data_root, cifar_archive, val_size=0)
    assert len(d.val_dataloader().dataset) == len(d.arrays.test_labels)


def test_batches_are_normalized_and_resized(data_root, cifar_archive):
    dm = make_datamodule(data_root, cifar_archive, batch_size=64, val_size=100)
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert abs(images.mean().item()) < 0.3 and 0.7 < images.std().item() < 1.3
    big = make_datamodule(
        data_root, cifar_archive, batch_size=4, image_size=224, normalization="imagenet"
    )
    images, _ = next(iter(big.train_dataloader()))
    assert images.shape == (4, 3, 224, 224)


def channel_statistics(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and standard deviation of each channel of (N, C, H, W) images, over every
    pixel of every image."""
    pixels = images.transpose(0, 1).flatten(1).double()
    return pixels.mean(1), pixels.std(1)


def agree(constants: tuple[tuple[float, ...], tuple[float, ...]], mean, std) -> bool:
    """Whether normalisation constants (mean, std) are within 0.01 of measured ones."""
    given = torch.tensor(constants, dtype=torch.float64)
    return bool(((given - torch.stack([mean, std])).abs() < 0.01).all())


def test_the_loaders_normalise_with_cifar10s_own_statistics(data_overrides, cifar_archive):
    if cifar_archive != SHARED_CIFAR:
        pytest.skip("the real CIFAR-10 is not beside the checkout")
    # One batch of the 5,000 held-out training images, un-augmented.
    overrides = [*data_overrides, "data.num_workers=0", "data.batch_size=5000"]
    for pipeline in PIPELINES:
        cfg = compose_config([*overrides, f"data.pipeline={pipeline}"])
        datamodule = instantiate_group(cfg, "data")
        datamodule.setup()
        images, _ = next(iter(datamodule.val_dataloader()))
        held_out = datamodule.arrays.train_images[datamodule.val_index]
        pixels = held_out.permute(0, 3, 1, 2).float() / 255
        mean, std = channel_statistics(pixels)
        constants = NORMALIZATION[cfg.data.normalization]
        assert agree(constants, mean, std), (constants, mean, std)
        assert not agree(NORMALIZATION["imagenet"], mean, std)  # the check can tell them apart
        # The loader applies exactly those constants.
        expected = (pixels - torch.tensor(constants[0])[:, None, None]) / torch.tensor(
            constants[1]
        )[:, None, None]
        torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)


def test_train_augmentation_changes_images_eval_does_not(data_root, cifar_archive):
    dm = make_datamodule(data_root, cifar_archive, val_size=100)
    train = dm.train_dataloader().dataset
    torch.manual_seed(0)
    views = torch.stack([train[0][0] for _ in range(8)])
    assert not all(torch.equal(views[0], v) for v in views[1:])
    val = dm.val_dataloader().dataset
    assert torch.equal(val[0][0], val[0][0])


def test_loader_workers_draw_the_augmentation_the_training_process_draws(data_root, cifar_archive):
    """Each training image's crop and flip is seeded from (seed, epoch, index): two worker
    processes give the batches the training process makes alone, so a resumed epoch (its
    workers started afresh) repeats them."""
    dm = make_datamodule(data_root, cifar_archive, val_size=100, batch_size=16)
    batches = {}
    for workers in (0, 2):
        dm.hparams.num_workers = workers
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(3)
        batches[workers] = list(itertools.islice(loader, 3))
    for (images, labels), (again, same_labels) in zip(batches[0], batches[2], strict=True):
        assert torch.equal(images, again) and torch.equal(labels, same_labels)


class CropDraws(Dataset):
    """What RandomCrop(32, padding=4) and RandomHorizontalFlip draw for an item: torch's
    global generator, as torchvision's transforms use it."""

    def __len__(self) -> int:
        return 4000

    def __getitem__(self, index: int) -> tuple[int, bool]:
        top, left = torch.randint(0, 9, (2,)).tolist()
        return 9 * top + left, bool(torch.rand(1) < 0.5)


def test_items_seeded_by_epoch_and_index_draw_independently():
    """The keyed draws keep augmentation's statistics: offsets uniform, flips fair, nothing
    shared between images or between an image's epochs; the process's generator untouched."""
    items = EpochSeededItems(CropDraws(), seed=42)
    state = torch.get_rng_state()
    epochs = [[items[(epoch, i)] for i in range(len(items))] for epoch in (0, 1)]
    assert torch.equal(torch.get_rng_state(), state)
    assert epochs[0][:5] == [items[(0, i)] for i in range(5)]  # a function of the key
    offsets = [offset for offset, _ in epochs[0]]
    unseeded = torch.randint(0, 81, (len(offsets),), generator=torch.Generator().manual_seed(0))
    assert chi_square_agrees(Counter(offsets), Counter(unseeded.tolist()))
    flips = sum(flip for _, flip in epochs[0])
    assert abs(flips - len(items) / 2) < 4 * (len(items) / 4) ** 0.5
    # 1 in 81 offsets agree by chance (about 49 of 4000), between neighbours or epochs alike.
    for pairs in (
        zip(epochs[0], epochs[1], strict=True),
        zip(epochs[0][1:], epochs[0][:-1], strict=True),
    ):
        agree = sum(a[0] == b[0] for a, b in pairs)
        assert agree < 100, agree


def test_wrong_class_count_is_a_clear_error(data_root, cifar_archive):
    with pytest.raises(DataError, match="set data.num_classes=10"):
        CifarDataModule(root=str(data_root), path=str(cifar_archive), num_classes=100).setup()


class Zeros(io.RawIOBase):
    """`size` zero bytes, made as they are read (the test holds no copy)."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


@pytest.mark.slow  # make test-all
def test_archive_that_expands_to_a_gigabyte_is_refused_before_it_is_read(tmp_path):
    bomb = tmp_path / "bomb.tar.gz"  # about 1 MB on disk
    with tarfile.open(bomb, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("cifar/train/cat/0000.png")
        info.size = 2**30
        tar.addfile(info, Zeros(info.size))
    # The CLI in a process of its own, reporting its peak memory (VmHWM: of this program
    # alone, where ru_maxrss would include pytest's, inherited through fork).
    command = (
        "import runpy, sys\n"
        f"sys.argv = ['resnet_lightning', 'data.path={bomb}', 'data.root={tmp_path}/cache',"
        f" 'hydra.run.dir={tmp_path}/run', 'trainer=cpu']\n"
        "try:\n"
        "    runpy.run_module('resnet_lightning', run_name='__main__')\n"
        "finally:\n"
        "    status = open('/proc/self/status').read().split('VmHWM:')[1].split()[0]\n"
        "    print('peak_kb', status, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", command], cwd=REPO, env=cli_env(), capture_output=True, text=True
    )
    *_, error, peak = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert error.startswith("error: ") and "cifar/train/cat/0000.png is 1024 MB" in error
    assert "data.max_image_mb=64" in error
    assert int(peak.split()[1]) < 2**20  # KB: under 1 GiB; reading the member took 1.8 GB


def test_read_limits_are_configurable(tmp_path):
    archive = make_image_archive(tmp_path / "small.tar.gz", train_per_class=2, test_per_class=1)
    tiny = CifarDataModule(root=str(tmp_path / "c1"), path=str(archive), max_total_gb=1e-6)
    with pytest.raises(DataError, match="images add up to more than data.max_total_gb=1e-06"):
        tiny.setup()
    with pytest.raises(DataError, match="more than an image may be"):
        CifarDataModule(root=str(tmp_path / "c2"), path=str(archive), max_image_mb=1e-4).setup()


def test_zip_with_a_forged_size_is_refused_naming_the_member(tmp_path):
    forged = tmp_path / "forged.zip"
    with zipfile.ZipFile(forged, "w") as z:
        z.writestr("train/cat/0.png", b"\x89PNG not really")
    data = bytearray(forged.read_bytes())
    central = data.index(b"PK\x01\x02")  # the central directory entry: size at offset 24
    data[central + 24 : central + 28] = (4 * 10**9).to_bytes(4, "little")
    forged.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train/cat/0.png is 3814.7\d* MB, more than an image"):
        load_cifar10(tmp_path / "cache", forged)


def test_zip_link_is_refused_as_a_link(tmp_path):
    linked = tmp_path / "link.zip"
    with zipfile.ZipFile(linked, "w") as z:
        info = zipfile.ZipInfo("train/cat/0.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match=r"holds a link \(train/cat/0.png\); links are refused"):
        load_cifar10(tmp_path / "cache", linked)


def test_unreadable_image_in_an_archive_is_named(tmp_path):
    archive = make_image_archive(tmp_path / "small.tar.gz", train_per_class=2, test_per_class=1)
    broken = tmp_path / "broken.tar"
    with tarfile.open(archive) as source, tarfile.open(broken, "w") as target:
        for member in source:
            data = source.extractfile(member).read()
            if member.name.endswith("train/dog/0001.png"):
                data = data[:20]  # cut short
            member.size = len(data)
            target.addfile(member, io.BytesIO(data))
    with pytest.raises(DataError) as error:
        load_cifar10(tmp_path / "cache", broken)
    assert "cifar/train/dog/0001.png is not a readable image" in str(error.value)
    assert "BytesIO" not in str(error.value)
