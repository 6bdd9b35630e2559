"""Data sources by spec, in-memory splits, and rank/worker-correct streaming of webdataset shards.

Specs:
    ``digits``            scikit-learn's bundled 8x8 digits (the embedded default; no download). A fixed stratified
                          split keeps 50 images per class for test.
    ``npz:PATH``          ``x_train, y_train, x_test, y_test`` uint8 NHWC arrays (+ optional ``class_names``).
    ``folder:PATH``       an ImageFolder tree: ``PATH/train/<class>/*`` and ``PATH/val|test/<class>/*`` (or the
                          class folders directly under ``PATH``, train only).
    ``hf:PATH``           a Hugging Face dataset saved with ``save_to_disk`` (columns ``image`` and ``label``).
    ``wds:PATH``          webdataset shards: a folder holding ``_info.json`` (as written by ``distillset shards``),
                          or a brace pattern whose folder holds one, e.g. ``wds:/data/in1k/train-{000000..001023}.tar``.
    ``grouped:MAPPING``   another source with its classes merged into coarse groups: ``MAPPING`` is a YAML flow mapping
                          ``{groups: {GROUP: [fine class name or index, ...], ...}, data: SPEC}``; every fine class
                          must be in exactly one group; labels become group indices in the mapping's order.

Every source yields ``(uint8 image (C, H, W), int label)``; normalisation and resolution belong to the backbone.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from distillset.core.errors import DistillError, unknown_name
from distillset.core.registry import Registry

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp")
LABEL_EXTS = ("cls", "label", "class")


@dataclass
class ImageSet:
    """A split held in memory: ``images`` uint8 ``(N, C, H, W)``, ``labels`` long ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DistillError(f"images must be uint8 (N, C, H, W), got {tuple(self.images.shape)} "
                               f"{self.images.dtype}; convert the data to 8-bit images.")
        if self.labels.shape != (self.images.shape[0],):
            raise DistillError(f"{self.images.shape[0]} images but {tuple(self.labels.shape)} labels; "
                               "every image needs exactly one label.")
        self.labels = self.labels.long()
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            bad = int(self.labels.min()) if self.labels.min() < 0 else int(self.labels.max())
            raise DistillError(f"label {bad} out of range for {len(self.class_names)} classes (labels span "
                               f"{int(self.labels.min())}..{int(self.labels.max())}); labels must be 0..num_classes-1.")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.class_names)

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes)

    def require_classes(self, ipc: int = 1, what: str = "this stage") -> None:
        """Fail clearly if a class is empty or has fewer than ``ipc`` images."""
        require_counts(self.class_counts(), self.class_names, ipc, what)


def require_counts(counts, class_names: list[str], ipc: int, what: str) -> None:
    """Fail clearly if a class has fewer than ``ipc`` images (``counts[c]`` of class ``c``)."""
    short = [(class_names[c], int(n)) for c, n in enumerate(counts) if n < ipc]
    if short:
        name, n = short[0]
        raise DistillError(f"class '{name}' has {n} images but {what} needs {ipc} per class "
                           f"({len(short)} classes short); lower ipc or add images to those classes.")


# ------------------------------------------------------------------------------------------------------------ sources


def _digits(split: str) -> ImageSet:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):  # fixed stratified split: 50 test images per class
        test[rng.permutation(np.flatnonzero(y == c))[:50]] = True
    keep = test if split == "test" else ~test
    return ImageSet(torch.from_numpy(x[keep]), torch.from_numpy(y[keep]), [str(i) for i in range(10)])


def _npz_labels(path: Path, key: str, y: np.ndarray) -> np.ndarray:
    """Integer labels of an npz split; float labels are accepted only when they hold whole numbers."""
    if y.ndim != 1:
        raise DistillError(f"{path}: {key} must be a 1-d array of class labels, got shape {y.shape}.")
    if y.dtype.kind == "f":
        bad = y[~np.isfinite(y) | (y != np.round(y))] if y.size else y
        if bad.size:
            raise DistillError(f"{path}: {key} holds non-integer labels (e.g. {float(bad[0])}); store class indices as "
                               "integers (y.astype(np.int64)), not probabilities or scores.")
    elif y.dtype.kind not in "iub":
        raise DistillError(f"{path}: {key} must hold integer class labels, got dtype {y.dtype}.")
    return y.astype(np.int64)


