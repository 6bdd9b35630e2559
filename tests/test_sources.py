"""Data sources users already have: torchvision dataset classes and Hugging Face datasets, read with their own real
loading code from local copies (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distillset.core.data import Source
from distillset.core.errors import DistillError

ASSETS = Path(__file__).parent / "assets"


def _idx(path: Path, arr: np.ndarray) -> None:
    """Write ``arr`` (uint8) in the IDX format MNIST ships in (magic: 0, 0, dtype 0x08, ndim; then big-endian dims)."""
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory) -> tuple[Path, dict]:
    """A local torchvision MNIST folder (MNIST/raw/*-ubyte) cut from the MNIST fixture."""
    d = np.load(ASSETS / "mnist_small.npz")
    root = tmp_path_factory.mktemp("tv")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, tag in (("train", "train"), ("test", "t10k")):
        _idx(raw / f"{tag}-images-idx3-ubyte", d[f"x_{split}"][..., 0])
        _idx(raw / f"{tag}-labels-idx1-ubyte", d[f"y_{split}"])
    return root, {k: d[k] for k in ("x_train", "y_train", "x_test", "y_test")}


def test_torchvision_class_reads_a_local_copy(mnist_root):
    root, d = mnist_root
    s = Source(f"torchvision:MNIST?root={root}")
    train, test = s.load("train"), s.load("test")
    assert train.image_shape == (1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.equal(train.images[:, 0], torch.from_numpy(d["x_train"][..., 0]))
    assert torch.equal(test.labels, torch.from_numpy(d["y_test"]).long())
    assert train.class_names[0].startswith("0") and len(train.class_names) == 10


def test_torchvision_errors_are_one_line(tmp_path):
    with pytest.raises(DistillError, match="unknown torchvision dataset 'CIFAR11'. Did you mean 'CIFAR10'"):
        Source("torchvision:CIFAR11").load("train")
    with pytest.raises(DistillError, match="could not be read from .*add &download=true"):
        Source(f"torchvision:CIFAR10?root={tmp_path}").load("train")
    with pytest.raises(DistillError, match="unknown option 'dowload'"):
        Source(f"torchvision:MNIST?root={tmp_path}&dowload=true").load("train")


def test_hf_load_dataset_reads_a_local_data_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 6)):
        ds = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(n)],
             "label": [i % 3 for i in range(n)]},
            features=datasets.Features({"image": datasets.Image(),
                                        "label": datasets.ClassLabel(names=["a", "b", "c"])}))
        (tmp_path / "data").mkdir(exist_ok=True)
        ds.to_parquet(str(tmp_path / "data" / f"{split}.parquet"))
    s = Source(f"hf:{tmp_path / 'data'}")  # not a save_to_disk folder: datasets.load_dataset reads it
    train = s.load("train")
    assert train.image_shape == (3, 8, 8) and len(train) == 12 and train.labels.tolist()[:4] == [0, 1, 2, 0]
    assert len(s.load("test")) == 6
