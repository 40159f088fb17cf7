"""The tensor data path (data.pipeline=tensor) against the torchvision one, on real images:
the same tensors without augmentation, the same augmentation in distribution, DDP shards that
partition each epoch, one uint8 copy of the data, and the GPU pieces where there is a GPU."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from resnet_lightning.data import NORMALIZATION, CifarDataModule, TensorLoader
from resnet_lightning.errors import InvalidArgument
from tests.cli_harness import REPO, SHARED_CIFAR, TINY, make_datamodule, run_cli

GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]
MEAN, STD = NORMALIZATION["cifar"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("image_size", "normalization"), [(32, "cifar"), (224, "imagenet")])
def test_unaugmented_batches_equal_the_torchvision_ones(
    data_root, cifar_archive, device, image_size, normalization
):
    kwargs = {"batch_size": 64, "image_size": image_size, "normalization": normalization}
    expected_images, expected_labels = next(
        iter(make_datamodule(data_root, cifar_archive, **kwargs).val_dataloader())
    )
    for channels_last in (False, True):
        dm = make_datamodule(
            data_root, cifar_archive, pipeline="tensor", channels_last=channels_last, **kwargs
        )
        images, labels = next(iter(dm.tensor_loader("val", device)))
        assert images.device.type == device and images.dtype == torch.float32
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        assert images.is_contiguous(memory_format=memory_format)
        assert torch.equal(labels.cpu(), expected_labels)
        # PIL resizes in two uint8 passes; their rounding (up to a grey level, a quarter on
        # average) is the only difference.
        grey_level = 1 / 255 / min(NORMALIZATION[normalization][1])
        tolerance = 1e-5 if image_size == 32 else grey_level
        torch.testing.assert_close(images.cpu(), expected_images, atol=tolerance, rtol=0)
        assert (images.cpu() - expected_images).abs().mean() < tolerance / 2


def pattern_image() -> torch.Tensor:
    """32x32 RGB whose red channel encodes the row and green the column (4, 12, ..., 252):
    a crop's offset, its flip and any padding (0) read back from one pixel."""
    ramp = torch.arange(32, dtype=torch.uint8) * 8 + 4
    image = torch.full((32, 32, 3), 200, dtype=torch.uint8)
    image[..., 0] = ramp[:, None]
    image[..., 1] = ramp[None, :]
    return image


