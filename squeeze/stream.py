"""Training a backbone on a streamed (webdataset) source: bounded memory, equal steps on every rank.

Each rank reads an endless, reseeded stream of its own shards (``assign_readers``), shuffled through a bounded
buffer, and cut into batches that dataloader workers decode in turn (so the result does not depend on ``workers``);
every rank takes exactly ``num_samples // (batch x world)`` batches per epoch, so uneven
shard sizes never leave one rank waiting in a collective. The loader is not passed to ``accelerator.prepare``: it
already splits by rank, and preparing it would drop samples (REFERENCE.md, pitfall 3).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import torch

from distillset.core.data import Source, assign_readers, decode_sample, read_tar_samples
from distillset.core.errors import DistillError
from distillset.core.runtime import Runtime


class ShardStream(torch.utils.data.IterableDataset):
    """Endless shuffled batches of this rank's shards, the same whatever the number of dataloader workers.

    The rank's sample order is a pure function of (seed, epoch, rank, world): its shards (``assign_readers`` over
    ranks only) in a seeded order, through a seeded shuffle buffer of undecoded samples. Batch ``b`` is that order's
    samples ``[b * batch, (b + 1) * batch)``. With ``W`` workers, worker ``w`` walks the same order and decodes only
    the batches ``b % W == w``; the DataLoader asks its workers in turn, so batches come back as ``0, 1, 2, ...``.
    The price is that every worker reads (not decodes) all of the rank's shards; decoding is what the workers share.
    Without ``batch_size`` single ``(image, label)`` samples are yielded, dealt to workers the same way.
    """

    def __init__(self, urls: list[str], num_classes: int, rank: int, world: int, seed: int, epoch: int,
                 batch_size: int | None = None, buffer: int = 2000):
        self.urls, self.num_classes, self.rank, self.world = urls, num_classes, rank, world
        self.seed, self.epoch, self.batch_size, self.buffer = seed, epoch, batch_size, buffer

    def samples(self) -> Iterator[dict]:
        """The rank's endless stream of undecoded samples (independent of dataloader workers)."""
        shards, stride, offset = assign_readers(len(self.urls), self.rank, self.world)
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}")
        buf: list = []
        while True:
            order = shards[:]
            rng.shuffle(order)
            for s in order:
                for i, sample in enumerate(read_tar_samples(self.urls[s])):
                    if i % stride != offset:
                        continue
                    if len(buf) < self.buffer:
                        buf.append(sample)
                        continue
                    k = rng.randrange(len(buf))
                    buf[k], sample = sample, buf[k]
                    yield sample

    def __iter__(self):
        wi = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if wi is None else (wi.id, wi.num_workers)
        size = self.batch_size or 1
        batch: list = []
        for pos, sample in enumerate(self.samples()):
            mine = (pos // size) % workers == worker
            batch.append(decode_sample(sample, self.num_classes) if mine else None)
            if len(batch) == size:
                if mine:
                    yield (torch.stack([x for x, _ in batch]), torch.tensor([y for _, y in batch])) \
                        if self.batch_size else batch[0]
                batch = []


def _stats(source: Source, limit: int = 4096) -> tuple[list[float], list[float]]:
    """Channel mean/std from the first ``limit`` training samples (identical on every rank)."""
    xs = []
    for x, _ in source.stream("train", 0, 1):
        xs.append(x)
        if len(xs) >= limit:
            break
    from distillset.squeeze.data import channel_stats

    return channel_stats(torch.stack(xs))


def stream_setup(cfg, rt: Runtime, source: Source):
    from distillset.squeeze.data import TrainData

    shards = source.shards
    urls = shards.urls("train")
    n = shards.num_samples("train") or cfg.steps_per_epoch * cfg.batch_size * rt.world
    if not n:
        raise DistillError("the shards' _info.json gives no num_samples for train; pass --steps-per-epoch N.")
    if cfg.max_train:
        n = min(n, cfg.max_train)
    steps = cfg.steps_per_epoch or max(1, n // (cfg.batch_size * rt.world))
    mean, std = _stats(source)
    info = source.info()

    def batches(epoch: int, g: torch.Generator):
        ds = ShardStream(urls, len(info["class_names"]), rt.rank, rt.world, cfg.seed, epoch, cfg.batch_size)
        # batch_size=None: the stream assembles batches itself, so their content does not depend on the workers
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=cfg.workers)
        it = iter(loader)
        for _ in range(steps):
            x, y = next(it)
            yield x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)

    def evaluate(model) -> float:
        from distillset.squeeze.data import batch_accuracy

        def batches():  # each test sample exactly once across ranks
            items = source.stream("test", rt.rank, rt.world)
            while chunk := list(itertools.islice(items, 512)):
                yield torch.stack([x for x, _ in chunk]), torch.tensor([y for _, y in chunk])

        return batch_accuracy(model, batches(), mean, std, rt.device, rt)

    return TrainData(list(info["class_names"]), tuple(info["image_shape"]), mean, std, n, steps, batches, evaluate)
