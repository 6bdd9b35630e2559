"""The one synthesis loop: work units, sharding across processes, optimisation, checkpoint/resume, writing.

A *unit* is a block of classes x a block of image indices; it is optimised as one batch with its own generator
seeded from (seed, unit bounds) and every image's initial value seeded from (seed, class, index). Units are split
across processes as contiguous class ranges, so the result is the same whatever the number of processes. A finished
unit is written atomically as one webdataset shard of lossless PNGs; a re-run skips finished units.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import time
from pathlib import Path

import torch

from distillset.core.config import config_diff, fingerprint, to_dict, write_config
from distillset.core.data import ImageSet, Source, write_shard
from distillset.core.distilled import load_distilled, sample_key, save_grid, shard_path, unit_record
from distillset.core.errors import DistillError
from distillset.core.io import clean_temp, content_sha256, is_temp, read_json, require_folder, save_tensors, write_json
from distillset.core.locks import Lock, hold, owner, try_lock
from distillset.core.partition import Unit, mix_seed, plan_units, units_for_rank  # the last two re-exported
from distillset.core.runtime import Runtime, autocast_dtype, get_runtime, progress
from distillset.core.schedule import cosine
from distillset.recover import base
from distillset.recover.config import NON_SEMANTIC, RecoverConfig
from distillset.recover.ema import ImageEMA
from distillset.recover.real import RealData, StreamedRealData
from distillset.squeeze.inputs import ZCA, ZCA_FILE, InputTransform

log = logging.getLogger("distillset.recover")


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "timm", "accelerate", "diffusers", "distillset"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


class Engine:
    """Holds what is shared by all units of a run (teachers, real data, plugins) and optimises units."""

    def __init__(self, cfg: RecoverConfig, rt: Runtime, hooks: tuple[base.StepHook, ...] = ()):
        self.cfg, self.rt, self.device = cfg, rt, rt.device
        self.hooks = tuple(hooks)
        self._build_plugins()
        self.teachers = self._load_teachers()
        self.source = Source(cfg.data) if cfg.data else None
        needs_real = self.objective.uses_real() or cfg.param_options.get("init") in ("real", "rded") or cfg.zca == "fit"
        if needs_real and self.source is None:
            raise DistillError(f"method '{cfg.method}' (or init from real) needs real data; pass --data SPEC.")
        self._settle_task(self.source.info() if self.source else None)
        if self.objective_cls.joint_classes and cfg.classes_per_unit not in (0, self.num_classes):
            self.cfg = dataclasses.replace(cfg, classes_per_unit=0)  # the loss couples all classes: one unit
        self.real = self._load_real() if needs_real else None
        self.zca = self._input_space()
        self.autocast = autocast_dtype(cfg.autocast, self.device)
        self._prepare_teachers()

    def _build_plugins(self) -> None:
        """The objective, augmentation and parametrization class, from options validated with the config."""
        (self.objective_cls, objective_cfg), (self.param_cls, self.param_cfg), (aug_cls, aug_cfg) = \
            self.cfg.plugins()
        self.augment = aug_cls(aug_cfg)
        self.objective = self.objective_cls(objective_cfg)
        self.ema_decay = self._ema_decay()

    def _load_teachers(self) -> list:
        from distillset.squeeze.checkpoint import load_teacher

        cfg = self.cfg
        if self.objective_cls.needs_teacher and not cfg.teachers:
            raise DistillError(f"method '{cfg.method}' needs a teacher; pass --teachers PATH (a `distillset squeeze` "
                               "output folder).")
        teachers = [load_teacher(t, device=self.device) for t in cfg.teachers]
        self._check_teachers(teachers)
        return teachers

    def _settle_task(self, info: dict | None) -> None:
        """Classes, image shape and input statistics of the run: the teacher's, else the data's."""
        cfg = self.cfg
        if self.teachers:
            tc = self.teachers[0].config
            self.class_names = tc.class_names or (info["class_names"] if info else [str(i) for i in
                                                                                    range(tc.num_classes)])
            self.num_classes = tc.num_classes
            self.image_shape = (tc.in_chans, tc.img_size, tc.img_size)
            self.mean, self.std = tc.mean, tc.std
        elif info:
            self.class_names = info["class_names"]
            self.num_classes = len(self.class_names)
            self.image_shape = tuple(info["image_shape"])
            self.mean, self.std = [0.5] * self.image_shape[0], [0.5] * self.image_shape[0]  # until real data is read
        else:
            raise DistillError("recover needs a teacher or a data source to know the classes and image size.")
        if info and info["class_names"] and len(info["class_names"]) != self.num_classes:
            raise DistillError(f"the teacher predicts {self.num_classes} classes but the data has "
                               f"{len(info['class_names'])}; use a teacher trained on this data.")
        tc_names = self.teachers[0].config.class_names if self.teachers else None
        named = tc_names and list(tc_names) != [str(i) for i in range(len(tc_names))]  # not just indices
        if named and info and info["class_names"] and list(tc_names) != list(info["class_names"]):
            bad = next(i for i, (a, b) in enumerate(zip(tc_names, info["class_names"])) if a != b)
            raise DistillError(f"the teacher's classes differ from the data's (class {bad} is '{tc_names[bad]}' for "
                               f"the teacher, '{info['class_names'][bad]}' in the data): a teacher trained with "
                               "another class order silently gives ~chance accuracy; use a teacher trained on this "
                               "data.")
        data_size = tuple(info["image_shape"][-2:]) if info and info.get("image_shape") else None
        if self.teachers and data_size and data_size != tuple(self.image_shape[-2:]) and not cfg.image_size:
            h, w = self.image_shape[-2:]
            ratio = (h * w) / (data_size[0] * data_size[1])
            raise DistillError(f"teacher {self.teachers[0].config.arch} takes {h}x{w} images but the data's are "
                               f"{data_size[0]}x{data_size[1]}; say which size to distil at: --image-size {h} (the "
                               f"teacher's, {ratio:.3g}x the pixels) or --image-size {data_size[0]} (the data's).")
        if cfg.image_size:
            self.image_shape = (self.image_shape[0], cfg.image_size, cfg.image_size)
        if cfg.max_classes:
            self.num_classes = min(self.num_classes, cfg.max_classes)

    def _load_real(self) -> RealData:
        """The real training images of the run's classes, at the run's image size: read class by class from indexed
        shards when the source has a class index (memory follows the unit's classes), else loaded whole."""
        cfg = self.cfg
        streamed = self._streamed_real()
        if streamed is not None:
            return streamed
        train = self.source.load("train")
        if train.image_shape != self.image_shape:
            from distillset.core.data import resize_uint8

            self._check_channels(train.image_shape)
            train = ImageSet(resize_uint8(train.images, self.image_shape[-1]), train.labels, train.class_names)
        keep = torch.nonzero(train.labels < self.num_classes).flatten()  # max_classes: the first N classes
        train = ImageSet(train.images[keep], train.labels[keep], train.class_names[: self.num_classes])
        train.require_classes(self.objective.real_per_class(cfg.ipc), f"method '{cfg.method}' at ipc {cfg.ipc}")
        if not self.teachers:  # networks trained from scratch see the data's channel statistics, as the papers
            from distillset.squeeze.data import channel_stats

            self.mean, self.std = channel_stats(train.images)
        return RealData(train, self.device)

    def _check_channels(self, data_shape) -> None:
        if data_shape[0] != self.image_shape[0]:
            raise DistillError(f"data images have {data_shape[0]} channels but the teacher takes "
                               f"{self.image_shape[0]}.")

    def _streamed_real(self) -> StreamedRealData | None:
        shards = getattr(self.source, "shards", None)
        # DOORPING re-stamps poisoned images in place and ZCA fits on the whole split: both need it in memory
        if shards is None or not self.cfg.stream_real or self.hooks or self.cfg.zca == "fit":
            return None
        if not shards.info.get("splits", {}).get("train", {}).get("class_index"):
            log.info("the shards in %s have no class index: loading the whole training split (write one with "
                     "`distillset shards index` to read class by class)", shards.folder)
            return None
        from distillset.core.classindex import ClassIndex
        from distillset.core.data import require_counts

        index = ClassIndex(shards, "train")
        if shards.image_shape:
            self._check_channels(shards.image_shape)
        counts = index.counts()[: self.num_classes]
        require_counts(counts, shards.class_names, self.objective.real_per_class(self.cfg.ipc),
                       f"method '{self.cfg.method}' at ipc {self.cfg.ipc}")
        if not self.teachers:
            if index.mean is None:
                raise DistillError(f"the class index of {shards.folder} has no channel statistics; write it again "
                                   "with `distillset shards index`.")
            self.mean, self.std = list(index.mean), list(index.std)
        size = self.image_shape[-1] if tuple(shards.image_shape[-2:]) != tuple(self.image_shape[-2:]) else None
        cached = (self.cfg.classes_per_unit or self.num_classes) + 1
        log.info("real images: read class by class from %s (at most %d classes held)", shards.folder, cached)
        return StreamedRealData(index, self.num_classes, size, self.device, cached_classes=cached)

    def _prepare_teachers(self) -> None:
        compile_ = self.compiles_teachers()
        for t in self.teachers:
            if self.cfg.channels_last:
                t.model.to(memory_format=torch.channels_last)
                t.channels_last = True
            if compile_:
                t.compile()
        if compile_ and self.teachers:
            log.info("teachers: torch.compile (the first step of each input shape compiles)")

    def compiles_teachers(self) -> bool:
        """``compile``, or an optimising run whose share for this process has at least ``compile_min_steps`` steps."""
        cfg = self.cfg
        if cfg.compile:
            return True
        if not cfg.compile_min_steps or self.objective_cls.selects or not self.teachers:
            return False
        units = len(plan_units(self.num_classes, cfg.ipc, cfg.classes_per_unit, cfg.ipc_per_unit))
        return cfg.iterations * -(-units // self.rt.world) >= cfg.compile_min_steps

    def _ema_decay(self) -> float:
        """The engine's image EMA: ``ema_decay``, or the decay the method asks for by its own options (MTT's ema)."""
        own = self.objective.image_ema()
        if self.cfg.ema_decay and own and own != self.cfg.ema_decay:
            raise DistillError(f"ema_decay {self.cfg.ema_decay} and the method's ema option {own} disagree; set "
                               "only one of them.")
        return self.cfg.ema_decay or own

    def _input_space(self) -> ZCA | None:
        """Settle how the matching networks see images (mean/std, and the ZCA whitening or None). Expert buffers
        bring their own, which then holds for the whole run and for evaluation; otherwise the ``zca`` option."""
        cfg = self.cfg
        if cfg.zca and self.objective_cls.needs_teacher:
            raise DistillError(f"zca whitens the inputs of networks trained from scratch (matching methods); "
                               f"'{cfg.method}' matches a pretrained teacher that normalises its own inputs: drop zca.")
        ref = self.objective.input_reference()
        zca = None
        if ref is not None:
            self.mean, self.std = list(ref["mean"]), list(ref["std"])
            if ref["zca"] is None and cfg.zca:
                raise DistillError(f"zca is set but the {ref['source']} were trained without whitening; record them "
                                   "with `distillset squeeze trajectories --zca true`, or drop zca.")
            if ref["zca"] is not None:
                zca = ZCA.load(ref["zca"])
                if cfg.zca == "fit" or (cfg.zca and not zca.same_as(ZCA.load(cfg.zca))):
                    raise DistillError(f"the {ref['source']} were trained on inputs whitened by {ref['zca']}, and the "
                                       "synthetic images must be matched in that space: drop zca (it is used "
                                       "automatically) or point zca at that file.")
        elif cfg.zca == "fit":
            zca = ZCA.fit(self.real.images, cfg.zca_reg, transform=InputTransform(self.mean, self.std))
            log.info("zca: fitted on %d real training images (reg %g)", len(self.real.images), cfg.zca_reg)
        elif cfg.zca:
            zca = ZCA.load(cfg.zca)
        if zca is not None and tuple(zca.shape) != tuple(self.image_shape):
            raise DistillError(f"the ZCA whitening ({cfg.zca or ref['zca']}) was fitted on {tuple(zca.shape)} images "
                               f"but this run makes {tuple(self.image_shape)}; fit it at this resolution (zca: fit).")
        return zca

    def _check_teachers(self, teachers: list) -> None:
        if not teachers:
            return
        ref = teachers[0].config
        for t in teachers[1:]:
            c = t.config
            if c.num_classes != ref.num_classes:
                raise DistillError(f"teachers disagree on the number of classes ({ref.arch}: {ref.num_classes}, "
                                   f"{c.arch}: {c.num_classes}); all teachers must be trained on the same classes.")
            if c.img_size != ref.img_size or c.in_chans != ref.in_chans:
                raise DistillError(f"teachers disagree on the input ({ref.arch}: {ref.in_chans}x{ref.img_size}px, "
                                   f"{c.arch}: {c.in_chans}x{c.img_size}px); use teachers of one resolution.")
        if self.objective_cls.needs_bn:
            for t in teachers:
                if not t.has_bn:
                    raise DistillError(f"teacher {t.config.arch} ({t.path}) has no BatchNorm layer, so "
                                       f"'{self.cfg.method}' has no statistics to match; use a BatchNorm backbone "
                                       "(convnet_bn, resnet18_cifar, timm/torchvision ResNets).")

    # ------------------------------------------------------------------------------------------------------ units

    def context(self, unit: Unit) -> base.Context:
        cls, _ = unit.classes_and_indices()
        g = torch.Generator().manual_seed(mix_seed(self.cfg.seed, 1, unit.c0, unit.c1, unit.i0, unit.i1))
        if self.real is not None:
            self.real.prefetch(range(unit.c0, unit.c1))
        return base.Context(device=self.device, classes=cls.to(self.device), num_classes=self.num_classes,
                            image_shape=self.image_shape, generator=g, total_steps=self.cfg.iterations,
                            rank=self.rt.rank, world=self.rt.world, unit=unit.index, teachers=self.teachers,
                            real=self.real, augment=self.augment, autocast_dtype=self.autocast,
                            mean=list(self.mean), std=list(self.std), zca=self.zca, ipc=self.cfg.ipc,
                            seed=self.cfg.seed, channels_last=self.cfg.channels_last)

    def optimise(self, unit: Unit, state_path: Path | None = None) -> tuple[base.Parametrization, dict]:
        """Run one unit to completion (resuming from ``state_path`` when it holds a checkpoint)."""
        cfg = self.cfg
        ctx = self.context(unit)
        cls, idx = unit.classes_and_indices()
        syn = self.param_cls(self.param_cfg, cls.to(self.device), idx, self.image_shape, cfg.seed,
                             ctx).to(self.device)
        if self.objective_cls.selects:
            return syn, {}
        self.objective.setup(ctx)
        for h in self.hooks:
            h.setup(ctx)
        ema = ImageEMA(self.ema_decay)
        groups = [{"params": [p for p in syn.parameters() if p.requires_grad], "lr": cfg.lr}]
        for g in self.objective.extra_parameters():
            groups.append(g if isinstance(g, dict) else {"params": [g], "lr": cfg.lr})
        opt = self._optimizer(groups)
        start = 0
        if state_path is not None and state_path.exists():
            start = self._restore(state_path, syn, opt, ctx, ema)
        logs: dict = {}
        good = None
        bar = progress(total=cfg.iterations, initial=start, desc=f"unit {unit.index}", enabled=self.rt.is_main)
        t0 = time.perf_counter()
        for step in range(start, cfg.iterations):
            ctx.step = step
            scale = cosine(step, cfg.iterations) if cfg.schedule == "cosine" else 1.0
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
            ema.update(syn)  # the images as they enter this step

            def closure():
                with syn.step_cache():
                    value = self.objective.loss(syn, ctx)
                opt.zero_grad(set_to_none=True)
                value.backward()
                return value

            if isinstance(opt, torch.optim.LBFGS):  # re-evaluates the loss inside its step; returns the first value
                loss = opt.step(closure)
            else:
                loss = closure()
                opt.step()
            syn.project_()
            for h in self.hooks:
                h.after_step(syn, self.objective, ctx)
            bar.update(1)
            last = step == cfg.iterations - 1
            if (step + 1) % cfg.log_every == 0 or last:
                value = float(loss.detach())
                if not math.isfinite(value):
                    self._nan(unit, step, good, state_path)
                logs = {"loss": value, **self.objective.logs()}
                good = (step, {k: v.detach().clone() for k, v in syn.state_dict().items()})
                bar.set_postfix(loss=f"{value:.4g}")
                log.debug("unit %d step %d %s", unit.index, step + 1, logs)
                self.rt.log_metrics({f"recover/{k}": v for k, v in logs.items()},
                                    unit.index * cfg.iterations + step + 1)
            if state_path is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and not last:
                self._save_state(state_path, syn, opt, ctx, step + 1, ema)
        bar.close()
        ema.finalize(syn)  # with ema_decay the written images are the moving average
        self.objective.finalize(syn)
        for h in self.hooks:
            h.finalize(syn, ctx)
        self.objective.teardown()
        logs["seconds"] = time.perf_counter() - t0
        return syn, logs

    def _optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        """The configured optimiser over the images' group and the objective's extra groups (each keeps its own
        lr as ``base_lr`` for the schedule). L-BFGS takes a single group, so every tensor shares the run's lr."""
        cfg = self.cfg
        if cfg.optimizer == "lbfgs":
            own = [g for g in groups[1:] if g.get("lr", cfg.lr) != cfg.lr]
            if own:
                raise DistillError(f"method '{cfg.method}' optimises tensors with their own learning rate, which "
                                   "lbfgs cannot take (one lr for all); use adam or sgd.")
            groups = [{"params": [p for g in groups for p in g["params"]], "lr": cfg.lr}]
        for g in groups:
            g["base_lr"] = g["lr"]
        if cfg.optimizer == "lbfgs":
            # the strong-Wolfe line search: DLG's code steps by lr alone, and such an unchecked step can throw the
            # dummy images far off (a CIFAR-10 iDLG run ended at gradient distance 27 instead of 0.003)
            return torch.optim.LBFGS(groups, lr=cfg.lr, line_search_fn="strong_wolfe")
        if cfg.optimizer == "adam":
            return torch.optim.Adam(groups, betas=cfg.betas)
        return torch.optim.SGD(groups, momentum=cfg.momentum)

    @staticmethod
    def _extra(opt: torch.optim.Optimizer, syn: base.Parametrization) -> list[torch.Tensor]:
        """The optimised tensors that are not the parametrization's (the objective's extra parameters), in order."""
        own = {id(p) for p in syn.parameters()}
        return [p for g in opt.param_groups for p in g["params"] if id(p) not in own]

    def _nan(self, unit: Unit, step: int, good, state_path: Path | None):
        where = ""
        if good is not None and state_path is not None:
            keep = state_path.with_suffix(".last_good.safetensors")
            save_tensors(keep, good[1], {"step": str(good[0] + 1)})
            where = f"; the last good synthetic set (step {good[0] + 1}) is saved in {keep}"
        raise DistillError(f"the loss became NaN/inf by step {step + 1} of unit {unit.index}{where}; lower --lr "
                           "or the objective's weights and run again (finished units are kept).")

    def _save_state(self, path: Path, syn, opt, ctx: base.Context, step: int, ema: ImageEMA) -> None:
        from distillset.squeeze.checkpoint import save_atomic_state

        extra = self._extra(opt, syn)
        save_atomic_state(path, {"step": step, "syn": syn.state_dict(), "opt": opt.state_dict(),
                                 "extra": [p.detach().cpu() for p in extra], "rng": ctx.generator.get_state(),
                                 "objective_state": self.objective.checkpoint_state(), "ema": ema.state(),
                                 "hooks": [h.checkpoint_state() for h in self.hooks]})

    def _restore(self, path: Path, syn, opt, ctx: base.Context, ema: ImageEMA) -> int:
        try:
            st = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:
            raise DistillError(f"unit checkpoint {path} is corrupt ({e}); delete it to restart that unit.") from None
        syn.load_state_dict(st["syn"])
        opt.load_state_dict(st["opt"])
        extra = self._extra(opt, syn)
        with torch.no_grad():
            for p, v in zip(extra, st["extra"]):
                p.copy_(v)
        ctx.generator.set_state(st["rng"].cpu())
        objective_state = dict(st.get("objective_state", {}))
        # checkpoints written before the engine kept the EMA hold MTT's average in the objective's state
        ema.load_state(st.get("ema") or objective_state.pop("ema", {}), self.device)
        self.objective.load_checkpoint_state(objective_state)
        for h, hs in zip(self.hooks, st.get("hooks") or [{}] * len(self.hooks)):
            h.load_checkpoint_state(hs)
        log.info("resumed unit %d at step %d", ctx.unit, st["step"])
        return int(st["step"])

    def select(self, unit: Unit) -> torch.Tensor:
        """Coreset methods: uint8 images chosen from the real data (no optimisation)."""
        ctx = self.context(unit)
        self.objective.setup(ctx)
        picked = []
        for k, c in enumerate(range(unit.c0, unit.c1)):
            sub = dataclasses.replace(ctx, classes=torch.full((unit.i1 - unit.i0,), c, device=self.device),
                                      first_index=unit.i0)
            picked.append(self.objective.select_images(sub, unit.i1 - unit.i0))
        self.objective.teardown()
        return torch.cat(picked)


def check_unit_memory(units: list[Unit], image_shape: tuple[int, int, int], cfg: RecoverConfig, device,
                      selects: bool = False) -> None:
    """Refuse, before anything is allocated or written, a work unit whose tensors alone exceed the memory available.

    The estimate is a lower bound: the unit's images in float32 times the copies the loop keeps (the learnable
    tensor, its gradient, the optimiser's moments, the rendered and augmented batch); the networks' activations come
    on top. A coreset method only holds the chosen uint8 images.
    """
    from distillset.core.runtime import available_memory

    n = max((u.c1 - u.c0) * (u.i1 - u.i0) for u in units)
    # L-BFGS keeps up to 100 (step, gradient-change) pairs of the flattened tensors beside the gradient and direction
    copies = 1 if selects else {"adam": 4, "sgd": 3, "lbfgs": 204}[cfg.optimizer] + 2
    per_image = math.prod(image_shape) * (1 if selects else 4) * copies  # bytes: uint8 selected, float32 optimised
    need = n * per_image
    avail, where = available_memory(device)
    if need > avail:
        fits = max(1, int(avail // per_image))
        raise DistillError(f"a work unit of {n} images ({'x'.join(map(str, image_shape))}) needs at least "
                           f"{need / 2**30:.1f} GiB but {avail / 2**30:.1f} GiB of {where} is available; lower --ipc "
                           f"or set --ipc-per-unit/--classes-per-unit so a unit holds at most {fits} images.")


def _path_of(spec: str) -> Path | None:
    """The file or folder a teacher spec or a path-valued option names (``None`` if it names none on disk)."""
    from distillset.squeeze.checkpoint import parse_spec

    if not isinstance(spec, str) or not spec or "\n" in spec:
        return None
    try:
        p = parse_spec(spec)[2]
        return p if p.exists() else None
    except (OSError, ValueError):
        return None


def input_hashes(cfg: RecoverConfig, out: Path) -> dict:
    """What the run reads from disk, bound by content: teachers, and every option naming a file or folder
    (statistics, expert trajectories, a prior, a zca file, a model pool).

    A resume compares these, so an input changed in place between a kill and a re-run (a retrained teacher) is
    refused instead of mixing units made from two inputs under one manifest.
    """
    named = [(f"teacher {i}", t) for i, t in enumerate(cfg.teachers)]
    for group in ("options", "param_options", "aug_options"):
        for k, v in sorted(getattr(cfg, group).items()):
            for j, x in enumerate(v if isinstance(v, (list, tuple)) else [v]):
                named.append((f"{group}.{k}" + (f"[{j}]" if isinstance(v, (list, tuple)) else ""), x))
    if cfg.zca != "fit":
        named.append(("zca", cfg.zca))
    inputs = {}
    root = out.resolve()
    for name, spec in named:
        path = _path_of(spec)
        if path is None or path.resolve() == root or root in path.resolve().parents:
            continue  # not a path, or a file this run writes itself
        inputs[name] = {"path": str(spec), "sha256": content_sha256(path)}
    return inputs


def _check_inputs(out: Path, old: dict, inputs: dict, engine: Engine) -> None:
    recorded = old.get("inputs")
    if recorded is None:  # written before inputs were bound by content: the teachers' weights hashes are recorded
        for i, (t, rec) in enumerate(zip(engine.teachers, old.get("teachers", []))):
            if rec.get("sha256") and rec["sha256"] != t.sha256:
                raise DistillError(f"input teacher {i} ({t.path}) changed since this run in {out} started (weights "
                                   f"sha256 {rec['sha256'][:12]} then, {t.sha256[:12]} now); restore it, or delete "
                                   f"{out} to start over with the new one.")
        return
    for name in sorted(set(recorded) | set(inputs)):
        then, now = recorded.get(name, {}).get("sha256"), inputs.get(name, {}).get("sha256")
        if then != now:
            where = inputs.get(name, recorded.get(name, {})).get("path", "")
            raise DistillError(f"input {name} ({where}) changed since this run in {out} started (content sha256 "
                               f"{(then or 'none')[:12]} then, {(now or 'none')[:12]} now); restore it, or delete "
                               f"{out} to start over with the new one.")


def _refuse_foreign(out: Path) -> None:
    """An output folder without a manifest must hold nothing but what a distillset run leaves before its first
    write (its config copy, temporary files of killed writes, its locks, empty folders)."""
    if (out / "manifest.json").exists() or not out.exists():
        return

    def foreign(p: Path) -> bool:
        if p.is_dir() and not p.is_symlink():
            return p.name not in ("locks", "runs") and any(foreign(q) for q in p.iterdir())
        return p.name != "config.yaml" and not is_temp(p.name)

    if any(foreign(p) for p in out.iterdir()):
        raise DistillError(f"{out} is not empty and holds no distillset manifest; choose another --out.")


def _enter(out: Path, rt: Runtime) -> Lock:
    """This run's shared lock on the folder (held until it returns). The main process of a run that finds no other
    run active removes the temporary files killed writes left (ours, so they never block the folder); with another
    run active they may be its writes in flight, so they are left alone."""
    _refuse_foreign(out)
    lock = None
    if rt.is_main:
        lock = hold(out / "locks" / "run.lock", wait=False)  # exclusive: no other run is in the folder
        if lock is not None:
            for p in clean_temp(out):
                log.info("removed %s, left by a killed write", p)
            lock.downgrade()
    rt.wait()
    return lock or hold(out / "locks" / "run.lock", shared=True)


def _check_or_write_manifest(out: Path, cfg: RecoverConfig, engine: Engine, rt: Runtime, units: list[Unit]) -> dict:
    fp = fingerprint(cfg, NON_SEMANTIC)
    path = out / "manifest.json"
    inputs = input_hashes(cfg, out)
    records = [unit_record(u.index, u.c0, u.c1, u.i0, u.i1) for u in units]
    if path.exists():
        old = read_json(path)
        if old.get("fingerprint") != fp:
            diff = (config_diff(old.get("config"), to_dict(cfg), NON_SEMANTIC)
                    or f"fingerprint {old.get('fingerprint')} vs {fp}")
            raise DistillError(f"{out} holds a different run (method {old.get('method')}; {diff}); choose another "
                               "--out for this one, or delete that folder to replace it.")
        _check_inputs(out, old, inputs, engine)
        hooks = [h.describe() for h in engine.hooks]
        if old.get("hooks", []) != hooks:
            raise DistillError(f"{out} was made with hooks {old.get('hooks', [])} but this run has {hooks}; choose "
                               "another --out for this one, or delete that folder to replace it.")
        if old.get("units") not in (None, records):
            raise DistillError(f"{out}/manifest.json lists another unit layout than this run's; the manifest is "
                               "damaged: delete the folder and re-run.")
        if old.get("inputs") is None or old.get("units") is None:  # an older manifest gains both as it resumes
            old = {**old, "inputs": inputs, "units": records}
            if rt.is_main:
                write_json(path, old)
        return old
    manifest = {  # the folder was checked for foreign content by _enter, before its lock file was made
        "format": "distillset/1", "status": "running", "fingerprint": fp, "method": cfg.method,
        "parametrization": cfg.parametrization, "augmentation": cfg.augmentation, "config": to_dict(cfg),
        "teachers": [t.describe() for t in engine.teachers], "ipc": cfg.ipc, "num_classes": engine.num_classes,
        "class_names": engine.class_names[: engine.num_classes], "image_shape": list(engine.image_shape),
        "seeds": {"base": cfg.seed, "image": "mix_seed(seed, class, index)",
                  "unit": "mix_seed(seed, 1, c0, c1, i0, i1)"},
        "data": cfg.data, "versions": _versions(), "mean": engine.mean, "std": engine.std,
        "zca": ZCA_FILE if engine.zca is not None else None, "inputs": inputs, "units": records,
    }
    if engine.hooks:  # only then: manifests of runs without hooks stay as they were
        manifest["hooks"] = [h.describe() for h in engine.hooks]
    if rt.is_main:
        write_json(path, manifest)
        write_config(out, cfg)
    return manifest


def run(cfg: RecoverConfig, rt: Runtime | None = None, hooks: tuple[base.StepHook, ...] = ()) -> dict:
    """Run (or resume) a recover job; returns the final manifest. ``hooks`` run beside the objective in every unit
    (:class:`recover.base.StepHook`, e.g. DOORPING's trigger update)."""
    rt = rt or get_runtime()
    out = require_folder(cfg.out)
    engine = Engine(cfg, rt, hooks)
    cfg = engine.cfg  # as the engine settled it (a joint-classes method runs all classes as one unit)
    units = plan_units(engine.num_classes, cfg.ipc, cfg.classes_per_unit, cfg.ipc_per_unit)
    check_unit_memory(units, engine.image_shape, cfg, rt.device, engine.objective_cls.selects)
    run_lock = _enter(out, rt)
    _check_or_write_manifest(out, cfg, engine, rt, units)
    rt.start_tracking(out, "recover", to_dict(cfg))
    if engine.zca is not None and rt.is_main and not (out / ZCA_FILE).exists():
        engine.zca.save(out / ZCA_FILE)  # before any unit: a partial set is evaluated in the right space too
    rt.wait()
    t0 = time.perf_counter()
    done, skipped, stats = _work(engine, units, out, rt)
    elapsed = time.perf_counter() - t0
    all_stats = rt.gather_object({"rank": rt.rank, "done": done, "skipped": skipped, "seconds": elapsed,
                                  "units": stats})
    rt.wait()
    if rt.is_main:
        _finish(out, units, all_stats, rt)
    rt.wait()
    run_lock.release()
    rt.end_tracking()
    return read_json(out / "manifest.json")


def _write_unit(engine: Engine, u: Unit, out: Path) -> dict:
    """Optimise (or select) one unit and write its shard, latents and params; the unit's logs."""
    cfg = engine.cfg
    state_path = out / "state" / f"unit-{u.index:06d}.pt"
    if engine.objective_cls.selects:
        images, logs = engine.select(u), {}
    else:
        syn, logs = engine.optimise(u, state_path)
        images = syn.images_uint8()
        extra = syn.state()
        if extra:
            save_tensors(out / "latents" / f"unit-{u.index:06d}.safetensors", extra,
                         {"parametrization": cfg.parametrization})
        params = engine.objective.final_state()
        if params:
            save_tensors(out / "params" / f"unit-{u.index:06d}.safetensors", params, {"method": cfg.method})
    cls, idx = u.classes_and_indices()
    write_shard(shard_path(out, u.index), [(sample_key(c, i), images[k], c, {"class": c, "index": i, "unit": u.index})
                                           for k, (c, i) in enumerate(zip(cls.tolist(), idx.tolist()))])
    if state_path.exists():
        state_path.unlink()
    return logs


def _work(engine: Engine, units: list[Unit], out: Path, rt: Runtime, poll: float = 1.0) -> tuple[int, int, list]:
    """Compute every unit not written yet, this rank's first, then any other rank's or run's that nobody holds.

    Each unit is computed under its own lock (``locks/unit-XXXXXX.lock``), so concurrent runs into one folder and the
    ranks of one launch share the units instead of computing them twice; a unit whose holder died is taken over (the
    kernel frees its lock) and resumes from its checkpoint. Units held by a live process are waited for."""
    mine = units_for_rank(len(units), rt.rank, rt.world)  # a range: membership is O(1)
    pending = [units[i] for i in mine] + [u for u in units if u.index not in mine]
    done = skipped = 0
    stats: list[dict] = []
    waited = False
    while pending:
        progressed = False
        for u in list(pending):
            if shard_path(out, u.index).exists():
                pending.remove(u)
                skipped += u.index in mine
                continue
            lock = try_lock(out / "locks" / f"unit-{u.index:06d}.lock")
            if lock is None:
                continue  # another run or rank is on it
            try:
                if not shard_path(out, u.index).exists():  # re-check under the lock: it may have just finished
                    logs = _write_unit(engine, u, out)
                    done += 1
                    progressed = True
                    stats.append({"unit": u.index, **logs})
                    log.info("unit %d/%d (classes %d-%d) done: %s", u.index + 1, len(units), u.c0, u.c1 - 1,
                             {k: round(v, 4) for k, v in logs.items()})
            finally:
                lock.release(remove=True)
            pending.remove(u)
        if pending and not progressed:
            if not waited:
                log.info("waiting for %d unit(s) another process is computing (%s)", len(pending),
                         owner(out / "locks" / f"unit-{pending[0].index:06d}.lock"))
                waited = True
            time.sleep(poll)
    return done, skipped, stats


def _finish(out: Path, units: list[Unit], all_stats: list, rt: Runtime) -> None:
    """Mark the set complete and append this run to the manifest's history (under a lock: runs that share the
    folder may finish at the same time)."""
    missing = [u.index for u in units if not shard_path(out, u.index).exists()]
    if missing:
        raise DistillError(f"units {missing[:5]} were not written; re-run the same command to finish them.")
    with hold(out / "locks" / "manifest.lock"):
        manifest = read_json(out / "manifest.json")
        images, _ = load_distilled(out, require_complete=False)
        save_grid(out / "grid.png", images)
        prev = manifest.get("runs", [])
        manifest.update(status="complete", num_images=len(images),
                        runs=prev + [{"ranks": all_stats, "world": rt.world}])
        write_json(out / "manifest.json", manifest)
