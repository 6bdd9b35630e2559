"""Backdoor attacks (NAIVEATTACK, DOORPING): trigger stamping and poisoning as pure functions, DOORPING's trigger
update raising the target activation, the hook inside the engine (re-stamping, resume exactness), the driver end to
end and its bad input, all on the tiny real MNIST fixture."""

from __future__ import annotations

import json
import re

import pytest
import torch

from distillset.core.backdoor import (
    choose_poisoned,
    initial_pattern,
    patch_mask,
    pattern_to_uint8,
    poison,
    stamp,
    triggered,
)
from distillset.core.data import Source
from distillset.core.errors import DistillError
from tests.conftest import MNIST

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|DEBUG|WARNING) ")


@pytest.fixture(scope="module")
def mnist():
    src = Source(MNIST)
    return src.load("train"), src.load("test")


def test_patch_mask_is_a_square_one_pixel_in_from_the_corner():
    m = patch_mask((1, 28, 28), 3, "bottom_right")
    assert m.shape == (28, 28) and int(m.sum()) == 9
    assert m[24:27, 24:27].all() and not m[27].any() and not m[:, 27].any()  # the paper's 1 px margin
    tl = patch_mask((3, 32, 32), 2, "top_left")
    assert tl[1:3, 1:3].all() and int(tl.sum()) == 4
    with pytest.raises(DistillError, match="does not fit 28x28"):
        patch_mask((1, 28, 28), 28)
    with pytest.raises(DistillError, match="unknown trigger location"):
        patch_mask((1, 28, 28), 2, "middle")


def test_stamp_sets_masked_pixels_and_leaves_the_rest(mnist):
    train, _ = mnist
    x = train.images[:8]
    mask = patch_mask(train.image_shape, 4)
    for kind in ("white", "random"):
        pattern = initial_pattern(train.image_shape, mask, kind, seed=3)
        y = stamp(x, pattern, mask)
        assert torch.equal(y[:, :, ~mask], x[:, :, ~mask])
        assert torch.equal(y[:, :, mask], pattern[:, mask].expand(8, -1, -1))
        assert not torch.equal(x, y) and x.data_ptr() != y.data_ptr()  # a new tensor; the input is untouched
    assert (initial_pattern(train.image_shape, mask, "white")[:, mask] == 255).all()
    r = initial_pattern(train.image_shape, mask, "random", seed=3)
    assert (r[:, mask] >= 1).all() and (r[:, ~mask] == 0).all()
    assert torch.equal(r, initial_pattern(train.image_shape, mask, "random", seed=3))
    with pytest.raises(DistillError, match="cannot be stamped"):
        stamp(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), r, mask)


def test_choose_poisoned_takes_exactly_round_rate_n_non_target_images_by_seed(mnist):
    train, _ = mnist
    n = len(train)
    for rate in (0.01, 0.025, 0.1):
        idx = choose_poisoned(train.labels, 3, rate, seed=0)
        assert len(idx) == round(rate * n) and len(set(idx.tolist())) == len(idx)
        assert (train.labels[idx] != 3).all()
    a, b = choose_poisoned(train.labels, 3, 0.05, 0), choose_poisoned(train.labels, 3, 0.05, 1)
    assert torch.equal(a, choose_poisoned(train.labels, 3, 0.05, 0)) and not torch.equal(a, b)
    with pytest.raises(DistillError, match="lower the poison rate"):
        choose_poisoned(train.labels, 3, 0.95, 0)


