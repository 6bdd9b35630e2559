"""A newcomer's first hour (issue 18): help that teaches, typos that get "did you mean", messages that say what
differs and what to do, folders others can read, and no leftovers after a finished stage."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from distillset.launch.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_shows_types_defaults_and_value_forms(capsys):
    with pytest.raises(SystemExit) as e:
        main(["recover", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--ipc INT" in out and "--lr FLOAT" in out and "--channels-last {true,false}" in out
    assert "(default: 10)" in out and "'{KEY: VALUE}'" in out and "npz:PATH" in out
    assert " V " not in out and "[--ipc V]" not in out


def test_flag_typo_is_refused_with_did_you_mean_not_abbreviated(capsys):
    assert main(["squeeze", "--epoch", "3", "--out", "/nonexistent/never"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean --epochs?" in err


def test_command_group_lists_its_subcommands(capsys):
    assert main(["prior", "--help"]) == 0
    assert "prior train" in capsys.readouterr().out
    assert main(["prior"]) == 0
    assert main(["prior", "trian"]) == 2
    assert "command group: use one of prior train" in capsys.readouterr().err


def test_rerun_into_another_runs_folder_names_the_fields_that_differ(digits_teacher, tmp_path, capsys):
    args = ["recover", "--teachers", str(digits_teacher), "--ipc", "1", "--iterations", "2", "--autocast", "none",
            "--out", str(tmp_path / "r")]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--iterations", "3", "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "iterations: 2 -> 3" in err and "lr: 0.25 -> 0.1" in err and "choose another --out" in err


def test_skipped_stage_says_run_it_first(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("out: " + str(tmp_path / "run") + "\nsqueeze: {data: digits, epochs: 1}\n"
                      "recover: {ipc: 1, iterations: 1}\n")
    assert main(["run", str(recipe), "--stages", "recover"]) == 2
    err = capsys.readouterr().err
    assert "run that stage first (--stages squeeze,recover)" in err
    assert not (tmp_path / "run" / "recover").exists()


def test_export_folder_honours_the_umask_and_squeeze_leaves_no_checkpoint(digits_teacher, tmp_path):
    assert not (Path(digits_teacher) / "checkpoint").exists()
    assert json.loads((Path(digits_teacher) / "metrics.json").read_text())["test_top1"] > 0.5
    assert main(["recover", "--teachers", str(digits_teacher), "--ipc", "1", "--iterations", "1", "--autocast",
                 "none", "--out", str(tmp_path / "r")]) == 0
    old = os.umask(0o022)
    try:
        assert main(["export", "--distilled", str(tmp_path / "r"), "--out", str(tmp_path / "e")]) == 0
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "e").stat().st_mode)
    assert mode == 0o755, oct(mode)
    files = [p for p in (tmp_path / "e").rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files)


def test_readme_example_runs_as_written_after_the_demo(tmp_path, monkeypatch, capsys):
    """The README's `run ... --set recover.iterations=100 ...` works after `make demo` (here its recipe at debug
    size), reusing the demo's teacher: it was refused before ("holds a different run")."""
    import re
    import shlex

    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    demo = ["run", "recipes/digits.yaml", "--set", "squeeze.epochs=2", "--set", "recover.iterations=5", "--set",
            "squeeze.autocast=none", "--stages", "squeeze,recover"]  # the demo's folders the example meets
    assert main(demo) == 0
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if "recover.out=output/digits/recover_b32" in ln)
    cmd = shlex.split(re.sub(r"\s+#.*$", "", line.strip()))
    assert cmd[0] == "distillset"
    capsys.readouterr()
    assert main(cmd[1:]) == 0, capsys.readouterr().err
    assert (tmp_path / "output" / "digits" / "recover_b32" / "labels" / "labels.json").exists()


def test_demo_recipe_shows_progress_in_recover_and_evaluate(tmp_path, monkeypatch, capfd, caplog):
    monkeypatch.setenv("DISTILLSET_PROGRESS", "1")
    assert main(["run", str(ROOT / "recipes" / "digits.yaml"), "--out", str(tmp_path / "d"), "--set",
                 "squeeze.epochs=1", "--set", "recover.iterations=3", "--set", "relabel.epochs=2", "--set",
                 "evaluate.epochs=2", "--set", "evaluate.students=1", "--set", "squeeze.autocast=none"]) == 0
    err = capfd.readouterr().err
    assert "unit 0:" in err  # recover's bar over the unit's steps
    assert "evaluate: student epochs" in err  # evaluate's bar over students x epochs, with an ETA
    assert "training 4 students (2 epochs each)" in caplog.text


