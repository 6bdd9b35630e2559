"""``distillset explain``: IG completeness for every baseline, the deletion metric on a toy model with a known answer,
the grouped source, both shipped recipes end to end at a tiny scale, and the bad inputs the issue lists."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from distillset.core.data import ImageSet, Source, grouped_spec
from distillset.core.errors import DistillError
from distillset.launch.cli import main
from distillset.relabel.explain import (
    BASELINES,
    Target,
    box_mask,
    check_gradients,
    deletion_insertion,
    distilled_baseline,
    integrated_gradients,
    make_baselines,
    object_mass,
    pixel_scores,
)
from tests.conftest import CIFAR, TINY

ROOT = Path(__file__).resolve().parents[1]
VEHICLES = {"vehicles": ["airplane", "automobile", "ship", "truck"],
            "animals": ["bird", "cat", "deer", "dog", "frog", "horse"]}
TINY_OVERRIDES = ["squeeze.epochs=1", "squeeze.model_kwargs={width: 8}", "recover.iterations=2",
                  "recover.options.batch_real=8", "explain.images_per_class=1", "explain.seeds=2",
                  "explain.n_steps=8", "explain.curve_steps=4", "explain.infidelity_samples=2",
                  "explain.sensitivity_samples=1", "explain.examples=2", "squeeze.autocast=none",
                  "recover.autocast=none"]


def _net(in_chans=3, classes=10, size=32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(in_chans, 8, 3, padding=1), nn.Softplus(), nn.AvgPool2d(4), nn.Flatten(),
                         nn.Linear(8 * (size // 4) ** 2, classes)).eval()


def test_completeness_holds_for_every_baseline():
    """sum(attributions) = f(x) - f(baseline), computed here from the model (not only captum's own delta)."""
    x = Source(CIFAR).load("test").images[:6].float() / 255
    f = Target(_net(), "logit")
    target = torch.arange(6) % 10
    g = torch.Generator().manual_seed(0)
    bases = make_baselines(list(BASELINES), x, [0.49, 0.48, 0.45], 4.0, g, x.flip(0))
    assert set(bases) == set(BASELINES)
    for name, b in bases.items():
        attr, delta = integrated_gradients(f, x, b, target, 64, "gausslegendre", 4)
        with torch.no_grad():
            gap = (f(x) - f(b)).gather(1, target[:, None]).squeeze(1)
        total = attr.flatten(1).sum(1)
        assert gap.abs().min() > 1e-4, name  # a non-trivial gap: completeness is tested, not 0 = 0
        assert torch.allclose(total, gap, rtol=1e-3, atol=1e-4), (name, total, gap)
        assert torch.allclose(delta.abs(), (total - gap).abs(), atol=1e-5), name


class Toy(nn.Module):
    """Class 0's logit is 10 x (mean of the 4 key pixels) - 5, class 1's is 0: the key pixels are the whole answer."""

    def __init__(self, key: torch.Tensor):
        super().__init__()
        self.register_buffer("key", key.float())

    def forward(self, x):
        z = 10 * (x[:, 0] * self.key).flatten(1).sum(1) / self.key.sum() - 5
        return torch.stack([z, torch.zeros_like(z)], 1)


def test_deletion_and_insertion_on_a_toy_model_whose_answer_is_known():
    key = torch.zeros(4, 4)
    key[1, 1] = key[1, 2] = key[2, 1] = key[2, 2] = 1  # the 4 central pixels of 16
    model = Toy(key)
    x, fill = torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    target = torch.tensor([0])
    hi, lo = torch.sigmoid(torch.tensor(5.0)).item(), torch.sigmoid(torch.tensor(-5.0)).item()
    best = key.flatten()[None] + 0.01 * torch.arange(16.0)[None]  # key pixels first
    worst = -best
    # 4 steps of 4 pixels: the perfect ranking removes all key pixels in step 1, the reversed one in step 4
    d, i, d_auc, i_auc = deletion_insertion(model, x, fill, best, target, 4)
    assert torch.allclose(d, torch.tensor([[hi, lo, lo, lo, lo]]), atol=1e-6)
    assert torch.allclose(i, torch.tensor([[lo, hi, hi, hi, hi]]), atol=1e-6)
    assert d_auc.item() == pytest.approx(0.25 * (hi / 2 + 3 * lo + lo / 2), abs=1e-6)
    assert i_auc.item() == pytest.approx(0.25 * (lo / 2 + 3 * hi + hi / 2), abs=1e-6)
    d2, _, d2_auc, _ = deletion_insertion(model, x, fill, worst, target, 4)
    assert torch.allclose(d2, torch.tensor([[hi, hi, hi, hi, lo]]), atol=1e-6)
    assert d2_auc.item() > d_auc.item() + 0.5
    # IG against black puts all attribution on the key pixels: its deletion curve is the perfect one
    attr, _ = integrated_gradients(model, x, fill, target, 16, "gausslegendre", 4)
    assert float(attr[0, 0][key == 0].abs().max()) == 0.0
    _, _, ig_auc, _ = deletion_insertion(model, x, fill, pixel_scores(attr), target, 4)
    assert ig_auc.item() == pytest.approx(d_auc.item(), abs=1e-6)
    # the object-box mass of that map: all of it inside the central half-side box; a uniform map scores the area
    assert object_mass(attr, box_mask(4, 4, 0.5)).item() == pytest.approx(1.0)
    assert object_mass(torch.ones(1, 3, 8, 8), box_mask(8, 8, 0.5)).item() == pytest.approx(0.25)


def test_paired_comparison_on_the_same_images():
    from distillset.relabel.explain import ExplainConfig, paired

    cfg = ExplainConfig(baselines=["black", "distilled"], fills=["mean"], distilled="x")
    rows = [{"teacher": "t", "seed": 0, "image": i, "baseline": b, "deletion_mean": d, "insertion_mean": 0.5,
             "object_mass": m} for i, (b, d, m) in enumerate([("black", 0.4, 0.3), ("distilled", 0.2, 0.3)])]
    rows[1]["image"] = 0  # the same image under both baselines
    rows += [{**r, "image": 1, "deletion_mean": 0.1 if r["baseline"] == "black" else 0.3} for r in rows]
    p = paired(cfg, rows)["distilled - black"]
    assert p["deletion_mean"]["mean"] == pytest.approx(0.0) and p["deletion_mean"]["better"] == 0.5  # one win each
    assert p["deletion_mean"]["std"] == pytest.approx(math.sqrt(0.08))  # differences -0.2, +0.2
    assert p["insertion_mean"]["better"] == 0.5 and p["object_mass"]["mean"] == 0.0  # ties count half


def test_nearest_distilled_image_in_feature_space():
    x = Source(CIFAR).load("test").images[:2].float() / 255
    pool = torch.cat([x.flip(0), x]).mul(255).round().to(torch.uint8)  # group 0: [x1, x0, x1, x0]
    distilled = ImageSet(pool, torch.zeros(4, dtype=torch.long), ["g"])
    base, index = distilled_baseline(_net(), x, torch.zeros(2, dtype=torch.long), distilled, "nearest")
    assert index.tolist() == [1, 0]  # each input's own image (distance 0), not the other one
    assert torch.allclose(base, x, atol=1 / 255)
    _, first = distilled_baseline(_net(), x, torch.zeros(2, dtype=torch.long), distilled, "first")
    assert first.tolist() == [0, 0]


def test_grouped_source_maps_fine_labels_to_groups():
    fine = Source(CIFAR).load("train")
    coarse = Source(grouped_spec(VEHICLES, CIFAR)).load("train")
    assert coarse.class_names == ["vehicles", "animals"]
    vehicles = torch.tensor([0, 1, 8, 9])
    assert torch.equal(coarse.labels, (~torch.isin(fine.labels, vehicles)).long())
    by_index = Source(grouped_spec({"v": [0, 1, 8, 9], "a": [2, 3, 4, 5, 6, 7]}, CIFAR)).load("train")
    assert torch.equal(by_index.labels, coarse.labels)


@pytest.mark.parametrize("groups,phrase", [
    ({"vehicles": ["airplane", "automobile", "ship", "truck"], "animals": ["bird", "cat"]},
     "leaves fine class 'deer' without a coarse group"),
    ({"a": ["airplane", "cat"], "b": ["cat"]}, "'cat' is in groups 'a' and 'b'"),
    ({"a": ["aeroplane"]}, "unknown fine class"),
])
def test_a_bad_grouping_is_one_line(groups, phrase):
    with pytest.raises(DistillError, match=phrase):
        Source(grouped_spec(groups, CIFAR)).info()


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory) -> Path:
    """recipes/explain_cifar10.yaml end to end on the CIFAR fixture (squeeze, grouped DM, explain)."""
    from distillset.launch.recipe import run_recipe

    out = tmp_path_factory.mktemp("explain") / "cifar"
    run_recipe(str(ROOT / "recipes" / "explain_cifar10.yaml"), out_root=str(out),
               overrides=[f"squeeze.data={CIFAR}", *TINY_OVERRIDES])
    return out


