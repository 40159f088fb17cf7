"""Your own images (data=imagefolder) and CIFAR-100, on photos made from real CIFAR-10 images."""

from __future__ import annotations

import csv
import hashlib
import logging
import pickle
import shutil
import tarfile
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torchvision.datasets import CIFAR100

from resnet_lightning.data import CifarDataModule, ImageFolderDataModule, load_cifar
from resnet_lightning.errors import DataError, InvalidArgument
from tests.cli_harness import PHOTO_CLASSES as CLASSES
from tests.cli_harness import TINY, compose_config, run_cli, run_main


def datamodule(root, path, **kwargs) -> ImageFolderDataModule:
    kwargs = {"image_size": 64, "resize_size": 72, "num_workers": 0, "batch_size": 8} | kwargs
    dm = ImageFolderDataModule(root=str(root), path=str(path), **kwargs)
    dm.setup()
    return dm


def copy_tree(photos: Path, into: Path) -> Path:
    shutil.copytree(photos, into)
    return into


def test_tree_loads_sized_batches_with_sorted_class_names(photos, tmp_path):
    dm = datamodule(tmp_path, photos)
    assert dm.classes == CLASSES
    assert [len(dm.samples[s]) for s in ("train", "val", "test")] == [240, 60, 60]
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.float32
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (8, 3, 64, 64) and len(set(labels.tolist())) > 1  # classes mixed
    # Evaluation is deterministic (resize 72, centre crop 64), training is not.
    val = dm.val_dataloader().dataset
    assert torch.equal(val[0][0], val[0][0])
    train = dm.train_dataloader().dataset
    assert not torch.equal(train[0][0], train[0][0])


def test_model_head_follows_the_class_folders(photos, tmp_path):
    cfg = compose_config(
        ["data=imagefolder", f"data.path={photos}", f"data.root={tmp_path}", "model=resnet18"]
    )
    assert cfg.data.num_classes == cfg.model.num_classes == cfg.module.num_classes == 3
    net = instantiate(cfg.model)
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    with pytest.raises(DataError, match="has 3 classes but data.num_classes=5"):
        datamodule(tmp_path, photos, num_classes=5)


def test_image_folder_batches_mix_over_its_own_classes(photos, tmp_path):
    dm = datamodule(tmp_path, photos, cutmix_alpha=1.0)
    images, labels = next(iter(dm.train_dataloader()))
    mixed, targets = dm.mixer(images, labels)
    assert mixed.shape == images.shape and targets.shape == (8, 3)  # the folders' 3 classes
    assert torch.allclose(targets.sum(1), torch.ones(8))
    assert datamodule(tmp_path, photos).mixer is None


def test_single_tree_is_split_by_val_size(photos, tmp_path):
    dm = datamodule(tmp_path, photos / "train")  # <class>/* alone
    assert dm.classes == CLASSES
    assert (len(dm.samples["train"]), len(dm.samples["val"])) == (216, 24)  # 0.1 by default
    counted = datamodule(tmp_path, photos / "train", val_size=30)
    assert len(counted.samples["val"]) == 30 and counted.samples["test"] == counted.samples["val"]
    held = datamodule(tmp_path, photos, val_size=0.25)  # val/ then only tests
    assert (len(held.samples["train"]), len(held.samples["val"])) == (180, 60)
    assert {Path(f).parts[-3] for f, _ in held.samples["test"]} == {"val"}
    assert not {f for f, _ in held.samples["train"]} & {f for f, _ in held.samples["val"]}


def test_archive_is_extracted_once_and_whole(photos, tmp_path):
    archive = tmp_path / "photos.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(photos, arcname="myphotos")  # under a top folder
    root = tmp_path / "cache"
    dm = datamodule(root, archive)
    assert dm.classes == CLASSES and len(dm.samples["train"]) == 240
    (extracted,) = root.glob("imagefolder-*/")
    assert not list(root.glob(".*tmp"))
    stamp = extracted.stat().st_mtime_ns
    assert datamodule(root, archive).classes == CLASSES
    assert extracted.stat().st_mtime_ns == stamp


def test_archive_that_does_not_fit_the_disk_is_refused_leaving_nothing(
    photos, tmp_path, monkeypatch
):
    archive = tmp_path / "photos.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(photos, arcname=".")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(2**40, 2**40, 2**30 + 100_000))
    root = tmp_path / "cache"
    with pytest.raises(DataError, match=r"does not fit in data.root=.*larger disk"):
        datamodule(root, archive)
    assert list(root.iterdir()) == []


