"""G-VBSM: several teachers in turn, matching BatchNorm statistics plus real-data convolution and patch statistics.

loss = ce_weight * CE + r_bn * BN + r_conv * CONV + r_patch * PATCH for the teacher of this step (teachers rotate
every step), where

* BN is SRe2L's BatchNorm term (:class:`recover.objectives.bn_inversion.BNInversion`);
* CONV averages, over the teacher's convolution layers, the L2 distances between the channel mean/variance of the
  synthetic batch's conv output and the same statistics of the real data (``squeeze stats``), divided by
  sqrt(channels) so that every layer and backbone has the same scale;
* PATCH does the same in each cell of the P x P grid the statistics were computed on;
* with ``class_stats`` the CONV term matches each class of the batch to that class's real statistics instead.

The real-data statistics live beside each teacher (``TEACHER_DIR/stats.safetensors``, or the ``stats`` option) and are
checked against the teacher's weights when loaded. Soft labels come from the teacher ensemble: ``distillset relabel``
averages the probabilities of every teacher recorded in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from distillset.core.errors import DistillError
from distillset.recover.base import Context, Parametrization, register_objective
from distillset.recover.objectives.bn_inversion import BNInversion, channel_moments
from distillset.squeeze.statistics import TeacherStats, default_stats_path, load_statistics, patch_batch_moments


class ConvStatHook:
    """Forward hook on one convolution: distance of the batch's output statistics to the real data's."""

    def __init__(self, module: nn.Conv2d, stats: TeacherStats, layer: str, device, class_stats: bool):
        self.module = module
        self.channels = module.out_channels
        self.mean, self.var = (t.to(device) for t in stats.get("conv", layer))
        self.patch = None
        if f"patch/{layer}/mean" in stats.tensors:
            self.patch = tuple(t.to(device) for t in stats.get("patch", layer))
            self.grid = round(self.patch[0].shape[0] ** 0.5)
        self.cls = None
        if class_stats:
            if f"class/{layer}/mean" not in stats.tensors:
                raise DistillError("G-VBSM class_stats needs class-conditional statistics; re-run `distillset "
                                   "squeeze stats --class-conditional true`.")
            self.cls = tuple(t.to(device) for t in stats.get("class", layer))
        self.labels: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.patch_value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        y = output.float()  # statistics in fp32 even under bf16 autocast
        scale = self.channels ** -0.5
        if self.cls is not None and self.labels is not None:
            self.value = self._class_distance(y) * scale
        else:
            mean, var = channel_moments(output, self.mean)
            self.value = (torch.linalg.vector_norm(mean - self.mean) + torch.linalg.vector_norm(var - self.var)) * scale
        self.patch_value = None
        if self.patch is not None:
            h, w = y.shape[-2:]
            g = self.grid
            if h % g == 0 and w % g == 0:
                mean, var = patch_batch_moments(y, g)
                pm, pv = self.patch
                self.patch_value = ((torch.linalg.vector_norm(mean - pm) + torch.linalg.vector_norm(var - pv))
                                    * (g * g * y.shape[1]) ** -0.5)

    def _class_distance(self, y: torch.Tensor) -> torch.Tensor:
        labels = self.labels
        present, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        k = len(present)
        m = y.mean(dim=(2, 3))  # (N, C)
        sq = y.square().mean(dim=(2, 3))
        w = (1.0 / counts.to(y.dtype))[inverse][:, None]
        mean_c = torch.zeros(k, y.shape[1], device=y.device, dtype=y.dtype).index_add_(0, inverse, m * w)
        sq_c = torch.zeros_like(mean_c).index_add_(0, inverse, sq * w)
        var_c = (sq_c - mean_c.square()).clamp_min(0)
        tm, tv = self.cls[0][present], self.cls[1][present]
        d = torch.linalg.vector_norm(mean_c - tm, dim=1) + torch.linalg.vector_norm(var_c - tv, dim=1)
        return d.mean()

    def remove(self):
        self.handle.remove()


@register_objective("gvbsm", paper="Shao et al. 2024, Generalized Large-Scale Data Condensation via Various Backbone "
                    "and Statistical Matching (G-VBSM, arXiv:2311.17950)")
class GVBSM(BNInversion):
    """G-VBSM recover: BN + real-data conv/patch statistics of several teachers used in turn, plus CE."""

    @dataclass
    class Config(BNInversion.Config):
        """Options of G-VBSM (besides BN inversion's r_bn, first_bn_mult, bn_norm, ce_weight).

        Attributes:
            r_conv: weight of the convolution channel-statistics term.
            r_patch: weight of the patch-statistics term (0 = off).
            class_stats: match each class to its own real statistics (needs ``squeeze stats --class-conditional``).
            stats: statistics files, one per teacher in order (default: TEACHER_DIR/stats.safetensors).
        """

        r_conv: float = 1.0
        r_patch: float = 1.0
        class_stats: bool = False
        stats: list[str] = field(default_factory=list)

    def __init__(self, cfg: Config | None = None):
        super().__init__(cfg)
        c = self.cfg
        self.r_conv, self.r_patch, self.class_stats = float(c.r_conv), float(c.r_patch), bool(c.class_stats)
        self.stats_paths = list(c.stats or [])
        self.conv_hooks: list[list[ConvStatHook]] = []
        self._stats_cache: dict[str, TeacherStats] = {}

    def _stats_for(self, i: int, teacher) -> TeacherStats:
        if self.stats_paths:
            if len(self.stats_paths) != len(self._teachers):
                raise DistillError(f"G-VBSM got {len(self.stats_paths)} statistics files for {len(self._teachers)} "
                                   "teachers; give one per teacher, in the same order.")
            path = self.stats_paths[i]
        else:
            path = str(default_stats_path(teacher.path)) if teacher.path else ""
            if not path:
                raise DistillError(f"teacher {teacher.config.arch} has no folder; pass the objective option stats.")
        key = f"{path}|{teacher.sha256}"
        if key not in self._stats_cache:  # loaded once per run, not per unit
            self._stats_cache[key] = load_statistics(path, teacher)
        return self._stats_cache[key]

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self._teachers = ctx.teachers
        modules_of = [dict(t.model.named_modules()) for t in ctx.teachers]
        for i, t in enumerate(ctx.teachers):
            st = self._stats_for(i, t)
            layers = st.layers("conv")
            hooks = []
            for name in layers:
                m = modules_of[i].get(name)
                if not isinstance(m, nn.Conv2d):
                    raise DistillError(f"statistics of teacher {t.config.arch} name layer '{name}', which the model "
                                       "lacks; re-run `distillset squeeze stats` for this teacher.")
                hooks.append(ConvStatHook(m, st, name, ctx.device, self.class_stats))
            self.conv_hooks.append(hooks)

    def loss(self, syn: Parametrization, ctx: Context) -> torch.Tensor:
        k = self.teacher_index(ctx)
        hooks = self.conv_hooks[k]
        for h in hooks:
            h.labels = syn.labels
        total = super().loss(syn, ctx)  # runs teacher k once: BN and conv hooks fire together
        conv = torch.stack([h.value for h in hooks]).mean()
        patches = [h.patch_value for h in hooks if h.patch_value is not None]
        patch = torch.stack(patches).mean() if patches else conv.new_zeros(())
        self._logs.update(conv=conv.detach(), patch=patch.detach())
        return total + self.r_conv * conv + self.r_patch * patch

    def teardown(self) -> None:
        super().teardown()
        for hs in self.conv_hooks:
            for h in hs:
                h.remove()
        self.conv_hooks = []
