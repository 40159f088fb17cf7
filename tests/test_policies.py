"""Augmentation policies and random erasing (data.policy, data.random_erasing): the tensor
path's batched draws and ops against torchvision's classes and kernels, on real CIFAR images,
and a tiny CLI run through each data path."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest
import torch
from torchvision.transforms import v2

from resnet_lightning.data.policies import BatchPolicy, random_erasing
from tests.cli_harness import REPO, TINY, chi_square_agrees, make_datamodule, run_cli

POLICIES = ["autoaugment", "randaugment", "trivialaugment"]


@pytest.fixture(scope="module")
def real_images(data_root, cifar_archive) -> torch.Tensor:
    """Real training images, uint8 (N, C, H, W)."""
    arrays = make_datamodule(data_root, cifar_archive).arrays
    return arrays.train_images[:2048].permute(0, 3, 1, 2).contiguous()


def torchvision_draws(transform: v2.Transform, image: torch.Tensor, count: int) -> list[list]:
    """(op, magnitude) of each op torchvision's policy applies, per call, `count` calls."""
    calls: list[list] = []

    def record(image, op, magnitude, **kwargs):
        if op != "Identity":  # AutoAugment never names it: a skipped op applies nothing
            calls[-1].append((op, magnitude))
        return image

    transform._apply_image_or_video_transform = record
    torch.manual_seed(0)
    for _ in range(count):
        calls.append([])
        transform(image)
    return calls


