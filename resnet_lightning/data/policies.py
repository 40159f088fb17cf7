"""Augmentation policies and random erasing on whole batches: the tensor path's counterpart of
torchvision.transforms.v2's AutoAugment (CIFAR-10 policy), RandAugment, TrivialAugmentWide and
RandomErasing, with the same draws per image and the same results per operation.

Each image draws its own sub-policy, operations, magnitude bins and signs, as torchvision
draws them for one image; the batch is then transformed in a few whole-batch ops, with no loop
over images. The op set, magnitude tables and sub-policies are read from torchvision's own
classes, and every op whose result depends on the magnitude and the pixel alone is tabulated
by torchvision's own kernels:

- geometric ops (shear, translate, rotate; nearest, zero fill) move pixels the same way in
  every image: each (op, bin, sign) is a map from output pixel to source pixel, made by
  applying torchvision's affine to an image of pixel numbers, and a batch is one gather;
- pointwise ops (brightness, posterize, solarize, invert) are 256-entry lookup tables, made by
  torchvision's kernels on the 256 grey levels, and a batch is one gather;
- the blends (color, contrast, sharpness) run on the batch with a factor per image, as
  torchvision's uint8 kernels compute them (float32, clamped, truncated to uint8); autocontrast
  and equalize are torchvision's kernels, which take batches.

Why not kornia.augmentation.auto: its AutoAugment and TrivialAugment draw one sub-policy for
the whole batch (`rand_selector.sample((1,))`) and its RandAugment one set of ops for the
batch (`randperm(...)[:n]`), with op sets and magnitude ranges of its own (no identity, a
solarize-add, translations as a fraction of the side, magnitudes m/30 of its ranges), and it
would add kornia and kornia-rs (a compiled Rust extension) to the dependencies.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from resnet_lightning.errors import InvalidArgument

POLICIES = ("none", "autoaugment", "randaugment", "trivialaugment")
MAGNITUDE_BINS = 31  # RandAugment's and TrivialAugmentWide's num_magnitude_bins (torchvision)
AUTOAUGMENT_BINS = 10  # AutoAugment's sub-policies index 10 magnitude bins
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
POINTWISE = ("Identity", "Brightness", "Posterize", "Solarize", "Invert")
# torchvision's RandomErasing defaults.
ERASING_SCALE, ERASING_RATIO = (0.02, 0.33), (0.3, 3.3)


def check_augmentation(policy: str, randaugment_n: int, randaugment_m: int, random_erasing: float):
    """The data modules' policy and erasing arguments, each refused in one line when wrong."""
    if policy not in POLICIES:
        raise InvalidArgument("policy", policy, f"is unknown; use one of {', '.join(POLICIES)}")
    if randaugment_n < 0:
        raise InvalidArgument("randaugment_n", randaugment_n, "must be >= 0, e.g. 2")
    if not 0 <= randaugment_m < MAGNITUDE_BINS:
        raise InvalidArgument(
            "randaugment_m", randaugment_m, f"must be a bin in 0..{MAGNITUDE_BINS - 1}, e.g. 9"
        )
    if not 0 <= random_erasing <= 1:
        raise InvalidArgument(
            "random_erasing", random_erasing, "must be a probability in [0, 1], e.g. 0.25"
        )


def torchvision_policy(
    name: str,
    num_ops: int = 2,
    magnitude: int = 9,
    autoaugment: v2.AutoAugmentPolicy = v2.AutoAugmentPolicy.CIFAR10,
) -> v2.Transform | None:
    """The torchvision transform of policy `name` (None for "none"); AutoAugment with the
    learned policy of `autoaugment` (CIFAR-10's, or ImageNet's for photos)."""
    if name == "autoaugment":
        return v2.AutoAugment(autoaugment)
    if name == "randaugment":
        return v2.RandAugment(num_ops, magnitude, MAGNITUDE_BINS)
    if name == "trivialaugment":
        return v2.TrivialAugmentWide(MAGNITUDE_BINS)
    return None


