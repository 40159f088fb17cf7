"""The LightningModule: loss, metrics and optimizer wiring around any image classifier."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from resnet_lightning.callbacks.time_budget import find_time_budget, training_position
from resnet_lightning.errors import InvalidArgument, UsageError
from resnet_lightning.models import get_classifier
from resnet_lightning.training.position_schedule import PositionSchedule, tabulate_schedule

# The stages metrics are kept for, each under its own prefix (train/acc, val/acc, test/acc).
SPLITS = ("train", "val", "test")
OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class ImageClassifier(L.LightningModule):
    """Trains `net` with cross-entropy; logs loss, top-1 and top-5 accuracy per split.

    Labels are class indices or, from batches mixed by the data (Mixup, CutMix), (B, C)
    probabilities; the loss takes either, and `train/acc` of a mixed batch counts a
    prediction right when it is the target's dominant (argmax) class.

    Args:
        net: any module mapping images to class logits.
        optimizer: builds the optimizer from parameters (a Hydra `_partial_`).
        scheduler: builds the LR scheduler from the optimizer, or None. A scheduler with a
            `total_steps` argument left unset (OneCycleLR) is sized from the Trainer's real
            number of optimizer steps.
        scheduler_interval: "epoch" or "step": how often the scheduler steps.
        num_classes: size of the classifier output, for the metrics.
        label_smoothing: cross-entropy label smoothing, of index and probability targets alike.
        test_time_flip: validate and test on the mean logits of each image and its mirror.
        test_time_translate: also score each image translated by this many pixels down-right
            and up-left (reflect-padded): half the logits are the untranslated image's, a
            quarter each translation's, each view with its mirror under `test_time_flip`
            (with 1 and flips: airbench's six views). 0: off.
        backbone_lr_scale: the learning rate of everything but the classifier, as a fraction
            of the optimizer's (fine-tuning pretrained weights gently while the new head
            learns fast). A network built with `freeze_backbone` trains its head alone, and
            its frozen BatchNorm layers keep their pretrained running statistics.
        warmup_epochs: raise the learning rate linearly from `warmup_start_factor` times its
            value to the full value over this many epochs (fractions allowed), stepped per
            batch, under whatever schedule follows (multistep, cosine: torch's LinearLR,
            chained with it). 0: no warm-up.
        warmup_start_factor: the fraction of the learning rate the warm-up starts from.
        lr_reference_batch: the global batch the optimizer's learning rate is given for; the
            run scales it linearly to its own global batch (per-device batch x devices x
            nodes x gradient accumulation: Goyal et al. 2017), so one recipe fits any number
            of GPUs and machines. None: the learning rate as given.
        no_decay_bn_bias: no weight decay on normalisation layers' weights and biases nor on
            any bias (torchvision reference's `--norm-weight-decay 0 --bias-weight-decay 0`,
            timm's filter_bias_and_bn): they get their own parameter groups with
            weight_decay=0, beside each learning-rate group.
        norm_bias_lr_scale: the learning rate of normalisation layers' biases (BatchNorm's
            shifts) as a multiple of their group's, and their weight decay divided by it, so
            that their decay per step (lr x weight decay) is unchanged: airbench trains them
            64x faster. 1: as every other parameter.
        progressive_min_size: progressive resizing: train on images scaled down (bilinear,
            antialiased) to this height in pixels, the width in proportion, until the first
            position of `progressive_ramp`, growing linearly to the full size at the second;
            validation and test at full size. 0: off.
        progressive_ramp: the two positions in [0, 1] of training (the time budget's, or the
            steps done of those planned) between which the images grow.
        progressive_size_step: the sizes in between are multiples of this many pixels (fewer
            shapes: each new one costs oneDNN or cuDNN a first slow step).
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        num_classes: int = 10,
        label_smoothing: float = 0.0,
        test_time_flip: bool = False,
        backbone_lr_scale: float = 1.0,
        warmup_epochs: float = 0.0,
        warmup_start_factor: float = 0.01,
        lr_reference_batch: int | None = None,
        no_decay_bn_bias: bool = False,
        test_time_translate: int = 0,
        norm_bias_lr_scale: float = 1.0,
        progressive_min_size: int = 0,
        progressive_ramp: tuple[float, float] = (0.4, 0.8),
        progressive_size_step: int = 4,
    ):
        super().__init__()
        if scheduler_interval not in ("epoch", "step"):
            raise InvalidArgument(
                "scheduler_interval", scheduler_interval, "is not 'epoch' or 'step'"
            )
        if warmup_epochs < 0:
            raise InvalidArgument("warmup_epochs", warmup_epochs, "is negative; 0 turns it off")
        if not 0 < warmup_start_factor <= 1:
            raise InvalidArgument("warmup_start_factor", warmup_start_factor, "is not in (0, 1]")
        if lr_reference_batch is not None and lr_reference_batch <= 0:
            raise InvalidArgument(
                "lr_reference_batch", lr_reference_batch, "must be positive, e.g. 256, or null"
            )
        if test_time_translate < 0:
            raise InvalidArgument(
                "test_time_translate", test_time_translate, "must be >= 0 pixels (0: off), e.g. 1"
            )
        if not norm_bias_lr_scale > 0:
            raise InvalidArgument(
                "norm_bias_lr_scale", norm_bias_lr_scale, "must be positive (1: off), e.g. 64"
            )
        if warmup_epochs and scheduler is not None and _needs_total_steps(scheduler):
            # OneCycleLR sets the learning rate outright each step: the warm-up would be lost.
            raise InvalidArgument(
                "warmup_epochs",
                warmup_epochs,
                "cannot precede a one-cycle schedule, which warms up by itself "
                "(scheduler.pct_start); set module.warmup_epochs=0",
            )
        if progressive_min_size < 0:
            raise InvalidArgument(
                "progressive_min_size",
                progressive_min_size,
                "must be >= 0 pixels (0: off), e.g. 24",
            )
        # A plain tuple: a checkpoint holds no omegaconf objects (its loader refuses them).
        progressive_ramp = tuple(float(p) for p in progressive_ramp)
        if len(progressive_ramp) != 2 or not 0 <= progressive_ramp[0] <= progressive_ramp[1] <= 1:
            raise InvalidArgument(
                "progressive_ramp",
                list(progressive_ramp),
                "must be two positions 0 <= start <= end <= 1, e.g. [0.4, 0.8]",
            )
        if progressive_size_step < 1:
            raise InvalidArgument(
                "progressive_size_step", progressive_size_step, "must be >= 1 pixel, e.g. 4"
            )
        # The network and factories are rebuilt from the run's Hydra config, not pickled here.
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.train_image_size: int | None = None  # the height of the last training batch
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        # With probability targets p, CrossEntropyLoss smooths them to (1 - e) p + e / C. For
        # mixed targets p = lam a + (1 - lam) b that is lam ((1 - e) a + e / C) +
        # (1 - lam) ((1 - e) b + e / C): timm's mixup_target, which mixes smoothed one-hots.
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        accuracy = {"acc": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
        if num_classes >= 5:
            accuracy["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        accuracy = MetricCollection(accuracy)
        # Keyed "<split>_" because ModuleDict keys may not shadow Module methods like train().
        self.metrics = nn.ModuleDict({f"{s}_": accuracy.clone(prefix=f"{s}/") for s in SPLITS})
        # No NaN check: it reads the loss back every step, a host sync that stalls a GPU until
        # it has caught up (callbacks.divergence.DivergenceGuard checks at logging steps).
        self.mean_loss = nn.ModuleDict(
            {f"{s}_": MeanMetric(nan_strategy="disable") for s in SPLITS}
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The logits validation, test and predict score: with `test_time_flip`, the mean of
        each image's and its mirror's; with `test_time_translate` t, half that and a quarter
        each of the same for the image translated by t pixels down-right and up-left."""
        logits = self._flip_mean(images)
        shift = self.hparams.test_time_translate
        if shift:
            height, width = images.shape[-2:]
            padded = F.pad(images, (shift,) * 4, mode="reflect")
            down_right = padded[..., :height, :width]
            up_left = padded[..., 2 * shift :, 2 * shift :]
            translated = (self._flip_mean(down_right) + self._flip_mean(up_left)) / 2
            logits = (logits + translated) / 2
        return logits

    def _flip_mean(self, images: torch.Tensor) -> torch.Tensor:
        logits = self(images)
        if self.hparams.test_time_flip:
            logits = (logits + self(images.flip(-1))) / 2
        return logits

    def _step(
        self, batch: tuple[torch.Tensor, torch.Tensor], split: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        logits = self(images) if split == "train" else self.predict_logits(images)
        loss = self.criterion(logits, labels)
        metrics, mean_loss = self.metrics[f"{split}_"], self.mean_loss[f"{split}_"]
        # Mixed targets: accuracy against each image's dominant label.
        metrics.update(logits, labels.argmax(1) if labels.ndim == 2 else labels)
        # One value per image: MeanMetric(nan_strategy="disable") drops `weight`
        # (torchmetrics#3434), and a short last batch must count for its images only.
        mean_loss.update(loss.detach().expand(len(labels)))
        if split == "train":
            self.log("train/loss", loss, prog_bar=True)  # every step
            self.log("train/loss_epoch", mean_loss, on_step=False, on_epoch=True)
        else:
            self.log(f"{split}/loss", mean_loss, on_epoch=True, prog_bar=True)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=split != "train")
        return loss, logits

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        height = images.shape[-2]
        size = self._train_size(height)
        if size != height:
            width = round(images.shape[-1] * size / height)
            images = F.interpolate(
                images, size=(size, width), mode="bilinear", antialias=True, align_corners=False
            )
        self.train_image_size = size  # the time budget times steps of each size apart
        if self.hparams.progressive_min_size:
            self.log("train/image_size", float(size))
        loss, _ = self._step((images, labels), "train")
        return loss

    def on_train_start(self) -> None:
        if self.hparams.progressive_min_size:
            start, end = self.hparams.progressive_ramp
            rank_zero_info(
                f"Progressive resizing: training images scaled to "
                f"{self.hparams.progressive_min_size} px until {start:.0%} of training, growing "
                f"in {self.hparams.progressive_size_step} px steps to their full size at {end:.0%}"
            )

    def _train_size(self, full: int) -> int:
        """The size (height) to train at now: `progressive_min_size` until the first position
        of `progressive_ramp`, growing linearly to `full` at the second, rounded to
        `progressive_size_step`; `full` when progressive resizing is off."""
        low = self.hparams.progressive_min_size
        if not low or low >= full:
            return full
        start, end = self.hparams.progressive_ramp
        position = training_position(self.trainer)
        if end > start:
            ramp = min(max((position - start) / (end - start), 0.0), 1.0)
        else:
            ramp = float(position >= end)
        step = self.hparams.progressive_size_step
        return min(max(round((low + ramp * (full - low)) / step) * step, low), full)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        _, logits = self._step(batch, "test")
        return {"logits": logits.detach()}  # for callbacks such as the confusion matrix

    def on_train_epoch_start(self) -> None:
        # Frozen BatchNorm layers keep their loaded running statistics (Lightning leaves the
        # modules' train/eval modes to us, and restores them after each validation).
        for layer in self.net.modules():
            params = list(layer.parameters())
            is_norm = isinstance(layer, nn.modules.batchnorm._BatchNorm)
            if is_norm and params and not any(p.requires_grad for p in params):
                layer.eval()

    def _parameter_groups(self) -> list[tuple[list[nn.Parameter], float, float]]:
        """(parameters, lr scale, weight-decay scale) triples: the head and the backbone apart
        when scaled; with `no_decay_bn_bias`, each split again into decayed (1) and not (0);
        with `norm_bias_lr_scale` f, the norm layers' biases apart again (lr x f, decay / f)."""
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        scale = self.hparams.backbone_lr_scale
        groups = [(trainable, 1.0)]
        if scale != 1.0:
            head = {id(p) for p in get_classifier(self.net).parameters()}
            groups = [
                ([p for p in trainable if id(p) in head], 1.0),
                ([p for p in trainable if id(p) not in head], scale),
            ]
        if self.hparams.no_decay_bn_bias:
            exempt = {id(p) for p in no_decay_parameters(self.net)}
            groups = [
                ([p for p in params if (id(p) not in exempt) == bool(decay)], scale, decay)
                for params, scale in groups
                for decay in (1.0, 0.0)
            ]
        else:
            groups = [(params, scale, 1.0) for params, scale in groups]
        factor = self.hparams.norm_bias_lr_scale
        if factor == 1.0:
            return groups
        shifts = {id(p) for p in norm_biases(self.net)}
        split = []
        for params, scale, decay in groups:
            rest = [p for p in params if id(p) not in shifts]
            biases = [p for p in params if id(p) in shifts]
            split += [(rest, scale, decay)] if rest else []
            split += [(biases, scale * factor, decay / factor)] if biases else []
        return split

    def configure_optimizers(self):
        groups = self._parameter_groups()
        optimizer = self.optimizer_factory(
            [
                {"params": params} if decayed else {"params": params, "weight_decay": 0.0}
                for params, _, decayed in groups
            ]
        )
        batch_scale = self._batch_lr_scale()
        groups = [(params, scale * batch_scale, decayed) for params, scale, decayed in groups]
        for group, (_, scale, decay) in zip(optimizer.param_groups, groups, strict=True):
            group["lr"] *= scale
            if decay not in (0.0, 1.0):  # 0 is set above, 1 is the optimizer's own
                group["weight_decay"] *= decay
        budget = find_time_budget(self._trainer)  # None too when no Trainer is attached
        if budget is not None:  # the schedule runs on the budget's position instead of steps
            budget.schedule = self._position_schedule(optimizer)
            return optimizer
        schedulers = [self._warmup(optimizer)] if self.hparams.warmup_epochs else []
        if self.scheduler_factory is not None:
            kwargs = {}
            if sized := _sized_argument(self.scheduler_factory):
                kwargs[sized] = int(self.trainer.estimated_stepping_batches)
            max_lr = getattr(self.scheduler_factory, "keywords", {}).get("max_lr")
            if max_lr is not None:  # OneCycleLR sets every group's lr from max_lr: scale it
                kwargs["max_lr"] = [max_lr * scale for _, scale, _ in groups]
            scheduler = self.scheduler_factory(optimizer, **kwargs)
            schedulers.append({"scheduler": scheduler, "interval": self.hparams.scheduler_interval})
        return ([optimizer], schedulers) if schedulers else optimizer

    def _position_schedule(self, optimizer: torch.optim.Optimizer) -> PositionSchedule:
        """The configured warm-up and schedule as they would run over the Trainer's planned
        steps (trainer.max_epochs or max_steps), as a function of the position in [0, 1]."""
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise UsageError(
                "a time budget stretches the schedule of trainer.max_epochs or max_steps over "
                "the time; this run has neither: set trainer.max_epochs (e.g. 100)"
            )
        steps_per_epoch = self._steps_per_epoch()
        sized = self.scheduler_factory and _sized_argument(self.scheduler_factory)
        kwargs = {sized: int(total)} if sized else {}
        lr_factors, momenta = tabulate_schedule(
            self.optimizer_factory,
            self.scheduler_factory,
            self.hparams.scheduler_interval,
            int(total),
            steps_per_epoch,
            warmup_steps=self._warmup_steps(steps_per_epoch) if self.hparams.warmup_epochs else 0,
            warmup_start_factor=self.hparams.warmup_start_factor,
            scheduler_kwargs=kwargs,
        )
        return PositionSchedule(optimizer, lr_factors, momenta)

    def _steps_per_epoch(self) -> int:
        # Reading it sets the training data up, so that its number of batches is known.
        _ = self.trainer.estimated_stepping_batches
        accumulate = self.trainer.accumulate_grad_batches
        return max(math.ceil(self.trainer.num_training_batches / accumulate), 1)

    def _warmup_steps(self, steps_per_epoch: int) -> int:
        return max(round(self.hparams.warmup_epochs * steps_per_epoch), 1)

    def _batch_lr_scale(self) -> float:
        """Global batch / lr_reference_batch (1 without a reference)."""
        reference = self.hparams.lr_reference_batch
        if reference is None:
            return 1.0
        trainer = self.trainer
        if trainer.train_dataloader is None:  # set up now, as estimated_stepping_batches does
            trainer.fit_loop.setup_data()
        per_device = trainer.train_dataloader.batch_size
        global_batch = per_device * trainer.world_size * trainer.accumulate_grad_batches
        scale = global_batch / reference
        rank_zero_info(
            f"Learning rate x{scale:g}: a global batch of {global_batch} ({per_device} x "
            f"{trainer.world_size} processes x {trainer.accumulate_grad_batches} accumulated) "
            f"against module.lr_reference_batch={reference}"
        )
        return scale

    def _warmup(self, optimizer: torch.optim.Optimizer) -> dict[str, object]:
        """LinearLR over the warm-up's steps. It multiplies the learning rate, as MultiStepLR
        and CosineAnnealingLR do, so the two compose when each steps at its own interval."""
        steps = self._warmup_steps(self._steps_per_epoch())
        start = self.hparams.warmup_start_factor
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start, 1.0, total_iters=steps)
        return {"scheduler": warmup, "interval": "step", "name": "warmup"}


# The layers whose every parameter is a scale or shift of normalised activations.
NORM_LAYERS = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def no_decay_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The weights and biases of normalisation layers and every other bias: the parameters
    weight decay should spare (torchvision reference's `set_weight_decay`)."""
    found: dict[int, nn.Parameter] = {}
    for module in net.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, NORM_LAYERS) or name == "bias":
                found[id(param)] = param
    return list(found.values())


def norm_biases(net: nn.Module) -> list[nn.Parameter]:
    """The biases (shifts) of normalisation layers."""
    return [m.bias for m in net.modules() if isinstance(m, NORM_LAYERS) and m.bias is not None]


def _needs_total_steps(factory: Callable) -> bool:
    """A one-cycle schedule whose `total_steps` the run fills in."""
    return _sized_argument(factory) == "total_steps"


def _sized_argument(factory: Callable) -> str | None:
    """The scheduler argument that the run sizes from its real number of optimizer steps:
    `total_steps` left unset (OneCycleLR), or `total_iters: null` given (LinearLR,
    PolynomialLR: e.g. linear decay to zero over the whole run)."""
    given = getattr(factory, "keywords", {})
    params = inspect.signature(factory).parameters
    if "total_steps" in params and given.get("total_steps") is None:
        return "total_steps"
    if "total_iters" in params and "total_iters" in given and given["total_iters"] is None:
        return "total_iters"
    return None
