"""Soft labels (storage, exact crops, resume) and the evaluation against random real images."""

from __future__ import annotations

import json

import pytest
import torch

from distillset.core.errors import DistillError
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import run as recover
from distillset.relabel.evaluate import EvaluateConfig, dd_ranking, random_subset
from distillset.relabel.evaluate import run as evaluate
from distillset.relabel.softlabels import RelabelConfig, compress, dense_targets, epoch_crops, load_soft_labels
from distillset.relabel.softlabels import run as relabel


@pytest.fixture(scope="module")
def distilled(digits_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("d") / "set"
    recover(RecoverConfig(out=str(out), teachers=[str(digits_teacher)], data="digits", ipc=3, iterations=60, lr=0.1,
                          autocast="none", aug_options={"final_scale": 0.5, "flip": False}))
    return out


def test_topk_roundtrip_is_a_distribution_and_keeps_the_top():
    p = torch.softmax(torch.randn(6, 20) * 3, 1)
    c = compress(p, 5)
    assert c["values"].dtype == torch.float16 and c["indices"].dtype == torch.uint8
    d = dense_targets(c["values"], c["indices"], 20)
    assert torch.allclose(d.sum(1), torch.ones(6), atol=1e-3)
    assert torch.equal(d.argmax(1), p.argmax(1))
    assert (d - p).abs().sum(1).max() < 2 * (1 - p.topk(5, 1).values.sum(1)).max() + 1e-2
    full = dense_targets(compress(p, 0)["values"], None, 20)
    assert torch.allclose(full, p, atol=1e-3)


def test_crops_are_a_pure_function_of_seed_and_epoch():
    a, b = epoch_crops(10, 3, 5, 0.08, True), epoch_crops(10, 3, 5, 0.08, True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["cx"], epoch_crops(10, 3, 6, 0.08, True)["cx"])


def test_relabel_stores_teacher_labels_compactly_and_resumes(distilled, digits_teacher, monkeypatch):
    import distillset.relabel.softlabels as sl
    from distillset.core.distilled import load_distilled
    from distillset.squeeze.checkpoint import load_teacher

    cfg = RelabelConfig(distilled=str(distilled), epochs=6, topk=3, epochs_per_file=2, min_scale=0.5, flip=False,
                        autocast="none")
    calls = {"n": 0}
    orig = sl.write_block  # one call per epoch-block file (labels are streamed into it)

    def die_after_first(*args, **kwargs):
        orig(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(sl, "write_block", die_after_first)
    with pytest.raises(KeyboardInterrupt):
        relabel(cfg)
    monkeypatch.setattr(sl, "write_block", orig)
    first = (distilled / "labels" / "soft-000000.safetensors").stat().st_mtime_ns
    result = relabel(cfg)
    assert (distilled / "labels" / "soft-000000.safetensors").stat().st_mtime_ns == first
    assert result["bytes_per_image"] == 6 * 3 * (2 + 1)  # epochs x k x (fp16 value + uint8 index)
    labels = load_soft_labels(distilled)
    assert labels.values.shape == (6, 30, 3)
    # the stored label of (epoch 4, image 7) is the teacher's prediction on exactly that crop
    images, _ = load_distilled(distilled)
    t = load_teacher(digits_teacher)
    from distillset.relabel.softlabels import apply_crops

    crops = epoch_crops(30, 0, 4, 0.5, False)
    x = apply_crops(images.images[7:8].float() / 255, crops, torch.tensor([7]))
    with torch.no_grad():
        p = torch.softmax(t(x) / 4.0, 1)[0]
    assert torch.allclose(labels.targets(4, torch.tensor([7]))[0].topk(3).values, p.topk(3).values, atol=2e-3)
    with pytest.raises(DistillError, match="other settings"):
        relabel(RelabelConfig(distilled=str(distilled), epochs=6, topk=4, epochs_per_file=2))


def test_evaluate_reports_distilled_and_random_under_one_protocol(distilled, tmp_path):
    if not (distilled / "labels" / "labels.json").exists():
        relabel(RelabelConfig(distilled=str(distilled), epochs=6, topk=3, epochs_per_file=2, min_scale=0.5,
                              flip=False, autocast="none"))
    m = evaluate(EvaluateConfig(distilled=str(distilled), out=str(tmp_path / "eval"), epochs=40, students=2,
                                min_scale=0.5, flip=False, batch_size=10))
    got = {(s["set"], s["labels"]): s for s in m["summary"]}
    assert set(got) == {("distilled", "hard"), ("distilled", "soft"), ("random", "hard"), ("random", "soft")}
    assert all(s["n"] == 2 and 0.0 <= s["mean"] <= 1.0 for s in got.values())
    # students learn something on 30 images: well above chance (10%) with soft labels
    assert got[("distilled", "soft")]["mean"] > 0.3 and got[("random", "soft")]["mean"] > 0.3
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(m["summary"]))
    csv = (tmp_path / "eval" / "metrics.csv").read_text().splitlines()
    assert csv[0] == "arch,set,labels,mean,std,n" and len(csv) == 5
    assert "IOR" in m["dd_ranking"] and "HLR" in m["dd_ranking"]


def test_random_subset_and_dd_ranking():
    from distillset.core.data import Source

    s = Source("digits").load("train")
    sub = random_subset(s, 4, 0, 10)
    assert sub.class_counts().tolist() == [4] * 10
    assert torch.equal(sub.images, random_subset(s, 4, 0, 10).images)
    with pytest.raises(DistillError, match="fewer than ipc"):
        random_subset(s, 1000, 0, 10)
    r = dd_ranking(0.9, 0.5, 0.4, 0.7, 0.6)
    assert r["IOR"] == pytest.approx(0.1) and r["HLR"] == pytest.approx(0.4)
    assert 0 < r["LRS"] < 1


def test_evaluate_without_labels_asks_for_relabel(digits_teacher, tmp_path):
    out = tmp_path / "d"
    recover(RecoverConfig(out=str(out), teachers=[str(digits_teacher)], data="digits", ipc=1, iterations=2,
                          autocast="none"))
    with pytest.raises(DistillError, match="run `distillset relabel"):
        evaluate(EvaluateConfig(distilled=str(out), labels="soft", epochs=1, students=1))