def batch_draws(policy: BatchPolicy, count: int) -> list[list]:
    codes = policy.sample(count, torch.Generator().manual_seed(0))
    ops = [[policy.ops[c // (2 * policy.bins)] for c in row] for row in codes.tolist()]
    magnitudes = policy.magnitudes[codes].tolist()
    return [
        [(op, m) for op, m in zip(row_ops, row_m, strict=True) if op != "Identity"]
        for row_ops, row_m in zip(ops, magnitudes, strict=True)
    ]


@pytest.mark.parametrize("name", POLICIES)
def test_each_image_draws_ops_and_magnitudes_as_torchvision_does(name, real_images):
    count = 4000
    policy = BatchPolicy(name, num_ops=2, magnitude=9)
    ours = batch_draws(policy, count)
    theirs = torchvision_draws(policy.reference, real_images[0], count)
    # Which ops, with untouched images as one more outcome.
    op_counts = [
        Counter(op for draw in draws for op, _ in draw)
        + Counter({"untouched": sum(not draw for draw in draws)})
        for draws in (ours, theirs)
    ]
    assert len(op_counts[0]) > 10 and chi_square_agrees(*op_counts), op_counts
    untouched = [sum(not d for d in draws) / count for draws in (ours, theirs)]
    assert abs(untouched[0] - untouched[1]) < 4 * (0.25 / count) ** 0.5 * 2**0.5, untouched
    # Which magnitudes: the same values of torchvision's tables, negated half the time.
    pairs = [Counter(p for draw in draws for p in draw) for draws in (ours, theirs)]
    if name == "trivialaugment":  # 31 bins a draw: compare the bins' counts
        values = policy.magnitudes.view(len(policy.ops), policy.bins, 2)[:, :, 0].tolist()
        table = dict(zip(policy.ops, values, strict=True))
        signed = [op for k, op in enumerate(policy.ops) if policy.signed[k]]
        bins = [
            Counter(table[op].index(abs(m)) for op, m in p.elements() if op in signed)
            for p in pairs
        ]
        assert len(bins[0]) == 31 and chi_square_agrees(*bins), bins
        assert set(pairs[0]) <= {(op, s * m) for op in table for m in table[op] for s in (1, -1)}
    else:
        assert set(pairs[0]) == set(pairs[1])
    for p in pairs:
        negated = sum(n for (op, m), n in p.items() if m < 0)
        signed = sum(n for (op, m), n in p.items() if policy.signed[policy.ops.index(op)] and m)
        assert abs(negated / signed - 0.5) < 0.05


def test_each_op_gives_torchvision_results_exactly(real_images):
    """Every op at its largest magnitudes (both signs) and at bin 20 (TrivialAugmentWide's
    90 degree rotation, torchvision's rot90 fast path), and RandAugment's bin 9: the batched
    result equals, pixel for pixel, torchvision's kernel on each image as its policy calls it."""
    images = real_images[:16]
    for name, bins in (("trivialaugment", (30, 20)), ("randaugment", (9,))):
        policy = BatchPolicy(name, magnitude=9)
        for k, op in enumerate(policy.ops):
            for b in bins:
                for negated in (0, 1):
                    code = (k * policy.bins + b) * 2 + negated
                    magnitude = float(policy.magnitudes[code])
                    ours = policy.apply(images, torch.full((len(images),), code))
                    theirs = torch.stack([policy.apply_one(i, op, magnitude) for i in images])
                    assert torch.equal(ours, theirs), (name, op, magnitude)


def test_random_erasing_agrees_with_torchvision(real_images):
    count, p = 3000, 0.25
    erased = {}
    ones = torch.ones(count, 3, 32, 32)
    ours = random_erasing(ones.clone(), p, torch.Generator().manual_seed(0))
    transform = v2.RandomErasing(p, value=0)
    torch.manual_seed(0)
    theirs = torch.stack([transform(image) for image in ones])
    for path, images in (("tensor", ours), ("torchvision", theirs)):
        mask = images[:, 0] == 0
        rows, cols = mask.any(2).sum(1), mask.any(1).sum(1)
        assert torch.equal(mask.sum((1, 2)), rows * cols)  # one box, whole
        areas = mask.sum((1, 2))[rows > 0].float() / 1024
        assert abs(len(areas) / count - p) < 4 * (p * (1 - p) / count) ** 0.5
        # Within torchvision's default scale, up to the rounding of each side.
        assert areas.min() > 0.01 and areas.max() < 0.4
        erased[path] = Counter((areas * 10).long().tolist())  # areas in 0.1 bins
    assert chi_square_agrees(erased["tensor"], erased["torchvision"]), erased


@pytest.mark.parametrize("name", POLICIES)
def test_both_data_paths_augment_real_images_alike(name, data_root, cifar_archive):
    """The wiring: each path's training batches of real images through the policy (after crop
    and flip, before normalisation) have the same distribution of per-image mean brightness."""
    means = {}
    for pipeline in ("torchvision", "tensor"):
        kwargs = {"batch_size": 512, "policy": name, "random_erasing": 0.25, "pipeline": pipeline}
        dm = make_datamodule(data_root, cifar_archive, **kwargs)
        torch.manual_seed(0)
        batches = itertools.islice(dm.train_dataloader(), 2)
        means[pipeline] = torch.cat([x.mean((1, 2, 3)) for x, _ in batches])
    edges = torch.quantile(torch.cat(list(means.values())), torch.linspace(0, 1, 11))[1:-1]
    counts = [Counter(torch.bucketize(m, edges).tolist()) for m in means.values()]
    assert len(counts[0]) == 10 and chi_square_agrees(*counts), counts
    # Against the unaugmented images: the policy changed them.
    plain = make_datamodule(data_root, cifar_archive, batch_size=512, augment=False)
    plain_means = next(iter(plain.train_dataloader()))[0].mean((1, 2, 3))
    assert not torch.allclose(
        means["tensor"][:512].sort().values, plain_means.sort().values, atol=1e-3
    )


# About 15 s a run here (a process of its own): the slow tier (make test-all). The policies'
# wiring is checked in-process above, and test_regularization.py trains with a policy on both
# paths in-process.
@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["torchvision", "tensor"])
def test_a_tiny_run_trains_with_trivialaugment_and_erasing(pipeline, tmp_path, data_overrides):
    run_dir = tmp_path / "run"
    overrides = [
        *TINY,
        "model=resnet20",
        "trainer.max_epochs=1",
        f"data.pipeline={pipeline}",
        "data.policy=trivialaugment",
        "data.random_erasing=0.25",
    ]
    run_cli([*overrides, *data_overrides, f"hydra.run.dir={run_dir}"], cwd=REPO)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["test/loss"] == metrics["test/loss"]  # not nan
    saved = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "policy: trivialaugment" in saved and "random_erasing: 0.25" in saved