def _npz_class_names(path: Path, labels: list[np.ndarray]) -> list[str]:
    """Class names ``0..K-1`` inferred from the labels of both splits when the file gives no ``class_names``.

    Inferred classes must be contiguous: a stray label (99 in a 10-class set) is reported as out of range rather than
    as 89 empty classes.
    """
    used = np.unique(np.concatenate([y for y in labels if y.size] or [np.zeros(0, np.int64)]))
    if used.size == 0:
        return []
    if used[0] < 0:
        raise DistillError(f"{path}: label {int(used[0])} out of range; labels must be 0..num_classes-1.")
    missing = np.setdiff1d(np.arange(int(used[-1]) + 1), used)
    if missing.size:
        first_gap = int(missing[0])
        stray = [int(v) for v in used[used > first_gap]]
        raise DistillError(f"{path}: label {stray[-1]} out of range: labels 0..{first_gap - 1} are used, then "
                           f"{stray[:3]} with no class {first_gap} in between; labels must be 0..num_classes-1 "
                           "(or list every class in class_names).")
    return [str(i) for i in range(int(used[-1]) + 1)]


def _npz_images(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    """uint8 NHWC images of an npz split (NHW grayscale gets a channel axis), as NCHW."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.dtype != np.uint8:
        raise DistillError(f"{path}: {key} must be uint8 (N, H, W, C), got {x.shape} {x.dtype}.")
    if x.shape[-1] not in (1, 3, 4):
        hint = (" it looks like (N, C, H, W): store x.transpose(0, 2, 3, 1)" if x.shape[1] in (1, 3, 4)
                else " images need 1 (gray), 3 (RGB) or 4 channels last")
        raise DistillError(f"{path}: {key} has shape {x.shape}, not (N, H, W, C) with C in 1, 3, 4;{hint}.")
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _npz(path: Path, split: str) -> ImageSet:
    if not path.exists():
        raise DistillError(f"npz file {path} does not exist; check the path (see ../shared/data/README.md).")
    try:
        z = np.load(path, allow_pickle=False)
        x, y = z[f"x_{split}"], z[f"y_{split}"]
        other = z[f"y_{'test' if split == 'train' else 'train'}"]
        names = [str(s) for s in z["class_names"]] if "class_names" in z.files else None
    except KeyError as e:
        raise DistillError(f"{path} has no key {e}; an npz source needs x_train, y_train, x_test, y_test.") from None
    except Exception as e:
        raise DistillError(f"{path} is not a readable .npz file ({e}); re-create or re-download it.") from None
    images = _npz_images(path, f"x_{split}", x)
    y = _npz_labels(path, f"y_{split}", y)
    if names is None:  # both splits: a test split without the last class must not shrink the class list
        names = _npz_class_names(path, [y, _npz_labels(path, "y_other", other)])
    return ImageSet(torch.from_numpy(images), torch.from_numpy(y), names)


def _pil_to_uint8(img, channels: int | None, size: int | None) -> np.ndarray:
    from PIL import Image

    if channels == 1:
        img = img.convert("L")
    elif channels == 3 or img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    if size is not None:  # shorter side to size, then centre crop
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _stack(arrays: list[np.ndarray], where: str) -> np.ndarray:
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DistillError(f"{where}: images have different shapes {sorted(shapes)[:3]}...; pass image_size "
                           "(e.g. --image-size 64) to resize them to one size.")
    return np.stack(arrays)


def folder_files(root: Path, split: str) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and ``(file, label)`` pairs of an ImageFolder split, without decoding anything."""
    if not root.is_dir():
        raise DistillError(f"folder {root} does not exist; give an ImageFolder tree (root/train/<class>/*.png).")
    sub = {"train": ["train"], "test": ["test", "val"]}[split]
    base = next((root / s for s in sub if (root / s).is_dir()), None)
    if base is None:
        if split == "test":
            raise DistillError(f"{root} has no test/ or val/ folder; add one or evaluate on another source.")
        base = root
    tree = root.resolve()
    outside: list[Path] = []

    def within(p: Path) -> bool:  # a symbolic link may embed any readable file into shards a user then shares
        if p.is_symlink() and tree not in p.resolve().parents:
            outside.append(p)
            return False
        return True

    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and within(p))
    if not classes:
        raise DistillError(f"{base} holds no class folders; expected {base}/<class>/<image>.")
    items = []
    for c, name in enumerate(classes):
        files = sorted(f for f in (base / name).iterdir() if f.suffix.lower().lstrip(".") in IMAGE_EXTS and within(f))
        if not files:
            raise DistillError(f"class folder {base / name} is empty; remove it or add images.")
        items += [(f, c) for f in files]
    if outside:
        import logging

        logging.getLogger("distillset.data").warning(
            "skipped %d symbolic link(s) in %s that lead outside it (first: %s -> %s); copy those files into the "
            "tree to use them", len(outside), root, outside[0], outside[0].resolve())
    return classes, items