def test_cifar_recipe_runs_end_to_end_and_reruns_without_work(cifar_run):
    folder = cifar_run / "explain"
    result = json.loads((folder / "explain.json").read_text())
    assert result["groups"] == VEHICLES
    assert set(result["summary"]) == {*BASELINES, "random order (reference)"}
    for name in BASELINES:
        s = result["summary"][name]
        assert s["abs_delta"]["n"] == 20  # 10 fine classes x 1 image x 2 seeds
        assert 0 <= s["deletion_mean"]["mean"] <= 1 and 0 <= s["object_mass"]["mean"] <= 1
        assert math.isfinite(s["infidelity"]["mean"]) and s["sensitivity"]["mean"] > 0
    rows = (folder / "explain.csv").read_text().splitlines()
    assert len(rows) == 1 + 20 * (len(BASELINES) + 1)
    assert sorted(p.name for p in (folder / "examples").iterdir()) == ["example_00.png", "example_01.png"]
    assert (folder / "config.yaml").exists() and "| distilled |" in (folder / "summary.md").read_text()
    assert set(result["paired"]) == {f"distilled - {b}" for b in BASELINES if b != "distilled"}
    assert result["paired"]["distilled - blur"]["deletion_blur"]["n"] == 20
    parts = {p: p.stat().st_mtime_ns for p in (folder / "parts").iterdir()}
    from distillset.launch.recipe import run_recipe

    (folder / "explain.json").unlink()  # as if killed after its (teacher, seed) parts were written
    again = run_recipe(str(ROOT / "recipes" / "explain_cifar10.yaml"), out_root=str(cifar_run),
                       overrides=[f"squeeze.data={CIFAR}", *TINY_OVERRIDES])["results"]["explain"]
    assert again["summary"] == result["summary"]
    assert {p: p.stat().st_mtime_ns for p in (folder / "parts").iterdir()} == parts  # nothing recomputed
    with pytest.raises(DistillError, match=r"another config \(n_steps: 8 -> 4"):  # another run is refused
        run_recipe(str(ROOT / "recipes" / "explain_cifar10.yaml"), out_root=str(cifar_run),
                   overrides=[f"squeeze.data={CIFAR}", *TINY_OVERRIDES, "explain.n_steps=4"], stages=["explain"])


