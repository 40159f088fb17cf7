"""Test or use a checkpoint, with the model rebuilt from the config its run was trained with.

    python -m resnet_lightning.eval ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt
    python -m resnet_lightning.eval ckpt_path=<ckpt> predict=cat.png     # top-5 classes
    python -m resnet_lightning.eval ckpt_path=<ckpt> 'predict=[a.png,b.jpg]'
    python -m resnet_lightning.eval ckpt_path=<ckpt> predict=photos/     # -> predictions.csv
    python -m resnet_lightning.eval ckpt_path=<ckpt> predict=photos/ output=photos.csv batch_size=64

Image files are predicted on the console, one line each. A folder (every image under it, in
sorted order) is predicted into a CSV instead: `output=<file.csv>`, by default
`predictions.csv` in the current directory (replaced if it exists); `output=` also sends
single files there. Its columns are `file` and then `class1,prob1,...,class5,prob5`, the
top-5 classes (the checkpoint's class names) with their softmax probabilities, highest first,
with a progress bar on stderr. The CSV is written whole at the end: an image that cannot be
read stops the command with an error naming it, and no CSV is written.

Testing and predicting go `batch_size` images at a time, 256 by default, not the run's
training batch size (inference keeps no activations for a backward pass, so batches this large
fit, and run faster). Other `key=value` arguments override the run's saved config:
`data.path=...`, `data.root=...`, `trainer.accelerator=cpu`. The whole test set is tested even
when the run's own test was limited to a few batches (`trainer.limit_test_batches=2` to limit
it again). The checkpoint is loaded with `weights_only=True`; no run files are written (the
data cache in data.root, as by any run).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress

from resnet_lightning.atomic_files import write_atomic
from resnet_lightning.callbacks.checkpoints import (
    RunRecord,
    check_checkpoint_fits,
    load_checkpoint_file,
)
from resnet_lightning.data.image_folder import IMAGE_SUFFIXES, to_rgb
from resnet_lightning.errors import CheckpointError, UsageError, one_line_errors
from resnet_lightning.tools.report.output import csv_text
from resnet_lightning.training.config import instantiate_group, trusted_saved_config
from resnet_lightning.training.module import ImageClassifier
from resnet_lightning.training.precision import resolve_auto_precision

# A single process sees every test image once (DDP's sampler pads the last batch with repeats),
# all of them even when the run itself tested a few batches (limit_test_batches).
EVAL_TRAINER = {
    "devices": 1,
    "num_nodes": 1,
    "strategy": "auto",
    "accelerator": "auto",
    "limit_test_batches": 1.0,
}
BATCH = 256
DEFAULT_CSV = "predictions.csv"


class TrainedRun(NamedTuple):
    """A checkpoint's run: its config (with the eval overrides), module and class names."""

    cfg: DictConfig
    module: ImageClassifier
    class_names: list[str]


def evaluate(ckpt_path: str | Path, overrides: Sequence[str] = ()) -> dict[str, float]:
    """Test metrics of the checkpoint on its run's test data (as configured, plus `overrides`)."""
    cfg, module, _ = load_trained_run(ckpt_path, overrides)
    datamodule = instantiate_group(cfg, "data")
    trainer: L.Trainer = instantiate_group(
        cfg, "trainer", logger=False, callbacks=[], enable_checkpointing=False
    )
    (metrics,) = trainer.test(module, datamodule=datamodule)
    return {k: float(v) for k, v in metrics.items()}


class Prediction(NamedTuple):
    """An image file and its top-5 (class name, probability), most probable first."""

    file: Path
    top5: list[tuple[str, float]]


def predict(
    ckpt_path: str | Path,
    images: Sequence[str | Path],
    overrides: Sequence[str] = (),
    batch_size: int = BATCH,
) -> list[Prediction]:
    """The top-5 (class, probability) of each image file, or of each image in a folder."""
    run = load_trained_run(ckpt_path, overrides)
    return [p for batch in predict_batches(run, _image_files(images), batch_size) for p in batch]


