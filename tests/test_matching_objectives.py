"""Matching objectives on real CIFAR-10 fixtures: each one's defining quantity falls when its images are optimised.

Small ConvNets (width 32) and small real batches keep every test to seconds on a CPU; the mechanisms are the
papers'. Progress is measured under FIXED evaluation draws (a fresh objective and context seeded the same way before
and after), so a drop is a property of the images, not of the random networks drawn during the run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distillset.core.data import Source
from distillset.recover.base import Context, get
from distillset.recover.objectives._matching import dc_loops
from distillset.recover.objectives.model_aug import NetSource
from distillset.recover.params import PixelSet
from distillset.recover.real import RealData

SMALL = {"width": 32, "batch_real": 32}
CLASSES = 3


@pytest.fixture(scope="module")
def real() -> RealData:
    return RealData(Source("npz:tests/assets/cifar10_small.npz").load("train"))


def make_ctx(real: RealData, ipc: int, seed: int = 0) -> Context:
    cls = torch.arange(CLASSES).repeat_interleave(ipc)
    return Context(device=torch.device("cpu"), classes=cls, num_classes=10, image_shape=(3, 32, 32),
                   generator=torch.Generator().manual_seed(seed), real=real, augment=get("augmentation", "none").from_options(),
                   mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26], ipc=ipc)


def make_syn(ctx: Context, ipc: int, init: str = "real") -> PixelSet:
    cls = ctx.classes
    return PixelSet.from_options(cls, torch.arange(ipc).repeat(CLASSES), (3, 32, 32), 0, ctx, init=init)


def optimise(name: str, real: RealData, ipc: int, steps: int, lr: float, init: str = "real", **options):
    ctx = make_ctx(real, ipc)
    syn = make_syn(ctx, ipc, init)
    obj = get("objective", name).from_options(**options)
    obj.setup(ctx)
    opt = torch.optim.SGD(syn.parameters(), lr=lr, momentum=0.5)
    for step in range(steps):
        ctx.step = step
        loss = obj.loss(syn, ctx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        syn.project_()
    obj.teardown()
    return syn


def evaluate(name: str, syn: PixelSet, real: RealData, ipc: int, seeds=(101, 102, 103), **options) -> float:
    """The objective's loss under fixed draws (fresh objective and state per seed), averaged over seeds."""
    total = 0.0
    for s in seeds:
        ctx = make_ctx(real, ipc, seed=s)
        obj = get("objective", name).from_options(**options)
        obj.setup(ctx)
        with torch.enable_grad():
            total += float(obj.loss(syn, ctx).detach())
        obj.teardown()
    return total / len(seeds)


def test_dc_gradient_distance_drops(real):
    opts = {**SMALL, "outer_loop": 2, "inner_loop": 2}
    before = evaluate("dc", make_syn(make_ctx(real, 2), 2), real, 2, **opts)
    # the cosine distance moves slowly (DC runs 1000s of steps); a larger lr shows the drop within 16 steps
    after = evaluate("dc", optimise("dc", real, 2, steps=16, lr=1.0, **opts), real, 2, **opts)
    assert after < 0.95 * before, (before, after)


def test_dc_loop_mapping(real):
    """outer_loop steps per network; between them the network is trained inner_loop epochs on the synthetic set."""
    assert dc_loops(1) == (1, 1) and dc_loops(10) == (10, 50) and dc_loops(50) == (50, 10) and dc_loops(12) == (10, 50)
    ctx = make_ctx(real, 2)
    syn = make_syn(ctx, 2)
    obj = get("objective", "dc").from_options(**SMALL, outer_loop=3, inner_loop=2)
    obj.setup(ctx)
    nets, weights = [], []
    for step in range(6):
        ctx.step = step
        obj.loss(syn, ctx).backward()
        nets.append(ctx.state["net"])
        weights.append(next(ctx.state["net"].parameters()).detach().clone())
    assert nets[0] is nets[1] is nets[2] and nets[3] is nets[4] is nets[5] and nets[2] is not nets[3]
    assert not torch.equal(weights[0], weights[1])  # inner training between outer steps on one network
    # resume: the checkpointed network is restored without drawing randomness
    state = obj.checkpoint_state()
    g_state = ctx.generator.get_state()
    ctx.state.clear()
    obj.load_checkpoint_state(state)
    assert torch.equal(next(ctx.state["net"].parameters()), weights[5]) and ctx.state["k"] == 3
    assert torch.equal(ctx.generator.get_state(), g_state)


def test_dsa_objective_applies_siamese_augmentation(real):
    syn = make_syn(make_ctx(real, 1), 1)
    plain = evaluate("dc", syn, real, 1, seeds=(7,), **SMALL)
    dsa = evaluate("dsa", syn, real, 1, seeds=(7,), **SMALL)
    assert plain != dsa  # same nets and real batches, only the augmentation differs
    # ... and DSA's own distance drops too
    opts = {**SMALL, "outer_loop": 1, "inner_loop": 1}
    before = evaluate("dsa", syn, real, 1, seeds=(11, 12, 13, 14), **opts)
    after = evaluate("dsa", optimise("dsa", real, 1, steps=16, lr=0.1, **opts), real, 1, seeds=(11, 12, 13, 14),
                     **opts)
    assert after < before, (before, after)


