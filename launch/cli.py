"""``distillset``: a thin CLI over each stage's ``run(cfg)``.

    distillset <command> [--config FILE.yaml] [--field value ...]   one stage (flags override the YAML)
    distillset run RECIPE.yaml [--stages a,b] [--out DIR]            chain the stages of a recipe
    distillset methods | models                                      list plugins / backbones
    --trust-code (any command)  allow a prior folder's prior.json to name a generator module to import
    -v / -q (any command)       more logging (recover and squeeze losses every --log-every) / warnings only
    --report-to T (any command) track losses and accuracies with accelerate's trackers: tensorboard, wandb, mlflow

    distillset methods [NAME] [--json] | models [--json]             list plugins (a plugin's options) / backbones

Errors users can fix are printed as one line (``error: ...``) with exit code 2; no finished output is touched.
"""

from __future__ import annotations

import argparse
import sys

from distillset.core.errors import DistillError
from distillset.launch.commands import COMMANDS
from distillset.launch.commands import load as _load


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as a one-line :class:`DistillError` (exit 2, no usage dump) and
    takes no abbreviations (``--epoch`` is a typo of ``--epochs``, not a shorthand that starts a long run)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        import difflib
        import re

        m = re.match(r"unrecognized arguments: (--[\w-]+)", message)
        if m:  # a typo of a flag gets the same "did you mean" as a typo in --set or a plugin option
            flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
            close = difflib.get_close_matches(m.group(1), flags, n=1)
            if close:
                message += f" (did you mean {close[0]}?)"
        raise DistillError(f"{self.prog}: {message}; see `{self.prog} --help`.")


def _command_parser(name: str) -> argparse.ArgumentParser:
    from distillset.core.config import add_flags

    cfg_path, _, help_ = COMMANDS[name]
    cls = _load(cfg_path)
    sub = _group(name)
    epilog = (f"subcommands: {', '.join(sub)}. " if sub else "") + (
        "Values: --data digits | npz:PATH | folder:PATH | hf:PATH | wds:PATTERN; mappings as YAML, e.g. "
        "--options '{r_bn: 0.01}'; lists as a,b; booleans true/false. `distillset methods NAME` lists a method's "
        "options.")
    p = _Parser(prog=f"distillset {name}", description=(cls.__doc__ or help_).split("\n")[0], epilog=epilog)
    p.add_argument("--config", help="YAML file of options (a recipe section or a saved config.yaml)")
    p.add_argument("--section", help="read this section of the YAML (default: the command name, if present)")
    add_flags(p, cls)
    return p


def build_config(name: str, argv: list[str]):
    """Parse ``argv`` for command ``name`` into its config dataclass (YAML first, flags override)."""
    from distillset.core.config import flags_to_dict, from_dict, load_yaml

    cfg_path, _, _ = COMMANDS[name]
    cls = _load(cfg_path)
    ns = _command_parser(name).parse_args(argv)
    data: dict = {}
    if ns.config:
        data = load_yaml(ns.config)
        section = ns.section or name.replace(" ", "_")
        if section in data and isinstance(data[section], dict):
            data = data[section]
        elif ns.section:
            raise DistillError(f"{ns.config} has no section '{ns.section}'.")
    data.update(flags_to_dict(ns, cls))
    return from_dict(cls, data)


def _group(word: str) -> list[str]:
    """The multi-word commands that start with ``word`` (``prior`` -> ``prior train``)."""
    return [n for n in COMMANDS if n.startswith(word + " ")]


def split_command(argv: list[str]) -> tuple[str, list[str]]:
    """``(command name, its arguments)`` of a stage command line (multi-word names such as ``prior train``)."""
    name = " ".join(argv[:2]) if " ".join(argv[:2]) in COMMANDS else argv[0]
    if name not in COMMANDS:
        group = _group(argv[0])
        if group:  # `distillset prior` (or `prior --help`): the group's subcommands
            raise DistillError(f"'{argv[0]}' is a command group: use one of {', '.join(group)} "
                               f"(`distillset {group[0]} --help` lists its options).")
        from distillset.core.errors import unknown_name

        raise unknown_name("command", argv[0], list(COMMANDS) + ["run", "methods", "models"])
    return name, argv[len(name.split()):]


def run_parser() -> argparse.ArgumentParser:
    """The arguments of ``distillset run``."""
    p = _Parser(prog="distillset run")
    p.add_argument("recipe")
    p.add_argument("--stages", default="", help="comma-separated subset of stages to run")
    p.add_argument("--out", default="", help="output root (default: the recipe's out)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                   help="override one recipe value, e.g. --set recover.iterations=100 or "
                        "--set recover.options.batch_real=64")
    return p


def run_command(name: str, argv: list[str]):
    cfg = build_config(name, argv)
    return _load(COMMANDS[name][1])(cfg)


def _plugin_registries() -> dict:
    from distillset.recover import base
    from distillset.recover.refinements import REFINEMENTS
    from distillset.relabel.evaluators import EVALUATORS

    return {**base.REGISTRIES, "refinement": REFINEMENTS, "evaluator": EVALUATORS}


