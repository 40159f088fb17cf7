"""data=imagefolder data.pipeline=tensor on photos made from real CIFAR-10 images: squares
decoded once and cached, evaluation batches equal to the torchvision path's, training crops
drawn as torchvision's RandomResizedCrop, the memory refusal, and a tiny in-process run."""

from __future__ import annotations

import csv
import math
from collections import Counter

import pytest
import torch
from PIL import Image
from torchvision import transforms

from resnet_lightning.data import NORMALIZATION, ImageFolderDataModule
from resnet_lightning.data import image_folder as image_folder_module
from resnet_lightning.data.tensor_loader import (
    random_resized_crop_boxes,
    random_resized_crop_flip,
)
from resnet_lightning.errors import DataError
from tests.cli_harness import TINY, chi_square_agrees, run_main, without_callbacks

MEAN, STD = NORMALIZATION["imagenet"]
GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]


def datamodule(root, path, **kwargs) -> ImageFolderDataModule:
    kwargs = {"image_size": 64, "resize_size": 72, "num_workers": 0, "batch_size": 8} | kwargs
    dm = ImageFolderDataModule(root=str(root), path=str(path), **kwargs)
    dm.setup()
    return dm


def test_batches_are_sized_normalised_and_labelled(photos, tmp_path):
    dm = datamodule(tmp_path, photos, pipeline="tensor", channels_last=True)
    loader = dm.train_dataloader()
    assert len(loader) == 240 // 8
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1, 2}
    pixels = images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and pixels.std() > 0.1
    # The same epoch draws the same batches (a resumed epoch), the next one others.
    again, _ = next(iter(dm.train_dataloader()))
    assert torch.equal(images, again)
    loader.sampler.set_epoch(1)
    assert not torch.equal(images, next(iter(loader))[0])
    # Every label of the split, in the sampler's order.
    squares, all_labels = dm.squares["train"]
    assert squares.shape == (240, 72, 72, 3) and squares.dtype == torch.uint8
    assert sorted(torch.cat([y for _, y in loader]).tolist()) == sorted(all_labels.tolist())


@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_batches_equal_the_torchvision_ones(photos, tmp_path, device):
    expected = list(datamodule(tmp_path, photos).val_dataloader())
    got = list(datamodule(tmp_path, photos, pipeline="tensor").tensor_loader("val", device))
    assert len(got) == len(expected) == 60 // 8 + 1
    for (images, labels), (want_images, want_labels) in zip(got, expected, strict=True):
        assert images.device.type == device
        images, labels = images.cpu(), labels.cpu()
        assert torch.equal(labels, want_labels)
        # Both resize through PIL; the centre crop of the square is the same pixels here
        # (square photos), so only float rounding differs.
        torch.testing.assert_close(images, want_images, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(88, 60), (60, 100)])
def test_non_square_photos_are_evaluated_as_torchvision_does(photos, tmp_path, size):
    # Wide and tall photos: the square keeps the centre of the longer side, and the centre
    # crop of that square is torchvision's Resize + CenterCrop of the whole photo.
    for file in photos.glob("val/*/*.jpg"):
        reshaped = tmp_path / "photos" / file.relative_to(photos)
        reshaped.parent.mkdir(parents=True, exist_ok=True)
        Image.open(file).resize(size, Image.BICUBIC).save(reshaped, quality=90)
    tree = tmp_path / "photos" / "val"
    expected = list(datamodule(tmp_path, tree, val_size=30).val_dataloader())
    got = list(datamodule(tmp_path, tree, val_size=30, pipeline="tensor").val_dataloader())
    assert sum(len(labels) for _, labels in got) == 30
    for (images, labels), (want_images, want_labels) in zip(got, expected, strict=True):
        assert torch.equal(labels, want_labels)
        torch.testing.assert_close(images, want_images, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("height", "width"), [(72, 72), (48, 96)])
