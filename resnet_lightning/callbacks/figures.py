"""TensorBoard figures that the scalars cannot show, as Lightning callbacks.

Each writes to the run's TensorBoardLogger and does nothing without one (`logger=csv`,
`debug=fast_dev_run`). Each is an entry of conf/callbacks/default.yaml; set it to null to skip it.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torchmetrics.classification import MulticlassConfusionMatrix
from torchvision.utils import make_grid

from resnet_lightning.data import NORMALIZATION, CifarDataModule
from resnet_lightning.models.complexity import parameter_counts, stages


def tensorboard_writer(trainer: L.Trainer) -> SummaryWriter | None:
    """The run's TensorBoard SummaryWriter on the main process, else None."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def network(pl_module: L.LightningModule) -> nn.Module:
    """The network inside the LightningModule (ImageClassifier keeps it as `net`)."""
    return getattr(pl_module, "net", pl_module)


def network_name(net: nn.Module) -> str:
    """The model zoo's name (resnet56) when the network has one, else its class name."""
    info = getattr(net, "model_info", None)
    return getattr(info, "name", type(net).__name__)


class ConfusionMatrixFigure(L.Callback):
    """The test set's confusion matrix (rows: true class, columns: prediction) as the image
    `test/confusion_matrix`, drawn by torchmetrics with the data set's class names."""

    def __init__(self, normalize: str | None = None) -> None:
        self.normalize = normalize  # None: counts; "true": each row sums to 1 (recall)
        self.matrix: MulticlassConfusionMatrix | None = None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.matrix = None

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        # The logits the test metrics scored (test-time flips included), from the test step.
        logits = outputs["logits"]
        if self.matrix is None:
            self.matrix = MulticlassConfusionMatrix(logits.shape[1], normalize=self.normalize)
            self.matrix = self.matrix.to(logits.device)
        self.matrix.update(logits, batch[1])

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.matrix is None:
            return
        matrix = self.matrix.compute()  # on every process: it gathers across DDP ranks
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        classes = getattr(trainer.datamodule, "classes", None)
        figure, ax = self.matrix.plot(matrix.cpu(), labels=classes)
        figure.set_size_inches(8, 7)
        ax.set_title(f"test confusion matrix, step {trainer.global_step}")
        writer.add_figure("test/confusion_matrix", figure, trainer.global_step)


class AugmentedImageGrid(L.Callback):
    """The first training batch as the network receives it (crops, flips, resizing) as the
    image `train/augmented_images`, with the normalisation undone so colours read."""

    def __init__(self, num_images: int = 64, nrow: int = 8) -> None:
        self.num_images = num_images
        self.nrow = nrow
        self.logged = False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        if self.logged:
            return
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        images = batch[0][: self.num_images].detach().float().cpu()
        datamodule = trainer.datamodule
        if isinstance(datamodule, CifarDataModule):
            mean, std = (
                torch.tensor(s).view(1, 3, 1, 1)
                for s in NORMALIZATION[datamodule.hparams.normalization]
            )
            grid = make_grid((images * std + mean).clamp(0, 1), nrow=self.nrow)
        else:  # unknown statistics: stretch each image to the full range instead
            grid = make_grid(images, nrow=self.nrow, normalize=True, scale_each=True)
        writer.add_image("train/augmented_images", grid, trainer.global_step)
        self.logged = True


class StageGradientNorms(L.Callback):
    """The L2 norm of each stage's gradient every `every_n_steps` optimizer steps, as scalars
    `grad_norm/<stage>`, and at the end of training all of them in one log-scale figure
    `grad_norm/stages`. Stages are the network's top-level modules (conv1, layer1..N, fc).

    Plain-56 against ResNet-56 shows why shortcuts matter: without them the early stages'
    gradients are the ones that shrink.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.history.clear()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Called after any AMP unscaling, so the norms are of the true gradients.
        # On Lightning's logging steps (every_n_steps = log_every_n_steps), which read values
        # back anyway, so this adds no host sync of its own; 0 turns it off, as it does logging.
        step = trainer.global_step
        if self.every_n_steps <= 0 or (step + 1) % self.every_n_steps:
            return
        norms = {}
        for name, stage in stages(network(pl_module)):
            grads = [p.grad for p in stage.parameters() if p.grad is not None]
            if grads:
                norms[name] = torch.nn.utils.get_total_norm(grads)
        if not norms:
            return
        values = torch.stack(list(norms.values())).tolist()  # one device sync for all
        metrics = {}
        for name, value in zip(norms, values, strict=True):
            self.history[name].append((step, value))
            metrics[f"grad_norm/{name}"] = value
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None or not self.history:
            return
        figure = Figure(figsize=(7, 4.5), layout="constrained")
        ax = figure.subplots()
        for name, points in self.history.items():
            ax.plot([s for s, _ in points], [v for _, v in points], label=name)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel("gradient L2 norm")
        ax.set_title(f"{network_name(network(pl_module))}: gradient norm per stage")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        writer.add_figure("grad_norm/stages", figure, trainer.global_step)


class ParameterDistribution(L.Callback):
    """Where the parameters are and what values they take: parameters per stage and layer type
    as the image `model/parameters` at the start, and a histogram of each stage's weights
    (conv kernels and linear matrices, not biases or BN scales) `weights/<stage>` at the start
    and after every epoch."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        net = network(pl_module)
        counts = parameter_counts(net)
        total = sum(sum(c.values()) for c in counts.values())
        title = f"{network_name(net)}: {total / 1e6:.2f}M parameters"
        writer.add_figure("model/parameters", plot_parameter_counts(counts, title), 0)
        self._log_histograms(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_histograms(trainer, pl_module)

    def _log_histograms(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        for name, stage in stages(network(pl_module)):
            weights = [p.detach().flatten() for p in stage.parameters() if p.ndim > 1]
            if weights:
                values = torch.cat(weights).float().cpu()
                writer.add_histogram(f"weights/{name}", values, trainer.global_step)


def layer_types_by_size(counts: dict[str, Counter[str]]) -> list[str]:
    """The layer types of `parameter_counts`, the one holding most parameters first."""
    totals = sum(counts.values(), Counter())
    return sorted(totals, key=lambda layer_type: -totals[layer_type])


def plot_parameter_counts(counts: dict[str, Counter[str]], title: str) -> Figure:
    """Bars per stage, stacked by layer type, labelled with each stage's total."""
    layer_types = layer_types_by_size(counts)
    names = list(counts)
    figure = Figure(figsize=(max(6.0, 0.8 * len(names) + 2), 4.5), layout="constrained")
    ax = figure.subplots()
    bottom = np.zeros(len(names))
    for layer_type in layer_types:
        values = np.array([counts[n].get(layer_type, 0) for n in names]) / 1e6
        ax.bar(names, values, bottom=bottom, label=layer_type)
        bottom += values
    for x, height in enumerate(bottom):
        ax.annotate(
            f"{height:.2f}M" if height >= 0.01 else f"{height * 1e6:,.0f}",
            (x, height),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    # Room for the label above the tallest bar (margins() leaves none: annotations do not
    # take part in autoscaling).
    ax.set_ylim(0, max(bottom.max(), 1e-6) * 1.12)
    ax.set_ylabel("parameters (millions)")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=30)
    ax.legend(title="layer type", fontsize=8, loc="upper left")
    return figure