def decode(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Crop offsets (0..8 in the 40 px padded image), flips and cutout squares of augmented
    pattern images, from their pixel values."""
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    values = ((images.cpu().float() * std + mean) * 255).round()
    red, green = values[:, 0], values[:, 1]
    # Row 16 and columns 16/17 never fall in the padding.
    flipped = green[:, 16, 17] < green[:, 16, 16]
    dy = (red[:, 16, 16] - 4) / 8 - 12
    dx = (green[:, 16, 16] - 4) / 8 - 12 + flipped.float()
    return {
        "dy": dy.long(),
        "dx": dx.long(),
        "flipped": flipped,
        "top_padding": (values[:, 2, 0, 16] == 0),  # blue is 200 everywhere but the padding
        "cutout": (images[:, 0] == 0),  # after normalisation only a cutout pixel is exactly 0
    }


def augmented_pattern(path: str, device: str, draws: int, cutout: int) -> dict[str, torch.Tensor]:
    """`draws` augmented copies of the pattern image through one pipeline's real code."""
    torch.manual_seed(0)
    dm = CifarDataModule(augment=True, cutout=cutout)
    if path == "torchvision":
        transform = dm.transform(train=True)
        pil = Image.fromarray(pattern_image().numpy())
        images = torch.stack([transform(pil) for _ in range(draws)])
    else:
        copies = pattern_image().expand(draws, 32, 32, 3).to(device)
        labels = torch.zeros(draws, dtype=torch.long, device=device)
        loader = TensorLoader(copies, labels, draws, MEAN, STD, augment=True, cutout=cutout)
        images, _ = next(iter(loader))
    return decode(images)


def chi_square(counts_a: torch.Tensor, counts_b: torch.Tensor) -> float:
    """Two-sample chi-square statistic of equal-sized samples' histograms."""
    total = (counts_a + counts_b).float()
    return float(((counts_a - counts_b).float() ** 2 / total.clamp(min=1)).sum())


@pytest.mark.parametrize("device", DEVICES)
def test_crops_and_flips_agree_with_torchvision_in_distribution(device):
    draws = 3000
    ours = augmented_pattern("tensor", device, draws, cutout=0)
    theirs = augmented_pattern("torchvision", device, draws, cutout=0)
    for key in ("dy", "dx"):
        a, b = ours[key].bincount(minlength=9), theirs[key].bincount(minlength=9)
        assert len(a) == len(b) == 9  # offsets 0..8 only
        assert chi_square(a, b) < 26.1  # chi2(8 dof) at p = 0.001
        uniform = torch.full((9,), draws / 9)
        assert float(((a - uniform) ** 2 / uniform).sum()) < 26.1
    for decoded in (ours, theirs):
        assert abs(decoded["flipped"].float().mean() - 0.5) < 4 * (0.25 / draws) ** 0.5
        # Zero padding: the top row is padding exactly when the crop starts above the image.
        assert torch.equal(decoded["top_padding"], decoded["dy"] < 4)


@pytest.mark.parametrize("device", DEVICES)
def test_cutout_agrees_with_torchvision_random_erasing(device):
    draws = 2000
    positions = {}
    for path in ("tensor", "torchvision"):
        masks = augmented_pattern(path, device, draws, cutout=8)["cutout"]
        assert (masks.sum((1, 2)) == 64).all()  # one 8x8 square, always whole
        rows = masks.any(2).float().argmax(1)  # first masked row
        positions[path] = rows.bincount(minlength=25)
        assert len(positions[path]) == 25  # placed inside the 32 px image
    assert chi_square(positions["tensor"], positions["torchvision"]) < 51.2  # chi2(24), p=0.001


def test_ddp_ranks_partition_each_epoch_and_reshuffle_deterministically():
    def epoch_labels(count, rank, epoch, **kwargs):
        images = torch.zeros(count, 2, 2, 3, dtype=torch.uint8)
        labels = torch.arange(count)  # labels are the images' positions
        loader = TensorLoader(
            images, labels, 8, MEAN, STD, seed=5, rank=rank, world_size=2, **kwargs
        )
        loader.sampler.set_epoch(epoch)  # as Lightning does each epoch
        batches = [y for _, y in loader]
        assert len(batches) == len(loader)
        return torch.cat(batches)

    train = {"shuffle": True, "drop_last": True}
    shards = [epoch_labels(96, rank, 0, **train) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 48
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(96))  # each image once
    assert torch.equal(epoch_labels(96, 0, 0, **train), shards[0])  # reproducible
    assert not torch.equal(epoch_labels(96, 0, 1, **train), shards[0])  # a new epoch, a new order
    # Evaluation: no shuffle, nothing dropped; the sampler pads 103 to 2 x 52.
    shards = [epoch_labels(103, rank, 0) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 52
    assert set(torch.cat(shards).tolist()) == set(range(103))


def test_the_data_set_is_held_once_as_uint8(data_root, cifar_archive):
    dm = make_datamodule(data_root, cifar_archive, pipeline="tensor", val_size=5000)
    train, val, test = dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()
    arrays = dm.arrays
    for loader, images in (
        (train, arrays.train_images),
        (val, arrays.train_images),
        (test, arrays.test_images),
    ):
        assert loader.images.dtype == torch.uint8
        assert loader.images.data_ptr() == images.data_ptr()  # a view, never a copy
    # The same split as the torchvision path: disjoint train and validation images.
    assert torch.equal(train.index, dm.train_index) and torch.equal(val.index, dm.val_index)
    assert len(train) == (len(arrays.train_labels) - 5000) // 128
    if cifar_archive == SHARED_CIFAR:
        nbytes = arrays.train_images.nbytes + arrays.test_images.nbytes
        assert 180e6 < nbytes < 190e6  # 60,000 x 32 x 32 x 3


@pytest.mark.slow  # make test-all
def test_resnet9_dawnbench_recipe_runs_through_the_cli(tmp_path, data_overrides):
    """The whole ResNet-9 DAWNBench recipe (tensor pipeline on the training device, bf16,
    channels-last, cutout, label smoothing, test-time flips) for a few steps on this machine."""
    run_dir = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith("trainer=")]
    smaller = ["trainer.limit_train_batches=2", "data.batch_size=8"]  # ResNet-9 is heavy here
    recipe = "experiment=resnet9_dawnbench"
    run_cli([recipe, *tiny, *smaller, *data_overrides, f"hydra.run.dir={run_dir}"], cwd=REPO)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["params"] == 6_573_120  # ResNet-9
    assert 0.0 <= metrics["test/acc"] <= 1.0
    timing = json.loads((run_dir / "epoch_times.json").read_text())
    assert len(timing["epoch_s"]) == 2 and timing["fit_s"] > 0
    saved = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "pipeline: tensor" in saved and "precision: bf16-mixed" in saved


@pytest.mark.slow  # make test-all
def test_ddp_run_with_the_tensor_pipeline(tmp_path, data_overrides):
    """Two gloo processes, each loading its shard on its own; equal lengths keep them in step."""
    run_dir = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith("trainer=")]
    overrides = ["model=resnet20", "trainer=ddp_cpu", "data.pipeline=tensor", *tiny]
    run_cli([*overrides, *data_overrides, f"hydra.run.dir={run_dir}"], cwd=REPO)
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile", [False, True])
def test_bf16_channels_last_training_on_the_gpu(tmp_path, data_overrides, compile):
    run_dir = tmp_path / "run"
    overrides = [
        "experiment=fast94",
        f"model.compile={str(compile).lower()}",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=5",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
    ]
    run_cli([*overrides, *data_overrides, f"hydra.run.dir={run_dir}"], cwd=REPO)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 10 and metrics["test/loss"] == metrics["test/loss"]  # not nan


