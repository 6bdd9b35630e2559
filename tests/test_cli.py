"""The CLI: commands, recipes (every shipped recipe resolves; digits runs end to end at debug size), errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distillset.core.errors import DistillError
from distillset.launch.cli import build_config, main
from distillset.launch.commands import COMMANDS
from distillset.launch.recipe import resolve, run_recipe
from tests.conftest import CIFAR, TINY

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_help_and_listings(capsys):
    assert main(["--help"]) == 0
    assert "recover" in capsys.readouterr().out
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "sre2l" in out and "curriculum_crop" in out and "pixel" in out
    assert main(["models"]) == 0
    assert "resnet18_cifar" in capsys.readouterr().out


def test_flags_override_yaml_and_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("recover:\n  ipc: 3\n  iterations: 7\n")
    cfg = build_config("recover", ["--config", str(tmp_path / "r.yaml"), "--iterations", "9", "--aug-options",
                                   "{flip: false}"])
    assert (cfg.ipc, cfg.iterations, cfg.aug_options) == (3, 9, {"flip": False})
    for argv, pattern in [(["recover", "--ipc", "zero"], "must be int"),
                          (["recovr"], "unknown command 'recovr'.*Did you mean 'recover'"),
                          (["recover", "--ipc", "0"], "ipc must be >= 1"),
                          (["squeeze", "--data", "nosuch:x", "--out", str(tmp_path / "s")], "unknown data source")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
        import re

        assert re.search(pattern, err), err


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_resolves(recipe, tmp_path):
    from distillset.core.config import load_yaml

    plan = resolve(load_yaml(recipe), str(tmp_path))
    assert plan, recipe
    for section, cfg in plan:
        assert section.replace("_", " ") in COMMANDS


def test_digits_recipe_runs_end_to_end_at_debug_size(tmp_path, capsys):
    out = tmp_path / "run"
    result = run_recipe(str(ROOT / "recipes" / "digits_sre2l.yaml"), out_root=str(out), overrides=[
        "squeeze.epochs=3", "recover.iterations=20", "relabel.epochs=4", "evaluate.epochs=4",
        "evaluate.students=1", "squeeze.autocast=none"])
    table = capsys.readouterr().out
    for row in ("full data (teacher)", "random real IPC 10, hard labels", "distilled IPC 10, soft labels",
                "soft-label bytes per image", "wall time"):
        assert row in table
    assert (out / "summary.md").read_text().strip() == table.strip()
    assert (out / "recover" / "grid.png").exists() and (out / "recover" / "config.yaml").exists()
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert metrics["ipc"] == 10 and result["results"]["relabel"]["bytes_per_image"] == 4 * 4 * 3


def test_cifar_recipe_runs_at_debug_size_on_the_fixture(tmp_path):
    recipe = ROOT / "recipes" / "sre2l_cifar10.yaml"
    run_recipe(str(recipe), out_root=str(tmp_path / "c"), overrides=[
        f"squeeze.data={CIFAR}", "squeeze.epochs=1", "squeeze.arch=convnet3_bn", "squeeze.model_kwargs={width: 8}",
        "recover.iterations=2", "recover.ipc=1", "relabel.epochs=1", "evaluate.epochs=1", "evaluate.students=1"])
    assert (tmp_path / "c" / "evaluate" / "metrics.csv").exists()


def test_export_formats_roundtrip(tmp_path, digits_teacher):
    from distillset.core.data import Source
    from distillset.core.distilled import load_distilled

    d = tmp_path / "d"
    assert main(["recover", "--teachers", str(digits_teacher), "--ipc", "2", "--iterations", "3", "--out", str(d),
                 "--data", "digits"]) == 0
    images, _ = load_distilled(d)
    for fmt, spec in [("imagefolder", "folder:{}"), ("hf", "hf:{}"), ("wds", "wds:{}")]:
        out = tmp_path / fmt
        assert main(["export", "--distilled", str(d), "--out", str(out), "--format", fmt]) == 0
        back = Source(spec.format(out)).load("train")
        assert sorted(map(bytes, back.images.numpy())) == sorted(map(bytes, images.images.numpy()))
        assert sorted(back.labels.tolist()) == sorted(images.labels.tolist())
    info = json.loads((tmp_path / "wds" / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == 20 and info["splits"]["train"]["shard_lengths"] == [20]
    assert main(["export", "--distilled", str(d), "--out", str(tmp_path / "wds"), "--format", "wds"]) == 2


def test_timm_reads_exported_shards(tmp_path, digits_teacher):
    from timm.data import create_dataset

    d = tmp_path / "d"
    main(["recover", "--teachers", str(digits_teacher), "--ipc", "2", "--iterations", "2", "--out", str(d)])
    main(["export", "--distilled", str(d), "--out", str(tmp_path / "w"), "--format", "wds"])
    ds = create_dataset(f"wds/{tmp_path / 'w'}", root=str(tmp_path / "w"), split="train", is_training=False)
    samples = list(ds)
    assert len(samples) == 20 and sorted(t for _, t in samples) == sorted([c for c in range(10)] * 2)


def test_console_script_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "distillset.launch.cli", "recover", "--ipc", "1", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "needs a teacher" in r.stderr


def test_unknown_recipe_section(tmp_path):
    (tmp_path / "r.yaml").write_text("recovr: {}\n")
    with pytest.raises(DistillError, match="unknown section 'recovr'"):
        run_recipe(str(tmp_path / "r.yaml"))
    assert TINY  # the fixture path constant is importable for recipe tests of other areas


def test_gvbsm_with_two_teachers_from_the_cli(tmp_path, digits_teacher):
    """G-VBSM end to end through the CLI: two BN teachers, their streamed statistics, recover, ensemble relabel."""
    import shutil

    teachers = [tmp_path / "t1", tmp_path / "t2"]
    shutil.copytree(digits_teacher, teachers[0])  # stats are written beside each teacher
    assert main(["squeeze", "--data", "digits", "--arch", "convnet3_bn", "--model-kwargs", "{width: 16}",
                 "--epochs", "2", "--flip", "false", "--autocast", "none", "--out", str(teachers[1])]) == 0
    for t in teachers:
        assert main(["squeeze", "stats", "--teacher", str(t), "--data", "digits", "--batch-size", "500"]) == 0
    out = tmp_path / "g"
    assert main(["recover", "--method", "gvbsm", "--teachers", f"{teachers[0]},{teachers[1]}", "--data", "digits",
                 "--ipc", "2", "--iterations", "6", "--lr", "0.1", "--autocast", "none", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["teachers"]) == 2
    assert main(["relabel", "--distilled", str(out), "--epochs", "2", "--topk", "3"]) == 0
    labels = json.loads((out / "labels" / "labels.json").read_text())
    assert len(labels["teachers"]) == 2  # soft labels from the teacher ensemble


def test_fingerprint_ignores_options_left_at_their_default():
    """A later release that adds an option must still recognise (and resume) the output folders of earlier ones."""
    import dataclasses

    from distillset.core.config import fingerprint

    @dataclasses.dataclass
    class Old:
        ipc: int = 10
        lr: float = 0.25

    @dataclasses.dataclass
    class New:
        ipc: int = 10
        lr: float = 0.25
        zca: str = ""

    assert fingerprint(Old(ipc=5)) == fingerprint(New(ipc=5))
    assert fingerprint(New(ipc=5)) != fingerprint(New(ipc=5, zca="fit"))
    assert fingerprint(New(ipc=5)) != fingerprint(New(ipc=6))
    assert fingerprint(New(ipc=5, lr=0.1), ignore=("lr",)) == fingerprint(New(ipc=5))
