"""Helpers shared by the matching objectives (DC, DSA, DM, CAFE, DataDAM): normalisation, per-class positions of the
synthetic images, the Siamese augmentation choice, ConvNet block features, and the DC-style network schedule that
maps outer/inner loops onto the engine's one-loss-per-step loop.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from distillset.core.errors import DistillError
from distillset.recover.base import Context, Objective, Parametrization, resolve_options
from distillset.recover.objectives.model_aug import NetConfig
from distillset.squeeze.inputs import InputTransform

log = logging.getLogger(__name__)

AUG_CHOICES = ("none", "dsa", "diffaugment", "engine")

# DC's (outer_loop, inner_loop) per images-per-class (Zhao et al. 2021, Table/README): 1 -> (1, 1), 10 -> (10, 50),
# 50 -> (50, 10); other ipc values take the nearest entry at or below.
DC_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


def dc_loops(ipc: int) -> tuple[int, int]:
    keys = [k for k in sorted(DC_LOOPS) if k <= max(1, ipc)]
    return DC_LOOPS[keys[-1]]


class Normalize(InputTransform):
    """The run's input transform (the engine's mean/std, then its ZCA whitening when set), applied to real and
    synthetic images alike."""

    def __init__(self, ctx: Context):
        super().__init__(ctx.mean, ctx.std, ctx.zca)


def class_positions(labels: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``[(class, positions of its synthetic images)]`` in class order."""
    return [(int(c), torch.nonzero(labels == c).flatten()) for c in torch.unique(labels).tolist()]


def matching_aug(choice: str, options: dict | None = None):
    """The augmentation class and Config a matching objective's ``aug``/``aug_options`` name (``None`` for ``none``
    and ``engine``), validated: a matching method's Config calls this so a bad choice fails when the recipe is read."""
    if choice not in AUG_CHOICES:
        raise DistillError(f"unknown matching augmentation '{choice}'; use one of {', '.join(AUG_CHOICES)} "
                           "('engine' uses the recipe's augmentation).")
    if choice in ("none", "engine"):
        return None
    return resolve_options("augmentation", choice, {"siamese": True, **(options or {})})


@dataclass
class MatchingConfig(NetConfig):
    """Options every per-class matching method shares (besides the networks').

    Attributes:
        batch_real: real images per class per step.
        aug: augmentation applied Siamese to the real and the synthetic batch: dsa, diffaugment, none, or engine
            (the recipe's augmentation).
        aug_options: options of that augmentation (e.g. strategy, ratios).
        compile_min_steps: torch.compile the networks' passes (weights as graph inputs, see :class:`CompiledNet`)
            when a unit runs at least this many steps; 0 = never. Compiling costs ~30-70 s per graph on a 2-core
            CPU and pays back after a few hundred steps (benchmarks/matching_perf.py), so short runs stay eager.
    """

    batch_real: int = 256
    aug: str = "dsa"
    aug_options: dict = field(default_factory=dict)
    compile_min_steps: int = 2000

    def __post_init__(self):
        super().__post_init__()
        if self.batch_real < 1:
            raise DistillError(f"batch_real must be >= 1, got {self.batch_real}.")
        if self.compile_min_steps < 0:
            raise DistillError(f"compile_min_steps must be >= 0 (0 = never compile), got {self.compile_min_steps}.")
        matching_aug(self.aug, self.aug_options)

    def compiles(self, ctx: Context) -> bool:
        """Whether a unit of ``ctx.total_steps`` steps runs the compiled networks."""
        return 0 < self.compile_min_steps <= ctx.total_steps


