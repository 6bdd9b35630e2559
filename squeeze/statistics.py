"""``distillset squeeze stats``: real-data feature statistics of a teacher, streamed once, for G-VBSM.

For every convolution layer of the teacher this records, over the real training images:

* ``conv/<layer>/mean``, ``conv/<layer>/var`` (C,): channel mean/variance of the layer's output over images and
  positions (G-VBSM's "convolution statistics");
* ``patch/<layer>/mean``, ``patch/<layer>/var`` (P*P, C): the same in each cell of a P x P grid over the feature map
  (G-VBSM's "patch statistics"; layers whose size is not a multiple of P are skipped);
* optionally ``class/<layer>/mean``, ``class/<layer>/var`` (K, C) and ``class/<layer>/count`` (K,): per class.

The source is streamed once (``Source.stream``: an exact partition across ranks and dataloader workers), so memory is
bounded by the batch size and the accumulators (counts, means and centred sums of squares per layer, merged with
Chan et al.'s parallel update in float64), never by the number of images. Each rank checkpoints its accumulators
atomically with the number of samples it has consumed and resumes from there; at the end the ranks' accumulators are
merged with ``all_reduce`` (Chan's merge written as two sums) and the main process writes
``TEACHER_DIR/stats.safetensors`` whose metadata names the teacher's sha256, so statistics are never used with
another model by mistake (:func:`load_statistics`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distillset.core.errors import DistillError

log = logging.getLogger("distillset.squeeze")

FORMAT = "distillset-stats/1"


# ------------------------------------------------------------------------------------------------------ accumulators


class Moments:
    """Grouped running count / mean / centred sum of squares (float64) of features of shape ``S``.

    ``n`` is ``(G,)`` (elements seen per group), ``mean`` and ``m2`` are ``(G, *S)``. Updates take per-sample summaries
    (the mean and centred sum of squares of ``k`` elements each), so a sample's spatial positions are folded before
    they reach the accumulator and memory does not depend on the data size.
    """

    def __init__(self, groups: int, shape: tuple[int, ...]):
        self.n = torch.zeros(groups, dtype=torch.float64)
        self.mean = torch.zeros(groups, *shape, dtype=torch.float64)
        self.m2 = torch.zeros(groups, *shape, dtype=torch.float64)

    def _expand(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *([1] * (self.mean.ndim - 1)))

    def merge_(self, n_b: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Chan et al.'s pairwise merge of another accumulator ``(n_b, mean_b, m2_b)`` into this one."""
        n = self.n + n_b
        safe = torch.where(n > 0, n, torch.ones_like(n))
        delta = mean_b - self.mean
        self.mean = self.mean + delta * self._expand(n_b / safe)
        self.m2 = self.m2 + m2_b + delta.square() * self._expand(self.n * n_b / safe)
        self.n = n

    def update(self, groups: torch.Tensor, k: int, means: torch.Tensor, m2s: torch.Tensor) -> None:
        """Add samples: ``groups`` (N,) group ids, each sample summarised by ``k`` elements' mean and centred M2."""
        g = self.n.shape[0]
        means, m2s = means.double(), m2s.double()
        cnt = torch.bincount(groups, minlength=g).double() * k
        safe = torch.where(cnt > 0, cnt, torch.ones_like(cnt))
        mean_b = torch.zeros_like(self.mean).index_add_(0, groups, means * k) / self._expand(safe)
        spread = (means - mean_b[groups]).square() * k
        m2_b = torch.zeros_like(self.m2).index_add_(0, groups, m2s + spread)
        self.merge_(cnt, mean_b, m2_b)

    def var(self) -> torch.Tensor:
        return self.m2 / self._expand(self.n.clamp_min(1))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"n": self.n, "mean": self.mean, "m2": self.m2}

    def load(self, t: dict[str, torch.Tensor]) -> None:
        self.n, self.mean, self.m2 = t["n"].double(), t["mean"].double(), t["m2"].double()

    def all_reduce_(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Merge this accumulator across processes: Chan's merge as two sums (``reduce_sum`` sums over ranks)."""
        n = reduce_sum(self.n.clone())
        safe = self._expand(torch.where(n > 0, n, torch.ones_like(n)))
        mean = reduce_sum(self.mean * self._expand(self.n)) / safe
        m2 = reduce_sum(self.m2 + (self.mean - mean).square() * self._expand(self.n))
        self.n, self.mean, self.m2 = n, mean, m2


def spatial_summary(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-sample channel mean and centred sum of squares over positions: (N, C), (N, C), positions."""
    y = y.double()
    m = y.mean(dim=(2, 3))
    m2 = (y - m[:, :, None, None]).square().sum(dim=(2, 3))
    return m, m2, y.shape[2] * y.shape[3]


def patch_cells(y: torch.Tensor, grid: int) -> torch.Tensor:
    """``(N, C, H, W)`` feature maps viewed as ``(N, C, P, H/P, P, W/P)``: the cells of G-VBSM's P x P patch grid
    (the one layout the statistics are recorded in and matched in)."""
    n, c, h, w = y.shape
    return y.reshape(n, c, grid, h // grid, grid, w // grid)


def patch_batch_moments(y: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel mean and (population) variance of every patch cell over a batch: ``(P*P, C)`` each, differentiable."""
    c = y.shape[1]
    var, mean = torch.var_mean(patch_cells(y, grid), dim=(0, 3, 5), unbiased=False)  # (C, P, P)
    return mean.reshape(c, grid * grid).t(), var.reshape(c, grid * grid).t()


def patch_summary(y: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-sample, per-cell channel mean and centred M2 on a ``grid`` x ``grid`` split: (N, P*P, C) twice, cell size."""
    n, c, h, w = y.shape
    y = patch_cells(y.double(), grid)
    m = y.mean(dim=(3, 5), keepdim=True)
    m2 = (y - m).square().sum(dim=(3, 5))
    cells = (h // grid) * (w // grid)
    return (m.reshape(n, c, grid * grid).transpose(1, 2), m2.reshape(n, c, grid * grid).transpose(1, 2), cells)


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


class FeatureStats:
    """Accumulates conv / patch / per-class statistics of a teacher's convolution outputs, batch by batch."""

    def __init__(self, teacher, patch_grid: int = 4, class_conditional: bool = False):
        self.teacher = teacher
        self.patch_grid = patch_grid
        self.class_conditional = class_conditional
        self.num_classes = teacher.config.num_classes
        self.layers = conv_layers(teacher.model)
        if not self.layers:
            raise DistillError(f"teacher {teacher.config.arch} has no convolution layer; G-VBSM statistics need one.")
        self.acc: dict[str, Moments] = {}
        self.samples = 0
        self._labels: torch.Tensor | None = None
        self._handles = []

    def _hook(self, name: str):
        def hook(module, inputs, output):
            y = output.detach().float()
            n = y.shape[0]
            m, m2, k = spatial_summary(y)
            c = m.shape[1]
            self._acc(f"conv/{name}", 1, (c,)).update(torch.zeros(n, dtype=torch.long), k, m, m2)
            if self.class_conditional:
                self._acc(f"class/{name}", self.num_classes, (c,)).update(self._labels, k, m, m2)
            g = self.patch_grid
            if g and y.shape[2] % g == 0 and y.shape[3] % g == 0:
                pm, pm2, pk = patch_summary(y, g)
                self._acc(f"patch/{name}", 1, (g * g, c)).update(torch.zeros(n, dtype=torch.long), pk, pm, pm2)

        return hook

    def _acc(self, key: str, groups: int, shape: tuple[int, ...]) -> Moments:
        if key not in self.acc:
            self.acc[key] = Moments(groups, shape)
        return self.acc[key]

    @torch.no_grad()
    def add(self, images: torch.Tensor, labels: torch.Tensor, amp: torch.dtype | None = None) -> None:
        """Add a batch of ``[0, 1]`` float images (N, C, H, W) with their labels."""
        self._labels = labels.long().cpu()
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.layers]
        try:
            with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
                self.teacher(images)
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []
        self.samples += int(images.shape[0])

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{key}/{part}": v for key, a in self.acc.items() for part, v in a.tensors().items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        keys = {k.rsplit("/", 1)[0] for k in tensors}
        for key in keys:
            m = Moments(1, ())
            m.load({p: tensors[f"{key}/{p}"] for p in ("n", "mean", "m2")})
            self.acc[key] = m

    def all_reduce_(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor], keys: list[str]) -> None:
        """Merge across processes; ``keys`` (the same on every rank) fixes the order of the collectives."""
        for key in keys:
            self.acc[key].all_reduce_(reduce_sum)

    def result(self) -> dict[str, torch.Tensor]:
        """Final float32 tensors: means and (population) variances, plus per-class counts."""
        out = {}
        for key, a in sorted(self.acc.items()):
            if key.startswith("class/"):
                out[f"{key}/mean"], out[f"{key}/var"] = a.mean.float(), a.var().float()
                out[f"{key}/count"] = a.n.float()
            else:
                out[f"{key}/mean"], out[f"{key}/var"] = a.mean[0].float(), a.var()[0].float()
        return out


def expected_keys(teacher, img_size: int, patch_grid: int, class_conditional: bool) -> list[str]:
    """Accumulator keys a run will create, found with one forward pass of a blank image (same on every rank)."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [m.register_forward_hook(lambda mod, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
               for name, m in conv_layers(teacher.model)]
    try:
        with torch.no_grad():
            p = next(teacher.parameters(), None)
            dev = p.device if p is not None else torch.device("cpu")
            teacher(torch.zeros(1, teacher.config.in_chans, img_size, img_size, device=dev))
    finally:
        for h in handles:
            h.remove()
    keys = []
    for name, s in shapes.items():
        keys.append(f"conv/{name}")
        if class_conditional:
            keys.append(f"class/{name}")
        if patch_grid and s[2] % patch_grid == 0 and s[3] % patch_grid == 0:
            keys.append(f"patch/{name}")
    return sorted(keys)


# ------------------------------------------------------------------------------------------------------------ config


@dataclass
class StatsConfig:
    """Stream real images once through a teacher and store its feature statistics (G-VBSM's conv/patch matching).

    Attributes:
        teacher: teacher spec (a `distillset squeeze` folder, local-dir:PATH, tv:ARCH=PATH, timm:ARCH=PATH).
        data: data source spec (streamed; wds: shards are read per rank and worker, nothing is held in memory).
        out: statistics file (default: TEACHER_DIR/stats.safetensors).
        split: which split to stream (train).
        batch_size: images per forward pass (memory is bounded by this, not by the dataset).
        patch_grid: P: also record statistics in each cell of a P x P grid over every feature map (0 = off).
        class_conditional: also record per-class channel statistics.
        max_samples: stop after this many samples per process (0 = the whole split), for debugging.
        checkpoint_every: save the running sums every N batches, so a killed run resumes (0 = off).
        workers: dataloader workers per process (each reads its own part of the stream).
        autocast: none (fp32 statistics, default), auto, bf16 or fp16 for the forward pass.
    """

    teacher: str = ""
    data: str = ""
    out: str = ""
    split: str = "train"
    batch_size: int = 256
    patch_grid: int = 4
    class_conditional: bool = False
    max_samples: int = 0
    checkpoint_every: int = 20
    workers: int = 0
    autocast: str = "none"

    def __post_init__(self):
        if not self.teacher:
            raise DistillError("squeeze stats needs --teacher PATH (a `distillset squeeze` output folder).")
        if not self.data:
            raise DistillError("squeeze stats needs --data SPEC (the teacher's real training data).")
        if self.batch_size < 1 or self.patch_grid < 0 or self.max_samples < 0 or self.checkpoint_every < 0:
            raise DistillError("batch_size must be >= 1; patch_grid, max_samples and checkpoint_every >= 0.")
        if self.split not in ("train", "test"):
            raise DistillError(f"unknown split '{self.split}'; use train or test.")


def default_stats_path(teacher_spec: str) -> Path:
    """``TEACHER_DIR/stats.safetensors`` (for ``tv:ARCH=FILE`` specs: beside the weights file)."""
    spec = teacher_spec.removeprefix("local-dir:")
    if "=" in spec and spec.startswith(("tv:", "timm:")):
        return Path(spec.partition("=")[2]).with_name("stats.safetensors")
    return Path(spec) / "stats.safetensors"


def _fingerprint(cfg: StatsConfig, teacher) -> str:
    import hashlib
    import json

    d = {"sha": teacher.sha256, "data": cfg.data, "split": cfg.split, "grid": cfg.patch_grid,
         "cls": cfg.class_conditional, "max": cfg.max_samples, "bs": cfg.batch_size, "amp": cfg.autocast}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class _Stream(torch.utils.data.IterableDataset):
    """The source's exact partition for (rank, world), further split across dataloader workers by the source."""

    def __init__(self, source, split: str, rank: int, world: int):
        self.source, self.split, self.rank, self.world = source, split, rank, world

    def __iter__(self):
        return self.source.stream(self.split, self.rank, self.world)


def batches(source, cfg: StatsConfig, rank: int, world: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 image batches of this rank's part of the stream (deterministic order, so a resume can skip ahead)."""
    ds = _Stream(source, cfg.split, rank, world)
    if cfg.workers:
        loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.workers)
        yield from ((x, torch.as_tensor(y)) for x, y in loader)
        return
    xs, ys = [], []
    for x, y in ds:
        xs.append(x)
        ys.append(y)
        if len(xs) == cfg.batch_size:
            yield torch.stack(xs), torch.tensor(ys)
            xs, ys = [], []
    if xs:
        yield torch.stack(xs), torch.tensor(ys)


def run(cfg: StatsConfig, rt=None) -> dict:
    """Compute (or resume) the statistics of ``cfg.teacher`` over ``cfg.data``; returns a summary."""
    from distillset.core.data import Source
    from distillset.core.runtime import get_runtime
    from distillset.squeeze.checkpoint import load_teacher

    rt = rt or get_runtime()
    teacher = load_teacher(cfg.teacher, device=rt.device)
    tc = teacher.config
    source = Source(cfg.data)
    info = source.info()
    if len(info["class_names"]) != tc.num_classes:
        raise DistillError(f"teacher {cfg.teacher} predicts {tc.num_classes} classes but {cfg.data} has "
                           f"{len(info['class_names'])}; use the data the teacher was trained on.")
    out = Path(cfg.out) if cfg.out else default_stats_path(cfg.teacher)
    fp = _fingerprint(cfg, teacher)
    ckpt = out.with_name(f"{out.stem}.rank{rt.rank}of{rt.world}.ckpt.safetensors")
    stats = FeatureStats(teacher, cfg.patch_grid, cfg.class_conditional)
    keys = expected_keys(teacher, tc.img_size, cfg.patch_grid, cfg.class_conditional)
    t0 = time.perf_counter()
    _accumulate(stats, source, cfg, teacher, rt, _resume(stats, ckpt, fp, rt), ckpt, fp)
    if sorted(stats.acc) != keys:  # a rank with no samples still takes part in every collective
        for key in keys:
            if key not in stats.acc:
                stats.acc[key] = _empty_like_key(key, teacher, tc.img_size, cfg.patch_grid)
    total = int(rt.all_reduce_sum(torch.tensor([stats.samples], dtype=torch.float64)).item())
    if rt.world > 1:
        stats.all_reduce_(rt.all_reduce_sum, keys)
    if total == 0:
        raise DistillError(f"{cfg.data} yielded no {cfg.split} samples; check the source.")
    if rt.is_main:
        _write(out, stats, cfg, teacher, total)
        log.info("stats: %d samples through %s -> %s (%d layers) in %.1fs", total, tc.arch, out,
                 len(stats.layers), time.perf_counter() - t0)
    rt.wait()
    if ckpt.exists():
        ckpt.unlink()
    return {"path": str(out), "num_samples": total, "layers": len(stats.layers), "seconds": time.perf_counter() - t0}


def _resume(stats: FeatureStats, ckpt: Path, fp: str, rt) -> int:
    """Load this rank's checkpointed sums when they belong to this run; the number of samples already in them."""
    from safetensors import safe_open

    from distillset.core.io import load_tensors

    if not ckpt.exists():
        return 0
    with safe_open(str(ckpt), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("fingerprint") != fp:
        return 0
    stats.load_state(load_tensors(ckpt))
    stats.samples = int(meta["consumed"])
    log.info("stats: rank %d resumes after %d samples", rt.rank, stats.samples)
    return stats.samples


def _accumulate(stats: FeatureStats, source, cfg: StatsConfig, teacher, rt, consumed: int, ckpt: Path,
                fp: str) -> None:
    """Stream this rank's share of the images through the teacher, skipping the ``consumed`` already summed."""
    from distillset.core.data import resize_uint8
    from distillset.core.io import save_tensors
    from distillset.core.runtime import autocast_dtype

    tc = teacher.config
    amp = autocast_dtype(cfg.autocast, rt.device)
    seen = batches_done = 0
    for x, y in batches(source, cfg, rt.rank, rt.world):
        if cfg.max_samples and seen >= cfg.max_samples:
            break
        if cfg.max_samples:
            x, y = x[: cfg.max_samples - seen], y[: cfg.max_samples - seen]
        start, seen = seen, seen + len(y)
        if seen <= consumed:
            continue  # already in the checkpointed sums (the partition and its order are deterministic)
        if start < consumed:
            x, y = x[consumed - start:], y[consumed - start:]
        if x.shape[1] != tc.in_chans:
            raise DistillError(f"{cfg.data} images have {x.shape[1]} channels but teacher {tc.arch} takes "
                               f"{tc.in_chans}; use the data the teacher was trained on.")
        if x.shape[-1] != tc.img_size or x.shape[-2] != tc.img_size:
            x = resize_uint8(x, tc.img_size)
        if int(y.max()) >= tc.num_classes:
            raise DistillError(f"label {int(y.max())} is out of range for the teacher's {tc.num_classes} classes.")
        stats.add(x.to(rt.device).float().div_(255), y, amp)
        batches_done += 1
        if cfg.checkpoint_every and batches_done % cfg.checkpoint_every == 0:
            save_tensors(ckpt, stats.state(), {"fingerprint": fp, "consumed": str(stats.samples)})


def _write(out: Path, stats: FeatureStats, cfg: StatsConfig, teacher, total: int) -> None:
    from distillset.core.io import save_tensors

    tc = teacher.config
    meta = {"format": FORMAT, "teacher_sha256": teacher.sha256, "teacher_arch": tc.arch, "teacher": cfg.teacher,
            "num_classes": str(tc.num_classes), "img_size": str(tc.img_size), "patch_grid": str(cfg.patch_grid),
            "class_conditional": str(cfg.class_conditional), "num_samples": str(total), "data": cfg.data,
            "split": cfg.split}
    save_tensors(out, stats.result(), meta)


def _empty_like_key(key: str, teacher, img_size: int, grid: int) -> Moments:
    kind, name = key.split("/", 1)
    module = dict(teacher.model.named_modules())[name]
    c = module.out_channels
    if kind == "class":
        return Moments(teacher.config.num_classes, (c,))
    if kind == "patch":
        return Moments(1, (grid * grid, c))
    return Moments(1, (c,))


# ----------------------------------------------------------------------------------------------------------- loading


@dataclass
class TeacherStats:
    """Statistics of one teacher, as read by :func:`load_statistics`."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]

    def layers(self, kind: str) -> list[str]:
        prefix = f"{kind}/"
        return sorted({k[len(prefix):].rsplit("/", 1)[0] for k in self.tensors if k.startswith(prefix)})

    def get(self, kind: str, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensors[f"{kind}/{layer}/mean"], self.tensors[f"{kind}/{layer}/var"]


def load_statistics(path: str | Path, teacher) -> TeacherStats:
    """Read a statistics file and check it was computed for ``teacher`` (same weights, same layers)."""
    from safetensors import safe_open

    from distillset.core.io import load_tensors

    path = Path(path)
    if not path.exists():
        raise DistillError(f"no statistics at {path}; compute them with `distillset squeeze stats --teacher "
                           f"{teacher.path or 'TEACHER'} --data SPEC`.")
    tensors = load_tensors(path)
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != FORMAT:
        raise DistillError(f"{path} is not a distillset statistics file (format {meta.get('format')}); "
                           "re-run `distillset squeeze stats`.")
    sha = meta.get("teacher_sha256", "")
    if teacher.sha256 and sha != teacher.sha256:
        raise DistillError(f"{path} holds statistics of another model ({meta.get('teacher_arch')} sha256 "
                           f"{sha[:12]}, not {teacher.config.arch} sha256 {teacher.sha256[:12]}); re-run "
                           f"`distillset squeeze stats --teacher {teacher.path or 'TEACHER'}`.")
    modules = dict(teacher.model.named_modules())
    for k, v in tensors.items():
        name = k.split("/", 1)[1].rsplit("/", 1)[0]
        m = modules.get(name)
        if not isinstance(m, nn.Conv2d) or (k.endswith(("/mean", "/var")) and v.shape[-1] != m.out_channels):
            raise DistillError(f"{path} does not match teacher {teacher.config.arch} (layer '{name}'); the "
                               "statistics were computed for another model: re-run `distillset squeeze stats`.")
    return TeacherStats(tensors, meta)
