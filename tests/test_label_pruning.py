"""Label pruning (LPLD): fewer stored (crop, label) pairs, each still the teacher's label of its own crop; students
draw from the pool per image and epoch; a pruned pool serves one student length only."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from distillset.core.distilled import load_distilled
from distillset.core.errors import DistillError
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import run as recover
from distillset.relabel.evaluate import EvaluateConfig
from distillset.relabel.evaluate import run as evaluate
from distillset.relabel.softlabels import RelabelConfig, apply_crops, epoch_crops, load_soft_labels
from distillset.relabel.softlabels import run as relabel
from distillset.squeeze.checkpoint import load_teacher


@pytest.fixture(scope="module")
def two_sets(digits_teacher, tmp_path_factory):
    """The same distilled set twice: one to relabel in full, one pruned."""
    root = tmp_path_factory.mktemp("prune")
    out = []
    for name in ("full", "pruned"):
        folder = root / name
        recover(RecoverConfig(out=str(folder), teachers=[str(digits_teacher)], data="digits", method="random",
                              ipc=2, iterations=0, autocast="none"))
        out.append(folder)
    return out


def test_pruned_labels_store_a_fraction_and_match_their_crops(two_sets, digits_teacher):
    full, pruned = two_sets
    common = {"epochs": 40, "topk": 3, "min_scale": 0.5, "flip": False, "autocast": "none", "epochs_per_file": 8}
    r_full = relabel(RelabelConfig(distilled=str(full), **common))
    r_pruned = relabel(RelabelConfig(distilled=str(pruned), prune=0.1, **common))
    assert r_pruned["stored_epochs"] == 4 and r_full["stored_epochs"] == 40
    assert r_pruned["bytes_per_image"] == pytest.approx(r_full["bytes_per_image"] / 10)
    soft = load_soft_labels(pruned)
    assert soft.pruned and soft.epochs == 4 and soft.meta["student_epochs"] == 40
    # every student epoch draws, per image, one of the 4 stored pairs: all are used, the draw is reproducible
    draws = torch.stack([soft.draw(e) for e in range(40)])
    assert int(draws.min()) == 0 and int(draws.max()) == 3 and torch.equal(draws[7], soft.draw(7))
    assert len({tuple(d.tolist()) for d in draws}) > 30  # not one cycle: a fresh draw per epoch
    # the crop a student gets for (stored epoch, image) is the crop that label was computed on
    images, _ = load_distilled(pruned)
    teacher = load_teacher(str(digits_teacher))
    stored = draws[5]
    crops = soft.crops(stored)
    for i in range(len(images)):
        want = epoch_crops(len(images), soft.meta["crop_seed"], int(stored[i]), 0.5, False)
        assert all(torch.equal(crops[k][i], want[k][i]) for k in want)
    x = apply_crops(images.images.float() / 255, crops)
    with torch.no_grad():
        probs = torch.softmax(teacher(x) / soft.meta["temperature"], 1)
    targets = soft.targets(stored, torch.arange(len(images)))
    top = probs.topk(3, 1)
    assert torch.equal(targets.topk(3, 1).indices, top.indices)
    assert torch.allclose(targets.gather(1, top.indices), top.values, atol=2e-3)


def test_unpruned_labels_keep_the_cycle(two_sets):
    soft = load_soft_labels(two_sets[0])
    assert not soft.pruned and torch.equal(soft.draw(43), torch.full((len(soft.values[0]),), 3))


def test_pruned_labels_refuse_another_student_length(two_sets):
    with pytest.raises(DistillError, match="pruned to 4 of 40 student epochs"):
        evaluate(EvaluateConfig(distilled=str(two_sets[1]), epochs=30, students=1, labels="soft", baseline=False))
    m = evaluate(EvaluateConfig(distilled=str(two_sets[1]), epochs=40, students=1, labels="soft", baseline=True,
                                evaluators=[]))
    rows = {(r["set"], r["labels"]): r for r in m["summary"]}
    assert 0 < rows[("distilled", "soft")]["mean"] <= 1 and ("random", "soft") in rows  # baseline pruned alike


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1"])
def test_prune_rate_outside_zero_one(value, tmp_path):
    r = subprocess.run([sys.executable, "-m", "distillset.launch.cli", "relabel", "--distilled", str(tmp_path),
                        "--prune", value], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "in (0, 1]" in r.stderr, r.stderr
