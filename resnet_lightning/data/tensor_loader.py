"""The fast data path: batches cut from one uint8 tensor and augmented whole, on its device.

The torchvision path decodes every image through PIL in Python; here the data set stays one
(N, H, W, C) uint8 tensor (on the GPU when training there) and each batch is gathered, cropped,
flipped, normalised and resized by a handful of tensor ops. The transforms match the
torchvision ones in distribution: crop offsets uniform over 0..2*padding with zero (or
reflected) padding, flips with probability 0.5, cutout squares uniform over the image; for
larger images (random_resized_crop) RandomResizedCrop's areas and aspects, each batch's crops
resized by one roi_align. Alternating flips (airbench's) have no torchvision counterpart.

Sharding follows DistributedSampler: every rank draws the same permutation from the seed and
the epoch, and takes its own slice of it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from .policies import BatchPolicy, erase, random_erasing
from .sampling import ResumableSampler

PAD_MODES = ("zeros", "reflect")
FLIPS = ("random", "alternating", "none")


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to `count` within the block (cheap: ~1 us)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def random_crop_flip(
    images: Tensor,
    padding: int,
    generator: torch.Generator,
    *,
    reflect: bool = False,
    flip: Tensor | None = None,
) -> Tensor:
    """Crop each (H, W, C) uint8 image of the batch at a random offset after padding it by
    `padding` pixels (zeros, or the image reflected at its edges), and mirror those that
    `flip` (B,) marks, or, when it is None, half of them at random; returns (B, C, H, W)
    (with channels-last strides)."""
    size, h, w, c = images.shape
    device = images.device
    # The batch and its mirror image, padded, so one gather does crop and flip.
    padded = images.new_zeros(2 * size, h + 2 * padding, w + 2 * padding, c)
    if reflect:
        rows, cols = reflected(h, padding, device), reflected(w, padding, device)
        padded[:size] = images[:, rows][:, :, cols]
        padded[size:] = padded[:size].flip(2)
    else:
        padded[:size, padding : padding + h, padding : padding + w] = images
        padded[size:, padding : padding + h, padding : padding + w] = images.flip(2)
    windows = padded.unfold(1, h, 1).unfold(2, w, 1)  # every crop, (2B, 2p+1, 2p+1, C, H, W)
    dy, dx = torch.randint(0, 2 * padding + 1, (2, size), device=device, generator=generator)
    if flip is None:
        flip = torch.rand(size, device=device, generator=generator) < 0.5
    # The mirror of the crop at dx is the crop of the mirror at 2p - dx.
    dx = torch.where(flip, 2 * padding - dx, dx)
    return windows[torch.arange(size, device=device) + size * flip, dy, dx]


def reflected(length: int, padding: int, device: torch.device) -> Tensor:
    """The source index of each position of a side of `length` padded by `padding` on both
    ends with its reflection (edge pixel not repeated: torch's "reflect"): -1 -> 1."""
    index = torch.arange(-padding, length + padding, device=device).abs()
    return torch.where(index >= length, 2 * (length - 1) - index, index)


def alternating_flips(count: int, seed: int, device: torch.device) -> Tensor:
    """Per image, whether it is mirrored in even epochs (odd ones mirror the others): airbench's
    derandomised flip (Jordan 2024), each image mirrored in every other epoch. Exactly half of
    the `count` images, chosen by the seed alone (a stream apart from the shuffles' and the
    batches' draws), so that every rank and a resumed run agree."""
    generator = torch.Generator().manual_seed(hash((seed, -1)) % 2**63)
    return (torch.randperm(count, generator=generator) < count // 2).to(device)


def random_resized_crop_boxes(
    size: int, height: int, width: int, generator: torch.Generator, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(top, left, h, w) of `size` crops drawn as torchvision's RandomResizedCrop.get_params:
    area (0.08, 1) of the image, aspect (3/4, 4/3) log-uniform, the first of 10 tries that
    fits, else the centre crop clamped to that aspect. All tries drawn at once."""
    tries = 10
    fraction = torch.empty(size, tries, device=device).uniform_(0.08, 1, generator=generator)
    area = height * width * fraction
    log_ratio = torch.empty(size, tries, device=device)
    aspect = log_ratio.uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator).exp_()
    w = (area * aspect).sqrt_().round_().long()
    h = (area / aspect).sqrt_().round_().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(1, keepdim=True)  # the first try that fits (0 when none does)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    fallback = ~fits.any(1)
    # torchvision's fallback: the whole image, trimmed to the nearest allowed aspect.
    ratio = width / height
    fall_w = width if ratio <= 4 / 3 else round(height * 4 / 3)
    fall_h = height if ratio >= 3 / 4 else round(width / (3 / 4))
    h, w = torch.where(fallback, fall_h, h), torch.where(fallback, fall_w, w)
    # randint(0, height - h + 1) per image, as a uniform draw scaled to each range.
    offsets = torch.rand(2, size, device=device, generator=generator)
    top = (offsets[0] * (height - h + 1)).long()
    left = (offsets[1] * (width - w + 1)).long()
    top = torch.where(fallback, (height - h) // 2, top)
    left = torch.where(fallback, (width - w) // 2, left)
    return top, left, h, w


def random_resized_crop_flip(images: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """RandomResizedCrop(size) + RandomHorizontalFlip of each (H, W, C) uint8 image, as one
    roi_align (bilinear, averaging over each output pixel's area as an antialiased resize
    does); returns float (B, C, size, size) on the 0..255 scale."""
    batch, height, width, _ = images.shape
    device = images.device
    top, left, h, w = random_resized_crop_boxes(batch, height, width, generator, device)
    flip = torch.rand(batch, device=device, generator=generator) < 0.5
    # Boxes in pixel-edge coordinates (aligned=True: pixel i spans [i, i + 1)).
    boxes = torch.stack([left, top, left + w, top + h], 1).float()
    index = torch.arange(batch, device=device, dtype=boxes.dtype)[:, None]
    crops = roi_align(
        images.permute(0, 3, 1, 2).float(),
        torch.cat([index, boxes], 1),
        output_size=size,
        aligned=True,
    )
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


def center_crop(images: Tensor, size: int) -> Tensor:
    """The centre size x size square of each (H, W, C) image, offsets rounded as torchvision's
    CenterCrop; returns (B, C, size, size) (a view with channels-last strides)."""
    _, height, width, _ = images.shape
    top, left = round((height - size) / 2), round((width - size) / 2)
    return images[:, top : top + size, left : left + size].permute(0, 3, 1, 2)


def cutout(images: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Zero one size x size square per image, placed uniformly inside it (in place).

    After normalisation zero is the mean colour, as torchvision's RandomErasing(value=0).
    """
    batch, _, h, w = images.shape
    device = images.device
    top = torch.randint(0, h - size + 1, (batch,), device=device, generator=generator)
    left = torch.randint(0, w - size + 1, (batch,), device=device, generator=generator)
    sides = torch.full_like(top, size)
    return erase(images, top, left, sides, sides)


class TensorLoader:
    """Yields (images, labels) batches from uint8 (N, H, W, C) images on their own device.

    Images come out float32, normalised, (B, C, image_size, image_size), contiguous or
    channels-last, as the torchvision path gives them. Nothing is copied up front: `index`
    selects the split's images from the full tensor, batch by batch.

    Args:
        images: (N, H, W, C) uint8, on the device batches should be made on.
        labels: (N,) int64, on the same device.
        batch_size: images per batch, per rank.
        mean, std: per-channel normalisation, on the 0..1 scale.
        index: the positions in `images` this loader serves (e.g. a validation split).
        augment: random crop after padding by `padding` pixels, and horizontal flip.
        pad_mode: what the crop's padding holds: "zeros" or "reflect" (the image mirrored at
            its edges, the edge pixel not repeated).
        flip: with `augment`, "random" (each image mirrored with probability 1/2), "alternating"
            (airbench's: half the images, drawn from the seed, mirrored in even epochs, the
            other half in odd ones: each image in every other epoch), or "none".
        random_resized_crop: the ImageNet recipe instead, for images larger than
            `image_size` (image folders): training crops RandomResizedCrop(image_size) and
            flips, evaluation takes the centre image_size square.
        cutout: side of the square zeroed in each image at 32 px (0: none); scaled with
            `image_size`.
        policy, randaugment_n, randaugment_m: an augmentation policy applied after crop and
            flip, each image with its own draws (policies.BatchPolicy); "none" for none.
        random_erasing: probability of RandomErasing's box per image, after cutout.
        image_size: output side; other than the input's, bilinear resize (antialiased).
        channels_last: channels-last batches, for channels-last models.
        shuffle, drop_last: as DataLoader's.
        seed: shuffling and augmentation seed; the same on every rank.
        rank, world_size: this process's shard of each epoch.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        index: Tensor | None = None,
        augment: bool = False,
        padding: int = 4,
        pad_mode: str = "zeros",
        flip: str = "random",
        random_resized_crop: bool = False,
        cutout: int = 0,
        policy: str = "none",
        randaugment_n: int = 2,
        randaugment_m: int = 9,
        random_erasing: float = 0.0,
        image_size: int | None = None,
        channels_last: bool = False,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be (N, H, W, C) uint8, not {images.dtype} {images.shape}"
            )
        self.images, self.labels = images, labels
        self.index = torch.arange(len(labels)) if index is None else index.cpu()
        self.batch_size, self.drop_last = batch_size, drop_last
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode={pad_mode!r} is not one of {', '.join(PAD_MODES)}")
        if flip not in FLIPS:
            raise ValueError(f"flip={flip!r} is not one of {', '.join(FLIPS)}")
        if flip != "random" and random_resized_crop:
            raise ValueError(f"flip={flip!r}: random_resized_crop flips at random only")
        self.augment, self.padding, self.channels_last = augment, padding, channels_last
        self.reflect, self.flip = pad_mode == "reflect", flip
        # Indexed by the images' positions in `images`, as the batches are.
        self.even_epoch_flips = (
            alternating_flips(len(images), seed, images.device) if flip == "alternating" else None
        )
        self.random_resized_crop = random_resized_crop
        self.image_size = image_size or images.shape[1]
        self.cutout = round(cutout * self.image_size / images.shape[1])
        self.seed, self.rank = seed, rank
        _, height, width, _ = images.shape
        self.policy = None
        if policy != "none" and random_resized_crop:
            raise ValueError(
                "the policies take uint8 crops, which random_resized_crop does not give"
            )
        if policy != "none":
            self.policy = BatchPolicy(
                policy, randaugment_n, randaugment_m, height, width, images.device
            )
        self.random_erasing = random_erasing
        # Lightning calls loader.sampler.set_epoch(epoch) as it does for DataLoaders, and reads
        # batch_sampler (to check evaluation shuffling); batches are cut from the sampler's
        # order directly.
        self.sampler = ResumableSampler(self.index, seed, rank, world_size, shuffle=shuffle)
        self.batch_sampler = None
        device = images.device
        mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
        # x / 255 normalised is one multiply-add: x * scale + shift.
        self.scale, self.shift = 1 / (255 * std_t), -mean_t / std_t

    def __len__(self) -> int:
        samples = len(self.sampler)  # the same on every rank (the sampler pads)
        if self.drop_last:
            return samples // self.batch_size
        return -(-samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = iter(self.sampler)  # resumes part-way when a restored state says so
        generator = torch.Generator(self.images.device)
        # On the CPU a batch is made in the training process between steps, one thread, as
        # DataLoader workers run: its ops are small, and with the cores busy (a loaded or
        # shared machine) threads that wait for each other make it slower, not faster.
        on_cpu = self.images.device.type == "cpu"
        for _ in range(len(self)):
            chunk = list(itertools.islice(order, self.batch_size))
            if not chunk or (self.drop_last and len(chunk) < self.batch_size):
                return
            number = (self.sampler.seen - 1) // self.batch_size  # of this batch in its epoch
            # Distinct per epoch, batch and rank, reproducible from the seed alone (int hashes
            # are not salted), so that a resumed epoch draws what it would have drawn.
            generator.manual_seed(hash((self.seed, self.sampler.epoch, number, self.rank)) % 2**63)
            batch = self.index[torch.tensor(chunk, dtype=torch.long)].to(self.images.device)
            with intra_op_threads(1) if on_cpu else nullcontext():
                # index_select copies whole images; `images[batch]` goes element by element.
                images = self.transform(
                    self.images.index_select(0, batch), generator, self.flips(batch)
                )
            yield images, self.labels.index_select(0, batch)

    def state_dict(self) -> dict[str, int]:
        """How far the current epoch got: Lightning saves it in mid-epoch checkpoints."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    def flips(self, batch: Tensor) -> Tensor | None:
        """Which images of the batch (positions in `images`) to mirror; None: half at random."""
        if self.flip == "none":
            return torch.zeros(len(batch), dtype=torch.bool, device=batch.device)
        if self.flip == "alternating":
            return self.even_epoch_flips[batch] ^ (self.sampler.epoch % 2 == 1)
        return None

    def transform(
        self, images: Tensor, generator: torch.Generator, flip: Tensor | None = None
    ) -> Tensor:
        """uint8 (B, H, W, C) -> float32 (B, C, S, S), normalised and augmented; `flip`: which
        to mirror (None: half at random)."""
        if self.random_resized_crop and self.augment:
            images = random_resized_crop_flip(images, self.image_size, generator)
        elif self.random_resized_crop:
            images = center_crop(images, self.image_size)
        elif self.augment:
            images = random_crop_flip(
                images, self.padding, generator, reflect=self.reflect, flip=flip
            )
        else:
            images = images.permute(0, 3, 1, 2)
        if self.policy is not None:
            images = self.policy(images, generator)
        # Permuted (B, H, W, C) memory is channels-last; an NCHW copy is cheapest in uint8.
        images = images if self.channels_last else images.contiguous()
        images = images.float().mul_(self.scale).add_(self.shift)
        if self.image_size != images.shape[-1]:
            images = F.interpolate(
                images, size=self.image_size, mode="bilinear", antialias=True, align_corners=False
            )
        if self.cutout:
            images = cutout(images, self.cutout, generator)
        if self.random_erasing:
            images = random_erasing(images, self.random_erasing, generator)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return images.contiguous(memory_format=memory_format)