def read_image_file(path: Path, image_size: int | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return _pil_to_uint8(img, None, image_size)
    except Exception as e:
        raise DistillError(f"cannot read image {path} ({e}); remove or replace it.") from None


def _folder(root: Path, split: str, image_size: int | None) -> ImageSet:
    classes, items = folder_files(root, split)
    x = _stack([read_image_file(f, image_size) for f, _ in items], str(root))
    return ImageSet(torch.from_numpy(x), torch.tensor([c for _, c in items]), classes)


def _hf(path: Path, split: str) -> ImageSet:
    try:
        import datasets
    except ImportError:
        raise DistillError("the hf: source needs the 'datasets' package; pip install datasets.") from None
    saved = path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "dataset_info.json",
                                                                   "state.json"))
    if saved:
        ds = datasets.load_from_disk(str(path))
    else:  # a hub name (cached by datasets; downloaded only where the network allows) or a local data folder
        try:
            ds = datasets.load_dataset(str(path))
        except Exception as e:  # noqa: BLE001  (datasets raises many types: missing, offline, bad format)
            raise DistillError(f"hf:{path} is neither a dataset saved with save_to_disk nor loadable with "
                               f"datasets.load_dataset ({type(e).__name__}: {str(e).splitlines()[0][:160]}).") from None
    if isinstance(ds, datasets.DatasetDict):
        key = split if split in ds else ("validation" if split == "test" and "validation" in ds else None)
        if key is None:
            raise DistillError(f"{path} has splits {list(ds)}; it needs a '{split}' split.")
        ds = ds[key]
    if "image" not in ds.column_names or "label" not in ds.column_names:
        raise DistillError(f"{path} has columns {ds.column_names}; it needs 'image' and 'label'.")
    feat = ds.features["label"]
    names = list(feat.names) if hasattr(feat, "names") else [str(i) for i in range(max(ds["label"]) + 1)]
    xs = [_pil_to_uint8(img, None, None) for img in ds["image"]]
    return ImageSet(torch.from_numpy(_stack(xs, str(path))), torch.tensor(ds["label"]), names)


def _reader(rank: int, world: int) -> tuple[int, int]:
    """This reader's index and the number of readers (ranks x dataloader workers)."""
    wi = torch.utils.data.get_worker_info()
    return (rank, world) if wi is None else (rank * wi.num_workers + wi.id, world * wi.num_workers)


SOURCES = Registry("data source", "distillset.sources")  # the built-in kinds are defined below, in this module


class SourceKind:
    """One kind of data source: the part of a spec before ``:`` names it, the part after it is ``arg``.

    A kind loads a split into memory; streaming defaults to reading that in-memory split in rank/worker order.
    """

    name: ClassVar[str] = ""
    needs_arg: ClassVar[bool] = True
    is_stream: ClassVar[bool] = False
    resizes: ClassVar[bool] = False  # the kind applies ``image_size`` itself while decoding
    shards: WdsShards | None = None  # the shard index of a webdataset kind

    def __init__(self, arg: str, image_size: int | None):
        self.arg, self.image_size = arg, image_size

    def load(self, split: str) -> ImageSet:
        raise NotImplementedError

    def info(self, source: Source) -> dict:
        s = source.load("train")
        return {"class_names": s.class_names, "image_shape": s.image_shape}

    def stream(self, source: Source, split: str, rank: int, world: int) -> Iterator[tuple[torch.Tensor, int]]:
        """Each sample of ``split`` once across ranks and dataloader workers."""
        reader, readers = _reader(rank, world)
        s = source.load(split)
        for i in range(reader, len(s), readers):
            yield s.images[i], int(s.labels[i])


@SOURCES.register("digits", description="scikit-learn's bundled 8x8 digits (no download; 50 test images per class)")
class DigitsSource(SourceKind):
    needs_arg = False

    def load(self, split: str) -> ImageSet:
        return _digits(split)


@SOURCES.register("npz", description="npz:PATH, uint8 NHWC arrays x_train, y_train, x_test, y_test")
class NpzSource(SourceKind):
    def load(self, split: str) -> ImageSet:
        return _npz(Path(self.arg), split)


