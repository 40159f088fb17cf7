"""A short run on real CIFAR-10 learns, on both data pipelines: the training loss falls and the
validation accuracy ends far above chance. The other tests check plumbing; these fail when
the gradients, the labels, the augmentation or the optimizer wiring stop a model learning."""

from __future__ import annotations

import math

import lightning as L
import pytest

from resnet_lightning.training.config import build_module, instantiate_group
from tests.cli_harness import compose_config

STEPS = 150
# A small airbench net (about 6M multiply-accumulates an image, a twentieth of airbench94's),
# trained by the default config's SGD under a one-cycle schedule for 150 steps of 64 images: a
# fifth of an epoch.
LEARNING_RUN = [
    "trainer=cpu",
    "trainer.precision=32-true",
    "trainer.max_epochs=1",
    f"trainer.limit_train_batches={STEPS}",
    "trainer.limit_val_batches=16",  # 1,024 validation images
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "model=airbench94_res",
    "model.widths=[16,32,32]",
    "model.whiten=false",
    "scheduler=onecycle",
    "optimizer.lr=0.4",  # the net's logits are scaled by 1/9: a higher rate than the default
    "data.batch_size=64",
    "data.num_workers=0",
]


class StepLosses(L.Callback):
    """The training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def learning_run(overrides: list[str]) -> tuple[list[float], float]:
    """A fit of the composed config as train() builds it, on the CPU, without loggers or
    checkpoints: each step's training loss, and the validation accuracy after it."""
    cfg = compose_config([*LEARNING_RUN, *overrides])
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate_group(cfg, "data")
    module = build_module(cfg, instantiate_group(cfg, "model"))
    record = StepLosses()
    trainer = instantiate_group(
        cfg, "trainer", callbacks=[record], logger=False, enable_checkpointing=False
    )
    trainer.fit(module, datamodule=datamodule)
    return record.losses, float(trainer.callback_metrics["val/acc"])


@pytest.mark.parametrize("pipeline", ["torchvision", "tensor"])
def test_a_short_run_learns(pipeline, data_overrides, tmp_path):
    overrides = [*data_overrides, f"paths.output_dir={tmp_path}", f"data.pipeline={pipeline}"]
    losses, accuracy = learning_run(overrides)
    assert len(losses) == STEPS
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first == pytest.approx(math.log(10), abs=0.25)  # an untrained net guesses
    # Measured: 2.30 -> 1.62 and 38.5% (torchvision), 2.31 -> 1.68 and 37.7% (tensor).
    assert last < first - 0.4, (first, last)
    assert accuracy > 0.3, accuracy  # chance is 0.1