def test_dm_embedding_gap_shrinks(real):
    opts = {**SMALL}
    syn0 = make_syn(make_ctx(real, 2), 2, init="noise")
    before = evaluate("dm", syn0, real, 2, **opts)
    after = evaluate("dm", optimise("dm", real, 2, steps=20, lr=1.0, init="noise", **opts), real, 2, **opts)
    assert after < 0.7 * before, (before, after)


def test_dm_shards_by_class():
    assert not get("objective", "dm").joint_classes and get("objective", "dc").joint_classes


def test_cafe_loss_drops(real):
    opts = {**SMALL, "outer_loop": 2, "inner_loop": 1, "temperature": 10.0}
    before = evaluate("cafe", make_syn(make_ctx(real, 2), 2, init="noise"), real, 2, **opts)
    after = evaluate("cafe", optimise("cafe", real, 2, steps=12, lr=0.1, init="noise", **opts), real, 2, **opts)
    assert after < 0.7 * before, (before, after)


def test_datadam_loss_drops(real):
    opts = {**SMALL}
    before = evaluate("datadam", make_syn(make_ctx(real, 2), 2, init="noise"), real, 2, **opts)
    # normalised attention maps give small gradients: a large image lr shows the drop within 12 steps
    after = evaluate("datadam", optimise("datadam", real, 2, steps=12, lr=10.0, init="noise", **opts), real, 2,
                     **opts)
    assert after < 0.9 * before, (before, after)


def test_acc_dd_pool_and_perturbation(real):
    ctx = make_ctx(real, 1)
    src = NetSource("convnet", 32, model_pool=2, perturb=0.05, pool_epochs=3)
    pool = src.pool(ctx)
    assert len(pool) == 2
    x = real.get(torch.arange(200)).sub(torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1))
    x = x / torch.tensor([0.25, 0.24, 0.26]).view(1, 3, 1, 1)
    y = real.labels[:200]
    fresh = NetSource("convnet", 32).sample(ctx)
    with torch.no_grad():
        ce_pool = F.cross_entropy(pool[0](x), y)
        ce_fresh = F.cross_entropy(fresh(x), y)
    assert ce_pool < ce_fresh  # early-stage models have learned something about the real data
    net = src.sample(ctx)
    assert src.pool(ctx) is pool  # cached
    with torch.no_grad():
        member = min(pool, key=lambda m: float((next(m.parameters()) - next(net.parameters())).norm()))
    w0, w1 = next(member.parameters()), next(net.parameters())
    rel = ((w1 - w0).flatten(1).norm(dim=1) / w0.flatten(1).norm(dim=1))
    assert torch.allclose(rel, torch.full_like(rel, 0.05), rtol=1e-3)  # filter-wise scaled perturbation
    # DM through the option runs on pool members
    syn = optimise("dm", real, 1, steps=2, lr=1.0, model_pool=1, perturb=0.01, pool_epochs=0.5, **SMALL)
    assert torch.isfinite(syn.data).all()


def test_dm_batched_forward_equals_class_by_class(real):
    """All classes in one forward (instance-norm nets) gives the class-by-class gaps and gradients; a BatchNorm net
    keeps the per-class passes (its statistics would mix the classes)."""
    from distillset.recover.objectives.model_aug import build_net

    dm = get("objective", "dm").from_options(batch_real=32, width=32)
    results = []
    for batched in (False, True):
        ctx = make_ctx(real, 2, seed=3)
        dm.setup(ctx)
        syn = make_syn(ctx, 2)
        net = dm.source.sample(ctx)
        gaps = torch.stack(dm.class_gaps(syn, ctx, net, batched=batched))
        grad, = torch.autograd.grad(gaps.sum(), [p for p in syn.parameters() if p.requires_grad])
        results.append((gaps.detach(), grad))
    (g0, d0), (g1, d1) = results
    assert torch.allclose(g0, g1, rtol=1e-4, atol=1e-5) and torch.allclose(d0, d1, rtol=1e-3, atol=1e-6)
    dm.BATCH_IMAGES = 70  # groups of two classes: the same numbers again
    ctx = make_ctx(real, 2, seed=3)
    syn = make_syn(ctx, 2)
    g2 = torch.stack(dm.class_gaps(syn, ctx, dm.source.sample(ctx), batched=True)).detach()
    assert torch.allclose(g0, g2, rtol=1e-4, atol=1e-5)
    ctx = make_ctx(real, 2)
    bn = build_net("convnet_bn", ctx, 0, 16)
    calls = []
    bn.features.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    dm.cfg.batch_classes = True
    dm.class_gaps(make_syn(ctx, 2), ctx, bn)
    assert max(calls) == 32  # one class at a time, even with batch_classes
