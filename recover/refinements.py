"""Named refinements: published methods that are options of a base method here, listed by ``distillset methods``
under their own names so a user looking for them finds how to switch them on (and ``--method NAME`` says so).

Each entry names the base methods, the options (or recover fields) that make the refinement, and the paper. No
option value is implied: the paper's values depend on the dataset and IPC (``distillset methods BASE`` documents
each option).
"""

from __future__ import annotations

from dataclasses import dataclass

from distillset.core.registry import Registry

REFINEMENTS = Registry("refinement", "distillset.refinements", ("distillset.recover.refinements",))


@dataclass(frozen=True)
class Refinement:
    """How a refinement is switched on: ``options`` of the ``methods`` (or recover ``fields``)."""

    methods: tuple[str, ...]
    options: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()

    def usage(self, name: str) -> str:
        opts = ", ".join(f"{o}: ..." for o in self.options)
        parts = [f"--method {self.methods[0]}"] + ([f"--options '{{{opts}}}'"] if opts else [])
        parts += [f"--{f.replace('_', '-')} VALUE" for f in self.fields]
        also = f" (also with {', '.join(self.methods[1:])})" if len(self.methods) > 1 else ""
        return f"{name} is a refinement of {self.methods[0]}{also}: use {' '.join(parts)}"


_TABLE = {
    "acc-dd": (Refinement(("dc", "dsa", "dm", "datadam", "cafe"), ("model_pool", "perturb")),
               "Zhang et al. 2023, Accelerating Dataset Distillation via Model Augmentation (CVPR)",
               "model augmentation: a pool of early-stage networks, perturbed, instead of fresh random ones"),
    "ftd": (Refinement(("mtt", "datm"), ("ema",)),
            "Du et al. 2023, Minimizing the Accumulated Trajectory Error to Improve Dataset Distillation (CVPR)",
            "an exponential moving average of the synthetic images is written instead of the last iterate"),
    "ast": (Refinement(("mtt", "datm"), ("intermediate",)),
            ("Shen et al. 2023, AST: Effective Dataset Distillation through Alignment with Smooth and High-Quality "
             "Expert Trajectories"), "also match the expert at its intermediate epochs"),
    "edc": (Refinement(("sre2l", "gvbsm"), ("class_aware",), ("param_options", "ema_decay")),
            "Shao et al. 2024, Elucidating the Design Space of Dataset Condensation (NeurIPS)",
            ("class-aware BN statistics (class_aware), RDED initialisation (param_options {init: rded}), EMA of "
             "the images (ema_decay); several teachers with --teachers A,B")),
}

for _name, (_ref, _paper, _what) in _TABLE.items():
    REFINEMENTS.add(_name, _ref, paper=_paper, description=f"{_what} ({_ref.usage(_name).split(': ', 1)[1]})")


def hint(name: str) -> str | None:
    """The one-line usage of refinement ``name`` (``None`` when it is not one)."""
    entry = REFINEMENTS.entry(name) if name in REFINEMENTS else None
    return entry.obj.usage(name).rstrip(".") + "." if entry is not None else None
