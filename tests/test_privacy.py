"""Membership inference and visual privacy (``distillset privacy mia | nearest``): the attack's arithmetic against
hand computations, the split's rules, LiRA's ratio, nearest neighbours that must find a planted copy, and the
commands end to end on digits."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from distillset.core.data import ImageSet, Source
from distillset.core.errors import DistillError
from distillset.relabel.privacy import (
    advantage_at,
    check_split,
    lira_scores,
    nearest_l2,
    nearest_summary,
    split_members,
    threshold_attack,
)


def test_advantage_matches_hand_computation():
    member = torch.tensor([0.1, 0.2, 0.9])
    non = torch.tensor([0.5, 0.8, 1.0])
    # tau = 0.6: members below: 0.1, 0.2 (2); non-members at or above: 0.8, 1.0 (2) -> 2 * 4/6 - 1
    assert advantage_at(member, non, 0.6) == pytest.approx(1 / 3)
    # the best tau lies in (0.2, 0.5]: 2 members below, all 3 non-members above -> 2 * 5/6 - 1 = 2/3
    assert advantage_at(member, non, 0.3) == pytest.approx(2 / 3)
    a = threshold_attack(-member, -non)  # higher score = member: the negated loss
    assert a["advantage"] == pytest.approx(2 / 3)
    assert a["balanced_accuracy"] == pytest.approx(5 / 6)
    assert advantage_at(member, non, -a["threshold"] + 1e-6) == pytest.approx(2 / 3)
    # AUC = P(member's loss < non-member's loss) over the 9 pairs: 0.1 and 0.2 beat all 3, 0.9 beats 0.5? no, 0.8? no,
    # 1.0 yes -> 7/9
    assert a["auc"] == pytest.approx(7 / 9)


def test_heldout_advantage_is_unbiased_where_best_threshold_is_not():
    g = torch.Generator().manual_seed(0)
    best, held = [], []
    for _ in range(40):  # no signal at all: members and non-members from one distribution
        a = threshold_attack(torch.randn(200, generator=g), torch.randn(200, generator=g))
        best.append(a["advantage"])
        held.append(a["advantage_heldout"])
    mean_best, mean_held = sum(best) / len(best), sum(held) / len(held)
    assert mean_best > 0.05 and mean_best == pytest.approx(a["null_advantage"], rel=0.35)  # "leakage" found in noise
    assert abs(mean_held) < 0.02  # a threshold chosen on the other half finds none
    strong = threshold_attack(torch.randn(200, generator=g) + 3, torch.randn(200, generator=g))
    assert strong["advantage_heldout"] > 0.8 and strong["tpr_at_1pct_fpr"] > 0.3


def test_split_is_disjoint_equal_and_stratified():
    labels = torch.arange(10).repeat(20)
    m, n = split_members(labels, 7, seed=3)
    assert len(m) == len(n) == 70 and not set(m.tolist()) & set(n.tolist())
    assert torch.bincount(labels[m], minlength=10).tolist() == [7] * 10
    assert torch.equal(m, split_members(labels, 7, seed=3)[0]) and not torch.equal(m, split_members(labels, 7, 4)[0])
    with pytest.raises(DistillError, match="at most 10"):
        split_members(labels, 11, seed=0)
    with pytest.raises(DistillError, match="disjoint"):
        check_split(torch.tensor([1, 2, 3]), torch.tensor([3, 4, 5]))
    with pytest.raises(DistillError, match="equal"):
        check_split(torch.tensor([1, 2, 3]), torch.tensor([4, 5]))


def test_lira_ranks_members_above_non_members():
    g = torch.Generator().manual_seed(0)
    n, k = 200, 8
    shift = 2.0  # a member's confidence is higher when it is trained on
    base = torch.randn(n, generator=g) * 3  # examples differ in how easy they are: what LiRA calibrates away
    ins = torch.rand(k, n, generator=g) < 0.5
    shadow = base + shift * ins + 0.5 * torch.randn(k, n, generator=g)
    is_member = torch.arange(n) < n // 2
    target = base + shift * is_member + 0.5 * torch.randn(n, generator=g)
    scores = lira_scores(target, shadow, ins)
    lira = threshold_attack(scores[is_member], scores[~is_member])
    plain = threshold_attack(target[is_member], target[~is_member])  # the uncalibrated confidence attack
    assert lira["auc"] > 0.9 and lira["auc"] > plain["auc"] + 0.1


def test_nearest_finds_a_planted_copy():
    train = Source("digits").load("train")
    test = Source("digits").load("test")
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (3, 1, 8, 8), generator=g, dtype=torch.uint8)
    planted = torch.cat([train.images[[17]], noise])
    syn = ImageSet(planted, torch.tensor([int(train.labels[17]), 0, 1, 2]), train.class_names)
    d, i = nearest_l2(syn.images, train.images, 3, batch=100)  # the block merge across batches
    assert float(d[0, 0]) == 0.0 and int(i[0, 0]) == 17
    assert torch.all(d[:, :-1] <= d[:, 1:])
    ref = test.subset(torch.arange(40))
    s = nearest_summary(syn, train, ref, k=3)
    per = s["_per_image"]["synthetic"]
    assert int(per["ssim_index"][0, 0]) == 17 and float(per["ssim"][0, 0]) == pytest.approx(1.0, abs=1e-4)
    assert s["synthetic"]["l2_nearest_min"] == 0.0
    assert s["synthetic"]["share_closer_than_reference_5pct"] == pytest.approx(0.25)  # the copy, not the noise


def _cli(capsys, *argv):
    """The CLI in this process (as test_bad_input does): its exit code and what it printed."""
    from distillset.launch.cli import main

    code = main(list(argv))
    cap = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=cap.out, stderr=cap.err)


def test_mia_end_to_end_and_resume(tmp_path):
    from distillset.launch.privacy import MIAConfig, run_mia

    dm = {"method": "dm", "iterations": 3, "optimizer": "sgd", "lr": 1.0, "augmentation": "none",
          "classes_per_unit": 0, "options": {"batch_real": 16, "width": 16}}
    cfg = MIAConfig(out=str(tmp_path / "mia"), data="digits", members_per_class=12, seeds=1, ipc=2,
                    targets={"members": {"epochs": 60}, "random": {}, "dm": dm}, model_kwargs={"width": 16}, lr=0.05,
                    epochs=5, shadows=2)
    res = run_mia(cfg)
    rows = {r["target"]: r for r in res["summary"]}
    assert rows["members"]["train_images"] == 120 and rows["dm"]["train_images"] == rows["random"]["train_images"] == 20
    # 60 epochs on 12 images per class fit the members: the loss attack separates them from non-members
    assert rows["members"]["advantage"] > 0.2
    assert 0 < rows["dm"]["test_top1"] <= 1 and "lira_auc" in rows["dm"]
    for f in ("mia.json", "mia.csv", "roc.png", "config.yaml", "targets/dm_seed0.json", "sets/dm/seed0/manifest.json"):
        assert (tmp_path / "mia" / f).exists(), f
    before = (tmp_path / "mia" / "targets" / "members_seed0.json").stat().st_mtime_ns
    again = run_mia(cfg)  # every (target, seed) is read back, not retrained
    assert (tmp_path / "mia" / "targets" / "members_seed0.json").stat().st_mtime_ns == before
    assert again["summary"] == res["summary"]


def test_nearest_command(tmp_path):
    from distillset.launch.privacy import NearestConfig, run_nearest
    from distillset.recover.config import RecoverConfig
    from distillset.recover.engine import run as recover

    sets = []
    for init in ("noise", "real"):
        out = tmp_path / f"dm_{init}"
        recover(RecoverConfig(out=str(out), data="digits", method="dm", ipc=2, iterations=2, lr=1.0,
                              optimizer="sgd", augmentation="none", classes_per_unit=0,
                              param_options={"init": init}, options={"batch_real": 8, "width": 8}))
        sets.append(str(out))
    res = run_nearest(NearestConfig(distilled=sets, out=str(tmp_path / "near"), rows=4))
    noise, real = res["sets"]["dm_noise"], res["sets"]["dm_real"]
    assert noise["init"] == "noise" and real["init"] == "real"
    # two steps from a real image stay next to it; from noise they are far from every training image
    assert real["synthetic"]["l2_nearest_mean"] < noise["synthetic"]["l2_nearest_mean"]
    assert real["synthetic"]["ssim_nearest_mean"] > noise["synthetic"]["ssim_nearest_mean"]
    for f in ("nearest.json", "nearest.csv", "nearest_dm_noise.png", "nearest_dm_real.png"):
        assert (tmp_path / "near" / f).exists(), f


@pytest.mark.parametrize("args, message", [
    (["--split", "SPLIT_OVERLAP"], "both members and non-members"),
    (["--split", "SPLIT_SIZES"], "equal sizes"),
    (["--targets", "{dm2: {iterations: 3}}"], "needs a method"),
    (["--targets", "{members: {method: dm}}"], "takes only epochs"),
    (["--targets", "{x: {method: dm, ipc: 3}}"], "sets ipc"),
    (["--ipc", "60", "--members-per-class", "50"], "exceeds members_per_class"),
    (["--members-per-class", "500"], "lower members_per_class"),
    (["--shadows", "1"], "shadows = 1"),
])
def test_mia_bad_input(tmp_path, args, message, capsys):
    (tmp_path / "SPLIT_OVERLAP").write_text(json.dumps({"members": [1, 2, 3], "non_members": [3, 4, 5]}))
    (tmp_path / "SPLIT_SIZES").write_text(json.dumps({"members": [1, 2, 3], "non_members": [4, 5]}))
    args = [str(tmp_path / a) if a.startswith("SPLIT") else a for a in args]
    r = _cli(capsys, "privacy", "mia", "--out", str(tmp_path / "o"), *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_nearest_bad_input(tmp_path, capsys):
    r = _cli(capsys, "privacy", "nearest", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "at least one distilled set" in r.stderr
    r = _cli(capsys, "privacy", "nearest", "--distilled", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_mia_evaluator_in_evaluate(tmp_path):
    from distillset.recover.config import RecoverConfig
    from distillset.recover.engine import run as recover
    from distillset.relabel.evaluate import EvaluateConfig
    from distillset.relabel.evaluate import run as evaluate

    out = tmp_path / "dm"
    recover(RecoverConfig(out=str(out), data="digits", method="dm", ipc=2, iterations=2, lr=1.0, optimizer="sgd",
                          augmentation="none", classes_per_unit=0, options={"batch_real": 8, "width": 8}))
    m = evaluate(EvaluateConfig(distilled=str(out), epochs=2, students=1, labels="hard", protocol="plain",
                                model_kwargs={"width": 8}, evaluators=["mia"]))
    assert set(m["mia"]) >= {"distilled", "random", "members"} and m["mia"]["members"] == 500
    assert -1 <= m["mia"]["distilled"]["advantage_heldout"] <= 1 and 0 <= m["mia"]["random"]["auc"] <= 1