# airbench's crop and flip options: data.padding, data.pad_mode, data.flip


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> normalised float (B, C, H, W), as both pipelines normalise."""
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    return (images.permute(0, 3, 1, 2).float() / 255 - mean) / std


def crop_offsets(out: torch.Tensor, image: torch.Tensor, padding: int) -> list[tuple[int, int]]:
    """The offsets (dy, dx) at which `out` (C, H, W) is a crop of `image` (H, W, C) padded by
    reflection (torch's own F.pad, the reference)."""
    padded = F.pad(normalise(image[None]), (padding,) * 4, mode="reflect")[0]
    side = 2 * padding + 1
    return [
        (dy, dx)
        for dy in range(side)
        for dx in range(side)
        if torch.allclose(padded[:, dy : dy + 32, dx : dx + 32], out, atol=1e-5)
    ]


def test_reflect_padding_crops_windows_of_the_reflected_image(data_root, cifar_archive):
    """Both pipelines, real images, no flips: every crop is a window of the image padded by
    reflection, at every offset, and the reflected border shows off the centre."""
    dm = make_datamodule(
        data_root, cifar_archive, padding=2, pad_mode="reflect", flip="none", val_size=0
    )
    images = dm.arrays.train_images[:64]
    loader = TensorLoader(
        images,
        dm.arrays.train_labels[:64],
        64,
        MEAN,
        STD,
        augment=True,
        padding=2,
        pad_mode="reflect",
        flip="none",
    )
    tensor_crops, _ = next(iter(loader))
    transform = dm.transform(train=True)
    torch.manual_seed(0)
    torchvision_crops = [transform(Image.fromarray(image.numpy())) for image in images]
    for crops in (tensor_crops, torchvision_crops):
        offsets = [crop_offsets(out, image, 2) for out, image in zip(crops, images, strict=True)]
        assert all(offsets), "a crop that is no window of the reflected image"
        seen = {found[0] for found in offsets}
        assert len(seen) > 10 and any(dy != 2 and dx != 2 for dy, dx in seen)


def flipped_in_order(loader: TensorLoader, images: torch.Tensor) -> torch.Tensor:
    """For an unshuffled, untranslated loader over `images`: whether each came out mirrored
    (each matches exactly one of itself and its mirror)."""
    out = torch.cat([batch for batch, _ in loader])
    plain, mirrored = normalise(images), normalise(images.flip(2))
    is_plain = (out - plain).flatten(1).abs().amax(1) < 1e-5
    is_mirrored = (out - mirrored).flatten(1).abs().amax(1) < 1e-5
    assert torch.equal(is_plain, ~is_mirrored)
    return is_mirrored


def test_alternating_flips_mirror_each_image_every_other_epoch(data_root, cifar_archive):
    dm = make_datamodule(data_root, cifar_archive, pipeline="tensor", val_size=0)
    images = dm.arrays.train_images[:200]
    positions = torch.arange(200)  # as labels: where each image of a batch came from

    def loader(epoch: int, seed: int = 3, **kwargs) -> TensorLoader:
        made = TensorLoader(
            images,
            positions,
            50,
            MEAN,
            STD,
            augment=True,
            padding=0,
            flip="alternating",
            seed=seed,
            **kwargs,
        )
        made.sampler.set_epoch(epoch)
        return made

    flips = [flipped_in_order(loader(epoch), images) for epoch in range(4)]
    assert int(flips[0].sum()) == 100  # half the images in the first epoch
    for epoch in range(3):
        assert torch.equal(flips[epoch + 1], ~flips[epoch])  # each in every other epoch
    assert not torch.equal(flipped_in_order(loader(0, seed=4), images), flips[0])
    # A property of (seed, image, epoch), not of the order the images come in, of the global
    # RNG, or of where an epoch starts: a run resumed after two batches flips as one that
    # was not stopped.
    torch.manual_seed(123)
    full = [(x, i) for x, i in loader(1, shuffle=True)]
    resumed = loader(1, shuffle=True)
    resumed.load_state_dict({"epoch": 1, "seen": 100})
    tail = list(resumed)
    assert len(full) == 4 and len(tail) == 2
    for (x, i), (x_resumed, i_resumed) in zip(full[2:], tail, strict=True):
        assert torch.equal(x, x_resumed) and torch.equal(i, i_resumed)
    out, order = torch.cat([x for x, _ in full]), torch.cat([i for _, i in full])
    expected = torch.where(flips[1][order, None, None, None], images.flip(2)[order], images[order])
    torch.testing.assert_close(out, normalise(expected), atol=1e-5, rtol=0)


def test_flip_none_never_mirrors(data_root, cifar_archive):
    dm = make_datamodule(data_root, cifar_archive, padding=0, flip="none")
    images = dm.arrays.train_images[:64]
    loader = TensorLoader(
        images, torch.arange(64), 64, MEAN, STD, augment=True, padding=0, flip="none"
    )
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        assert not flipped_in_order(loader, images).any()
    transform = dm.transform(train=True)
    torch.manual_seed(0)
    torchvision_out = torch.stack([transform(Image.fromarray(x.numpy())) for x in images])
    torch.testing.assert_close(torchvision_out, normalise(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"padding": 32}, "padding=32 must be in 0..31"),
        ({"pad_mode": "edge"}, "pad_mode='edge' is unknown; use one of zeros, reflect"),
        ({"flip": "always"}, "flip='always' is unknown; use one of random, alternating, none"),
        ({"flip": "alternating"}, "flip='alternating' needs data.pipeline=tensor"),
    ],
)
def test_bad_crop_and_flip_options_are_refused(kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        CifarDataModule(**kwargs)