class BatchPolicy:
    """A torchvision augmentation policy applied to uint8 (B, C, H, W) batches on their device,
    each image with its own draws.

    An image's draw for one slot (AutoAugment: the two ops of its sub-policy; RandAugment:
    `num_ops` ops; TrivialAugmentWide: one) is a code, (op * bins + bin) * 2 + negated: the
    op's position in `ops`, its magnitude bin, and whether a signed magnitude was negated.

    Args:
        name: "autoaugment", "randaugment" or "trivialaugment".
        num_ops, magnitude: RandAugment's ops per image and magnitude bin (of 31).
        height, width: the images' size (translations scale with it).
        device: where the tables live (the images' device).
    """

    def __init__(
        self,
        name: str,
        num_ops: int = 2,
        magnitude: int = 9,
        height: int = 32,
        width: int = 32,
        device: torch.device | str = "cpu",
    ) -> None:
        reference = torchvision_policy(name, num_ops, magnitude)
        if reference is None:
            raise ValueError(f"policy {name!r} is not one of {', '.join(POLICIES[1:])}")
        self.name, self.reference, self.num_ops = name, reference, num_ops
        space = reference._AUGMENTATION_SPACE  # op -> (magnitudes(bins, h, w), signed)
        # AutoAugment's space has no Identity: an op its sub-policy skips leaves the image.
        self.ops = ["Identity", *(op for op in space if op != "Identity")]
        self.bins = AUTOAUGMENT_BINS if name == "autoaugment" else MAGNITUDE_BINS
        self.magnitude_bin = magnitude
        magnitudes = torch.zeros(len(self.ops), self.bins, 2, dtype=torch.float64)
        self.signed = torch.zeros(len(self.ops), dtype=torch.bool)
        for k, op in enumerate(self.ops[1:], 1):
            values, signed = space[op][0](self.bins, height, width), space[op][1]
            if values is not None:
                # float(): torchvision reads each magnitude as a Python float, as here.
                values = torch.tensor([float(v) for v in values], dtype=torch.float64)
                magnitudes[k, :, 0], magnitudes[k, :, 1] = values, -values if signed else values
            self.signed[k] = signed
        self.magnitudes = magnitudes.flatten()  # by code
        if name == "autoaugment":
            # 25 sub-policies of two (op, probability, bin) each; a missing bin is 0.
            table = [
                [(self.ops.index(op), p, b or 0) for op, p, b in s] for s in reference._policies
            ]
            self.sub_ops = torch.tensor([[t[0] for t in s] for s in table], device=device)
            self.sub_p = torch.tensor([[t[1] for t in s] for s in table], device=device)
            self.sub_bins = torch.tensor([[t[2] for t in s] for s in table], device=device)
        self._tabulate(height, width, device)
        self.signed = self.signed.to(device)
        self.op_of_code = (torch.arange(len(self.magnitudes)) // (2 * self.bins)).to(device)
        self.magnitudes = self.magnitudes.to(device)

    def apply_one(self, image: Tensor, op: str, magnitude: float) -> Tensor:
        """One op on one uint8 (C, H, W) image, exactly as torchvision's policy applies it."""
        return self.reference._apply_image_or_video_transform(
            image,
            op,
            magnitude,
            interpolation=self.reference.interpolation,
            fill=self.reference._fill,
        )

    def _tabulate(self, height: int, width: int, device: torch.device | str) -> None:
        """Source-pixel maps of the geometric ops and lookup tables of the pointwise ones, by
        code, made by torchvision's kernels."""
        codes = len(self.magnitudes)
        pixels = height * width
        # Pixel numbers 1..H*W as float32 (exact), so nearest sampling reads them back; 0 is
        # the zero fill, which the gather takes from a zero put in front of each image.
        numbers = torch.arange(1, pixels + 1, dtype=torch.float32).view(1, height, width)
        grey_levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256)
        self.source = torch.arange(1, pixels + 1).repeat(codes, 1)  # identity maps
        self.lut = torch.arange(256, dtype=torch.uint8).repeat(codes, 1)
        for code in range(codes):
            op = self.ops[code // (2 * self.bins)]
            magnitude = float(self.magnitudes[code])
            if op in GEOMETRIC:
                moved = self.apply_one(numbers.expand(3, height, width), op, magnitude)
                self.source[code] = moved[0].flatten().long()
            elif op in POINTWISE:
                self.lut[code] = self.apply_one(grey_levels, op, magnitude)[0, 0]
        self.source, self.lut = self.source.to(device), self.lut.to(device)

    def sample(self, batch: int, generator: torch.Generator) -> Tensor:
        """Codes (B, slots): each image's draw for each slot, as torchvision draws them."""
        device = self.magnitudes.device

        def uniform(*shape: int) -> Tensor:
            return torch.rand(*shape, device=device, generator=generator)

        if self.name == "autoaugment":
            sub = torch.randint(len(self.sub_ops), (batch,), device=device, generator=generator)
            ops, bins = self.sub_ops[sub], self.sub_bins[sub]
            # torchvision applies an op when rand <= its probability.
            ops = torch.where(uniform(batch, 2) <= self.sub_p[sub], ops, 0)
        else:
            slots = self.num_ops if self.name == "randaugment" else 1
            # The ops' order in torchvision's space, Identity first in both spaces.
            ops = torch.randint(len(self.ops), (batch, slots), device=device, generator=generator)
            if self.name == "randaugment":
                bins = torch.full_like(ops, self.magnitude_bin)
            else:
                bins = torch.randint(self.bins, ops.shape, device=device, generator=generator)
        negated = self.signed[ops] & (uniform(*ops.shape) <= 0.5)
        return (ops * self.bins + bins) * 2 + negated

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """uint8 (B, C, H, W) -> the same, each image through its own draws."""
        codes = self.sample(len(images), generator)
        for slot in range(codes.shape[1]):
            images = self.apply(images, codes[:, slot])
        return images

    def apply(self, images: Tensor, codes: Tensor) -> Tensor:
        """Each image through the op of its code (one slot)."""
        batch, channels, height, width = images.shape
        flat = images.reshape(batch, channels, height * width)
        # Geometric ops: one gather from each image with a zero (the fill) in front.
        padded = torch.cat([flat.new_zeros(batch, channels, 1), flat], dim=2)
        source = self.source[codes][:, None].expand(batch, channels, -1)
        flat = padded.gather(2, source)
        # Pointwise ops: one gather from each image's lookup table.
        flat = self.lut[codes][:, None].expand(batch, channels, -1).gather(2, flat.long())
        images = flat.view(batch, channels, height, width)
        op = self.op_of_code[codes]
        factor = 1.0 + self.magnitudes[codes]  # torchvision's 1.0 + magnitude, in double
        # Blends with factor 1 leave an image as it is: every image goes through them.
        for name, blend in (
            ("Color", saturation),
            ("Contrast", contrast),
            ("Sharpness", sharpness),
        ):
            if name in self.ops:
                images = blend(images, torch.where(op == self.ops.index(name), factor, 1.0))
        for name, kernel in (("AutoContrast", F.autocontrast), ("Equalize", F.equalize)):
            chosen = (op == self.ops.index(name)).view(-1, 1, 1, 1)
            images = torch.where(chosen, kernel(images), images)
        return images


def _blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """torchvision's uint8 blend, images * factor + other * (1 - factor), clamped and truncated,
    with a factor per image."""
    ratio = factor.float().view(-1, 1, 1, 1)
    # torchvision's `add_(other, alpha=1 - ratio)` multiplies and adds in one rounding (a fused
    # multiply-add); in double, rounded once to float32, the sum rounds the same.
    rest = other.double() * (1.0 - factor).float().double().view(-1, 1, 1, 1)
    blended = (images.float() * ratio).double().add_(rest).float()
    return blended.clamp_(0, 255).to(torch.uint8)


def saturation(images: Tensor, factor: Tensor) -> Tensor:
    """F.adjust_saturation of uint8 images, a factor per image."""
    grey = F.rgb_to_grayscale(images).float()  # uint8 first: floored, as torchvision does
    return _blend(images, grey, factor)


def contrast(images: Tensor, factor: Tensor) -> Tensor:
    """F.adjust_contrast of uint8 images, a factor per image."""
    grey = F.rgb_to_grayscale(images).float()
    return _blend(images, grey.mean(dim=(-3, -2, -1), keepdim=True), factor)


def sharpness(images: Tensor, factor: Tensor) -> Tensor:
    """F.adjust_sharpness of uint8 images, a factor per image: the interior blended with its
    3x3 smoothing (13ths: 1 around, 5 in the middle), the border kept."""
    channels = images.shape[1]
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=images.device)
    kernel = (kernel / 13).expand(channels, 1, 3, 3)
    output = images.float()
    blurred = torch.nn.functional.conv2d(output, kernel, groups=channels).round_()
    interior = output[..., 1:-1, 1:-1]
    alpha = (1.0 - factor).float().double().view(-1, 1, 1, 1)
    # torchvision: interior.add_(blurred - interior, alpha=1 - factor), one rounding.
    interior.copy_((interior.double() + (blurred - interior).double() * alpha).float())
    return output.clamp_(0, 255).to(torch.uint8)


