"""Bad input, table-driven: every case is one line on stderr (``error: ...``), exit code 2, and never a traceback.

Each case is ``(argv, expected exit code, phrase of the message)``; ``{T}`` and friends name files the fixture
builds. Most run in-process through ``distillset.launch.cli.main`` (fast); the ``SUBPROCESS`` ones run as a real
``python -m distillset.launch.cli`` to prove the process-level behaviour. Add a case here for every bad input that
gets a clean message, so no later change brings a traceback back.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distillset.launch.cli import main

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d [A-Z]+ distillset")


def _npz(path: Path, x_train, y_train, x_test=None, y_test=None, **extra) -> None:
    x_test = np.zeros((10, 8, 8, 3), np.uint8) if x_test is None else x_test
    y_test = np.arange(10) if y_test is None else y_test
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **extra)


@pytest.fixture(scope="module")
def env(tmp_path_factory, digits_teacher, digits_teacher_in) -> dict:
    """The files the cases name: npz sources, folders, recipes, a finished distilled set, a file where a folder goes."""
    from PIL import Image

    from distillset.recover.config import RecoverConfig
    from distillset.recover.engine import run as recover

    d = tmp_path_factory.mktemp("bad_input")
    rgb = np.zeros((20, 8, 8, 3), np.uint8)
    y = np.arange(20) % 10
    _npz(d / "nchw.npz", np.zeros((20, 3, 8, 8), np.uint8), y, np.zeros((10, 3, 8, 8), np.uint8))
    _npz(d / "gray_rgb.npz", np.zeros((20, 8, 8), np.uint8), y)
    _npz(d / "empty.npz", np.zeros((0, 8, 8, 3), np.uint8), np.zeros(0, np.int64))
    _npz(d / "float_labels.npz", rgb, y + 0.5)
    y99 = y.copy()
    y99[3] = 99
    _npz(d / "label99.npz", rgb, y99)
    _npz(d / "label99_named.npz", rgb, y99, class_names=np.array([str(i) for i in range(10)]))
    _npz(d / "five.npz", np.zeros((20, 8, 8), np.uint8), np.arange(20) % 5, np.zeros((5, 8, 8), np.uint8),
         np.arange(5))
    np.savez(d / "wrongkeys.npz", x=rgb)
    (d / "corrupt.npz").write_bytes(b"not a zip")
    np.savez(d / "float_images.npz", x_train=rgb.astype(np.float32), y_train=y, x_test=rgb[:10], y_test=y[:10])
    (d / "empty_class" / "cat").mkdir(parents=True)
    (d / "empty_class" / "dog").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "empty_class" / "cat" / "a.png")
    (d / "shapes" / "cat").mkdir(parents=True)
    (d / "shapes" / "dog").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "shapes" / "cat" / "a.png")
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(d / "shapes" / "dog" / "b.png")
    (d / "noinfo").mkdir()
    (d / "file").write_text("a file where a folder is expected\n")
    (d / "broken").mkdir()
    (d / "broken" / "config.json").write_text((digits_teacher / "config.json").read_text())
    (d / "broken" / "model.safetensors").write_bytes(b"garbage")
    (d / "bad.yaml").write_text("recover: {ipc: [1\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "unknown_section.yaml").write_text("recovr: {}\n")
    (d / "unknown_key.yaml").write_text("recover:\n  ipcs: 3\n")
    (d / "recipe.yaml").write_text(f"out: {d / 'recipe_out'}\nrecover:\n  teachers: [{digits_teacher}]\n  ipc: 1\n")
    distilled = d / "set"
    recover(RecoverConfig(out=str(distilled), teachers=[str(digits_teacher)], data="digits", ipc=1, iterations=1,
                          autocast="none"))
    return {"T": str(digits_teacher), "TIN": str(digits_teacher_in), "D": str(distilled), "d": str(d),
            "OUT": str(d / "out")}


R = ["recover", "--teachers", "{T}", "--iterations", "1", "--ipc", "1", "--out", "{OUT}/r"]
S = ["squeeze", "--epochs", "1", "--out", "{OUT}/s"]
E = ["evaluate", "--distilled", "{D}", "--epochs", "1", "--students", "1", "--out", "{OUT}/e"]
L = ["relabel", "--distilled", "{D}", "--epochs", "1"]

CASES = [
    # the command line itself
    ("unknown_command", ["recovr"], "unknown command 'recovr'"),
    ("unknown_flag", ["squeeze", "--bogus", "1"], "unrecognized arguments: --bogus"),
    ("flag_without_value", ["squeeze", "--epochs"], "expected one argument"),
    ("run_without_recipe", ["run"], "required: recipe"),
    ("not_an_int", ["recover", "--ipc", "zero"], "must be int"),
    ("not_a_bool", ["recover", "--channels-last", "maybe"], "must be true or false"),
    ("bad_yaml_in_flag", R + ["--options", "{a: [}"], "is not valid YAML"),
    ("unknown_objective_option", R + ["--options", "{r_bnn: 1}"], "objective 'sre2l' option 'r_bnn'. Did you mean 'r_bn'"),
    ("unknown_param_option", R + ["--param-options", "{inti: real}"], "parametrization 'pixel' option 'inti'. Did you mean 'init'"),
    ("unknown_aug_option", R + ["--aug-options", "{flipp: true}"], "augmentation 'curriculum_crop' option 'flipp'. Did you mean 'flip'"),
    ("one_beta", R + ["--betas", "0.5"], "needs 2 values"),
    ("beta_above_one", R + ["--betas", "0.5,1.5"], "betas must be two numbers in [0, 1)"),
    # numbers out of range
    ("ipc_zero", ["recover", "--ipc", "0"], "ipc must be >= 1"),
    ("recover_negative_image_size", R + ["--image-size", "-8"], "image_size"),
    ("squeeze_negative_image_size", S + ["--image-size", "-8"], "image_size"),
    ("recover_lr_negative", R + ["--lr", "-1"], "lr must be a finite number"),
    ("recover_lr_huge", R + ["--lr", "1e38"], "lr must be a finite number"),
    ("recover_lr_nan", R + ["--lr", "nan"], "lr must be a finite number"),
    ("squeeze_lr_negative", S + ["--lr", "-1"], "lr must be a finite number"),
    ("squeeze_lr_huge", S + ["--lr", "1e38"], "lr must be a finite number"),
    ("squeeze_lr_nan", S + ["--lr", "nan"], "lr must be a finite number"),
    ("evaluate_lr_negative", E + ["--lr", "-1"], "lr (0 = the protocol's) must be a finite number"),
    ("evaluate_lr_nan", E + ["--lr", "nan"], "must be a finite number"),
    ("trajectories_lr_nan", ["squeeze", "trajectories", "--lr", "nan"], "lr must be a finite number"),
    ("trajectories_lr_negative", ["squeeze", "trajectories", "--lr", "-1"], "lr must be a finite number"),
    ("prior_lr_huge", ["prior", "train", "--lr", "1e38"], "lr must be a finite number"),
    ("relabel_temperature_zero", L + ["--temperature", "0"], "temperature must be a finite number"),
    ("squeeze_epochs_zero", S + ["--epochs", "0"], "epochs and batch_size must be >= 1"),
    ("recover_classes_per_unit_negative", R + ["--classes-per-unit", "-1"], "classes_per_unit and ipc_per_unit"),
    ("recover_zca_reg_zero", R + ["--zca-reg", "0"], "zca_reg must be > 0"),
    ("recover_log_every_zero", R + ["--log-every", "0"], "log_every must be >= 1"),
    ("recover_momentum_one", R + ["--momentum", "1"], "momentum must be in [0, 1)"),
    ("evaluate_students_zero", E + ["--students", "0"], "must be >= 1"),
    ("relabel_topk_negative", L + ["--topk", "-1"], "topk must be >= 0"),
    ("relabel_min_scale_zero", L + ["--min-scale", "0"], "min_scale must be in (0, 1]"),
    ("shards_maxcount_zero", ["shards", "--maxcount", "0"], "maxcount must be >= 1"),
    ("ipc_beyond_memory", R + ["--ipc", "100000000"], "lower --ipc or set --ipc-per-unit/--classes-per-unit"),
    ("ipc_beyond_this_machine", R + ["--ipc", "2000000"], "needs at least"),
    # unknown names
    ("unknown_optimizer", S + ["--optimizer", "lion"], "unknown optimizer 'lion'"),
    ("recover_unknown_optimizer", R + ["--optimizer", "lion"], "unknown optimizer 'lion'"),
    ("unknown_schedule", R + ["--schedule", "step"], "unknown schedule 'step'"),
    ("unknown_arch", S + ["--arch", "convnet_nb"], "unknown model 'convnet_nb'"),
    ("unknown_tv_arch", S + ["--arch", "tv:resnet19"], "unknown torchvision model"),
    ("unknown_method", R + ["--method", "sre2x"], "unknown objective 'sre2x'"),
    ("unknown_parametrization", R + ["--parametrization", "pixl"], "unknown parametrization 'pixl'"),
    ("unknown_augmentation", R + ["--augmentation", "nope"], "unknown augmentation 'nope'"),
    ("unknown_source_prefix", S + ["--data", "nosuch:x"], "unknown data source"),
    ("unknown_labels", E + ["--labels", "fuzzy"], "unknown labels 'fuzzy'"),
    ("unknown_protocol", E + ["--protocol", "kip"], "unknown protocol 'kip'"),
    ("unknown_quantize", L + ["--quantize", "int4"], "unknown quantize 'int4'"),
    ("unknown_export_format", ["export", "--distilled", "{D}", "--format", "zip"], "unknown export format 'zip'"),
    # data sources
    ("npz_missing", S + ["--data", "npz:{d}/missing.npz"], "does not exist"),
    ("npz_nchw", S + ["--data", "npz:{d}/nchw.npz"], "looks like (N, C, H, W)"),
    ("npz_gray_train_rgb_test", S + ["--data", "npz:{d}/gray_rgb.npz"], "convert both splits to the same channels"),
    ("npz_no_training_images", S + ["--data", "npz:{d}/empty.npz"], "has no train images"),
    ("npz_float_labels", S + ["--data", "npz:{d}/float_labels.npz"], "non-integer labels"),
    ("npz_float_images", S + ["--data", "npz:{d}/float_images.npz"], "must be uint8"),
    ("npz_label_99", S + ["--data", "npz:{d}/label99.npz"], "label 99 out of range"),
    ("npz_label_99_named", S + ["--data", "npz:{d}/label99_named.npz"], "label 99 out of range"),
    ("npz_wrong_keys", S + ["--data", "npz:{d}/wrongkeys.npz"], "has no key"),
    ("npz_corrupt", S + ["--data", "npz:{d}/corrupt.npz"], "not a readable"),
    ("folder_missing", S + ["--data", "folder:{d}/nofolder"], "does not exist"),
    ("folder_empty_class", S + ["--data", "folder:{d}/empty_class"], "dog is empty"),
    ("folder_mixed_shapes", S + ["--data", "folder:{d}/shapes"], "different shapes"),
    ("wds_without_info", S + ["--data", "wds:{d}/noinfo"], "no _info.json"),
    ("teacher_data_class_mismatch", R + ["--data", "npz:{d}/five.npz"], "predicts 10 classes but the data has 5"),
    # paths and folders
    ("recover_out_is_a_file", R[:-2] + ["--out", "{d}/file"], "is a file, not a folder"),
    ("squeeze_out_is_a_file", S[:-2] + ["--out", "{d}/file"], "is a file, not a folder"),
    ("evaluate_out_is_a_file", E[:-2] + ["--out", "{d}/file"], "is a file, not a folder"),
    ("recover_without_teacher", ["recover", "--ipc", "1", "--out", "{OUT}/nt"], "needs a teacher"),
    ("teacher_missing", R[:2] + ["{d}/noteacher"] + R[3:], "not a distillset checkpoint"),
    ("teacher_corrupt", R[:2] + ["{d}/broken"] + R[3:], "corrupt or truncated"),
    ("teacher_without_bn", R[:2] + ["{TIN}"] + R[3:], "has no BatchNorm layer"),
    ("recover_into_another_run", R[:-2] + ["--out", "{D}", "--iterations", "2"], "holds a different run"),
    ("squeeze_into_another_config", S[:-2] + ["--out", "{T}", "--epochs", "3"], "trained with another config"),
    ("evaluate_missing_set", ["evaluate", "--distilled", "{d}/noset"], "is not a distilled set"),
    ("evaluate_soft_without_labels", E + ["--labels", "soft"], "run `distillset relabel"),
    ("evaluate_arch_kwargs", E + ["--archs", "[timm:resnet10t]", "--model-kwargs", "{width: 8}"],
     "does not take model_kwargs"),
    ("evaluate_unknown_arch", E + ["--archs", "[convnet_nb]"], "unknown model 'convnet_nb'"),
    # configs and recipes
    ("config_missing", ["recover", "--config", "{d}/nope.yaml"], "does not exist"),
    ("config_bad_yaml", ["recover", "--config", "{d}/bad.yaml"], "is not valid YAML"),
    ("config_not_a_mapping", ["recover", "--config", "{d}/list.yaml"], "must hold a mapping"),
    ("config_unknown_section", ["recover", "--config", "{d}/recipe.yaml", "--section", "nosuch"],
     "has no section 'nosuch'"),
    ("config_unknown_key", ["recover", "--config", "{d}/unknown_key.yaml"], "unknown RecoverConfig option 'ipcs'"),
    ("recipe_missing", ["run", "{d}/nope.yaml"], "does not exist"),
    ("recipe_bad_yaml", ["run", "{d}/bad.yaml"], "is not valid YAML"),
    ("recipe_unknown_section", ["run", "{d}/unknown_section.yaml"], "unknown section 'recovr'"),
    ("recipe_set_without_equals", ["run", "{d}/recipe.yaml", "--set", "recover.ipc"], "--set expects"),
    ("recipe_set_bad_yaml", ["run", "{d}/recipe.yaml", "--set", "recover.options={a: [}"], "is not valid YAML"),
    ("recipe_stage_not_in_recipe", ["run", "{d}/recipe.yaml", "--stages", "squeeze"], "stage 'squeeze' is not in"),
]

# run as real processes: the exit status, stderr and absence of a traceback of the installed entry point
SUBPROCESS = {"unknown_command", "bad_yaml_in_flag", "recover_without_teacher", "ipc_beyond_memory", "npz_nchw"}


def _check(code: int, out: str, err: str, phrase: str) -> None:
    assert "Traceback" not in out and "Traceback" not in err, err
    lines = [s for s in err.strip().splitlines() if s.strip() and not LOG_LINE.match(s)]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert phrase in lines[0], lines[0]


def test_the_table_is_large_and_unique():
    names = [c[0] for c in CASES]
    assert len(CASES) >= 60 and len(set(names)) == len(names) and SUBPROCESS <= set(names)


@pytest.mark.parametrize("name,argv,phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_no_traceback(name, argv, phrase, env, capsys, monkeypatch, tmp_path):
    argv = [re.sub(r"\{(\w+)\}", lambda m: env.get(m[1], m[0]), a) for a in argv]
    if name in SUBPROCESS:
        # cwd outside the source tree: the installed (or PYTHONPATH) distillset is the one that runs
        r = subprocess.run([sys.executable, "-m", "distillset.launch.cli", *argv], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
        _check(r.returncode, r.stdout, r.stderr, phrase)
        return
    from distillset.core import runtime

    # a machine-independent memory bound (the estimate is checked against what this "machine" has free)
    monkeypatch.setattr(runtime, "available_memory", lambda device=None: (8 * 2**30, "RAM"))
    code = main(argv)  # no exception may escape: main turns every DistillError into one line
    captured = capsys.readouterr()
    _check(code, captured.out, captured.err, phrase)
