"""DOORPING (Liu et al., NDSS'23): the backdoor trigger is re-optimised while a method distils, and the poisoned real
images are re-stamped with it, so the distilled set keeps learning the current trigger.

An engine hook (:class:`recover.base.StepHook`), not a second loop: the objective (DC, DM, DD, ...) runs unchanged on
``ctx.real``, whose poisoned images (relabelled to the target class beforehand) carry the current trigger. Every
``update_every`` engine steps the trigger is optimised on a network:

* the network the objective currently uses (``Objective.network``: DC's scheduled network, trained on the synthetic
  set by the inner loop, as the paper's ``update_trigger`` after DC's network update), else
* a fresh network trained ``net_epochs`` epochs on the current synthetic set (DM and DD keep no network between
  steps; this is "the model trained during distillation" for them).

As the paper's code, the masked trigger pixels are optimised by Adam (gradients reach only the mask) so that chosen
units reach ``alpha`` x their activation at the start of the update (MSE, stopped once below ``threshold``). The
units (``neurons``): by default the target class's logit itself (the target activation); ``target``: the ``topk``
units of the layer feeding the classifier with the largest weights into the target logit; ``connectivity``: the
paper's, the ``topk`` units with the largest summed absolute outgoing weights. Our choices: the trigger lives in
``[0, 1]`` pixel space, clamped there and rounded to the uint8 pixels the images hold (the paper's code lets it leave
the valid range in normalised units), and it is optimised stamped on ``canvas`` poisoned images (the context it is
used in; ``canvas`` 0 is the paper's black canvas).

The trigger is in the unit checkpoint (a resumed unit continues with it and re-stamps the real images); only the unit
that holds the target class (where the poisoned images are) updates it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from distillset.core.backdoor import pattern_to_uint8, stamp
from distillset.core.errors import DistillError
from distillset.core.partition import mix_seed
from distillset.recover.base import Context, Objective, Parametrization, StepHook
from distillset.recover.objectives._matching import Normalize, train_network

log = logging.getLogger("distillset.doorping")

NEURONS = ("logit", "target", "connectivity")


@dataclass
class DoorpingConfig:
    """How the DOORPING trigger is re-optimised.

    Attributes:
        update_every: engine steps between trigger updates (the paper: after every network update of DC's loop).
        steps: at most this many Adam steps per update (the paper: 1000; the trigger saturates in [0, 1] far sooner).
        lr: Adam learning rate of the trigger pixels, in [0, 1] pixel units (the paper: 0.08 in normalised units).
        alpha: the selected units are driven to alpha x their activation at the start of the update.
        topk: units selected in the layer feeding the classifier.
        neurons: what the trigger drives: logit (the target class's logit itself), target (the topk embedding
            units with the largest weights into the target logit) or connectivity (the paper's: the topk embedding
            units with the largest summed absolute outgoing weights).
        threshold: stop an update once the MSE falls below this (the paper: 0.5).
        canvas: N > 0: the trigger is optimised stamped on N of the poisoned images (drawn from the unit generator);
            0: alone on a black image (the paper's; on MNIST it drove the trigger towards black, the colour of the
            digits' corners, which no longer marks anything).
        arch: architecture of the network trained for the update when the objective keeps none (DM, DD).
        model_kwargs: its keyword arguments (e.g. width).
        net_epochs: epochs of that network on the current synthetic set (SGD, lr_net).
        lr_net: its SGD learning rate.
    """

    update_every: int = 10
    steps: int = 50
    lr: float = 0.02
    alpha: float = 10.0
    topk: int = 1
    neurons: str = "logit"
    threshold: float = 0.5
    canvas: int = 8
    arch: str = "convnet"
    model_kwargs: dict = field(default_factory=dict)
    net_epochs: int = 20
    lr_net: float = 0.01

    def __post_init__(self):
        if min(self.update_every, self.steps, self.topk) < 1 or min(self.net_epochs, self.canvas) < 0:
            raise DistillError("doorping update_every, steps and topk must be >= 1, net_epochs and canvas >= 0.")
        if self.neurons not in NEURONS:
            raise DistillError(f"unknown doorping neurons '{self.neurons}'; use one of {', '.join(NEURONS)}.")
        if self.lr <= 0 or self.lr_net <= 0 or self.alpha <= 0:
            raise DistillError("doorping lr, lr_net and alpha must be > 0.")


def classifier_of(net: nn.Module) -> nn.Linear:
    """The last linear layer (the classifier) of a network with an ``embed`` method (the ConvNet family)."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears or not hasattr(net, "embed"):
        raise DistillError(f"DOORPING needs a network with embed() and a linear classifier (the ConvNet family), got "
                           f"{type(net).__name__}; use arch convnet.")
    return linears[-1]


def select_units(net: nn.Module, target: int, topk: int, how: str = "logit") -> tuple[str, torch.Tensor]:
    """``(layer, indices)`` of what the trigger drives: ``("logits", [target])``, or the ``topk`` units of the
    embedding (``"embed"``) chosen by the classifier's weights (see the module docstring)."""
    w = classifier_of(net).weight.detach()
    if how == "logit":
        return "logits", torch.tensor([target])
    score = w[target] if how == "target" else w.abs().sum(0)
    return "embed", torch.topk(score, min(topk, score.numel())).indices


def unit_activation(net: nn.Module, x: torch.Tensor, units: tuple[str, torch.Tensor], norm: nn.Module) -> torch.Tensor:
    """Activations ``(N, k)`` of the selected units (:func:`select_units`) on ``[0, 1]`` images ``x``."""
    layer, idx = units
    feats = net(norm(x)) if layer == "logits" else net.embed(norm(x))
    return feats[:, idx.to(feats.device)]


def optimise_trigger(net: nn.Module, pixels: torch.Tensor, mask: torch.Tensor, canvas: torch.Tensor,
                     units: tuple[str, torch.Tensor], norm: nn.Module,
                     cfg: DoorpingConfig) -> tuple[torch.Tensor, dict]:
    """One trigger update: the float ``[0, 1]`` trigger ``(C, H, W)`` after driving ``units`` of ``net`` (on
    ``canvas`` images with the trigger stamped) to ``alpha`` x their starting activation; and what it achieved."""
    was_training = net.training
    net.eval()  # BatchNorm uses its running statistics: the trigger must work on a deployed model
    req = [p.requires_grad for p in net.parameters()]
    for p in net.parameters():
        p.requires_grad_(False)
    m = mask.to(canvas.device)
    trig = pixels.detach().clone().to(canvas.device).requires_grad_(True)
    opt = torch.optim.Adam([trig], lr=cfg.lr, betas=(0.9, 0.99))
    with torch.no_grad():
        start = unit_activation(net, torch.where(m, trig, canvas), units, norm)
    # the paper's goal alpha x start, written as a rise of (alpha - 1) x |start| (at least 0.1): a silent unit is not
    # held at zero, and a negative logit is raised rather than pushed further down
    goal = start + (cfg.alpha - 1) * start.abs().clamp_min(0.1)
    steps = 0
    for steps in range(1, cfg.steps + 1):
        act = unit_activation(net, torch.where(m, trig, canvas), units, norm)
        loss = F.mse_loss(act, goal)
        if float(loss.detach()) < cfg.threshold:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            trig.clamp_(0, 1)
    with torch.no_grad():
        end = unit_activation(net, torch.where(m, trig, canvas), units, norm)
    for p, r in zip(net.parameters(), req):
        p.requires_grad_(r)
    net.train(was_training)
    return trig.detach(), {"activation_before": float(start.mean()), "activation_after": float(end.mean()),
                           "steps": steps}


class DoorpingHook(StepHook):
    """Re-optimise the trigger every ``update_every`` steps of the unit holding ``target`` and re-stamp the poisoned
    real images (``positions`` in ``ctx.real``, already relabelled to ``target``) with it.

    Args:
        cfg: the update's options.
        pattern: the starting uint8 trigger ``(C, H, W)``.
        mask: bool ``(H, W)``.
        positions: indices of the poisoned images in the run's real training data.
        target: the target class.
        on_final: called with the final uint8 pattern and the updates' history when the target unit finishes (before
            its images are written), so the caller can keep the trigger the set was distilled with. The history is a
            diagnostic and not checkpointed: after a resume it lists the updates since the resume (the trigger itself
            is checkpointed, so the result is the same).
    """

    def __init__(self, cfg: DoorpingConfig, pattern: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 target: int, on_final=None):
        self.cfg, self.mask, self.target, self.on_final = cfg, mask.cpu(), int(target), on_final
        self.pattern = pattern.cpu().clone()
        self.positions = positions.long().cpu()
        self.history: list[dict] = []
        self._ctx: Context | None = None

    def describe(self) -> dict:
        return {"hook": "doorping", "target": self.target, "poisoned": len(self.positions),
                "mask_pixels": int(self.mask.sum()), "config": {k: v for k, v in vars(self.cfg).items()}}

    def active(self, ctx: Context) -> bool:
        return bool((ctx.classes == self.target).any())

    def setup(self, ctx: Context) -> None:
        real = ctx.real
        if real is None:
            raise DistillError("DOORPING needs a method that reads real data during distillation (dc, dm, dd).")
        if len(self.positions) and (int(self.positions.max()) >= len(real.labels)
                                    or bool((real.labels[self.positions] != self.target).any())):
            raise DistillError("DOORPING's poisoned positions are not images of the target class in the run's real "
                               "data; build the data with the same poisoning (launch/backdoor.py does).")
        real.make_writable()
        self._ctx = ctx
        self.norm = Normalize(ctx).to(ctx.device)
        self._restamp()

    def _restamp(self) -> None:
        real = self._ctx.real
        pos = self.positions.to(real.images.device)
        real.images[pos] = stamp(real.images[pos], self.pattern, self.mask)

    def network(self, syn: Parametrization, objective: Objective, ctx: Context) -> nn.Module:
        """The objective's current network, else a fresh one trained on the current synthetic set."""
        net = objective.network(ctx)
        if net is not None:
            return net
        from distillset.squeeze.models import create_model

        c, h, _ = ctx.image_shape
        with torch.random.fork_rng(devices=[]):  # the network's init is drawn from the unit generator
            torch.manual_seed(mix_seed(int(torch.randint(2 ** 62, (1,), generator=ctx.generator))))
            net = create_model(self.cfg.arch, ctx.num_classes, c, h, **self.cfg.model_kwargs).to(ctx.device)
        if self.cfg.net_epochs:
            with torch.no_grad():
                x = syn.render().detach().float()
            opt = torch.optim.SGD(net.parameters(), lr=self.cfg.lr_net, momentum=0.9)
            train_network(net, x, syn.labels, self.cfg.net_epochs, opt, self.norm, ctx)
        return net

    def update(self, net: nn.Module, ctx: Context) -> dict:
        """One trigger update on ``net``; the poisoned images are re-stamped with the result."""
        real = ctx.real
        if self.cfg.canvas:
            pick = torch.randperm(len(self.positions), generator=ctx.generator)[: self.cfg.canvas]
            canvas = real.get(self.positions[pick])
        else:  # the paper's: the trigger alone
            canvas = torch.zeros((1, *ctx.image_shape), device=ctx.device)
        units = select_units(net, self.target, self.cfg.topk, self.cfg.neurons)
        pixels = self.pattern.to(canvas.device).float() / 255
        trig, info = optimise_trigger(net, pixels, self.mask, canvas, units, self.norm, self.cfg)
        self.pattern = pattern_to_uint8(trig, self.mask)
        self._restamp()
        return info

    def after_step(self, syn: Parametrization, objective: Objective, ctx: Context) -> None:
        if not self.active(ctx) or not len(self.positions) or (ctx.step + 1) % self.cfg.update_every:
            return
        info = self.update(self.network(syn, objective, ctx), ctx)
        self.history.append({"step": ctx.step + 1, **info})
        log.debug("doorping step %d: %s", ctx.step + 1, info)

    def checkpoint_state(self) -> dict:
        return {"pattern": self.pattern.clone()}

    def load_checkpoint_state(self, state: dict) -> None:
        if "pattern" in state:
            self.pattern = state["pattern"].cpu().to(torch.uint8)
            if self._ctx is not None:
                self._restamp()

    def finalize(self, syn: Parametrization, ctx: Context) -> None:
        if self.active(ctx) and self.on_final is not None:
            self.on_final(self.pattern.clone(), list(self.history))
