"""Data-dependent initialisation before a fit: airbench's patch-whitening first layer."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from resnet_lightning.errors import InvalidArgument, UsageError


class WhiteningInit(L.Callback):
    """Before a fit, hands the first `images` training images (normalised, un-augmented) to
    the network's `init_whitening(images)`, when it has one (models.airbench); other
    networks are left alone.

    It runs in `setup`, which Lightning calls after the data module's setup and before it
    restores a checkpoint: a resumed run keeps the checkpoint's weights. Every DDP rank
    computes the same filters from the same images.

    Args:
        images: how many training images the patch statistics are taken from (airbench: 5,000).
    """

    def __init__(self, images: int = 5000) -> None:
        if images < 1:
            raise InvalidArgument("images", images, "must be positive, e.g. 5000")
        self.images = images

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        net = getattr(pl_module, "net", pl_module)
        init = getattr(net, "init_whitening", None)
        if init is None:
            return
        train_images = getattr(trainer.datamodule, "train_images", None)
        if train_images is None:
            raise UsageError(
                f"{type(net).__name__}'s whitening layer is set from the training images, which "
                "only a data module with train_images(count) hands over; use data=cifar10 or "
                "data=imagefolder, or callbacks.whitening=null"
            )
        images = train_images(self.images)
        init(images)
        rank_zero_info(f"Whitening layer set from {len(images)} training images")