def test_crop_boxes_are_drawn_as_torchvision_draws_them(height, width):
    draws = 4000
    top, left, h, w = random_resized_crop_boxes(
        draws, height, width, torch.Generator().manual_seed(0), torch.device("cpu")
    )
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    get_params = transforms.RandomResizedCrop.get_params  # the (top, left, h, w) it crops
    reference = [get_params(image, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(draws)]

    def histograms(boxes) -> list[Counter]:
        area, aspect, where = Counter(), Counter(), Counter()
        for i, j, bh, bw in boxes:
            assert 0 <= i <= height - bh and 0 <= j <= width - bw
            area[min(int(bh * bw / (height * width) * 10), 9)] += 1
            aspect[round(math.log(bw / bh) * 10)] += 1
            where[(int(4 * i / (height - bh + 1)), int(4 * j / (width - bw + 1)))] += 1
        return [area, aspect, where]

    ours = histograms(zip(top.tolist(), left.tolist(), h.tolist(), w.tolist(), strict=True))
    for mine, theirs in zip(ours, histograms(reference), strict=True):
        assert chi_square_agrees(mine, theirs), (mine, theirs)


@pytest.mark.parametrize("device", DEVICES)
def test_crops_cover_their_boxes_and_half_are_mirrored(device):
    # Red encodes the row and green the column (x8), so a crop's mean reads back its box.
    ramp = torch.arange(16, dtype=torch.uint8) * 8
    image = torch.zeros(16, 16, 3, dtype=torch.uint8)
    image[..., 0], image[..., 1] = ramp[:, None], ramp[None, :]
    images = image.to(device).expand(2000, -1, -1, -1)
    top, left, h, w = random_resized_crop_boxes(
        2000, 16, 16, torch.Generator(device).manual_seed(1), torch.device(device)
    )
    crops = random_resized_crop_flip(images, 8, torch.Generator(device).manual_seed(1))
    assert crops.shape == (2000, 3, 8, 8) and crops.device.type == device
    # Pixel i holds 8 i, centred at i + 0.5: a crop's mean is the value at its box's centre.
    rows, columns = crops[:, 0].mean((1, 2)) / 8, crops[:, 1].mean((1, 2)) / 8
    assert (rows - (top + h / 2 - 0.5)).abs().max() < 0.3
    assert (columns - (left + w / 2 - 0.5)).abs().max() < 0.3
    mirrored = crops[:, 1, 4, 0] > crops[:, 1, 4, 7]
    assert 0.45 < mirrored.float().mean() < 0.55


def test_squares_are_decoded_once_then_read_from_the_cache(photos, tmp_path, monkeypatch):
    first = datamodule(tmp_path, photos, pipeline="tensor")
    caches = sorted(tmp_path.glob("imagefolder-*-72px-*.pt"))
    # train and val; test is the val/ folder again, so it shares val's squares.
    assert [c.name.split("-")[-4] for c in caches] == ["train", "val"]
    assert first.squares["test"] is first.squares["val"]
    times = [c.stat().st_mtime_ns for c in caches]

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(image_folder_module, "decode_square", no_decoding)
    second = datamodule(tmp_path, photos, pipeline="tensor")
    assert [c.stat().st_mtime_ns for c in caches] == times
    for split in ("train", "val"):
        assert torch.equal(second.squares[split][0], first.squares[split][0])
        assert torch.equal(second.squares[split][1], first.squares[split][1])


def test_squares_larger_than_memory_are_refused_in_one_line(photos, tmp_path, monkeypatch):
    monkeypatch.setattr(image_folder_module, "available_memory", lambda: 2**20)
    with pytest.raises(DataError) as error:
        datamodule(tmp_path, photos, pipeline="tensor")
    message = str(error.value)
    assert "\n" not in message and "free memory" in message
    assert "data.pipeline=torchvision" in message
    assert not list(tmp_path.glob("*.pt"))  # refused before decoding
    with pytest.raises(DataError, match="than the 0.0 GB of data.max_total_gb"):
        datamodule(tmp_path, photos / "train", pipeline="tensor", max_total_gb=1e-6)


def test_tensor_pipeline_trains_in_process(photos, tmp_path, capfd, monkeypatch):
    run_dir = tmp_path / "run"
    args = [
        *TINY,
        *without_callbacks(),
        "data=imagefolder",
        f"data.path={photos}",
        f"data.root={tmp_path / 'cache'}",
        "data.pipeline=tensor",
        "data.image_size=32",
        "data.resize_size=36",
        "data.batch_size=8",
        "model=resnet20",
        "logger=csv",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        f"hydra.run.dir={run_dir}",
    ]
    code, stderr = run_main(args, capfd, monkeypatch)
    assert code == 0, stderr
    (metrics,) = run_dir.glob("**/metrics.csv")
    with metrics.open() as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