def test_poison_relabels_and_stamps_only_the_chosen_images(mnist):
    train, test = mnist
    mask = patch_mask(train.image_shape, 3)
    pattern = initial_pattern(train.image_shape, mask, "white")
    idx = choose_poisoned(train.labels, 0, 0.05, 0)
    p = poison(train, idx, pattern, mask, 0)
    rest = torch.ones(len(train), dtype=torch.bool)
    rest[idx] = False
    assert (p.labels[idx] == 0).all() and torch.equal(p.labels[rest], train.labels[rest])
    assert torch.equal(p.images[rest], train.images[rest])
    assert (p.images[idx][:, :, mask] == 255).all()
    assert not (train.images[idx][:, :, mask] == 255).all()  # the source itself is not changed
    from distillset.launch.backdoor import trigger_distance

    d = trigger_distance(p.subset(idx[:5]), pattern, mask, 0)  # stamped images carry the trigger exactly
    assert d == {"target": 0.0, "others": None}
    d = trigger_distance(train, pattern, mask, 0)
    assert d["target"] > 0.9 and d["others"] > 0.9  # MNIST's corners are black, the trigger white
    from distillset.launch.backdoor import balanced_subset

    sub = balanced_subset(test.labels, 100, 10)
    assert (torch.bincount(test.labels[sub], minlength=10) == 10).all()
    t = triggered(test, pattern, mask, 0)
    assert len(t) == int((test.labels != 0).sum()) and (t.labels == 0).all()
    with pytest.raises(DistillError, match="target class 10 is out of range"):
        poison(train, idx, pattern, mask, 10)


def _trained_net(train, width=8, steps=40):
    """A small ConvNet trained on MNIST poisoned with a white corner patch (10% of the images, target 0): a network
    that has started to learn the backdoor, as the networks trained during distillation on poisoned data."""
    from distillset.squeeze.models import create_model

    mask = patch_mask(train.image_shape, 5)
    data = poison(train, choose_poisoned(train.labels, 0, 0.1, 0), initial_pattern(train.image_shape, mask), mask, 0)
    torch.manual_seed(0)
    net = create_model("convnet", 10, 1, 28, width=width)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x, y = data.images.float() / 255, data.labels
    for k in range(steps):
        j = torch.arange(k * 64, k * 64 + 64) % len(x)
        loss = torch.nn.functional.cross_entropy(net((x[j] - 0.5) / 0.5), y[j])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


@pytest.fixture(scope="module")
def poisoned_net(mnist):
    return _trained_net(mnist[0])


@pytest.mark.parametrize("neurons", ["logit", "target", "connectivity"])
def test_doorping_update_raises_the_target_activation(mnist, poisoned_net, neurons):
    from distillset.recover.doorping import DoorpingConfig, optimise_trigger, select_units, unit_activation
    from distillset.squeeze.inputs import InputTransform

    train, _ = mnist
    net = poisoned_net
    norm = InputTransform([0.5], [0.5])
    mask = patch_mask(train.image_shape, 5)
    pixels = initial_pattern(train.image_shape, mask, "random", seed=0).float() / 255
    canvas = train.images[train.labels != 0][:8].float() / 255
    units = select_units(net, 0, 2, neurons)
    if neurons == "target":  # the embedding units feeding the target logit
        w = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1].weight
        assert units[0] == "embed" and set(units[1].tolist()) == set(torch.topk(w[0], 2).indices.tolist())
    cfg = DoorpingConfig(steps=40, lr=0.05, neurons=neurons)
    trig, info = optimise_trigger(net, pixels, mask, canvas, units, norm, cfg)
    with torch.no_grad():
        before = unit_activation(net, torch.where(mask, pixels, canvas), units, norm).mean()
        after = unit_activation(net, torch.where(mask, trig, canvas), units, norm).mean()
    assert after > before + 0.05 * before.abs() and info["activation_after"] == pytest.approx(float(after), rel=1e-4)
    assert torch.equal(trig[:, ~mask], pixels[:, ~mask]) and trig.min() >= 0 and trig.max() <= 1
    # the rounded uint8 pattern keeps what the update achieved and stays a patch
    u8 = pattern_to_uint8(trig, mask)
    x = stamp((canvas * 255).round().to(torch.uint8), u8, mask).float() / 255
    with torch.no_grad():
        rounded = unit_activation(net, x, units, norm).mean()
    assert rounded > before + 0.04 * before.abs()
    assert (u8[:, ~mask] == 0).all()
    if neurons == "logit":  # the target's logit itself: the triggered images move towards the target class
        with torch.no_grad():
            p0 = net(norm(torch.where(mask, pixels, canvas))).softmax(1)[:, 0].mean()
            p1 = net(norm(torch.where(mask, trig, canvas))).softmax(1)[:, 0].mean()
        assert p1 > p0 + 0.1, (p0, p1)