def test_tiny10_recipe_runs_end_to_end(tmp_path):
    from distillset.launch.recipe import run_recipe

    res = run_recipe(str(ROOT / "recipes" / "explain_tiny10.yaml"), out_root=str(tmp_path),
                     overrides=[f"squeeze.data={TINY}", *TINY_OVERRIDES, "explain.seeds=1",
                                "explain.baselines=[black, distilled]", "explain.fills=[blur]"])
    r = res["results"]["explain"]
    assert r["groups"]["natural object"] == ["cliff"] and len(r["groups"]["artifact"]) == 6
    assert set(r["summary"]) == {"black", "distilled", "random order (reference)"}
    assert r["summary"]["distilled"]["insertion_blur"]["n"] == 10


def test_a_model_without_gradients_is_refused():
    class Detached(nn.Module):
        def forward(self, x):
            return _net()(x).detach()

    with pytest.raises(DistillError, match="gives no gradient"):
        check_gradients(Detached(), torch.rand(2, 3, 32, 32), "model m")
    flat = _net()
    for p in flat.parameters():
        p.data.zero_()
    with pytest.raises(DistillError, match="zero .* gradient"):
        check_gradients(flat, torch.rand(2, 3, 32, 32), "model m")


@pytest.fixture(scope="module")
def bad(cifar_run, tmp_path_factory) -> dict:
    """A distilled set of the fine classes, one at another image size, and a teacher whose weights are all zero."""
    from distillset.core.io import load_tensors, save_tensors
    from distillset.recover.config import RecoverConfig
    from distillset.recover.engine import run as recover

    d = tmp_path_factory.mktemp("explain_bad")
    common = {"method": "dm", "ipc": 1, "iterations": 1, "param_options": {"init": "real"}, "augmentation": "none",
              "options": {"batch_real": 8, "width": 8}, "autocast": "none"}
    recover(RecoverConfig(out=str(d / "fine"), data=CIFAR, **common))
    recover(RecoverConfig(out=str(d / "small"), data=grouped_spec(VEHICLES, CIFAR), image_size=16, **common))
    import shutil

    shutil.copytree(cifar_run / "squeeze", d / "flat")
    w = load_tensors(d / "flat" / "model.safetensors")
    save_tensors(d / "flat" / "model.safetensors", {k: torch.zeros_like(v) for k, v in w.items()})
    return {"d": d, "teacher": str(cifar_run / "squeeze"), "set": str(cifar_run / "recover")}