@SOURCES.register("folder", description="folder:PATH, an ImageFolder tree (PATH/train/<class>/*, PATH/val|test/...)")
class FolderSource(SourceKind):
    resizes = True

    def load(self, split: str) -> ImageSet:
        return _folder(Path(self.arg), split, self.image_size)

    def info(self, source: Source) -> dict:
        classes, items = folder_files(Path(self.arg), "train")
        return {"class_names": classes, "image_shape": tuple(read_image_file(items[0][0], self.image_size).shape)}

    def stream(self, source: Source, split: str, rank: int, world: int) -> Iterator[tuple[torch.Tensor, int]]:
        reader, readers = _reader(rank, world)
        _, items = folder_files(Path(self.arg), split)  # decode lazily: an ImageNet folder does not fit in memory
        for f, c in items[reader::readers]:
            yield torch.from_numpy(read_image_file(f, self.image_size)), c


@SOURCES.register("hf", description="hf:PATH|NAME, a Hugging Face dataset saved with save_to_disk, a local data folder "
                  "or a hub name (datasets.load_dataset; columns image, label)")
class HFSource(SourceKind):
    def load(self, split: str) -> ImageSet:
        return _hf(Path(self.arg), split)


def _tv_dataset(arg: str, split: str):
    """The torchvision dataset a ``torchvision:NAME[?root=DIR&download=true]`` spec names, for ``split``.

    Only classes of ``torchvision.datasets`` are looked up (a name, never a module path). ``root`` defaults to
    ``data/torchvision``; nothing is downloaded unless ``download=true`` is in the spec."""
    import inspect
    from urllib.parse import parse_qsl

    import torchvision.datasets as tvd

    name, _, query = arg.partition("?")
    opts = dict(parse_qsl(query))
    bad = sorted(set(opts) - {"root", "download"})
    if bad:
        raise DistillError(f"torchvision:{arg}: unknown option {bad[0]!r}; use ?root=DIR&download=true.")
    cls = getattr(tvd, name, None)
    if not isinstance(cls, type) or not issubclass(cls, tvd.VisionDataset):
        known = [n for n in dir(tvd) if isinstance(getattr(tvd, n), type) and issubclass(getattr(tvd, n),
                                                                                         tvd.VisionDataset)]
        raise unknown_name("torchvision dataset", name, known)
    root = opts.get("root", "data/torchvision")
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict = {}
    if "train" in params:
        kwargs["train"] = split == "train"
    elif "split" in params:
        kwargs["split"] = "train" if split == "train" else "test"
    if "download" in params:
        kwargs["download"] = opts.get("download", "false").lower() in ("1", "true", "yes")
    try:
        return cls(root, **kwargs)
    except (RuntimeError, OSError, ValueError) as e:  # torchvision's "Dataset not found or corrupted" and kin
        raise DistillError(f"torchvision:{name} ({split}) could not be read from {root} ({str(e).splitlines()[0]}); "
                           f"put the dataset there, point ?root= at it, or add &download=true.") from None


def _tv_to_imageset(ds, where: str) -> ImageSet:
    """A torchvision dataset as uint8 NCHW images, from its ``data``/``targets`` arrays where it keeps them
    (MNIST, CIFAR: no per-image decoding), else image by image."""
    names = [str(c) for c in getattr(ds, "classes", [])]
    data, targets = getattr(ds, "data", None), getattr(ds, "targets", None)
    if data is not None and targets is not None and str(getattr(data, "dtype", "")) in ("uint8", "torch.uint8"):
        x = torch.as_tensor(np.asarray(data))
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, H, W) or (N, H, W, C)
        y = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    else:
        xs, ys = [], []
        for i in range(len(ds)):
            img, label = ds[i]
            xs.append(_pil_to_uint8(img, None, None))
            ys.append(int(label))
        x, y = torch.from_numpy(_stack(xs, where)), torch.tensor(ys)
    if not names:
        names = [str(i) for i in range(int(y.max()) + 1)]
    return ImageSet(x.contiguous(), y, names)


@SOURCES.register("torchvision", description="torchvision:NAME[?root=DIR&download=true], a torchvision.datasets "
                  "class (CIFAR10, MNIST, ...) read from DIR (default data/torchvision)")
