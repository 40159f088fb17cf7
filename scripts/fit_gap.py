"""How a trained checkpoint fits its training images against the test set, and whether its
BatchNorm running statistics cost accuracy (docs/experiments.md, "Tuning at batch 256"):

    python scripts/fit_gap.py outputs/runs/<run>/checkpoints/last.ckpt [batches]

Prints the test accuracy without and with the run's test-time augmentation, the accuracy on
`batches` (default 40) un-augmented training batches, and the test accuracy again after the
BatchNorm statistics are recomputed over those training batches (a cumulative average).
"""

from __future__ import annotations

import sys
from itertools import islice

import torch
from torch.optim.swa_utils import update_bn

from resnet_lightning.tools.evaluate import load_trained_run
from resnet_lightning.training.config import instantiate_group


@torch.no_grad()
def accuracy(module, loader, batches: int, tta: bool) -> float:
    module.eval()
    right = total = 0
    for images, labels in islice(loader, batches):
        logits = module.predict_logits(images) if tta else module(images)
        right += (logits.argmax(1) == labels).sum().item()
        total += len(labels)
    return right / total


def main(ckpt_path: str, batches: int = 40) -> None:
    run = load_trained_run(ckpt_path, ["data.augment=false"])
    module = run.module
    data = instantiate_group(run.cfg, "data")
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    test, train = data.test_dataloader(), data.train_dataloader()
    everything = len(test)
    print(f"test, no TTA: {accuracy(module, test, everything, False):.2%}")
    print(f"test, the run's TTA: {accuracy(module, test, everything, True):.2%}")
    print(f"train, {batches} batches, un-augmented: {accuracy(module, train, batches, False):.2%}")
    update_bn(islice(train, batches), module)  # a plain average over those batches
    print(
        f"test after BatchNorm statistics of those batches, no TTA: "
        f"{accuracy(module, test, everything, False):.2%}, TTA: "
        f"{accuracy(module, test, everything, True):.2%}"
    )


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
