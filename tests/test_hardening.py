"""Hardening (issue 10): path safety, content-bound resume, temp files of killed writes, completeness checks.

Every crafted-file case is tried with ``..``, an absolute path and a symbolic link leaving the folder.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from distillset.core.distilled import load_distilled, read_manifest
from distillset.core.errors import DistillError
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import run as recover

ROOT = Path(__file__).resolve().parents[1]


def rcfg(teacher, out, **kw) -> RecoverConfig:
    base = {"out": str(out), "teachers": [str(teacher)], "ipc": 2, "iterations": 4, "lr": 0.1, "classes_per_unit": 5,
            "autocast": "none", "log_every": 2, "aug_options": {"final_scale": 0.5, "flip": False}}
    base.update(kw)
    return RecoverConfig(**base)


@pytest.fixture(scope="module")
def finished(digits_teacher, tmp_path_factory) -> Path:
    """A finished 2-unit distilled set (20 images), copied by each test that damages it."""
    out = tmp_path_factory.mktemp("hard") / "set"
    recover(rcfg(digits_teacher, out))
    return out


def copy_set(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_manifest(folder: Path, **changes) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    for k, v in changes.items():
        if v is None:
            m.pop(k, None)
        else:
            m[k] = v
    (folder / "manifest.json").write_text(json.dumps(m))


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def crafted_names(tmp_path: Path, folder: Path, target_name: str = "victim.txt") -> list[str]:
    """Three names that leave ``folder``: a climb, an absolute path, a symbolic link inside pointing out."""
    victim = tmp_path / target_name
    victim.write_text("precious")
    (folder / "link").symlink_to(victim)
    rel = os.path.relpath(victim, folder)
    return [rel, str(victim), "link"]


# ------------------------------------------------------------------------------------------------- 1 path safety


def test_inside_refuses_names_that_leave_the_folder(tmp_path):
    from distillset.core.io import inside

    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "ok.bin").write_bytes(b"x")
    assert inside(folder, "ok.bin", "x") == (folder / "ok.bin").resolve()
    assert inside(folder, str((folder / "ok.bin").resolve()), "x") == (folder / "ok.bin").resolve()  # old, absolute
    for name in crafted_names(tmp_path, folder) + ["../f/../..", "/etc/passwd"]:
        with pytest.raises(DistillError, match="outside") as e:
            inside(folder, name, "manifest.json 'zca'")
        one_line(e)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_export_never_writes_outside_its_folder(finished, tmp_path, kind):
    from distillset.launch.export import ExportConfig
    from distillset.launch.export import run as export

    d = copy_set(finished, tmp_path / "set")
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    victim = tmp_path / "a" / ".bashrc"
    victim.write_text("precious")
    (d / "zca.safetensors").write_bytes(b"evil")
    (d / "link").symlink_to(victim)
    # out/../.bashrc from the export folder is the victim; from the set it climbs the same way
    name = {"dotdot": os.path.relpath(victim, d), "absolute": str(victim), "symlink": "link"}[kind]
    edit_manifest(d, zca=name)
    with pytest.raises(DistillError, match="outside") as e:
        export(ExportConfig(distilled=str(d), out=str(work / "out")))
    one_line(e)
    assert victim.read_text() == "precious" and not (work / "out").exists()


def test_export_copies_zca_by_name_and_accepts_old_absolute_inside(finished, tmp_path):
    from distillset.launch.export import ExportConfig
    from distillset.launch.export import run as export

    d = copy_set(finished, tmp_path / "set")
    (d / "zca.safetensors").write_bytes(b"zca")
    edit_manifest(d, zca=str((d / "zca.safetensors").resolve()))  # an older manifest stored an absolute path
    export(ExportConfig(distilled=str(d), out=str(tmp_path / "out")))
    assert (tmp_path / "out" / "zca.safetensors").read_bytes() == b"zca"
    assert read_manifest(tmp_path / "out")["zca"] == "zca.safetensors"


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_evaluate_refuses_a_zca_outside_the_set(finished, tmp_path, kind):
    from distillset.relabel.evaluate import EvaluateConfig
    from distillset.relabel.evaluate import run as evaluate

    d = copy_set(finished, tmp_path / "set")
    edit_manifest(d, zca=crafted_names(tmp_path, d)[kind])
    with pytest.raises(DistillError, match="outside") as e:
        evaluate(EvaluateConfig(distilled=str(d), data="digits", students=1, epochs=1, labels="hard",
                                baseline=False))
    one_line(e)


def test_wds_info_file_names_stay_in_their_folder(tmp_path):
    from distillset.core.data import Source
    from distillset.launch.shards import ShardsConfig
    from distillset.launch.shards import run as shards

    out = tmp_path / "shards"
    shards(ShardsConfig(data="digits", out=str(out), maxcount=2000))
    info = json.loads((out / "_info.json").read_text())
    for name in crafted_names(tmp_path, out):
        info["splits"]["train"]["filenames"] = [name]
        (out / "_info.json").write_text(json.dumps(info))
        with pytest.raises(DistillError, match="outside") as e:
            Source(f"wds:{out}").load("train")
        one_line(e)


def test_expert_zca_name_stays_in_the_buffer_folder(tmp_path):
    from distillset.squeeze.trajectories import ExpertBuffers

    folder = tmp_path / "experts"
    folder.mkdir()
    for name in crafted_names(tmp_path, folder):
        ex = ExpertBuffers(trajectories=[], meta={"zca": name}, paths=[folder / "replay_buffer_0.safetensors"])
        with pytest.raises(DistillError, match="outside"):
            _ = ex.zca_path


def test_a_recorded_teacher_is_used_only_with_its_recorded_weights(finished, digits_teacher, tmp_path):
    from distillset.relabel.softlabels import RelabelConfig
    from distillset.relabel.softlabels import run as relabel
    from distillset.squeeze.checkpoint import load_recorded_teacher

    d = copy_set(finished, tmp_path / "set")
    m = read_manifest(d)
    assert load_recorded_teacher(m["teachers"][0], "manifest").sha256 == m["teachers"][0]["sha256"]
    # a crafted entry naming any other folder (here: a copy of the teacher with other weights) is refused
    other = copy_set(digits_teacher, tmp_path / "other")
    (other / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\1")
    edit_manifest(d, teachers=[{**m["teachers"][0], "path": str(other)}])
    with pytest.raises(DistillError, match="not the one recorded") as e:
        relabel(RelabelConfig(distilled=str(d), epochs=1, autocast="none"))
    one_line(e)
    assert not (d / "labels").exists()


# --------------------------------------------------------------------------------------- 2 prior.json's module


def test_prior_json_cannot_pick_a_module_to_import(tmp_path, monkeypatch):
    from distillset.generative.glad import GLaDPrior, build_glad

    monkeypatch.delenv("DISTILLSET_TRUST_CODE", raising=False)
    prior = build_glad(10, (1, 8, 8), z_dim=8, w_dim=8, width=8)
    prior.save_pretrained(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "prior.json").read_text())
    for spec in ("os:system", "tests.conftest:digits_teacher", "distillset.core.io:write_text"):
        with pytest.raises(DistillError, match="--trust-code") as e:
            GLaDPrior.load(tmp_path / "p", {**meta, "generator_class": spec})
        one_line(e)
    # folders written before and after the namespace move both load the built-in class
    for spec in ("generative.glad:StyleGenerator", "distillset.generative.glad:StyleGenerator"):
        assert type(GLaDPrior.load(tmp_path / "p", {**meta, "generator_class": spec}).generator).__name__ == \
            "StyleGenerator"
    monkeypatch.setenv("DISTILLSET_TRUST_CODE", "1")  # trusted: the named module is imported (and then checked)
    with pytest.raises(DistillError, match="not a generator class"):
        GLaDPrior.load(tmp_path / "p", {**meta, "generator_class": "distillset.core.data:ImageSet"})


def test_cli_trust_code_flag_sets_the_trust(monkeypatch):
    from distillset.launch import cli

    monkeypatch.delenv("DISTILLSET_TRUST_CODE", raising=False)
    assert cli.main(["models", "--trust-code"]) == 0
    assert os.environ.get("DISTILLSET_TRUST_CODE") == "1"


# ----------------------------------------------------------------------------------------- 4 shards and symlinks


def _png(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)


def test_shards_skip_symlinks_that_leave_the_tree(tmp_path, caplog):
    from distillset.core.data import Source
    from distillset.launch.shards import ShardsConfig
    from distillset.launch.shards import run as shards

    tree = tmp_path / "tree" / "train"
    for c in ("a", "b"):
        _png(tree / c / "0.png", 10)
    _png(tmp_path / "secret.png", 200)
    (tree / "a" / "leak.png").symlink_to(tmp_path / "secret.png")
    (tree / "b" / "inside.png").symlink_to(tree / "a" / "0.png")  # a link within the tree is fine
    (tree / "c").symlink_to(tmp_path / "outside_class", target_is_directory=True)
    _png(tmp_path / "outside_class" / "x.png", 250)
    with caplog.at_level(logging.WARNING, logger="distillset.data"):
        info = shards(ShardsConfig(data=f"folder:{tmp_path / 'tree'}", out=str(tmp_path / "out"), splits=["train"]))
    assert info["splits"]["train"]["num_samples"] == 3 and info["class_names"] == ["a", "b"]
    warned = [r.getMessage() for r in caplog.records if "symbolic link" in r.getMessage()]
    assert warned and all("skipped" in w and ("leak.png" in w or "/c " in w) for w in warned)
    images = Source(f"wds:{tmp_path / 'out'}").load("train").images
    assert int(images.max()) == 10  # neither the secret (200) nor the outside class (250) was embedded


# ------------------------------------------------------------------------------------ 5 num_images is bounded


def test_num_images_in_a_manifest_never_sizes_a_label_file(finished, tmp_path):
    from distillset.relabel.softlabels import RelabelConfig
    from distillset.relabel.softlabels import run as relabel
    from distillset.relabel.stream import count_images

    d = copy_set(finished, tmp_path / "set")
    assert count_images(d) == 20
    edit_manifest(d, num_images=10 ** 12)
    with pytest.raises(DistillError, match="says 1000000000000 images but its shards hold 20") as e:
        relabel(RelabelConfig(distilled=str(d), epochs=1, autocast="none"))
    one_line(e)
    assert not list((d / "labels").glob("*.safetensors")) if (d / "labels").exists() else True


def test_labels_json_file_count_is_bounded(finished, tmp_path):
    from distillset.relabel.softlabels import load_soft_labels

    d = copy_set(finished, tmp_path / "set")
    (d / "labels").mkdir()
    (d / "labels" / "labels.json").write_text(json.dumps({"files": 10 ** 15}))
    with pytest.raises(DistillError, match="soft-000000.safetensors is missing"):
        load_soft_labels(d)


# -------------------------------------------------------------------------------- 6 inputs bound by content


def _kill_after_first_unit(monkeypatch):
    import distillset.recover.engine as eng

    real = eng.write_shard

    def dying(path, samples):
        real(path, samples)
        raise KeyboardInterrupt

    monkeypatch.setattr(eng, "write_shard", dying)
    return real


def _retrain_in_place(teacher: Path) -> None:
    from distillset.squeeze.train import SqueezeConfig
    from distillset.squeeze.train import run as squeeze

    tmp = teacher.parent / "retrained"
    squeeze(SqueezeConfig(out=str(tmp), data="digits", arch="convnet_bn", model_kwargs={"width": 32}, epochs=1,
                          flip=False, autocast="none", seed=7))
    shutil.copy2(tmp / "model.safetensors", teacher / "model.safetensors")


@pytest.mark.parametrize("old_manifest", [False, True])
def test_a_teacher_retrained_in_place_makes_resume_refuse(digits_teacher, tmp_path, monkeypatch, old_manifest):
    import distillset.recover.engine as eng

    teacher = copy_set(digits_teacher, tmp_path / "teacher")
    out = tmp_path / "run"
    real = _kill_after_first_unit(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        recover(rcfg(teacher, out))
    monkeypatch.setattr(eng, "write_shard", real)
    m = read_manifest(out)
    assert m["inputs"]["teacher 0"]["sha256"] and len(list((out / "images").glob("*.tar"))) == 1
    if old_manifest:  # written before inputs were recorded: the teachers' weight hashes still bind them
        edit_manifest(out, inputs=None, units=None)
    _retrain_in_place(teacher)
    with pytest.raises(DistillError, match="input teacher 0 .* changed since this run") as e:
        recover(rcfg(teacher, out))
    one_line(e)
    assert len(list((out / "images").glob("*.tar"))) == 1


def test_unchanged_inputs_resume_and_old_manifests_gain_the_records(digits_teacher, tmp_path, monkeypatch):
    import distillset.recover.engine as eng

    out = tmp_path / "run"
    real = _kill_after_first_unit(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        recover(rcfg(digits_teacher, out))
    monkeypatch.setattr(eng, "write_shard", real)
    edit_manifest(out, inputs=None, units=None)
    done = recover(rcfg(digits_teacher, out))
    assert done["status"] == "complete" and len(done["units"]) == 2 and "teacher 0" in done["inputs"]


def test_an_option_file_is_bound_by_content(digits_teacher, tmp_path):
    from distillset.core.io import content_sha256
    from distillset.recover.engine import input_hashes

    stats = tmp_path / "stats.safetensors"
    stats.write_bytes(b"one")
    c = rcfg(digits_teacher, tmp_path / "o", method="gvbsm", options={"stats": [str(stats)]})
    before = input_hashes(c, tmp_path / "o")
    assert before["options.stats[0]"]["sha256"] == content_sha256(stats)
    stats.write_bytes(b"two")
    os.utime(stats, ns=(1, 1))
    assert input_hashes(c, tmp_path / "o")["options.stats[0]"] != before["options.stats[0]"]
    assert before["teacher 0"]["sha256"] == content_sha256(digits_teacher)


# -------------------------------------------------------------------------------- 8 temp files of killed writes


def test_a_killed_first_manifest_write_does_not_block_the_folder(digits_teacher, tmp_path):
    out = tmp_path / "run"
    (out / "images").mkdir(parents=True)
    (out / ".manifest.json.k3j_x9q2.tmp").write_text("{half")
    (out / "images" / ".shard-000000.tar.ab12cd34.tmp").write_bytes(b"half")
    assert recover(rcfg(digits_teacher, out))["status"] == "complete"
    assert not [p for p in out.rglob(".*.tmp")]
    foreign = tmp_path / "foreign"  # foreign content still blocks a fresh folder
    foreign.mkdir()
    (foreign / "stranger.txt").write_text("x")
    with pytest.raises(DistillError, match="not empty"):
        recover(rcfg(digits_teacher, foreign))


def test_no_temp_file_is_left_after_a_successful_run(finished):
    assert not list(finished.rglob(".*.tmp"))
    assert not list(finished.parent.glob(".*.tmp"))


# ---------------------------------------------------------------------------- 12 completeness against the units


def test_manifest_records_the_unit_list(finished):
    m = read_manifest(finished)
    assert m["units"] == [{"index": 0, "classes": [0, 5], "indices": [0, 2], "shard": "images/shard-000000.tar"},
                          {"index": 1, "classes": [5, 10], "indices": [0, 2], "shard": "images/shard-000001.tar"}]


def _readers(d: Path, tmp_path: Path):
    from distillset.launch.export import ExportConfig
    from distillset.launch.export import run as export
    from distillset.relabel.stream import count_images, iter_distilled

    yield lambda: load_distilled(d)
    yield lambda: export(ExportConfig(distilled=str(d), out=str(tmp_path / "exp")))
    yield lambda: list(iter_distilled(d, 4))
    yield lambda: count_images(d)


def test_every_reader_refuses_a_set_with_a_missing_shard(finished, tmp_path):
    d = copy_set(finished, tmp_path / "set")
    (d / "images" / "shard-000001.tar").unlink()
    for read in _readers(d, tmp_path):
        with pytest.raises(DistillError, match="shard images/shard-000001.tar of unit 1 .*is missing.*recover") as e:
            read()
        one_line(e)
    assert not (tmp_path / "exp").exists()


def test_a_shard_holding_another_units_images_is_refused(finished, tmp_path):
    d = copy_set(finished, tmp_path / "set")
    shutil.copy2(d / "images" / "shard-000000.tar", d / "images" / "shard-000001.tar")
    for read in _readers(d, tmp_path):
        with pytest.raises(DistillError, match="unit 1 has 10"):
            read()


def test_a_shard_link_leaving_the_set_is_refused(finished, tmp_path):
    d = copy_set(finished, tmp_path / "set")
    outside = tmp_path / "elsewhere.tar"
    shutil.move(d / "images" / "shard-000001.tar", outside)
    (d / "images" / "shard-000001.tar").symlink_to(outside)
    for read in _readers(d, tmp_path):
        with pytest.raises(DistillError, match="outside"):
            read()


@pytest.mark.parametrize("name", ["../../manifest.json", "/etc/passwd", "images/../../x.tar"])
def test_crafted_unit_shard_names_are_refused(finished, tmp_path, name):
    d = copy_set(finished, tmp_path / "set")
    m = read_manifest(d)
    m["units"][1]["shard"] = name
    edit_manifest(d, units=m["units"])
    with pytest.raises(DistillError, match="outside"):
        load_distilled(d)


def test_old_manifest_without_units_falls_back_to_a_count_check(finished, tmp_path):
    d = copy_set(finished, tmp_path / "set")
    edit_manifest(d, units=None)
    assert len(load_distilled(d)[0]) == 20  # an old complete folder still loads
    (d / "images" / "shard-000001.tar").unlink()
    for read in _readers(d, tmp_path):
        with pytest.raises(DistillError, match="holds 10 images but .* = 20|says 20 images but its shards hold 10"):
            read()


def test_relabel_reads_the_unit_layout_from_the_manifest():
    tree = ast.parse((ROOT / "relabel" / "stream.py").read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m and "recover" in m]


# ----------------------------------------------------------------------------- 13 advice for a damaged shard


def test_a_truncated_recover_shard_says_to_rerun_recover(finished, tmp_path):
    d = copy_set(finished, tmp_path / "set")
    s = d / "images" / "shard-000000.tar"
    s.write_bytes(s.read_bytes()[:700])
    for read in list(_readers(d, tmp_path))[:3]:
        with pytest.raises(DistillError, match="re-run the same `distillset recover`") as e:
            read()
        assert "distillset shards" not in one_line(e)


def test_a_truncated_source_shard_still_says_shards(tmp_path):
    from distillset.core.data import Source
    from distillset.launch.shards import ShardsConfig
    from distillset.launch.shards import run as shards

    out = tmp_path / "shards"
    shards(ShardsConfig(data="digits", out=str(out), maxcount=2000, splits=["train"]))
    s = out / "train-000000.tar"
    s.write_bytes(s.read_bytes()[:5000])
    with pytest.raises(DistillError, match="distillset shards"):
        Source(f"wds:{out}").load("train")