class TorchvisionSource(SourceKind):
    def load(self, split: str) -> ImageSet:
        return _tv_to_imageset(_tv_dataset(self.arg, split), f"torchvision:{self.arg}")


@SOURCES.register("wds", description="wds:PATH|PATTERN, webdataset shards with an _info.json, streamed per rank")
class WdsSource(SourceKind):
    is_stream = True

    def __init__(self, arg: str, image_size: int | None):
        super().__init__(arg, image_size)
        self.shards = WdsShards(arg)

    def load(self, split: str) -> ImageSet:
        return self.shards.load(split)

    def info(self, source: Source) -> dict:
        return {"class_names": self.shards.class_names, "image_shape": self.shards.image_shape}

    def stream(self, source: Source, split: str, rank: int, world: int) -> Iterator[tuple[torch.Tensor, int]]:
        yield from self.shards.iterate(split, rank, world)


def parse_grouped(arg: str) -> tuple[dict[str, list], str]:
    """``(groups, base data spec)`` of a ``grouped:`` spec's argument, a YAML flow mapping
    ``{groups: {GROUP: [fine class name or index, ...], ...}, data: SPEC}`` (``data`` may be left out where a recipe
    fills it in from its chain)."""
    import yaml

    try:
        d = yaml.safe_load(arg) if arg.strip() else None
    except yaml.YAMLError as e:
        raise DistillError(f"grouped:{arg[:60]} is not a YAML mapping ({str(e).splitlines()[0]}); write "
                           "grouped:{groups: {GROUP: [class, ...], ...}, data: SPEC}.") from None
    if not isinstance(d, dict) or not isinstance(d.get("groups"), dict) or set(d) - {"groups", "data"}:
        raise DistillError(f"grouped:{arg[:60]} must be a mapping with keys groups (GROUP: [class, ...]) and data "
                           "(the fine-labelled source), e.g. grouped:{groups: {vehicles: [airplane, ship], animals: "
                           "[cat, dog]}, data: npz:PATH}.")
    groups = {str(k): v if isinstance(v, list) else [v] for k, v in d["groups"].items()}
    return groups, str(d.get("data") or "")


def grouped_spec(groups: dict[str, list], data: str) -> str:
    """The ``grouped:`` spec of ``groups`` over the source ``data`` (the inverse of :func:`parse_grouped`)."""
    import json

    # JSON is a YAML flow mapping: one line, quotes wherever a name or a path needs them
    return "grouped:" + json.dumps({"groups": groups, "data": data}, separators=(", ", ": "))


def group_index(groups: dict[str, list], class_names: list[str], where: str = "the grouping") -> list[int]:
    """The coarse group of each fine class (by index), checked: every fine class in exactly one group, every entry a
    class name or index of ``class_names``, no group empty."""
    if not groups:
        raise DistillError(f"{where} has no groups; map each coarse group to its fine classes, e.g. "
                           "{vehicles: [airplane, ship], animals: [cat, dog]}.")
    owner: dict[int, str] = {}
    for g, members in groups.items():
        if not members:
            raise DistillError(f"{where}: group '{g}' is empty; give it at least one fine class or remove it.")
        for m in members:
            if isinstance(m, int) and not isinstance(m, bool) and 0 <= m < len(class_names):
                c = m
            elif str(m) in class_names:
                c = class_names.index(str(m))
            else:
                raise unknown_name(f"fine class (in group '{g}' of {where})", str(m), class_names)
            if c in owner:
                raise DistillError(f"{where}: fine class '{class_names[c]}' is in groups '{owner[c]}' and '{g}'; "
                                   "each fine class belongs to exactly one group.")
            owner[c] = g
    missing = [class_names[c] for c in range(len(class_names)) if c not in owner]
    if missing:
        raise DistillError(f"{where} leaves fine class '{missing[0]}' without a coarse group ({len(missing)} "
                           f"unassigned: {', '.join(missing[:4])}); add each fine class to one group.")
    names = list(groups)
    return [names.index(owner[c]) for c in range(len(class_names))]


@SOURCES.register("grouped", description="grouped:{groups: {GROUP: [class, ...]}, data: SPEC}, another source's "
                  "classes merged into coarse groups (labels are group indices, in the mapping's order)")
