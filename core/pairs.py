"""Image-caption pairs: the caption-aware data sources of vision-language distillation.

A :class:`PairSet` holds uint8 images ``(N, C, H, W)`` and, for each image, its reference captions (Flickr gives
five). Specs (the same URI style as :mod:`core.data`):

    ``npz:PATH``        ``x_train, x_test`` uint8 NHWC and ``captions_train, captions_test`` string arrays ``(N, K)``
                        (or ``(N,)``: one caption each), e.g. ``../shared/data/flickr8k_64.npz``.
    ``wds:PATH``        webdataset shards: a folder of ``train-*.tar`` / ``test-*.tar`` (or one brace pattern, train
                        only) whose samples are ``KEY.png|jpg`` + ``KEY.txt`` (one caption per line).
    ``folder:PATH``     ``PATH/train`` and ``PATH/test`` (or ``PATH`` itself, train only) holding ``NAME.png|jpg``
                        with ``NAME.txt`` beside each image (one caption per line).

Every image must have at least one non-empty caption; a missing or empty one is a one-line :class:`DistillError`
that names the image, so no pair is silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distillset.core.data import (
    IMAGE_EXTS,
    _npz_images,
    _pil_to_uint8,
    _stack,
    expand_pattern,
    read_image_file,
    read_tar_samples,
    resize_uint8,
)
from distillset.core.errors import DistillError

PAIR_KINDS = ("npz", "wds", "folder")


@dataclass
class PairSet:
    """A split of image-caption pairs: ``images`` uint8 ``(N, C, H, W)``, ``captions[i]`` the captions of image i."""

    images: torch.Tensor
    captions: list[list[str]]
    names: list[str]

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DistillError(f"images must be uint8 (N, C, H, W), got {tuple(self.images.shape)} {self.images.dtype}.")
        if len(self.captions) != self.images.shape[0]:
            raise DistillError(f"{self.images.shape[0]} images but {len(self.captions)} caption lists; every image "
                               "needs its captions (captions_* must have one row per x_* row).")
        for i, caps in enumerate(self.captions):
            if not caps:
                raise DistillError(f"image {i} ({self.names[i]}) has no caption; give every image at least one.")
            empty = [k for k, c in enumerate(caps) if not c.strip()]
            if empty:
                raise DistillError(f"caption {empty[0]} of image {i} ({self.names[i]}) is empty; write a caption or "
                                   "remove that image.")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: torch.Tensor | list[int]) -> PairSet:
        idx = [int(i) for i in index]
        return PairSet(self.images[idx], [self.captions[i] for i in idx], [self.names[i] for i in idx])

    def flat(self) -> tuple[list[str], torch.Tensor]:
        """All captions in one list and the image index of each (the retrieval ground truth)."""
        texts = [c for caps in self.captions for c in caps]
        owner = torch.tensor([i for i, caps in enumerate(self.captions) for _ in caps], dtype=torch.long)
        return texts, owner


def _npz_pairs(path: Path, split: str) -> PairSet:
    if not path.exists():
        raise DistillError(f"npz file {path} does not exist; check the path (see ../shared/data/README.md).")
    try:
        z = np.load(path, allow_pickle=False)
        x = z[f"x_{split}"]
        if f"captions_{split}" not in z.files:
            raise DistillError(f"{path} has no captions_{split}; an image-caption npz needs x_{split} and "
                               f"captions_{split} (N, K) strings (this file holds {sorted(z.files)}).")
        caps = z[f"captions_{split}"]
        names = [str(s) for s in z[f"files_{split}"]] if f"files_{split}" in z.files else None
    except DistillError:
        raise
    except KeyError as e:
        raise DistillError(f"{path} has no key {e}; an image-caption npz needs x_train, x_test, captions_train, "
                           "captions_test.") from None
    except Exception as e:  # noqa: BLE001
        raise DistillError(f"{path} is not a readable .npz file ({e}); re-create or re-download it.") from None
    if caps.dtype.kind not in "US":
        raise DistillError(f"{path}: captions_{split} must hold strings, got dtype {caps.dtype}.")
    caps = caps[:, None] if caps.ndim == 1 else caps
    if caps.ndim != 2 or caps.shape[0] != x.shape[0]:
        raise DistillError(f"{path}: captions_{split} has shape {caps.shape} but x_{split} has {x.shape[0]} images; "
                           "give one row of captions per image.")
    images = torch.from_numpy(_npz_images(path, f"x_{split}", x))
    names = names or [f"{split}_{i:06d}" for i in range(len(images))]
    return PairSet(images, [[str(c) for c in row] for row in caps], names)


def _caption_lines(data: bytes | str, where: str) -> list[str]:
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    lines = [ln.strip() for ln in text.strip("\n").splitlines()]
    if not any(lines):
        raise DistillError(f"{where} holds no caption; write one caption per line.")
    if "" in lines:
        raise DistillError(f"{where} has an empty caption line; remove it or write the caption.")
    return lines


def _folder_pairs(root: Path, split: str, image_size: int | None) -> PairSet:
    if not root.is_dir():
        raise DistillError(f"folder {root} does not exist; give a folder of NAME.png + NAME.txt pairs.")
    base = root / split if (root / split).is_dir() else (root if split == "train" else None)
    if base is None:
        raise DistillError(f"{root} has no {split}/ folder; add one or evaluate on another source.")
    files = sorted(f for f in base.iterdir() if f.suffix.lower().lstrip(".") in IMAGE_EXTS)
    if not files:
        raise DistillError(f"{base} holds no images; expected NAME.png with NAME.txt beside it.")
    images, captions = [], []
    for f in files:
        txt = f.with_suffix(".txt")
        if not txt.exists():
            raise DistillError(f"image {f} has no caption file {txt.name}; write its captions there (one per line).")
        captions.append(_caption_lines(txt.read_text(encoding="utf-8"), str(txt)))
        images.append(read_image_file(f, image_size))
    return PairSet(torch.from_numpy(_stack(images, str(base))), captions, [f.stem for f in files])


def _wds_pairs(arg: str, split: str) -> PairSet:
    import io

    from PIL import Image

    path = Path(arg)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob(f"{split}-*.tar"))
    elif split == "train":
        urls = expand_pattern(arg)
    else:
        urls = []
    if not urls:
        raise DistillError(f"wds:{arg} has no {split} shards ({split}-*.tar); write them or use another source.")
    images, captions, names = [], [], []
    for url in urls:
        for s in read_tar_samples(url, advice="re-write the shard"):
            where = f"shard {url} sample '{s['__key__']}'"
            ext = next((e for e in IMAGE_EXTS if e in s), None)
            if ext is None:
                raise DistillError(f"{where} has no image (.png/.jpg); every sample needs KEY.png and KEY.txt.")
            if "txt" not in s:
                raise DistillError(f"{where} has no caption (KEY.txt); every sample needs KEY.png and KEY.txt.")
            captions.append(_caption_lines(s["txt"], where))
            with Image.open(io.BytesIO(s[ext])) as img:
                images.append(_pil_to_uint8(img, None, None))
            names.append(s["__key__"])
    return PairSet(torch.from_numpy(_stack(images, f"wds:{arg}")), captions, names)


def load_pairs(spec: str, split: str = "train", image_size: int = 0) -> PairSet:
    """The ``split`` of the caption-aware source ``spec``, resized to ``image_size`` (0: keep)."""
    if split not in ("train", "test"):
        raise DistillError(f"unknown split '{split}'; use train or test.")
    kind, _, arg = spec.partition(":")
    if kind not in PAIR_KINDS or not arg:
        raise DistillError(f"'{spec}' is not an image-caption source; use npz:PATH (with captions_*), wds:PATH "
                           "(KEY.png + KEY.txt shards) or folder:PATH (NAME.png + NAME.txt).")
    if kind == "npz":
        s = _npz_pairs(Path(arg), split)
    elif kind == "folder":
        s = _folder_pairs(Path(arg), split, image_size or None)
    else:
        s = _wds_pairs(arg, split)
    if len(s) == 0:
        raise DistillError(f"source '{spec}' has no {split} pairs.")
    if image_size and s.images.shape[-1] != image_size:
        s = PairSet(resize_uint8(s.images, image_size), s.captions, s.names)
    return s