def test_grey_rgba_palette_and_16_bit_images_come_out_rgb(photos, tmp_path):
    tree = copy_tree(photos, tmp_path / "tree")
    photo = Image.open(next((tree / "train" / "bird").glob("*.jpg"))).convert("RGB")
    grey = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    modes = {
        "grey": photo.convert("L"),
        "rgba": photo.convert("RGBA"),
        "palette": palette,
        "16bit": Image.fromarray(grey),
    }
    for name, image in modes.items():
        image.save(tree / "train" / "bird" / f"mode-{name}.png")
    dm = datamodule(tmp_path, tree, augment=False)
    dataset = dm.train_dataloader().dataset
    index = {Path(f).stem: i for i, (f, _) in enumerate(dm.samples["train"])}
    reference = dataset[index["mode-grey"]][0]
    for name in modes:
        image, label = dataset[index[f"mode-{name}"]]
        assert image.shape == (3, 64, 64) and label == CLASSES.index("bird"), name
        if name in ("grey", "16bit"):  # 16 bits scaled to 8, not clipped to white
            torch.testing.assert_close(image, reference, atol=0.05, rtol=0)


def test_unreadable_images_are_skipped_counted_and_checked_once(photos, tmp_path, caplog):
    tree = copy_tree(photos, tmp_path / "tree")
    photo = next((tree / "train" / "bird").glob("*.jpg"))
    (tree / "train" / "bird" / "cut.jpg").write_bytes(photo.read_bytes()[:400])  # truncated
    (tree / "train" / "airplane" / "notes.png").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        dm = datamodule(tmp_path / "cache", tree)
    assert "skipped 2 unreadable image(s)" in caplog.text and "remove or replace" in caplog.text
    assert len(dm.samples["train"]) == 240
    assert not {"cut", "notes"} & {Path(f).stem for f, _ in dm.samples["train"]}
    (checked,) = (tmp_path / "cache").glob("imagefolder-*.json")
    stamp = checked.stat().st_mtime_ns
    datamodule(tmp_path / "cache", tree)
    assert checked.stat().st_mtime_ns == stamp  # not decoded again


@pytest.mark.parametrize(
    "change, message",
    [
        ("empty", r"train: Found no valid file for the classes bird; add images"),
        ("val_extra", r"val has \['cat'\], which train/ lacks"),
        ("val_missing", r"val lacks \['bird'\]"),
        ("unreadable_class", r"class folder\(s\) \['bird'\] hold no readable images"),
    ],
)
def test_bad_layouts_are_one_clear_line(photos, tmp_path, change, message):
    tree = copy_tree(photos, tmp_path / "tree")
    if change == "empty":
        shutil.rmtree(tree / "train" / "bird")
        (tree / "train" / "bird").mkdir()
    elif change == "val_extra":
        shutil.copytree(tree / "val" / "bird", tree / "val" / "cat")
    elif change == "val_missing":
        shutil.rmtree(tree / "val" / "bird")
    else:
        for file in (tree / "train" / "bird").glob("*.jpg"):
            file.write_bytes(b"broken")
    with pytest.raises(DataError, match=message) as error:
        datamodule(tmp_path / "cache", tree)
    assert "\n" not in str(error.value)


def test_imagefolder_without_a_path_is_one_line(tmp_path, capfd, monkeypatch):
    code, err = run_main(
        ["data=imagefolder", "trainer=cpu", f"hydra.run.dir={tmp_path}/run"], capfd, monkeypatch
    )
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "error: data=imagefolder needs data.path=<image-folder tree or archive>"
    )


def test_unknown_pipeline_is_refused_in_one_line(photos, tmp_path):
    with pytest.raises(ValueError, match="pipeline='dali' is unknown; use one of torchvision, t"):
        ImageFolderDataModule(root=str(tmp_path), path=str(photos), pipeline="dali")