class GroupedSource(SourceKind):
    resizes = True  # the base source resizes

    def __init__(self, arg: str, image_size: int | None):
        super().__init__(arg, image_size)
        self.groups, data = parse_grouped(arg)
        if not data:
            raise DistillError(f"grouped:{arg[:60]} names no data; add data: SPEC (the fine-labelled source).")
        if data.startswith("grouped:"):
            raise DistillError("a grouped: source cannot group another grouped: source; group the fine source once.")
        self.base = Source(data, image_size)
        self.shards = self.base.shards
        self.is_stream = self.base.is_stream
        self._index: torch.Tensor | None = None

    def index(self) -> torch.Tensor:
        """Fine class index -> group index (checked once against the base source's class names)."""
        if self._index is None:
            names = list(self.base.info()["class_names"])
            self._index = torch.tensor(group_index(self.groups, names, f"grouped source over {self.base.spec}"))
        return self._index

    def load(self, split: str) -> ImageSet:
        s = self.base.load(split)
        return ImageSet(s.images, self.index()[s.labels], list(self.groups))

    def info(self, source: Source) -> dict:
        self.index()  # a grouping that does not fit the base source fails here, before any work
        return {**self.base.info(), "class_names": list(self.groups)}

    def stream(self, source: Source, split: str, rank: int, world: int) -> Iterator[tuple[torch.Tensor, int]]:
        index = self.index()
        for x, y in self.base.stream(split, rank, world):
            yield x, int(index[y])


class Source:
    """A named data source. ``load(split)`` gives an in-memory :class:`ImageSet`; ``stream`` iterates lazily.

    The spec's kind (``npz`` in ``npz:PATH``) is looked up in :data:`SOURCES`; a third-party kind joins through the
    ``distillset.sources`` entry-point group (a :class:`SourceKind` subclass).
    """

    def __init__(self, spec: str, image_size: int | None = None):
        self.spec = spec
        if image_size is not None and image_size < 1:
            raise DistillError(f"image_size must be >= 1 (or 0 = keep the source's size), got {image_size}.")
        self.image_size = image_size
        kind, _, arg = spec.partition(":")
        if kind not in SOURCES:
            raise DistillError(f"unknown data source '{spec}'; use digits, npz:PATH, folder:PATH, hf:PATH|NAME, "
                               "wds:PATTERN, torchvision:NAME or grouped:{groups: ..., data: SPEC}.")
        impl_cls = SOURCES.get(kind)
        if impl_cls.needs_arg and not arg:
            raise DistillError(f"data source '{spec}' needs a path after '{kind}:'.")
        self.kind, self.arg = kind, arg
        self._cache: dict[str, ImageSet] = {}
        self.impl: SourceKind = impl_cls(arg, image_size)
        self.shards = self.impl.shards

    @property
    def is_stream(self) -> bool:
        return self.impl.is_stream

    def load(self, split: str = "train") -> ImageSet:
        if split not in ("train", "test"):
            raise DistillError(f"unknown split '{split}'; use train or test.")
        if split not in self._cache:
            s = self.impl.load(split)
            if len(s) == 0:
                raise DistillError(f"source '{self.spec}' has no {split} images.")
            if self.image_size and s.images.shape[-1] != self.image_size and not self.impl.resizes:
                s = ImageSet(resize_uint8(s.images, self.image_size), s.labels, s.class_names)
            self._check_splits_agree(split, s)
            self._cache[split] = s
        return self._cache[split]

    def _check_splits_agree(self, split: str, s: ImageSet) -> None:
        """Train and test of one source must have the same channels (one model sees both)."""
        other = next((o for k, o in self._cache.items() if k != split), None)
        if other is None:
            return
        if other.image_shape[0] != s.image_shape[0]:
            raise DistillError(f"source '{self.spec}': {split} images have {s.image_shape[0]} channels but the other "
                               f"split's have {other.image_shape[0]}; convert both splits to the same channels "
                               "(grayscale or RGB).")

    def info(self) -> dict:
        """Class names and image shape without loading a stream source."""
        return self.impl.info(self)

    def stream(self, split: str = "train", rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, int]]:
        """Each sample once across all ranks and dataloader workers (an exact partition)."""
        yield from self.impl.stream(self, split, rank, world)


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 batch to ``size`` x ``size`` (antialiased bilinear)."""
    x = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                                        align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


# -------------------------------------------------------------------------------------------------- webdataset shards


def assign_readers(num_shards: int, reader: int, readers: int) -> tuple[list[int], int, int]:
    """Which shards a reader opens and which of their samples it keeps: ``(shards, stride, offset)``.

    With at least as many shards as readers (ranks x workers), reader ``r`` takes shards ``r, r + R, ...`` whole.
    With fewer, each shard is shared by the readers ``r`` with ``r % S == s`` and each keeps every ``m``-th sample,
    so every sample is read exactly once and no reader is left empty-handed with an error (a pure function, tested).
    """
    if num_shards <= 0:
        raise DistillError("no shards to read; check the shard pattern.")
    if num_shards >= readers:
        return list(range(reader, num_shards, readers)), 1, 0
    shard = reader % num_shards
    sharing = len(range(shard, readers, num_shards))
    return [shard], sharing, reader // num_shards


def expand_pattern(pattern: str) -> list[str]:
    import braceexpand

    return [u for part in pattern.split("::") for u in braceexpand.braceexpand(part)]


def member_key(name: str) -> tuple[str, str]:
    """``(sample key, extension)`` of a tar member: the key is the path up to the first dot of the file name (the
    webdataset rule), so ``a/b.c.png`` is key ``a/b``, extension ``c.png``. Every reader uses this one rule."""
    base = os.path.basename(name)
    key, _, ext = base.partition(".")
    return os.path.join(os.path.dirname(name), key), ext


def member_name(key: str, ext: str) -> str:
    """The tar member name of ``key``'s ``ext`` file; keys must not contain dots (they would change the key)."""
    if "." in os.path.basename(key):
        raise ValueError(f"webdataset keys must not contain dots: {key}")
    return f"{key}.{ext}"