@pytest.mark.parametrize("case,args,phrase", [
    ("grouping_leaves_a_class", ["--groups", "{vehicles: [airplane, automobile, ship, truck], animals: [bird]}"],
     "leaves fine class 'cat' without a coarse group"),
    ("set_of_other_classes", ["--distilled", "{d}/fine", "--groups", json.dumps(VEHICLES)],
     "has classes ['airplane', 'automobile'"),
    ("set_of_other_size", ["--distilled", "{d}/small"], "holds 3x16x16 images but the classifier takes 3x32x32"),
    ("groups_differ_from_the_set", ["--groups", json.dumps({"vehicles": ["airplane", "automobile", "ship", "bird"],
                                                            "animals": ["truck", "cat", "deer", "dog", "frog",
                                                                        "horse"]})],
     "differs from the grouping"),
    ("model_without_gradients", ["--teachers", "{d}/flat"], "zero (or non-finite) gradient"),
])
def test_bad_input_is_one_line_exit_2(bad, case, args, phrase, tmp_path, capsys):
    base = {"--teachers": bad["teacher"], "--distilled": bad["set"], "--data": CIFAR}
    given = dict(zip(args[::2], [a.replace("{d}", str(bad["d"])) for a in args[1::2]]))
    argv = ["explain", "--out", str(tmp_path / "o")] + [t for k, v in {**base, **given}.items() for t in (k, v)]
    if case == "model_without_gradients":  # one case as a real process: exit code 2 and no traceback
        p = subprocess.run([sys.executable, "-m", "distillset.launch.cli", *argv], capture_output=True, text=True,
                           cwd=ROOT, check=False)
        assert p.returncode == 2, p.stderr
        err = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
        assert len(err) == 1 and phrase in err[0] and "Traceback" not in p.stderr, p.stderr
    else:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and phrase in err[0], err
    assert not (tmp_path / "o" / "explain.json").exists()


def test_a_baseline_is_scored_alike_whichever_others_are_listed(cifar_run):
    """Each baseline's numbers (the uniform noise itself, infidelity and sensitivity perturbations) come from its own
    generators: listing other baselines, or one alone as the benchmark does for extra coarse sets, changes nothing."""
    from distillset.relabel.explain import ExplainConfig, explain_one, plan

    def rows(baselines):
        cfg = ExplainConfig(teachers=[str(cifar_run / "squeeze")], distilled=str(cifar_run / "recover"), data=CIFAR,
                            baselines=baselines, seeds=1, images_per_class=1, n_steps=4, infidelity_samples=2,
                            sensitivity_samples=1, curve_steps=4)
        task = plan(cfg)
        return {(r["image"], r["baseline"]): r for r in explain_one(cfg, task, task.teachers[0], 5)[0]}

    both, alone = rows(["black", "uniform", "distilled"]), rows(["distilled", "uniform"])
    for key, r in alone.items():  # the random-order reference has its own generator too
        assert r == both[key], key