def write_cifar100_pickles(folder: Path, cifar_archive: Path, per_split: dict[str, int]) -> dict:
    """CIFAR-100's own files (cifar-100-python/train, test, meta: Python pickles of dicts with
    'data' (N, 3072) uint8 rows of R, G then B planes, 'fine_labels' and 'fine_label_names'),
    filled with real CIFAR-10 images under 100 made-up class names."""
    pixels = []  # the archive's first images (train/airplane/...: no need to read it all)
    with tarfile.open(cifar_archive) as archive:
        for member in archive:
            if member.isfile() and len(pixels) < sum(per_split.values()):
                pixels.append(np.asarray(Image.open(archive.extractfile(member))))
            archive.members.clear()
            if len(pixels) == sum(per_split.values()):
                break
    first = {"train": 0, "test": per_split["train"]}
    images = {split: pixels[first[split] : first[split] + n] for split, n in per_split.items()}
    names = [f"class{i:02d}" for i in range(100)]
    folder.mkdir(parents=True)
    written = {}
    for split, pixels in images.items():
        data = np.stack(pixels).transpose(0, 3, 1, 2).reshape(len(pixels), 3072)
        labels = [(7 * i) % 100 for i in range(len(pixels))]
        entry = {"data": data, "fine_labels": labels, "coarse_labels": [0] * len(pixels)}
        (folder / split).write_bytes(pickle.dumps(entry, protocol=2))
        written[split] = (np.stack(pixels), labels)
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names}, protocol=2))
    return written | {"meta": names}


def test_cifar100_reader_reads_its_own_pickle_layout(tmp_path, cifar_archive, monkeypatch):
    root = tmp_path / "data"
    written = write_cifar100_pickles(
        root / "cifar-100-python", cifar_archive, {"train": 300, "test": 50}
    )
    # Files of CIFAR-100's layout but other images cannot have its published md5s: torchvision
    # is told these files' md5s instead, and checks and reads them as it would the download.
    folder = root / CIFAR100.base_folder
    md5 = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in written}
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", CIFAR100.meta | {"md5": md5["meta"]})
    arrays = load_cifar(root, dataset="cifar100")
    assert arrays.classes == written["meta"]
    for split in ("train", "test"):
        pixels, labels = written[split]  # the images and labels the files hold
        assert torch.equal(getattr(arrays, f"{split}_images"), torch.from_numpy(pixels))
        assert getattr(arrays, f"{split}_labels").tolist() == labels
    dm = CifarDataModule(
        root=str(root), dataset="cifar100", num_classes=100, val_size=50, num_workers=0
    )
    dm.setup()
    assert dm.classes[7] == "class07" and len(dm.train_index) == 250
    cfg = compose_config(["data=cifar100"])
    assert (cfg.data.dataset, cfg.model.num_classes, cfg.data.normalization) == (
        "cifar100",
        100,
        "cifar100",
    )


@pytest.mark.slow  # make test-all: a training run and a prediction, 2 min on 2 shared cores
def test_train_on_photos_then_predict_names_the_classes(photos, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        *TINY,
        "data=imagefolder",
        f"data.path={photos}",
        f"data.root={tmp_path / 'cache'}",
        "data.image_size=64",
        "data.resize_size=72",
        "model=resnet18",
        "model.stem=imagenet",  # 64 px photos: the 7x7/2 stem and max-pool
        "trainer.max_epochs=1",
        "logger=[]",
        f"hydra.run.dir={run_dir}",
    ]
    run_cli(overrides, cwd=tmp_path)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert checkpoint["class_names"] == CLASSES
    assert checkpoint["state_dict"]["net.fc.weight"].shape == (3, 512)  # a 3-way head
    output = tmp_path / "photos.csv"
    run_cli(
        [f"ckpt_path={ckpt}", f"predict={photos / 'val'}", f"output={output}"],
        cwd=tmp_path,
        command="resnet_lightning.eval",
    )
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == 60
    assert {row["class1"] for row in rows} <= set(CLASSES)
    assert all({row[f"class{i}"] for i in (1, 2, 3)} == set(CLASSES) for row in rows)
    assert "class4" not in rows[0]  # three classes: a top-3


@pytest.fixture(scope="module")
def imagenet_weights(tmp_path_factory) -> Path:
    """A torchvision ResNet-50 state dict in a file: offline, the same loading path as
    IMAGENET1K_V2 (the values are torchvision's initialisation, not trained ones)."""
    from torchvision.models import resnet50

    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.manual_seed(0)
    torch.save(resnet50().state_dict(), path)
    return path


