"""The matching methods' fast paths compute what the plain ones do: bf16 autocast against fp32 (DM, DC), the
compiled networks against eager, one DSA op for both batches against two, and the GPU check's tiny mode."""

from __future__ import annotations

import os

import pytest
import torch

from distillset.core.data import Source
from distillset.recover.base import Context, get
from distillset.recover.objectives import _matching
from distillset.recover.objectives._matching import CompiledNet, SiameseAugmenter
from distillset.recover.params import PixelSet
from distillset.recover.real import RealData
from distillset.squeeze.models import create_model

CLASSES, IPC = 3, 2
# bf16 keeps 8 mantissa bits (relative rounding 2^-9 per value); summed over a ConvNet-3 the loss moves by well under
# one percent, and the gradient to the images keeps its direction. These are the tolerances the fast paths promise.
LOSS_RTOL = {"dm": 0.02, "dc": 0.05}
GRAD_COS = {"dm": 0.99, "dc": 0.97}


@pytest.fixture(scope="module")
def real() -> RealData:
    return RealData(Source("npz:tests/assets/cifar10_small.npz").load("train"))


def ctx_of(real: RealData, dtype, seed: int = 0, total_steps: int = 10) -> Context:
    cls = torch.arange(CLASSES).repeat_interleave(IPC)
    return Context(device=torch.device("cpu"), classes=cls, num_classes=10, image_shape=(3, 32, 32),
                   generator=torch.Generator().manual_seed(seed), real=real, autocast_dtype=dtype, ipc=IPC,
                   total_steps=total_steps, mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26])


def loss_and_grad(method: str, real: RealData, dtype, **options) -> tuple[float, torch.Tensor]:
    ctx = ctx_of(real, dtype)
    obj = get("objective", method).from_options(width=32, batch_real=32, **options)
    obj.setup(ctx)
    syn = PixelSet.from_options(ctx.classes, torch.arange(IPC).repeat(CLASSES), (3, 32, 32), 0, ctx, init="real")
    loss = obj.loss(syn, ctx)
    loss.backward()
    return float(loss), syn.data.grad.clone()


@pytest.mark.parametrize("method", ["dm", "dc"])
def test_bf16_loss_and_gradient_match_fp32(real, method):
    l32, g32 = loss_and_grad(method, real, None)
    l16, g16 = loss_and_grad(method, real, torch.bfloat16)
    assert l32 > 0 and abs(l16 - l32) <= LOSS_RTOL[method] * l32, (l16, l32)
    cos = float(torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0))
    assert cos >= GRAD_COS[method], cos
    # and bf16 does change the numbers: the check compares two different computations, not one twice
    assert l16 != l32


def test_one_dsa_op_for_both_batches_is_two_ops(real):
    aug = SiameseAugmenter("dsa")
    for seed in range(6):  # several draws, so several op families
        ctx = ctx_of(real, None, seed)
        r, s = torch.rand(5, 3, 32, 32), torch.rand(2, 3, 32, 32, requires_grad=True)
        ra, sa = aug.pair(r, s, ctx)
        ctx = ctx_of(real, None, seed)
        plugin = aug.resolve(ctx)
        p = plugin.sample(1, ctx)
        torch.testing.assert_close(ra, plugin.apply(r, p, ctx))
        torch.testing.assert_close(sa, plugin.apply(s, p, ctx))
        sa.sum().backward()
        assert s.grad is not None and s.grad.abs().sum() > 0


def test_compile_only_for_long_units(real):
    cfg = get("objective", "dm").Config(compile_min_steps=100)
    assert not cfg.compiles(ctx_of(real, None, total_steps=99))
    assert cfg.compiles(ctx_of(real, None, total_steps=100))
    assert not get("objective", "dm").Config(compile_min_steps=0).compiles(ctx_of(real, None, total_steps=10 ** 6))


def test_compiled_net_falls_back_to_eager_with_the_same_numbers(monkeypatch, real):
    """Without a working compiler the compiled path warns and runs eager; the numbers are the module's."""
    def broken(fn, **kw):
        def fail(*a, **k):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(_matching, "_COMPILED", {})
    torch.manual_seed(0)
    net = create_model("convnet3", 10, 3, 32, width=8)
    x = torch.rand(4, 3, 32, 32)
    fn = CompiledNet("embed")
    torch.testing.assert_close(fn(net, x), net.embed(x))
    assert fn.eager
    other = create_model("convnet3", 10, 3, 32, width=8)  # a second network: its own weights, not the first's
    torch.testing.assert_close(fn(other, x), other.embed(x))
    assert not torch.allclose(fn(other, x), net.embed(x))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DISTILLSET_COMPILE_TESTS") != "1",
                    reason="compiles with inductor: ~30-150 s on a shared 2-core CPU; DISTILLSET_COMPILE_TESTS=1 runs it")
def test_compiled_net_matches_eager_and_reuses_one_graph():
    """The real compiled path on a tiny ConvNet: same logits and weight gradients as eager, and a second network of
    the same architecture compiles nothing new (its weights are graph inputs)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    nets = [create_model("convnet2", 10, 3, 8, width=4) for _ in range(2)]
    fn = CompiledNet("forward")
    x = torch.rand(3, 3, 8, 8)
    frames = []
    for net in nets:
        out = fn(net, x)
        torch.testing.assert_close(out, net(x), rtol=1e-4, atol=1e-5)
        g = torch.autograd.grad(out.sum(), list(net.parameters()))
        g_ref = torch.autograd.grad(net(x).sum(), list(net.parameters()))
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        frames.append(counters["frames"]["ok"])
    assert not fn.eager
    assert frames[0] >= 1 and frames[1] == frames[0], frames


def test_device_check_tiny_mode_has_every_row():
    from benchmarks import device_check

    rows = device_check.run(tiny=True, device=torch.device("cpu"), compile_=False)
    assert [r[0] for r in rows] == list(device_check.ROWS)
    for check, result, _ in rows:
        value = float(result.split()[0])
        assert value > 0, (check, result)
    lines = device_check.table(rows, True, torch.device("cpu"), 1.0)
    body = [line for line in lines if line.startswith("| ") and not line.startswith("| check")]
    assert [line.split(" | ")[0][2:] for line in body] == list(device_check.ROWS)