def predict_to_csv(
    ckpt_path: str | Path,
    images: Sequence[str | Path],
    output: str | Path = DEFAULT_CSV,
    overrides: Sequence[str] = (),
    batch_size: int = BATCH,
) -> tuple[Path, int]:
    """Write the top-5 of every image to the CSV `output`; return it and the image count."""
    output = Path(output)
    if output.is_dir():
        raise UsageError(f"output={output} is a folder; name a file, e.g. output={output}/x.csv")
    run = load_trained_run(ckpt_path, overrides)
    files = _image_files(images)
    rows = []
    # On stderr, so that stdout holds only the summary line.
    columns = [*Progress.get_default_columns(), MofNCompleteColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("predicting", total=len(files))
        for batch in predict_batches(run, files, batch_size):
            rows += [_csv_row(p) for p in batch]
            progress.advance(task, len(batch))
    write_atomic(output, csv_text(rows))
    return output, len(rows)


def predict_batches(
    run: TrainedRun, files: Sequence[Path], batch_size: int = BATCH
) -> Iterator[list[Prediction]]:
    """The predictions of `files`, `batch_size` images at a time: only one batch is in memory."""
    # The data's own way with a picture of any size: CIFAR's brings it to 32 px first.
    transform = instantiate_group(run.cfg, "data").predict_transform()
    module = run.module.eval()
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images = [transform(_open_image(f)) for f in chunk]
        with torch.inference_mode():
            probabilities = module.predict_logits(torch.stack(images)).softmax(dim=1)
        top = probabilities.topk(min(5, probabilities.shape[1]), dim=1)
        yield [
            Prediction(file, [(run.class_names[c], float(p)) for p, c in zip(ps, cs, strict=True)])
            for file, ps, cs in zip(chunk, top.values, top.indices, strict=True)
        ]


def _csv_row(prediction: Prediction) -> dict[str, str]:
    row = {"file": str(prediction.file)}
    for rank, (name, probability) in enumerate(prediction.top5, start=1):
        # Six significant digits: enough to rank, and tiny probabilities stay non-zero.
        row |= {f"class{rank}": name, f"prob{rank}": f"{probability:.6g}"}
    return row


def load_trained_run(ckpt_path: str | Path, overrides: Sequence[str] = ()) -> TrainedRun:
    """The run's config (with `overrides`) and its module holding the checkpoint's weights."""
    checkpoint = load_checkpoint_file(ckpt_path)
    cfg = run_config(checkpoint, Path(ckpt_path))
    cfg.trainer.update(EVAL_TRAINER)
    # The weights come from the checkpoint: no download of pretrained ones, no compilation.
    cfg.model.update({"pretrained": None, "compile": False})
    cfg = _apply_overrides(cfg, overrides)
    # A run directory's .hydra/config.yaml (or an override) may say auto: this machine's choice.
    resolve_auto_precision(cfg)
    net = instantiate_group(cfg, "model")
    optimizer = instantiate_group(cfg, "optimizer")
    module: ImageClassifier = instantiate_group(cfg, "module", net=net, optimizer=optimizer)
    check_checkpoint_fits(module, checkpoint, ckpt_path)
    module.load_state_dict(checkpoint["state_dict"])
    classes = checkpoint.get(RunRecord.CLASSES_KEY)
    return TrainedRun(cfg, module, classes or [str(i) for i in range(cfg.module.num_classes)])


def run_config(checkpoint: dict[str, Any], ckpt_path: Path) -> DictConfig:
    """The resolved config saved in the checkpoint, or for checkpoints without one, the run's
    .hydra/config.yaml (the checkpoint in <run>/checkpoints/); `_target_`s that have moved
    since it was written are renamed."""
    saved = checkpoint.get(RunRecord.CONFIG_KEY)
    if saved is not None:
        return trusted_saved_config(OmegaConf.create(saved), str(ckpt_path))
    run_dir = ckpt_path.resolve().parent.parent
    hydra_dir = run_dir / ".hydra"
    if not (hydra_dir / "config.yaml").is_file():
        raise CheckpointError(
            f"{ckpt_path} holds no run config and {hydra_dir}/config.yaml does not exist; "
            "keep the checkpoint in its run's checkpoints/ folder"
        )
    cfg = OmegaConf.load(hydra_dir / "config.yaml")
    # Hydra's runtime values (${hydra:...}) exist only inside a Hydra app: fill in the paths.
    cwd = OmegaConf.load(hydra_dir / "hydra.yaml").hydra.runtime.cwd
    cfg.paths.update({"root_dir": cwd, "output_dir": str(run_dir)})
    return trusted_saved_config(cfg, str(hydra_dir / "config.yaml"))


def _apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    OmegaConf.set_struct(cfg, True)
    problem = None
    try:
        for override in overrides:
            key = override.split("=", 1)[0]
            if isinstance(OmegaConf.select(cfg, key), DictConfig):
                problem = f"{key} is a whole config group"
                break
        else:
            return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        problem = str(err).splitlines()[0]
    raise UsageError(
        f"cannot apply {' '.join(overrides)} to the run's config ({problem}); eval takes "
        "key.path=value overrides of existing keys, e.g. trainer.accelerator=cpu (not group "
        "choices such as trainer=cpu)"
    )


def _image_files(images: Sequence[str | Path]) -> list[Path]:
    files = []
    for image in map(Path, images):
        if image.is_dir():
            files += sorted(f for f in image.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif image.is_file():
            files.append(image)
        else:
            raise UsageError(
                f"predict={image}: no such file or folder; pass image files or a folder"
            )
    if not files:
        raise UsageError(f"predict={','.join(map(str, images))}: no images found")
    return files


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except (UnidentifiedImageError, OSError) as err:
        raise UsageError(
            f"could not read image {path} ({err}); nothing was written: remove it or pass "
            ".png/.jpg images"
        ) from None


def key_value_args(argv: Sequence[str], doc: str, required: str) -> dict[str, str]:
    """The `key=value` arguments of a checkpoint command, which must include `required`
    (e.g. "ckpt_path=<file.ckpt>"); `--help` (or nothing) prints `doc` and exits."""
    if not argv or argv[0] in ("-h", "--help"):
        print(doc)
        raise SystemExit(0 if argv else 2)
    args = dict(arg.split("=", 1) for arg in argv if "=" in arg)
    needed = {part.split("=", 1)[0] for part in required.split()}
    if any("=" not in arg for arg in argv) or not needed <= set(args):
        raise UsageError(f"expected {required} and key=value arguments, got {' '.join(argv)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m resnet_lightning.eval ckpt_path=... [predict=... output=...] [key=value ...]`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    with one_line_errors():
        args = key_value_args(argv, __doc__, "ckpt_path=<file.ckpt>")
        ckpt_path, images = args.pop("ckpt_path"), args.pop("predict", None)
        output, batch_size = args.pop("output", None), args.pop("batch_size", None)
        overrides = [f"{k}={v}" for k, v in args.items()]
        batch_size = _positive_int("batch_size", BATCH if batch_size is None else batch_size)
        if images is None:
            if output is not None:
                raise UsageError("output= goes with predict=<images or folder>")
            # data.batch_size, when given, comes later and wins.
            print(json.dumps(evaluate(ckpt_path, [f"data.batch_size={batch_size}", *overrides])))
            return
        images = OmegaConf.from_dotlist([f"images={images}"]).images  # one path or a [list]
        images = list(images) if OmegaConf.is_list(images) else [images]
        if output is None and not any(Path(i).is_dir() for i in images):
            for file, top5 in predict(ckpt_path, images, overrides, batch_size):
                print(f"{file}: " + ", ".join(f"{name} {p:.3f}" for name, p in top5))
            return
        path, count = predict_to_csv(
            ckpt_path, images, output or DEFAULT_CSV, overrides, batch_size
        )
        print(f"predicted {count} images: top-5 classes in {path.resolve()}")


def _positive_int(key: str, value: str | int) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise UsageError(f"{key}={value} must be a positive whole number, e.g. {key}=256")
    return number


if __name__ == "__main__":
    main()