def list_methods(name: str = "", as_json: bool = False) -> str:
    """``distillset methods [NAME] [--json]``: every plugin (name, kind, paper, description) from the registries, or
    one plugin's options (name, type, default, doc). Listing imports installed third-party plugins too."""
    import json

    regs = _plugin_registries()
    if name:
        found = [reg.entry(name) for reg in regs.values() if name in reg]
        if not found:
            from distillset.core.errors import unknown_name

            raise unknown_name("method or plugin", name, sorted({n for r in regs.values() for n in r.names()}))
        if as_json:
            return json.dumps([e.to_json() for e in found], indent=2)
        return "\n\n".join(_describe(e) for e in found)
    if as_json:
        return json.dumps({f"{k}s": [e.to_json() for e in reg.entries()] for k, reg in regs.items()}, indent=2)
    lines = []
    for kind, reg in regs.items():
        lines.append(f"{kind}s:")
        for e in reg.entries():
            paper = f"  [{e.paper.split(',')[0]}]" if e.paper else ""
            lines.append(f"  {e.name:<16} {e.description}{paper}")
    lines.append("\n`distillset methods NAME` lists a plugin's options; --json prints everything as JSON.")
    return "\n".join(lines)


def _describe(entry) -> str:
    lines = [f"{entry.name} ({entry.kind}): {entry.description}"]
    if entry.paper:
        lines.append(f"paper: {entry.paper}")
    if entry.kind == "refinement":  # an option set of base methods, which own the option docs
        lines.append(f"switch on: {entry.obj.usage(entry.name).split(': ', 1)[1]}; `distillset methods "
                     f"{entry.obj.methods[0]}` documents the options.")
        return "\n".join(lines)
    opts = entry.options()
    if not opts:
        lines.append("options: none")
        return "\n".join(lines)
    lines.append("options:")
    w_name = max(len(o.name) for o in opts)
    w_type = max(len(o.type) for o in opts)
    for o in opts:
        lines.append(f"  {o.name:<{w_name}}  {o.type:<{w_type}}  {o.default!r:<12} {o.doc}")
    return "\n".join(lines)


def list_models(as_json: bool = False) -> str:
    """``distillset models [--json]``: the backbone registry (name, BatchNorm, input size, description)."""
    import json

    from distillset.squeeze.models import BACKBONES

    entries = BACKBONES.entries()
    if as_json:
        return json.dumps([e.to_json() for e in entries], indent=2)
    lines = [f"  {e.name:<18} {'BN ' if e.metadata.get('has_bn') else '   '} {e.description}" for e in entries]
    lines += ["  timm:<name>        any timm architecture", "  tv:<name>          any torchvision architecture"]
    return "models (BN = has BatchNorm):\n" + "\n".join(lines)


def _usage() -> str:
    width = max(len(n) for n in COMMANDS) + 2
    cmds = "\n".join(f"  {n:<{width}} {h}" for n, (_, _, h) in COMMANDS.items())
    return (f"usage: distillset <command> [--config FILE] [--option value ...]\n\ncommands:\n{cmds}\n"
            f"  {'run':<{width}} chain the stages of a recipe: distillset run RECIPE.yaml\n"
            f"  {'methods':<{width}} list objectives, parametrizations and augmentations (NAME: its options)\n"
            f"  {'models':<{width}} list backbones\n\n`distillset <command> --help` lists a command's options.")


# flags any command takes, set as environment variables read where they act: flag -> (variable, value; None = the
# flag's argument)
GLOBAL_FLAGS = {
    "--trust-code": ("DISTILLSET_TRUST_CODE", "1"),  # prior.json may name a module to import (generative.glad)
    "--report-to": ("DISTILLSET_REPORT_TO", None),  # accelerate's trackers (core.runtime)
    "-v": ("DISTILLSET_LOG_LEVEL", "DEBUG"), "--verbose": ("DISTILLSET_LOG_LEVEL", "DEBUG"),
    "-q": ("DISTILLSET_LOG_LEVEL", "WARNING"), "--quiet": ("DISTILLSET_LOG_LEVEL", "WARNING"),
}


def _take_global_flags(argv: list[str]) -> list[str]:
    """``argv`` without the :data:`GLOBAL_FLAGS`, each one applied."""
    import os

    rest = []
    it = iter(argv)
    for arg in it:
        if arg not in GLOBAL_FLAGS:
            rest.append(arg)
            continue
        var, value = GLOBAL_FLAGS[arg]
        if value is None:
            value = next(it, None)
            if value is None:
                raise DistillError(f"{arg} needs a value (e.g. {arg} tensorboard).")
        os.environ[var] = value
    return rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = _take_global_flags(argv)
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    try:
        if argv[0] in ("methods", "models"):
            p = _Parser(prog=f"distillset {argv[0]}")
            if argv[0] == "methods":
                p.add_argument("name", nargs="?", default="", help="a plugin whose options to list")
            p.add_argument("--json", action="store_true", help="print the registry metadata as JSON")
            ns = p.parse_args(argv[1:])
            print(list_methods(ns.name, ns.json) if argv[0] == "methods" else list_models(ns.json))
        elif argv[0] == "run":
            from distillset.launch.recipe import run_recipe

            ns = run_parser().parse_args(argv[1:])
            run_recipe(ns.recipe, [s for s in ns.stages.split(",") if s], ns.out or None, ns.set)
        elif argv[0] not in COMMANDS and _group(argv[0]) and argv[1:2] in ([], ["-h"], ["--help"]):
            print(f"distillset {argv[0]}: a command group\n\nsubcommands:\n" + "\n".join(
                f"  {n:<22} {COMMANDS[n][2]}" for n in _group(argv[0])) + f"\n\n`distillset {_group(argv[0])[0]} "
                "--help` lists its options.")
        else:
            name, rest = split_command(argv)
            run_command(name, rest)
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; run the same command again to continue.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