def test_finetune_folder_loads_weights_under_a_head_sized_from_the_folders(
    photos, tmp_path, imagenet_weights
):
    cfg = compose_config(
        [
            "experiment=finetune_folder",
            f"data.path={photos}",
            f"data.root={tmp_path}",
            f"model.pretrained={imagenet_weights}",
        ]
    )
    assert compose_config(["experiment=finetune_folder"]).model.pretrained == "IMAGENET1K_V2"
    assert (cfg.data.image_size, cfg.data.resize_size, cfg.data.normalization) == (
        224,
        256,
        "imagenet",
    )
    net = instantiate(cfg.model)
    weights = torch.load(imagenet_weights, weights_only=True)
    assert torch.equal(net.layer4[2].conv3.weight, weights["layer4.2.conv3.weight"])
    assert net.fc.out_features == 3  # the folders' three classes, never typed
    module = instantiate(cfg.module, net=net, optimizer=instantiate(cfg.optimizer))
    (head, head_scale, _), (_, backbone_scale, _) = module._parameter_groups()
    assert {id(p) for p in head} == {id(p) for p in net.fc.parameters()}
    # The new head at lr 0.01, the pretrained layers at a tenth of it.
    assert (cfg.optimizer.lr, head_scale, backbone_scale) == (0.01, 1.0, 0.1)


@pytest.mark.slow  # make test-all: a ResNet-50 fine-tuning run and a prediction
def test_finetune_on_photos_then_predict_names_the_classes(photos, tmp_path, imagenet_weights):
    run_dir = tmp_path / "run"
    overrides = [
        *TINY,
        "experiment=finetune_folder",
        f"data.path={photos}",
        f"data.root={tmp_path / 'cache'}",
        f"model.pretrained={imagenet_weights}",
        "data.image_size=64",
        "data.resize_size=72",
        "data.batch_size=16",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        "logger=[]",
        f"hydra.run.dir={run_dir}",
    ]
    run_cli(overrides, cwd=tmp_path)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["class_names"] == CLASSES
    assert checkpoint["state_dict"]["net.fc.weight"].shape == (3, 2048)
    image = next((photos / "val" / "bird").iterdir())
    result = run_cli(
        [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"predict={image}"],
        cwd=tmp_path,
        command="resnet_lightning.eval",
    )
    # One line: the file, then its classes by name with their probabilities (three classes).
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith(f"{image}: ")
    named = dict(pair.rsplit(" ", 1) for pair in line.split(": ", 1)[1].split(", "))
    assert set(named) == set(CLASSES)
    assert sum(float(p) for p in named.values()) == pytest.approx(1.0, abs=0.01)


def test_photo_policies_are_torchvisions_with_imagenets_autoaugment(photos, tmp_path):
    from torchvision.transforms import v2

    steps = datamodule(tmp_path, photos, policy="autoaugment").transform(train=True).transforms
    (policy,) = [s for s in steps if isinstance(s, v2.AutoAugment)]
    assert policy.policy == v2.AutoAugmentPolicy.IMAGENET
    steps = datamodule(tmp_path, photos, policy="trivialaugment").transform(train=False).transforms
    assert not any(isinstance(s, v2.TrivialAugmentWide) for s in steps)  # training only


@pytest.mark.parametrize("pipeline", ["torchvision", "tensor"])
def test_photo_random_erasing_boxes_every_training_image(pipeline, photos, tmp_path):
    kwargs = {"pipeline": pipeline, "random_erasing": 1.0}
    if pipeline == "torchvision":
        kwargs["policy"] = "trivialaugment"
    images, _ = next(iter(datamodule(tmp_path, photos, **kwargs).train_dataloader()))
    # Erased pixels are exactly 0 (the mean colour) in all three channels; photos never are.
    erased = (images == 0).all(dim=1).flatten(1).sum(1)
    assert images.shape == (8, 3, 64, 64) and (erased > 0).all()
    images, _ = next(iter(datamodule(tmp_path, photos, pipeline=pipeline).train_dataloader()))
    assert ((images == 0).all(dim=1).flatten(1).sum(1) == 0).all()


def test_photo_policy_on_the_tensor_path_is_one_line(photos, tmp_path):
    with pytest.raises(InvalidArgument, match="policy='trivialaugment' needs data.pipeline="):
        datamodule(tmp_path, photos, pipeline="tensor", policy="trivialaugment")
