"""Host syncs: the counter sees every read of a device value, and the training step of the
real CLI makes none between its logging steps (each one would stall a GPU)."""

from __future__ import annotations

import json

import pytest
import torch

from resnet_lightning.callbacks.host_syncs import SyncCount
from tests.cli_harness import REPO, run_cli


def test_counter_sees_reads_and_data_dependent_shapes():
    x = torch.arange(6.0)
    with SyncCount() as count:
        x.sum().item()
        if (x > 2).any():
            x[x > 2].sum()  # boolean-mask indexing sizes its output from the data
        x.nonzero()
        x[torch.tensor([0, 2])] = 1.0  # integer indices: nothing read back
        (x * 2 + 1).relu()
    assert count.ops == {"_local_scalar_dense": 2, "index": 1, "nonzero": 1}, count.ops


def test_one_hot_range_check_is_not_counted():
    # CPU's one_hot reads the label range back; CUDA's does not, so it is no GPU sync.
    with SyncCount() as count:
        torch.nn.functional.one_hot(torch.tensor([1, 7]), 10)
    assert count.ops == {}


@pytest.mark.slow  # make test-all
def test_training_steps_read_nothing_back_between_log_steps(tmp_path, data_overrides):
    run_dir = tmp_path / "run"
    args = [
        "callbacks=host_syncs",  # the default callbacks plus the counter
        "model=resnet20",
        "data.pipeline=tensor",
        "data.batch_size=16",
        "trainer=cpu",
        "trainer.enable_progress_bar=false",  # a progress bar reads the loss every step
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=7",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.log_every_n_steps=3",
        f"hydra.run.dir={run_dir}",
        *data_overrides,
    ]
    run_cli(args, cwd=REPO)
    steps = json.loads((run_dir / "host_syncs.json").read_text())["steps"]
    assert [(s["epoch"], s["batch"]) for s in steps] == [(e, b) for e in (0, 1) for b in range(7)]
    # The divergence check reads the loss back at Lightning's logging steps (every third
    # step of the run) and at each epoch's last batch only.
    checked = {0: {2, 5, 6}, 1: {1, 4, 6}}
    for step in steps:
        assert (step["syncs"] > 0) == (step["batch"] in checked[step["epoch"]]), steps
        assert step["syncs"] <= 2, steps
