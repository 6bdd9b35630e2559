"""Real training images indexed by class, for objectives that compare with real data and for init from real."""

from __future__ import annotations

import logging

import torch

from distillset.core.data import ImageSet
from distillset.core.partition import init_order

log = logging.getLogger("distillset.recover")


class RealData:
    """Real images (uint8 on CPU, or on ``device`` when small) with per-class index lists.

    ``sample`` returns ``[0, 1]`` float images on ``device``; randomness comes from the caller's generator.
    """

    def __init__(self, images: ImageSet, device: torch.device | str = "cpu", keep_on_device_bytes: int = 1 << 30):
        self.set = images
        self.device = torch.device(device)
        on_device = images.images.numel() <= keep_on_device_bytes
        self.images = images.images.to(self.device) if on_device else images.images
        self.labels = images.labels
        self.num_classes = images.num_classes
        self.index = [torch.nonzero(images.labels == c).flatten() for c in range(self.num_classes)]
        self._orders: dict[tuple[int, int], torch.Tensor] = {}
        self._own = False

    def make_writable(self) -> None:
        """Give this object its own copy of the images before anything writes into them (DOORPING re-stamps its
        poisoned images): they may be the very tensor a data source caches."""
        if not self._own:
            self.images = self.images.clone()
            self._own = True

    def init_choice(self, c: int, i: int, seed: int) -> torch.Tensor:
        """The real image that synthetic image ``i`` of class ``c`` starts from (init from real), as a ``(1,)`` index.

        A seeded permutation of the class, so images ``0..ipc-1`` of a class are distinct real images (repeats only
        when ``ipc`` exceeds the class size), and a pure function of ``(seed, class, index)`` whatever the unit
        layout. The ``random`` baseline picks exactly these images, so "distilled vs random" measures what the
        optimisation added to its own starting point.
        """
        key = (int(seed), int(c))
        if key not in self._orders:
            self._orders[key] = init_order(self.index[c], c, seed)
        order = self._orders[key]
        return order[int(i) % order.numel()].view(1)

    def count(self, c: int) -> int:
        return int(self.index[c].numel())

    def to_float(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return images_uint8.to(self.device, non_blocking=True).float().div_(255.0)

    def indices(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` random indices of class ``c`` (without replacement when possible)."""
        idx = self.index[c]
        if n <= idx.numel():
            return idx[torch.randperm(idx.numel(), generator=generator)[:n]]
        return idx[torch.randint(idx.numel(), (n,), generator=generator)]

    def sample(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` random real images of class ``c`` as ``[0, 1]`` floats on ``device``."""
        return self.get(self.indices(c, n, generator))

    def get(self, index: torch.Tensor) -> torch.Tensor:
        return self.to_float(self.images[index.to(self.images.device)])

    def uint8(self, index: torch.Tensor) -> torch.Tensor:
        """The uint8 images at ``index``, on the CPU."""
        return self.images[index.to(self.images.device)].cpu()

    def of_class(self, c: int) -> torch.Tensor:
        return self.get(self.index[c])

    def prefetch(self, classes) -> None:
        """A hint that ``classes`` are read next (a unit's); in memory already, so nothing to do."""


class _ClassPositions:
    """``index[c]``: the global positions of class ``c``, looked up in the class index when first asked for."""

    def __init__(self, lookup):
        self._lookup, self._cache = lookup, {}

    def __getitem__(self, c: int) -> torch.Tensor:
        c = int(c)
        if c not in self._cache:
            self._cache[c] = self._lookup(c)
        return self._cache[c]


class StreamedRealData(RealData):
    """Real images read class by class from indexed webdataset shards (:class:`~distillset.core.classindex.ClassIndex`).

    The same interface and the same positions as :class:`RealData` over the whole split loaded in shard order, so a
    run picks the same images either way; only the classes asked for are decoded, and at most ``cached_classes`` of
    them are held (least recently used first out), so memory follows the classes of a unit, not the dataset.
    A caller that needs the whole split at once (``images``, e.g. an Acc-DD pool trained on all the data) gets it
    loaded then, with a warning that memory is no longer bounded.
    """

    def __init__(self, index, num_classes: int, image_size: int | None, device: torch.device | str = "cpu",
                 cached_classes: int = 16):
        self.index_file = index
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.image_size = image_size
        self.index = _ClassPositions(index.positions)
        self._orders: dict[tuple[int, int], torch.Tensor] = {}
        self._classes: dict[int, torch.Tensor] = {}  # class -> its uint8 images, rows in index[c] order
        self._max = max(1, cached_classes)
        self._all: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._own = False
        self.reads = 0  # images decoded (a test checks that only the asked classes are read)

    def _decode(self, positions: torch.Tensor) -> torch.Tensor:
        x = self.index_file.read(positions)
        self.reads += len(positions)
        if self.image_size and x.shape[-1] != self.image_size:
            from distillset.core.data import resize_uint8

            x = resize_uint8(x, self.image_size)
        return x

    def class_images(self, c: int) -> torch.Tensor:
        """Class ``c``'s uint8 images, decoded once while the class is among the recently used ones."""
        c = int(c)
        if c in self._classes:
            self._classes[c] = self._classes.pop(c)  # most recently used last
        else:
            self._hold({c: self._decode(self.index[c])})
        return self._classes[c]

    def _hold(self, decoded: dict[int, torch.Tensor]) -> None:
        """Keep newly decoded classes, dropping the least recently used beyond ``cached_classes``."""
        self._classes.update(decoded)
        while len(self._classes) > self._max:
            self._classes.pop(next(iter(self._classes)))

    def prefetch(self, classes) -> None:
        """Decode the classes of a unit in one pass over the shards (each shard opened once, not once per class)."""
        todo = [int(c) for c in classes if int(c) not in self._classes][: self._max]
        if len(todo) < 2:
            return
        parts = [self.index[c] for c in todo]
        block = self._decode(torch.cat(parts))
        self._hold(dict(zip(todo, torch.split(block, [len(p) for p in parts]))))

    @property
    def labels(self) -> torch.Tensor:
        if self._labels is None:
            self._labels = torch.from_numpy(self.index_file.labels.astype("int64"))
        return self._labels

    @property
    def images(self) -> torch.Tensor:
        if self._all is None:
            log.warning("this run reads the whole training split at once (%d images): per-class streaming no longer "
                        "bounds its memory", len(self.index_file))
            self._all = self._decode(torch.arange(len(self.index_file)))
        return self._all

    @images.setter
    def images(self, value: torch.Tensor) -> None:  # make_writable's copy
        self._all = value

    def get(self, index: torch.Tensor) -> torch.Tensor:
        return self.to_float(self.uint8(index))

    def uint8(self, index: torch.Tensor) -> torch.Tensor:
        index = index.cpu()
        if self._all is not None:
            return self._all[index]
        labels = torch.from_numpy(self.index_file.labels[index.numpy()].astype("int64"))
        out = None
        for c in labels.unique().tolist():
            rows = torch.nonzero(labels == c).flatten()
            where = torch.searchsorted(self.index[c], index[rows])  # index[c] is ascending
            block = self.class_images(c)[where]
            if out is None:
                out = torch.empty((len(index), *block.shape[1:]), dtype=block.dtype)
            out[rows] = block
        return out
