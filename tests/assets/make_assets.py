"""Cut the small real fixtures in this folder from ../shared/data (run from the repo root:
``python tests/assets/make_assets.py``). The test suite uses only these files and scikit-learn's digits, so a clone
without ../shared runs every test. Rows are chosen with a fixed seed, class-balanced.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
HERE = Path(__file__).resolve().parent


def cut(name: str, out: str, train_per_class: int, test_per_class: int, size: int | None = None) -> None:
    z = np.load(SHARED / name, allow_pickle=False)
    rng = np.random.default_rng(0)
    parts = {}
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        x, y = z[f"x_{split}"], z[f"y_{split}"]
        rows = np.concatenate([rng.choice(np.flatnonzero(y == c), n, replace=False) for c in range(int(y.max()) + 1)])
        rows = rng.permutation(rows)
        xs = x[rows]
        if size is not None and xs.shape[1] != size:  # average-pool by an integer factor
            f = xs.shape[1] // size
            xs = xs.reshape(len(xs), size, f, size, f, xs.shape[-1]).mean((2, 4)).round().astype(np.uint8)
        parts[f"x_{split}"], parts[f"y_{split}"] = xs, y[rows]
    np.savez_compressed(HERE / out, class_names=z["class_names"], **parts)
    print(out, {k: v.shape for k, v in parts.items()}, (HERE / out).stat().st_size, "bytes")


def cut_pairs(name: str, out: str, n_train: int, n_test: int, size: int) -> None:
    """An image-caption fixture: random rows (fixed seed) with their captions and file names, average-pooled."""
    z = np.load(SHARED / name, allow_pickle=False)
    rng = np.random.default_rng(0)
    parts = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = np.sort(rng.choice(len(z[f"x_{split}"]), n, replace=False))
        xs = z[f"x_{split}"][rows]
        f = xs.shape[1] // size
        xs = xs.reshape(len(xs), size, f, size, f, xs.shape[-1]).mean((2, 4)).round().astype(np.uint8)
        parts[f"x_{split}"], parts[f"captions_{split}"] = xs, z[f"captions_{split}"][rows]
        parts[f"files_{split}"] = z[f"files_{split}"][rows]
    np.savez_compressed(HERE / out, **parts)
    print(out, {k: v.shape for k, v in parts.items()}, (HERE / out).stat().st_size, "bytes")


if __name__ == "__main__":
    cut("cifar10.npz", "cifar10_small.npz", 50, 20)
    cut("tinyimagenet10_64.npz", "tiny10_small.npz", 10, 6)
    cut("mnist.npz", "mnist_small.npz", 60, 30)
    cut_pairs("flickr8k_64.npz", "flickr_small.npz", 64, 32, 32)