def test_teacher_and_data_sizes_that_differ_need_an_explicit_image_size(digits_teacher, tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 16, 16, 1), dtype=np.uint8)
    y = np.arange(40) % 10
    np.savez(tmp_path / "d16.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    args = ["recover", "--teachers", str(digits_teacher), "--data", f"npz:{tmp_path / 'd16.npz'}", "--ipc", "1",
            "--iterations", "1", "--autocast", "none", "--param-options", "{init: real}"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "takes 8x8 images but the data's are 16x16" in err and "--image-size 8" in err
    assert not (tmp_path / "a").exists()
    assert main([*args, "--image-size", "8", "--out", str(tmp_path / "b")]) == 0


def test_grid_has_gaps_between_tiles_and_labelled_rows(tmp_path):
    import torch
    from PIL import Image

    from distillset.core.data import ImageSet
    from distillset.core.distilled import save_grid

    x = torch.full((4, 1, 8, 8), 255, dtype=torch.uint8)  # white tiles: gaps must still show as rows/cols
    save_grid(tmp_path / "g.png", ImageSet(x, torch.tensor([0, 0, 1, 1]), ["zero", "one"]), per_class=2)
    img = Image.open(tmp_path / "g.png").convert("L")
    label_w = 8 + 6 * 4
    assert img.size == (label_w + 2 * (64 + 2) + 2, 2 * (64 + 2) + 2)
    assert min(img.getpixel((x, y)) for x in range(2, label_w) for y in range(2, 66)) < 128  # the name, in black


def test_export_writes_a_dataset_card_and_the_soft_labels(digits_teacher, tmp_path):
    r = tmp_path / "r"
    assert main(["recover", "--teachers", str(digits_teacher), "--ipc", "1", "--iterations", "1", "--autocast",
                 "none", "--out", str(r)]) == 0
    assert main(["relabel", "--distilled", str(r), "--epochs", "2", "--topk", "3"]) == 0
    assert main(["evaluate", "--distilled", str(r), "--data", "digits", "--epochs", "1", "--students", "1"]) == 0
    assert main(["export", "--distilled", str(r), "--format", "hf", "--out", str(tmp_path / "e")]) == 0
    card = (tmp_path / "e" / "README.md").read_text()
    assert card.startswith("---\nlicense: other") and "dataset-distillation" in card and "IPC 1" in card
    assert "| distilled | soft |" in card and "convnet_bn (sha256" in card
    labels = json.loads((tmp_path / "e" / "labels" / "labels.json").read_text())
    assert len(list((tmp_path / "e" / "labels").glob("soft-*.safetensors"))) == labels["files"] >= 1


def test_a_moved_run_tree_finds_its_teacher_by_content_hash(tmp_path, capsys):
    import shutil

    a = tmp_path / "a"
    assert main(["squeeze", "--data", "digits", "--arch", "convnet_bn", "--model-kwargs", "{width: 8}", "--epochs",
                 "1", "--autocast", "none", "--out", str(a / "teacher")]) == 0
    assert main(["recover", "--teachers", str(a / "teacher"), "--ipc", "1", "--iterations", "1", "--autocast",
                 "none", "--out", str(a / "set")]) == 0
    shutil.move(str(a), str(tmp_path / "b"))  # the manifest still names a/teacher
    assert main(["relabel", "--distilled", str(tmp_path / "b" / "set"), "--epochs", "1"]) == 0
    (tmp_path / "b" / "teacher" / "model.safetensors").write_bytes(b"other weights")  # and never other weights
    capsys.readouterr()
    shutil.rmtree(tmp_path / "b" / "set" / "labels")
    assert main(["relabel", "--distilled", str(tmp_path / "b" / "set"), "--epochs", "1"]) == 2
    assert "pass --teachers PATH" in capsys.readouterr().err


def test_report_to_tensorboard_writes_event_files_with_the_losses(tmp_path):
    import subprocess
    import sys

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = {**os.environ, "DISTILLSET_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "distillset.launch.cli", "--report-to", "tensorboard"]
    for args in (["squeeze", "--data", "digits", "--arch", "convnet_bn", "--model-kwargs", "{width: 8}", "--epochs",
                  "2", "--autocast", "none", "--out", str(tmp_path / "t")],
                 ["recover", "--teachers", str(tmp_path / "t"), "--ipc", "1", "--iterations", "4", "--log-every", "2",
                  "--autocast", "none", "--out", str(tmp_path / "r")]):
        r = subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-1500:]
    for folder, tag, n in ((tmp_path / "t", "squeeze/train_loss", 2), (tmp_path / "r", "recover/loss", 2)):
        events = list((folder / "runs").rglob("events.out.tfevents.*"))
        assert events, folder
        acc = EventAccumulator(str(events[0].parent))
        acc.Reload()
        assert tag in acc.Tags()["scalars"] and len(acc.Scalars(tag)) == n
