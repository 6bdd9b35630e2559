"""evaluate: the whole plan is checked before any work, model kwargs stay with their architecture, and a killed
evaluation resumes student by student."""

from __future__ import annotations

import json

import pytest

from distillset.core.errors import DistillError
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import run as recover
from distillset.relabel import evaluate as ev
from distillset.relabel.softlabels import RelabelConfig
from distillset.relabel.softlabels import run as relabel


@pytest.fixture(scope="module")
def distilled(digits_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("evalplan") / "set"
    recover(RecoverConfig(out=str(out), teachers=[str(digits_teacher)], data="digits", ipc=1, iterations=2,
                          autocast="none"))
    relabel(RelabelConfig(distilled=str(out), epochs=2, topk=3, epochs_per_file=2, autocast="none"))
    return out


def test_kwargs_belong_to_their_architecture(distilled, tmp_path, monkeypatch):
    # the teacher is convnet_bn with width 32: a timm student must not receive width
    assert ev.student_kwargs(["timm:resnet10t", "convnet_bn"], None, "convnet_bn", {"width": 32}) == {
        "timm:resnet10t": {}, "convnet_bn": {"width": 32}}
    assert ev.student_kwargs(["convnet_bn"], {}, "convnet_bn", {"width": 32}) == {"convnet_bn": {}}  # {} overrides
    calls = []
    monkeypatch.setattr(ev, "train_student", lambda images, test, spec, *a, **k: calls.append(spec) or 0.5)
    m = ev.run(ev.EvaluateConfig(distilled=str(distilled), out=str(tmp_path / "e"), archs=["timm:resnet10t"],
                                 epochs=1, students=1, batch_students=1))
    assert {s.arch for s in calls} == {"timm:resnet10t"} and all(s.model_kwargs == {} for s in calls)
    assert {(s["set"], s["labels"]) for s in m["summary"]} == {("distilled", "hard"), ("distilled", "soft"),
                                                               ("random", "hard"), ("random", "soft")}
    calls.clear()
    ev.run(ev.EvaluateConfig(distilled=str(distilled), out=str(tmp_path / "f"), epochs=1, students=1,
                             model_kwargs={}, batch_students=1))
    assert all(s.arch == "convnet_bn" and s.model_kwargs == {} for s in calls)


def test_a_bad_plan_fails_before_any_work(distilled, tmp_path, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("work started before the plan was checked")

    monkeypatch.setattr(ev, "train_student", no_work)
    monkeypatch.setattr(ev, "generate", no_work)
    cases = [({"archs": ["timm:resnet10t"], "model_kwargs": {"width": 8}}, "does not take model_kwargs"),
             ({"archs": ["convnet_nb"]}, "unknown model 'convnet_nb'"),
             ({"teachers": [str(tmp_path / "missing")]}, "missing")]
    for kw, msg in cases:
        with pytest.raises(DistillError, match=msg) as e:
            ev.run(ev.EvaluateConfig(distilled=str(distilled), out=str(tmp_path / "x"), epochs=1, students=1, **kw))
        assert "\n" not in str(e.value)
    assert not (tmp_path / "x" / "students").exists()


def test_a_killed_evaluation_trains_only_the_missing_students(distilled, tmp_path, monkeypatch):
    # one student at a time (the spy counts train_student calls); the cohort's resume is tests/test_cohort.py's
    cfg = ev.EvaluateConfig(distilled=str(distilled), out=str(tmp_path / "e"), epochs=1, students=2, labels="hard",
                            archs=["convnet"], model_kwargs={"width": 8}, batch_students=1)
    ref = ev.run(ev.EvaluateConfig(**{**cfg.__dict__, "out": str(tmp_path / "ref")}))
    real = ev.train_student
    trained = []

    def killed_after(n):
        def fake(images, test, spec, mean, std, seed, *a, **k):
            if len(trained) >= n:
                raise KeyboardInterrupt  # the kill
            trained.append(seed)
            return real(images, test, spec, mean, std, seed, *a, **k)
        return fake

    monkeypatch.setattr(ev, "train_student", killed_after(3))
    with pytest.raises(KeyboardInterrupt):
        ev.run(cfg)
    assert len(list((tmp_path / "e" / "students").glob("*.json"))) == 3
    trained.clear()
    monkeypatch.setattr(ev, "train_student", killed_after(100))
    again = ev.run(cfg)
    assert len(trained) == 1  # 4 students (2 sets x 2 seeds), 3 kept
    assert [r["top1"] for r in again["runs"]] == [r["top1"] for r in ref["runs"]]
    assert again["summary"] == ref["summary"]
    trained.clear()
    ev.run(cfg)  # everything finished: nothing is trained
    assert trained == []
    # another evaluation config is not mixed in: its students are trained afresh
    ev.run(ev.EvaluateConfig(**{**cfg.__dict__, "epochs": 2}))
    assert len(trained) == 4
    rec = json.loads(next((tmp_path / "e" / "students").glob("*.json")).read_text())
    assert {"fingerprint", "arch", "set", "labels", "seed", "top1"} <= set(rec)