class SiameseAugmenter:
    """The augmentation a matching objective applies to both batches of a comparison with one parameter draw."""

    def __init__(self, choice: str, options: dict | None = None):
        self.choice, self.options = choice, dict(options or {})
        plugin = matching_aug(choice, self.options)
        self._aug = plugin[0](plugin[1]) if plugin is not None else None

    def resolve(self, ctx: Context):
        if self.choice == "none":
            return None
        if self.choice == "engine":
            return ctx.augment
        return self._aug

    def pair(self, real: torch.Tensor, syn: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment ``real`` and ``syn`` with the same draw (broadcast to both batch sizes)."""
        aug = self.resolve(ctx)
        if aug is None:
            return real, syn
        params = aug.sample(1, ctx)
        # one draw for both, so one batched op over both: half the op launches, the same numbers
        both = aug.apply(torch.cat([real, syn.to(real.dtype)]), params, ctx)
        return both[:len(real)], both[len(real):]

    def single(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        aug = self.resolve(ctx)
        if aug is None:
            return x
        return aug.apply(x, aug.sample(1, ctx), ctx)


class _Method(nn.Module):
    """``net.embed`` or ``net.forward`` as a module's forward, so ``functional_call`` can swap the weights in."""

    def __init__(self, net: nn.Module, method: str):
        super().__init__()
        self.net, self.method = net, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embed(x) if self.method == "embed" else self.net(x)


def _signature(net: nn.Module) -> tuple:
    """What a compiled graph depends on besides the weights' values: the architecture, the tensors' shapes and
    dtypes, and train/eval mode (BatchNorm computes differently in each; the private copy keeps the mode it had)."""
    return ((type(net), tuple(m.training for m in net.modules()))
            + tuple((k, tuple(v.shape), v.dtype) for k, v in net.state_dict().items()))


# (architecture, method, autocast, device type) -> (eager function, its compiled form). Module level, so the units of
# a run (DM's are single classes) and every objective instance share one compilation instead of recompiling each.
_COMPILED: dict[tuple, tuple] = {}


def _functions(net: nn.Module, method: str, autocast: torch.dtype | None, device_type: str) -> tuple:
    key = (_signature(net), method, autocast, device_type)
    if key not in _COMPILED:
        wrapper = _Method(copy.deepcopy(net), method)

        def run(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
                return torch.func.functional_call(wrapper, state, (x,))

        _COMPILED[key] = (run, torch.compile(run, dynamic=False))
    return _COMPILED[key]


class CompiledNet:
    """A network's ``embed`` or ``forward`` as one torch.compile'd function of (weights, images).

    The matching methods draw a fresh network every step (DM) or every outer loop (DC). Compiling a module bakes
    in that instance; here its weights are inputs of the graph (``torch.func.functional_call`` on a private copy
    of the architecture), so every network of the same architecture and batch shape reuses one compilation, across
    units and objective instances. Inductor fuses what eager runs as separate memory-bound passes (instance norm,
    ReLU, pooling and their backwards), which is most of a ConvNet step on a CPU (benchmarks/matching_perf.py).
    Autograd runs through the compiled graph, first order only: DC's ``create_graph`` pass on the synthetic images
    stays eager. Should compiling fail (e.g. no C++ compiler), it warns once and runs eager from then on.

    Args:
        method: ``embed`` (the flattened last feature map) or ``forward`` (logits).
        autocast: dtype of the forward under autocast (``None``: full precision); part of the compiled graph.
        device_type: the autocast device type.
    """

    def __init__(self, method: str = "embed", autocast: torch.dtype | None = None, device_type: str = "cpu"):
        if method not in ("embed", "forward"):
            raise DistillError(f"CompiledNet runs embed or forward, not '{method}'.")
        self.method, self.autocast, self.device_type = method, autocast, device_type
        self.eager = False  # set when compiling failed

    def __call__(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        run, compiled = _functions(net, self.method, self.autocast, self.device_type)
        state = {f"net.{k}": v for k, v in [*net.named_parameters(), *net.named_buffers()]}
        if self.eager:
            return run(state, x)
        try:
            return compiled(state, x)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager path computes the same thing
            log.warning("torch.compile failed (%s: %s); running the networks eager.", type(e).__name__, e)
            self.eager = True
            return run(state, x)


def block_features(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Output of every [conv -> norm -> ReLU -> pool] block of a ConvNet (the last one is the embedding map)."""
    feats = getattr(net, "features", None)
    if not isinstance(feats, nn.Sequential):
        raise DistillError("layer-wise matching (CAFE, DataDAM) needs a ConvNet-family network (convnet*).")
    out, h, mods = [], x, list(feats)
    for i, m in enumerate(mods):
        h = m(h)
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(m, nn.AvgPool2d) or (isinstance(m, nn.ReLU) and not isinstance(nxt, nn.AvgPool2d)):
            out.append(h)
    return out


def train_network(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, opt: torch.optim.Optimizer,
                  norm: Normalize, ctx: Context, augmenter: SiameseAugmenter | None = None, batch: int = 256,
                  compiled: CompiledNet | None = None) -> None:
    """``steps`` epochs of SGD on the (detached) synthetic set, as DC's inner loop (one batch per epoch when small).

    ``compiled`` runs the forward (and so its backward) as one compiled graph of the network's weights; otherwise
    the forward runs eager under the run's autocast."""
    net.train()
    n = x.shape[0]
    for _ in range(steps):
        order = torch.randperm(n, generator=ctx.generator).to(x.device)
        for s in range(0, n, batch):
            idx = order[s:s + batch]
            xb = x[idx]
            if augmenter is not None:
                xb = augmenter.single(xb, ctx)
            if compiled is not None:
                out = compiled(net, norm(xb))
            else:
                with ctx.autocast():
                    out = net(norm(xb))
            loss = F.cross_entropy(out.float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


class NetSchedule:
    """DC's bi-level structure on the engine's loop: one engine step = one outer iteration.

    A network is drawn every ``outer_loop`` steps; between two outer steps on the same network it is trained
    ``inner_loop`` epochs on the current synthetic images (after the engine's image update, as DC does). The network
    lives in ``ctx.state`` (per unit) and is saved in unit checkpoints through :meth:`checkpoint_state`.
    """

    def __init__(self, source, outer_loop: int, inner_loop: int, lr_net: float, augmenter: SiameseAugmenter | None,
                 batch_train: int = 256):
        self.source, self.outer_loop, self.inner_loop = source, outer_loop, inner_loop
        self.lr_net, self.augmenter, self.batch_train = lr_net, augmenter, batch_train
        self._state: dict | None = None
        self.compiled: CompiledNet | None = None  # the inner updates' forward, when the objective compiles

    def loops(self, ctx: Context) -> tuple[int, int]:
        d = dc_loops(ctx.ipc)
        return self.outer_loop or d[0], self.inner_loop or d[1]

    def network(self, syn, ctx: Context, norm: Normalize) -> nn.Module:
        st = ctx.state
        self._state = st
        outer, inner = self.loops(ctx)
        if st.get("net") is None or st["k"] >= outer:
            st["net"] = self.source.sample(ctx)
            st["k"] = 0
        elif st["k"] > 0 and inner > 0:
            with torch.no_grad():
                x = syn.render().detach().float()
            for p in st["net"].parameters():
                p.requires_grad_(True)
            opt = torch.optim.SGD(st["net"].parameters(), lr=self.lr_net)
            train_network(st["net"], x, syn.labels, inner, opt, norm, ctx, self.augmenter, self.batch_train,
                          self.compiled)
        st["k"] += 1
        return st["net"]

    def checkpoint_state(self) -> dict:
        st = self._state or {}
        if st.get("net") is None:
            return {}
        return {"k": torch.tensor(st["k"]), **{f"net.{k}": v.detach().cpu() for k, v in st["net"].state_dict().items()}}

    def load_checkpoint_state(self, state: dict, ctx: Context) -> None:
        if not state:
            return
        net = self.source.build(ctx)  # restoring must not draw from the (already restored) generator
        net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        ctx.state.update(net=net, k=int(state["k"]))


def class_block_features(syn: Parametrization, ctx: Context, net: nn.Module, norm: Normalize,
                         augmenter: SiameseAugmenter, batch_real: int):
    """Per class of the unit: ``(real batch, real block features (no grad), synthetic block features)``, both batches
    through the same Siamese augmentation draw (CAFE and DataDAM compare these layer by layer)."""
    for c, pos in class_positions(syn.labels):
        real = ctx.real.sample(c, batch_real, ctx.generator)
        real, x_syn = augmenter.pair(real, syn.render(pos), ctx)
        with ctx.autocast():
            with torch.no_grad():
                fr = [f.float() for f in block_features(net, norm(real))]
            fs = [f.float() for f in block_features(net, norm(x_syn))]
        yield real, fr, fs


class ScheduledNetObjective(Objective):
    """Plumbing shared by the bi-level objectives (DC, CAFE): the unit's context, the network schedule in unit
    checkpoints, and the last step's logs. Subclasses set ``self.schedule`` and ``self._logs``."""

    schedule: NetSchedule
    _logs: dict[str, float]
    _ctx: Context | None = None

    def setup(self, ctx: Context) -> None:
        self._ctx = ctx
        self.norm = Normalize(ctx).to(ctx.device)

    def logs(self) -> dict[str, float]:
        return dict(self._logs)

    def checkpoint_state(self) -> dict:
        return self.schedule.checkpoint_state()

    def network(self, ctx: Context) -> nn.Module | None:
        return ctx.state.get("net")

    def load_checkpoint_state(self, state: dict) -> None:
        if self._ctx is not None:
            self.schedule.load_checkpoint_state(state, self._ctx)

    def teardown(self) -> None:
        if self._ctx is not None:
            self._ctx.state.pop("net", None)
        self._ctx = None
