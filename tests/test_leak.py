"""Gradient leakage (DLG, iDLG): the iDLG label rule, DLG lowering its gradient distance under the engine's L-BFGS,
resume of an L-BFGS unit, the gradient file's checks and the `attack leak` command end to end, on the MNIST fixture.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distillset.core.data import Source
from distillset.core.errors import DistillError
from distillset.core.io import file_sha256, load_tensors, save_tensors
from distillset.launch.cli import main
from distillset.launch.leak import LeakConfig, reconstruct, run, score
from distillset.recover.objectives.leak import capture_gradient, idlg_labels, last_layer, load_gradient, save_gradient
from distillset.squeeze.checkpoint import BackboneConfig, Teacher, load_teacher, save_backbone
from distillset.squeeze.models import create_model

from .conftest import MNIST


@pytest.fixture(scope="module")
def mnist():
    return Source(MNIST).load("train")


def fresh_lenet(seed: int, channels: int = 1, size: int = 28, **kw) -> Teacher:
    torch.manual_seed(seed)
    model = create_model("lenet_sigmoid", 10, channels, size, **kw)
    cfg = BackboneConfig("lenet_sigmoid", 10, channels, size, [0.0] * channels, [1.0] * channels, model_kwargs=kw)
    return Teacher(model, cfg).eval().requires_grad_(False)


def test_idlg_reads_the_label_of_every_single_image_gradient(mnist, digits_teacher):
    """One image: the last layer's bias gradient (and the weight gradient's row sums) is negative for the true class
    only, whatever the weights: fresh sigmoid LeNets and a trained BatchNorm ConvNet."""
    for seed in range(3):
        teacher = fresh_lenet(seed)
        w, b = last_layer(teacher)
        assert (w, b) == ("classifier.weight", "classifier.bias")
        for c in range(10):
            i = int(torch.nonzero(mnist.labels == c)[seed])
            g = capture_gradient(teacher, mnist.images[i:i + 1].float() / 255, mnist.labels[i:i + 1])
            assert idlg_labels(g[w], g[b], 1).tolist() == [c]
            assert idlg_labels(g[w], None, 1).tolist() == [c]  # no bias: the rows of the weight gradient
            assert int((g[b] < 0).sum()) == 1
    trained = load_teacher(str(digits_teacher))
    digits = Source("digits").load("train")
    w, b = last_layer(trained)
    for c in range(10):
        i = int(torch.nonzero(digits.labels == c)[0])
        g = capture_gradient(trained, digits.images[i:i + 1].float() / 255, digits.labels[i:i + 1])
        assert idlg_labels(g[w], g[b], 1).tolist() == [c]


def test_idlg_batch_rule_counts_repeated_labels(mnist):
    """Batches: the bias gradient is mean p - counts / B, so the counts come back from an estimate of the mean
    prediction (on random images); labels may repeat. Not exact (the estimate is), but close on a fresh LeNet."""
    gen = torch.Generator().manual_seed(0)
    overlap = exact = 0
    for seed in range(10):
        teacher = fresh_lenet(seed)
        idx = torch.randperm(len(mnist), generator=gen)[:4]
        y = mnist.labels[idx]
        g = capture_gradient(teacher, mnist.images[idx].float() / 255, y)
        with torch.no_grad():
            p = torch.softmax(teacher(torch.rand(64, 1, 28, 28, generator=gen)), -1).mean(0)
        labels = idlg_labels(g["classifier.weight"], g["classifier.bias"], 4, p)
        assert len(labels) == 4 and labels.tolist() == sorted(labels.tolist())
        present = set(torch.nonzero(g["classifier.bias"] < 0).flatten().tolist())
        assert present <= set(labels.tolist()) and present <= set(y.tolist())  # negative entries are present classes
        counts, truth = torch.bincount(labels, minlength=10), torch.bincount(y, minlength=10)
        overlap += int(torch.minimum(counts, truth).sum())
        exact += bool((counts == truth).all())
    assert overlap >= 36 and exact >= 8, (overlap, exact)


def _captured(tmp_path: Path, mnist, batch: int, seed: int = 0) -> tuple[Path, Path, dict]:
    """A fresh LeNet saved as a squeeze folder and the gradient of ``batch`` fixture images on it."""
    teacher = fresh_lenet(seed)
    save_backbone(tmp_path / "model", teacher.model, teacher.config)
    teacher = load_teacher(str(tmp_path / "model"))
    idx = torch.arange(batch) * 37
    truth = {"images": mnist.images[idx], "labels": mnist.labels[idx]}
    grads = capture_gradient(teacher, truth["images"].float() / 255, truth["labels"])
    save_gradient(tmp_path / "gradient.safetensors", grads, teacher=teacher, batch_size=batch, model="model")
    return tmp_path / "gradient.safetensors", tmp_path / "model", truth


def test_dlg_lowers_its_gradient_distance_under_lbfgs(tmp_path, mnist):
    """A few engine steps of L-BFGS move DLG's images and label logits so their gradient approaches the captured
    one; the reconstruction is then closer to the private image than the noise it started from."""
    gradient, model, truth = _captured(tmp_path, mnist, 1)
    runs = {}
    for steps in (0, 8):
        cfg = LeakConfig(out=str(tmp_path / "o"), method="dlg", gradient=str(gradient), iterations=max(1, steps))
        cfg.iterations = steps  # 0 steps: the distance of the initial noise (the engine allows it, the CLI not)
        runs[steps] = reconstruct(str(gradient), str(model), cfg, 5, _rt())
    (im0, _, s0, _), (im8, lab8, s8, _) = runs[0], runs[8]
    assert float(s8["grad_distance"]) < 1e-2 * float(s0["grad_distance"])
    assert not torch.equal(s0["label_logits"], s8["label_logits"])
    orig = truth["images"].float() / 255
    assert (im8 - orig).square().mean() < 0.25 * (im0 - orig).square().mean()
    assert lab8.tolist() == truth["labels"].tolist()


def _rt():
    from distillset.core.runtime import get_runtime

    return get_runtime()


def test_lbfgs_unit_resumes_to_the_uninterrupted_result(tmp_path, mnist):
    """The engine's L-BFGS keeps its curvature history and the objective's extra tensors (DLG's logits) in a unit
    checkpoint: resuming from step 2 of 4 ends where the uninterrupted run ends."""
    from distillset.core.partition import Unit
    from distillset.recover.config import RecoverConfig
    from distillset.recover.engine import Engine

    gradient, model, _ = _captured(tmp_path, mnist, 2)
    rc = RecoverConfig(out="", teachers=[str(model)], method="dlg", options={"gradient": str(gradient)},
                       param_options={"clamp": False}, augmentation="none", ipc=2, iterations=4, lr=1.0,
                       optimizer="lbfgs", schedule="constant", autocast="none", channels_last=False,
                       checkpoint_every=2)
    engine = Engine(rc, _rt())
    state = tmp_path / "unit.pt"
    full, _ = engine.optimise(Unit(0, 0, 1, 0, 2), state)
    full_logits = engine.objective.final_state()["label_logits"]
    assert state.exists()  # the step-2 checkpoint (recover's writer deletes it once the shard is written)
    again = Engine(rc, _rt())
    resumed, _ = again.optimise(Unit(0, 0, 1, 0, 2), state)
    assert torch.allclose(resumed.render(), full.render(), atol=1e-6)
    assert torch.allclose(again.objective.final_state()["label_logits"], full_logits, atol=1e-6)
    with pytest.raises(DistillError, match="lbfgs cannot take"):  # L-BFGS has one lr: MTT's own lr cannot ride it
        engine._optimizer([{"params": [full.data], "lr": 1.0}, {"params": [full_logits], "lr": 1e-5}])


def test_gradient_of_another_architecture_is_one_line_exit_2(tmp_path, mnist, capsys):
    """A gradient file whose tensors do not fit the model given (another width: other shapes) is refused before
    anything is written; a file that is not a gradient file too."""
    gradient, _, _ = _captured(tmp_path, mnist, 1)
    other = fresh_lenet(1, width=6)
    save_backbone(tmp_path / "narrow", other.model, other.config)
    before = file_sha256(gradient)
    out = tmp_path / "attack"
    code = main(["attack", "leak", "--gradient", str(gradient), "--model", str(tmp_path / "narrow"), "--out",
                 str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    assert "gradient of a lenet_sigmoid" in err[0] and "--model" in err[0]
    assert not out.exists() and file_sha256(gradient) == before
    save_tensors(tmp_path / "plain.safetensors", {"x": torch.zeros(2)})
    with pytest.raises(DistillError, match="not a distillset gradient file"):
        load_gradient(tmp_path / "plain.safetensors")


def test_attack_leak_end_to_end(tmp_path):
    """`attack leak` (on the 8x8 digits, for speed) captures on fresh LeNets, attacks with iDLG, scores by best
    assignment and writes its files; a re-run reads them back; the trial's gradient file attacks again through
    --gradient (its model found beside it) and --truth scores it."""
    out = tmp_path / "leak"
    argv = ["attack", "leak", "--data", "digits", "--method", "idlg", "--batch-size", "2", "--trials", "2",
            "--iterations", "20", "--out", str(out)]
    assert main(argv) == 0
    for name in ("config.yaml", "leak.json", "leak.csv", "grid.png", "trials/001/gradient.safetensors",
                 "trials/001/model/model.safetensors", "trials/001/truth.safetensors",
                 "trials/001/reconstruction.safetensors", "trials/001/result.json"):
        assert (out / name).is_file(), name
    res = json.loads((out / "leak.json").read_text())
    m = res["means"]
    assert res["batch_size"] == 2 and len(res["per_trial"]) == 2
    assert m["label_accuracy"] == m["label_set_accuracy"] == 1.0
    assert m["psnr"] > m["psnr_mean"] + 10 > m["psnr_random"] + 10
    assert len((out / "leak.csv").read_text().strip().splitlines()) == 1 + 4
    stamp = (out / "leak.json").stat().st_mtime_ns
    assert main(argv) == 0 and (out / "leak.json").stat().st_mtime_ns == stamp
    again = run(LeakConfig(out=str(tmp_path / "again"), method="idlg", iterations=20,
                           gradient=str(out / "trials/001/gradient.safetensors"),
                           truth=str(out / "trials/001/truth.safetensors")))
    assert again["means"]["label_accuracy"] == 1.0 and again["means"]["psnr"] > 30


def test_score_pairs_a_shuffled_batch_and_reports_nearest_real(mnist):
    """Reconstructions in another order are paired back to their originals (Hungarian assignment on MSE); the
    nearest real image of a real image is itself (PSNR capped at 100 dB)."""
    orig = mnist.images[:3]
    recon = (orig.float() / 255)[[2, 0, 1]]
    items = score(orig, mnist.labels[:3], recon, mnist.labels[:3][[2, 0, 1]], torch.Generator().manual_seed(0),
                  real=mnist)
    assert [im["reconstruction"] for im in items] == [1, 2, 0]
    assert all(im["label_correct"] and im["psnr"] == 100.0 and im["psnr_nearest_real"] == 100.0 for im in items)
    assert all(im["psnr_random"] < 10 for im in items)


def test_bad_leak_configs_are_one_line():
    with pytest.raises(DistillError, match="where the private batch comes from"):
        LeakConfig()
    with pytest.raises(DistillError, match="give one of them"):
        LeakConfig(data=MNIST, gradient="g.safetensors")
    with pytest.raises(DistillError, match="unknown leakage method"):
        LeakConfig(data=MNIST, method="gradinversion")
    with pytest.raises(DistillError, match="trials must be 1"):
        LeakConfig(gradient="g.safetensors", trials=3)
    with pytest.raises(DistillError, match="needs options.gradient"):
        from distillset.recover.config import RecoverConfig

        RecoverConfig(method="dlg", teachers=["t"])


def test_distilled_set_capture_scores_against_its_images_and_the_nearest_real(tmp_path):
    """--distilled draws the victim's batch from a distilled set (here a random-real coreset: each synthetic image
    is a real one, so its nearest real image is itself) and reports each reconstruction's nearest real image."""
    from distillset.core.distilled import load_distilled
    from distillset.recover.config import RecoverConfig
    from distillset.recover.engine import run as recover

    recover(RecoverConfig(out=str(tmp_path / "set"), data="digits", method="random", ipc=2))
    res = run(LeakConfig(out=str(tmp_path / "leak"), distilled=str(tmp_path / "set"), data="digits",
                         method="idlg", iterations=20))
    truth = load_tensors(tmp_path / "leak/trials/000/truth.safetensors")
    syn, _ = load_distilled(tmp_path / "set")
    assert any(torch.equal(truth["images"][0], im) for im in syn.images)
    im = res["per_trial"][0]["images"][0]
    assert im["original_psnr_nearest_real"] == 100.0 and im["psnr_nearest_real"] > 30 and im["label_correct"]