def erase(images: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor) -> Tensor:
    """Zero a box per image (rows top..top+height, columns left..left+width; in place).
    After normalisation zero is the mean colour, as torchvision's RandomErasing(value=0)."""
    _, _, h, w = images.shape
    rows = torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    in_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])  # (B, W)
    return images.masked_fill_((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0)


def erasing_boxes(
    batch: int, height: int, width: int, p: float, generator: torch.Generator, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RandomErasing(p)'s boxes (top, left, height, width) for a batch, drawn per image as
    torchvision draws them: with probability p, the first of 10 tries (area a uniform share of
    the image in ERASING_SCALE, log aspect ratio uniform in log ERASING_RATIO) that fits; none
    (height 0) if no try fits."""
    tries = 10

    def uniform(low: float, high: float) -> Tensor:
        u = torch.rand(batch, tries, device=device, generator=generator, dtype=torch.float64)
        return low + (high - low) * u

    erased = torch.rand(batch, device=device, generator=generator) < p
    area = height * width * uniform(*ERASING_SCALE)
    aspect = torch.exp(uniform(math.log(ERASING_RATIO[0]), math.log(ERASING_RATIO[1])))
    # int(round(x)): Python rounds halves to even, as torch.round does.
    box_h = torch.sqrt(area * aspect).round().long()
    box_w = torch.sqrt(area / aspect).round().long()
    fits = (box_h < height) & (box_w < width)
    first = fits.long().argmax(dim=1, keepdim=True)  # the first try that fits
    box_h = box_h.gather(1, first).squeeze(1) * (erased & fits.any(dim=1))
    box_w = box_w.gather(1, first).squeeze(1)
    top = (torch.rand(batch, device=device, generator=generator) * (height - box_h + 1)).long()
    left = (torch.rand(batch, device=device, generator=generator) * (width - box_w + 1)).long()
    return top, left, box_h, box_w


def random_erasing(images: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """torchvision's RandomErasing(p, value=0) on a float batch, a box per image (in place)."""
    batch, _, height, width = images.shape
    boxes = erasing_boxes(batch, height, width, p, generator, images.device)
    return erase(images, *boxes)
