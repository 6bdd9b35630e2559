"""Every command quoted in README.md and in a shipped recipe's comments resolves to its config (without running the
stage), the recipes' ``--set`` hints included; a mistyped plugin option fails in one line before any work."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from distillset.launch.cli import build_config, main, run_parser, split_command
from distillset.launch.recipe import apply_overrides, plan_recipe, resolve

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
LAUNCHER = "-m distillset.launch.cli"


def _command_text(line: str) -> str | None:
    """The ``distillset ...`` part of a shell line (after an ``accelerate launch ... -m distillset.launch.cli``)."""
    if LAUNCHER in line:
        return "distillset" + line.split(LAUNCHER, 1)[1]
    m = re.search(r"(?:^|[\s`])(distillset\s+[^`]*)", line)
    return m.group(1) if m else None


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            cmd = _command_text(line.split(" #")[0].strip())
            if cmd and "..." not in cmd:
                out.append(cmd)
    return out


def recipe_comment_commands(path: Path) -> list[str]:
    """``distillset ...`` commands in the recipe's comments (prose after two spaces or a parenthesis is dropped)."""
    out = []
    for line in path.read_text().splitlines():
        if not line.lstrip().startswith("#"):
            continue
        cmd = _command_text(line.lstrip("# "))
        if cmd:
            out.append(re.split(r"\s{2,}|\s\(", cmd.strip())[0].strip())
    return out


def recipe_comment_overrides(path: Path) -> list[list[str]]:
    """The ``--set A=B`` hints of each comment line of a recipe (applied together, to that recipe)."""
    out = []
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and "--set" in line and "distillset" not in line:
            out.append(re.findall(r"--set\s+([^\s`]+)", line))
    return out


def resolve_command(cmd: str, tmp_path: Path):
    argv = shlex.split(cmd)[1:]
    if argv[0] == "run":
        ns = run_parser().parse_args(argv[1:])
        return plan_recipe(str(ROOT / ns.recipe), [s for s in ns.stages.split(",") if s], ns.out or str(tmp_path),
                           ns.set)[1]
    if argv[0] in ("methods", "models"):
        assert main(argv) == 0
        return argv[0]
    name, rest = split_command(argv)
    if not rest:  # prose naming a command (e.g. "needs `distillset squeeze stats` first"): the name must exist
        return name
    return build_config(name, rest)


QUOTED = [("README.md", c) for c in readme_commands()] + [
    (p.name, c) for p in RECIPES for c in recipe_comment_commands(p)]


def test_commands_were_found():
    """The parsers see the commands the docs quote (so the test below cannot pass vacuously)."""
    cmds = [c for _, c in QUOTED]
    assert sum(c.startswith("distillset recover") for c in cmds) >= 1
    assert "distillset run recipes/imagenet1k_sre2l.yaml" in cmds
    assert "distillset run recipes/mtt_cifar10.yaml" in cmds
    assert any(c.startswith("distillset shards --data folder:/data/imagenet") for c in cmds)
    hints = {p.stem: recipe_comment_overrides(p) for p in RECIPES}
    assert ["recover.iterations=200", "recover.options.batch_real=64"] in hints["dm_cifar10"]
    assert ["recover.iterations=100", "recover.options.batch_real=64", "recover.options.compile_min_steps=1"] in hints[
            "dc_cifar10"]


@pytest.mark.parametrize("source,cmd", QUOTED, ids=[f"{s}:{c[:60]}" for s, c in QUOTED])
def test_every_quoted_command_resolves(source, cmd, tmp_path):
    assert resolve_command(cmd, tmp_path), (source, cmd)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_resolves_with_its_comment_overrides(recipe, tmp_path):
    from distillset.core.config import load_yaml

    assert resolve(load_yaml(recipe), str(tmp_path))
    for overrides in recipe_comment_overrides(recipe):
        _, plan = plan_recipe(str(recipe), None, str(tmp_path), overrides)
        cfgs = dict(plan)
        for item in overrides:
            key, _, value = item.partition("=")
            section, *path = key.split(".")
            node = cfgs[section]
            for part in path[:-1]:
                node = getattr(node, part) if not isinstance(node, dict) else node[part]
            got = node[path[-1]] if isinstance(node, dict) else getattr(node, path[-1])
            assert str(got) == value, (recipe.name, item, got)


def test_nested_override_reaches_into_plugin_options():
    recipe = apply_overrides({"recover": {"options": {"width": 8}}}, ["recover.options.batch_real=64",
                                                                      "recover.param_options.init=real"])
    assert recipe["recover"] == {"options": {"width": 8, "batch_real": 64}, "param_options": {"init": "real"}}


@pytest.mark.parametrize("flag,value,phrase", [
    ("--options", "{r_bnn: 1}", "unknown objective 'sre2l' option 'r_bnn'. Did you mean 'r_bn'"),
    ("--options", "{r_bn: many}", "objective 'sre2l': config 'r_bn' must be float"),
    ("--param-options", "{inti: real}", "unknown parametrization 'pixel' option 'inti'. Did you mean 'init'"),
    ("--aug-options", "{milestone: 2}", "milestone is a fraction"),
])
def test_a_mistyped_plugin_option_fails_in_one_line_before_any_file_is_written(flag, value, phrase, tmp_path, capsys,
                                                                             digits_teacher):
    out = tmp_path / "r"
    assert main(["recover", "--teachers", str(digits_teacher), "--data", "digits", "--ipc", "1", "--iterations", "1",
                 "--out", str(out), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and phrase in err, err
    assert not out.exists()  # nothing written: the corrected command is not refused by a half-made folder


def test_a_mistyped_option_in_a_recipe_fails_before_any_stage(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("squeeze: {data: digits}\nrecover: {method: dm, options: {batch_rael: 8}}\n")
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "option 'batch_rael'. Did you mean 'batch_real'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