def _hooked_run(tmp_path, name, mnist, checkpoint_every=0, die_at=None):
    from distillset.recover.config import RecoverConfig
    from distillset.recover.doorping import DoorpingConfig, DoorpingHook
    from distillset.recover.engine import run

    train, test = mnist
    mask = patch_mask(train.image_shape, 4)
    idx = choose_poisoned(train.labels, 0, 0.05, 0)
    start = initial_pattern(train.image_shape, mask, "random", 0)
    from distillset.launch.backdoor import _write_npz

    data = tmp_path / "poisoned.npz"
    if not data.exists():
        _write_npz(data, poison(train, idx, start, mask, 0), test)
    finals = []

    class Hook(DoorpingHook):
        def after_step(self, syn, objective, ctx):
            super().after_step(syn, objective, ctx)
            if die_at is not None and ctx.step + 1 == die_at:
                raise KeyboardInterrupt  # the kill, after that step's checkpoint would be due

    hook = Hook(DoorpingConfig(update_every=2, steps=10, net_epochs=3, model_kwargs={"width": 8}), start, mask, idx,
                0, on_final=lambda p, h: finals.append(p))
    cfg = RecoverConfig(out=str(tmp_path / name), data=f"npz:{data}", method="dm",
                        options={"batch_real": 16, "width": 8}, param_options={"init": "real"},
                        augmentation="none", ipc=1, iterations=6, lr=1.0, optimizer="sgd", schedule="constant",
                        classes_per_unit=0, checkpoint_every=checkpoint_every, autocast="none", channels_last=False)
    return run, cfg, hook, finals, idx, start


def test_doorping_hook_restamps_the_real_data_and_resumes_exactly(tmp_path, mnist):
    from distillset.core.distilled import load_distilled

    run, cfg, hook, finals, _idx, start = _hooked_run(tmp_path, "whole", mnist)
    manifest = run(cfg, hooks=(hook,))
    assert manifest["hooks"][0]["hook"] == "doorping" and len(hook.history) == 3  # steps 2, 4, 6
    assert len(finals) == 1 and not torch.equal(finals[0], start)  # the trigger moved
    assert all(h["activation_after"] >= h["activation_before"] for h in hook.history)
    whole = load_distilled(tmp_path / "whole")[0].images

    # killed after step 3 (checkpoint at step 2, after the update there), then resumed: the same set and trigger
    run, cfg2, hook2, _finals2, _, _ = _hooked_run(tmp_path, "killed", mnist, checkpoint_every=2, die_at=3)
    with pytest.raises(KeyboardInterrupt):
        run(cfg2, hooks=(hook2,))
    run, cfg3, hook3, finals3, _, _ = _hooked_run(tmp_path, "killed", mnist, checkpoint_every=2)
    run(cfg3, hooks=(hook3,))
    assert torch.equal(finals3[0], finals[0])
    assert torch.equal(load_distilled(tmp_path / "killed")[0].images, whole)
    # the same folder without the hook is another run
    from distillset.recover.config import RecoverConfig

    with pytest.raises(DistillError, match="was made with hooks"):
        run(RecoverConfig(**cfg3.__dict__))


def _cli(argv, capsys):
    from distillset.launch.cli import main

    code = main(argv)
    cap = capsys.readouterr()
    lines = [s for s in cap.err.strip().splitlines() if s.strip() and not LOG_LINE.match(s)]
    return code, lines, cap


@pytest.mark.parametrize("flags,phrase", [
    (["--trigger-size", "40"], "does not fit 28x28"),
    (["--target", "10"], "target class 10 is out of range for 10 classes"),
    (["--attacks", "doorping", "--method", "mtt"], "mtt reads none"),
    (["--poison-rate", "1.5"], "poison_rate is a share"),
    (["--doorping", "{neurons: all}"], "unknown doorping neurons"),
    (["--recover", "{image_size: 16}"], "set by the attack itself"),
])
def test_bad_input_is_one_line_and_writes_nothing(flags, phrase, tmp_path, capsys):
    out = tmp_path / "run"
    code, lines, cap = _cli(["attack", "backdoor", "--data", MNIST, "--out", str(out), *flags], capsys)
    assert code == 2 and "Traceback" not in cap.err
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], lines
    assert not out.exists()