def read_tar_samples(url: str, advice: str = "re-create it with `distillset shards`") -> Iterator[dict]:
    """Group a tar's members into samples by key (name up to the first dot), reporting corrupt shards clearly.

    ``advice`` says how to repair a damaged shard (a source's shards are re-made with ``distillset shards``, a
    distilled set's by re-running recover).
    """
    current: dict | None = None
    last_key = "(start)"
    try:
        with tarfile.open(url, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = member_key(member.name)
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise EOFError(f"member {member.name} has {len(data)} of {member.size} bytes")
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": url}
                    last_key = key
                current[ext.lower()] = data
            # a tar cut at a member boundary reads "cleanly": require the end-of-archive blocks
            if os.path.getsize(url) < tar.offset + 1024:
                raise EOFError("end-of-archive marker missing")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DistillError(f"shard {url} is corrupt or truncated after sample '{last_key}' ({e}); {advice}.") \
            from None
    if current is not None:
        yield current


def decode_sample(sample: dict, num_classes: int) -> tuple[torch.Tensor, int]:
    from PIL import Image

    where = f"shard {sample['__url__']} sample '{sample['__key__']}'"
    img_ext = next((e for e in IMAGE_EXTS if e in sample), None)
    lab_ext = next((e for e in LABEL_EXTS if e in sample), None)
    if img_ext is None or lab_ext is None:
        missing = "an image (.png/.jpg)" if img_ext is None else "a label (.cls)"
        raise DistillError(f"{where} has no {missing} (keys: {sorted(k for k in sample if not k.startswith('__'))});"
                           " every sample needs KEY.png and KEY.cls.")
    try:
        label = int(sample[lab_ext].decode().strip())
    except ValueError:
        raise DistillError(f"{where}: label {sample[lab_ext][:20]!r} is not an integer.") from None
    if not 0 <= label < num_classes:
        raise DistillError(f"{where}: label {label} is out of range for {num_classes} classes.")
    try:
        with Image.open(io.BytesIO(sample[img_ext])) as img:
            arr = _pil_to_uint8(img, None, None)
    except Exception as e:
        raise DistillError(f"{where}: image cannot be decoded ({e}).") from None
    return torch.from_numpy(arr.copy()), label


class WdsShards:
    """Shards described by an ``_info.json`` (timm's format, plus ``class_names`` and ``image_shape``)."""

    def __init__(self, arg: str):
        from distillset.core.io import read_json

        path = Path(arg)
        folder = path if path.is_dir() else path.parent
        if not folder.is_dir() or (not path.is_dir() and not any(c in path.name for c in "{*?[")
                                   and not path.exists()):
            raise DistillError(f"wds:{arg} does not exist; give a folder of shards with an _info.json (written by "
                               "`distillset shards`) or a pattern such as wds:FOLDER/train-{000000..000009}.tar.")
        info_path = folder / "_info.json"
        if not info_path.exists():
            raise DistillError(f"{folder} has no _info.json; write shards with `distillset shards` (or add an "
                               "_info.json with splits, class_names and image_shape).")
        self.folder = folder
        self.info = read_json(info_path)
        self.pattern = None if path.is_dir() else path.name
        self.class_names = list(self.info.get("class_names") or [])
        if not self.class_names:
            raise DistillError(f"{info_path} has no class_names; re-create the shards with `distillset shards`.")
        self.image_shape = tuple(self.info.get("image_shape") or ())

    def urls(self, split: str) -> list[str]:
        splits = self.info.get("splits", {})
        if split not in splits and split == "test" and "validation" in splits:
            split = "validation"
        if self.pattern is not None and split == "train":
            names = expand_pattern(self.pattern)
        elif split in splits:
            files = splits[split]["filenames"]  # timm's format: a list of file names (a brace pattern also works)
            names = expand_pattern(files) if isinstance(files, str) else list(files)
        else:
            raise DistillError(f"shards in {self.folder} have no '{split}' split (have {sorted(splits)}).")
        from distillset.core.io import inside

        urls = [str(inside(self.folder, u, f"_info.json split '{split}' file name")) for u in names]
        missing = [u for u in urls if not os.path.exists(u)]
        if missing:
            raise DistillError(f"shard {missing[0]} is missing ({len(missing)} of {len(urls)}); check the pattern.")
        return urls

    def num_samples(self, split: str) -> int | None:
        return self.info.get("splits", {}).get(split, {}).get("num_samples")

    def iterate(self, split: str, rank: int, world: int) -> Iterator[tuple[torch.Tensor, int]]:
        urls = self.urls(split)
        reader, readers = _reader(rank, world)
        shards, stride, offset = assign_readers(len(urls), reader, readers)
        n = len(self.class_names)
        for s in shards:
            for i, sample in enumerate(read_tar_samples(urls[s])):
                if i % stride == offset:
                    yield decode_sample(sample, n)

    def load(self, split: str) -> ImageSet:
        xs, ys = [], []
        for x, y in self.iterate(split, 0, 1):
            xs.append(x.numpy())
            ys.append(y)
        if not xs:
            raise DistillError(f"shards in {self.folder} hold no '{split}' samples.")
        return ImageSet(torch.from_numpy(_stack(xs, str(self.folder))), torch.tensor(ys), self.class_names)


class ChannelMoments:
    """Running per-channel sums of uint8 images in ``[0, 1]`` units (float64): their mean and unbiased std, from
    batches of any size (the whole split in memory, or a stream one image at a time)."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.sq: torch.Tensor | None = None
        self.pixels = 0  # per channel

    def add(self, images: torch.Tensor) -> None:
        """Add uint8 images ``(N, C, H, W)``."""
        x = images.to("cpu", torch.float64).div_(255)
        total, sq = x.sum(dim=(0, 2, 3)), x.square().sum(dim=(0, 2, 3))
        self.total = total if self.total is None else self.total + total
        self.sq = sq if self.sq is None else self.sq + sq
        self.pixels += x.shape[0] * x.shape[2] * x.shape[3]

    def result(self) -> tuple[list[float], list[float]]:
        """``(mean, std)`` per channel; the std is floored at 1e-3 (a constant channel must not divide by 0)."""
        n = self.pixels
        mean = self.total / n
        var = (self.sq - n * mean.square()) / max(1, n - 1)
        return mean.tolist(), var.clamp_min(0).sqrt().clamp_min(1e-3).tolist()


def encode_png(image: torch.Tensor) -> bytes:
    """Lossless PNG bytes of a uint8 ``(C, H, W)`` image."""
    from PIL import Image

    a = image.numpy()
    img = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_tar(path: str | os.PathLike, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write ``(key, {extension: bytes})`` samples as one webdataset tar, atomically, with fixed member metadata (so
    re-runs are byte-identical)."""
    from distillset.core.io import atomic_path

    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                ti = tarfile.TarInfo(member_name(key, ext))
                ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
                tar.addfile(ti, io.BytesIO(data))


def write_shard(path: str | os.PathLike, samples: list[tuple[str, torch.Tensor, int, dict | None]]) -> None:
    """Write ``(key, uint8 image, label, extra json)`` samples as one tar shard, atomically (PNG, lossless)."""
    import json

    rows = []
    for key, image, label, extra in samples:
        files = {"png": encode_png(image), "cls": str(int(label)).encode()}
        if extra is not None:
            files["json"] = json.dumps(extra, sort_keys=True).encode()
        rows.append((key, files))
    write_tar(path, rows)