def test_attack_backdoor_end_to_end_and_rerun_skips(tmp_path, capsys):
    from distillset.launch.backdoor import BackdoorConfig, run

    cfg = BackdoorConfig(out=str(tmp_path / "bd"), data=MNIST, method="dm", ipc=1, iterations=6,
                         options={"batch_real": 16, "width": 8}, poison_rate=0.05, trigger_size=4,
                         doorping={"update_every": 3, "steps": 10, "net_epochs": 3, "model_kwargs": {"width": 8}},
                         students=2, student_epochs=3, student_kwargs={"width": 8}, test_limit=100)
    res = run(cfg)
    out = tmp_path / "bd"
    for f in ("backdoor.json", "backdoor.csv", "asr.png", "triggers.png", "config.yaml", "data/naive.npz",
              "doorping/trigger.safetensors", "clean/distilled/manifest.json"):
        assert (out / f).exists(), f
    rows = {r["set"]: r for r in res["rows"]}
    assert set(rows) == {"clean", "naive", "doorping"} and rows["clean"]["asr_mean"] is None
    assert set(rows["clean"]["asr"]) == {"naive", "doorping"} and all(r["n"] == 2 for r in rows.values())
    for r in rows.values():
        assert 0 <= r["cta_mean"] <= 1 and all(0 <= a["mean"] <= 1 for a in r["asr"].values())
        assert set(r["trigger_distance"]) == {"naive", "doorping"}
    assert json.loads((out / "backdoor.json").read_text())["poisoned"] == 30
    assert (out / "backdoor.csv").read_text().splitlines()[0].startswith("method,set,cta_mean,cta_std,asr_naive_mean")
    # the three sets differ only by the attack: the poisoned sources keep every clean image
    clean, naive = Source(MNIST).load("train"), Source(f"npz:{out / 'data' / 'naive.npz'}").load("train")
    assert int((clean.labels != naive.labels).sum()) == 30
    stamps = {p.name: p.stat().st_mtime_ns for p in out.rglob("seed*.json")}
    again = run(cfg)  # everything finished: read back, nothing retrained
    assert again["rows"] == res["rows"]
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("seed*.json")} == stamps


@pytest.mark.parametrize("method,attacks,options,extra", [
    ("mtt", ["naive"], {"syn_steps": 2, "expert_epochs": 1, "max_start_epoch": 1},
     {"trajectories": {"num_experts": 1, "epochs": 2, "model_kwargs": {"width": 8}, "eval_test": False},
      "recover": {"lr": 10.0}}),
    ("dd", ["doorping"], {"inner_steps": 2, "real_batch": 32, "model_kwargs": {"width": 8}}, {}),
    ("dc", ["doorping"], {"batch_real": 8, "width": 8, "outer_loop": 2, "inner_loop": 1}, {}),
])
def test_every_method_distils_from_the_poisoned_data(method, attacks, options, extra, tmp_path):
    """MTT's experts are recorded on the poisoned data; DD's trigger is optimised on its own trained network, DC's
    on the network of DC's loop."""
    from distillset.launch.backdoor import BackdoorConfig, run

    cfg = BackdoorConfig(out=str(tmp_path / method), data=MNIST, method=method, ipc=1, iterations=4, options=options,
                         attacks=attacks, poison_rate=0.05, students=1, student_epochs=2, test_limit=50,
                         student_kwargs={"width": 8},
                         doorping={"update_every": 2, "steps": 5, "net_epochs": 2, "model_kwargs": {"width": 8}},
                         **extra)
    res = run(cfg)
    assert [r["set"] for r in res["rows"]] == ["clean", attacks[0]]
    if method == "mtt":
        meta = json.loads((tmp_path / "mtt" / "naive" / "experts" / "trajectories.json").read_text())
        assert "naive.npz" in json.dumps(meta)  # the experts saw the poisoned data
    else:
        assert len(res["doorping_updates"]) == 2
