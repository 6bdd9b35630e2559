"""``distillset run RECIPE.yaml``: chain the stages of a recipe, each with its own resolved config and folder.

A recipe is a mapping with an ``out`` root and one section per stage, in this order when present:
``squeeze``, ``squeeze_stats``, ``squeeze_trajectories``, ``prior_train``, ``recover``, ``relabel``, ``evaluate``,
``privacy_mia``, ``privacy_nearest``, ``export``, ``explain``, ``federated``, ``vl_train``, ``vl_distill``,
``vl_evaluate``, ``vl_export``. Each section holds fields of that stage's config; what a section leaves empty is chained from the
earlier stages: ``out`` -> ``<out>/<stage>``, ``data`` -> the squeeze data, ``teachers`` -> the squeeze folder,
``distilled`` -> the recover folder (the ``vl_distill`` folder for ``vl_evaluate``/``vl_export``, whose ``model`` is
the ``vl_train`` folder), an empty ``prior`` key in recover's ``options`` or ``param_options`` -> the prior_train
folder (how ``recipes/minimax_tiny10.yaml`` samples the prior it fine-tunes). A ``grouped:{groups: ...}`` data spec
without ``data`` regroups the chained
data (the squeeze data), and such a section gets no chained teacher: the squeeze teacher knows the fine classes, not
the groups (how ``recipes/explain_*.yaml`` distil by coarse labels). Every stage resumes, so re-running a recipe
continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from distillset.core.config import from_dict, load_yaml, parse_yaml_value
from distillset.core.errors import DistillError
from distillset.launch.commands import COMMANDS
from distillset.launch.commands import load as _load

log = logging.getLogger("distillset.run")

ORDER = ["squeeze", "squeeze_stats", "squeeze_trajectories", "prior_train", "recover", "relabel", "evaluate",
         "privacy_mia", "privacy_nearest", "export", "explain", "federated", "vl_train", "vl_distill", "vl_evaluate",
         "vl_export"]


def _command(section: str) -> str:
    name = section.replace("_", " ")
    if name not in COMMANDS:
        raise DistillError(f"recipe section '{section}' is not a stage; use {', '.join(ORDER)}.")
    return name


def resolve(recipe: dict, out_root: str) -> list[tuple[str, object]]:
    """The ordered (section, config) pairs of a recipe with chained defaults filled in."""
    unknown = [k for k in recipe if k not in ORDER and k not in ("name", "out", "description")]
    if unknown:
        raise DistillError(f"recipe has unknown section '{unknown[0]}'; sections are {', '.join(ORDER)}.")
    out = []
    chain: dict = {}
    for section in ORDER:
        if section not in recipe:
            continue
        cls = _load(COMMANDS[_command(section)][0])
        data = dict(recipe[section] or {})
        fields = {f.name for f in dataclasses.fields(cls)}
        if "out" in fields and not data.get("out"):
            data["out"] = str(Path(out_root) / section)
        if "data" in fields and not data.get("data") and "data" in chain:
            data["data"] = chain["data"]
        grouped = "data" in fields and str(data.get("data") or "").startswith("grouped:")
        if grouped:
            from distillset.core.data import grouped_spec, parse_grouped

            groups, base = parse_grouped(str(data["data"]).removeprefix("grouped:"))
            if not base and "data" in chain:
                data["data"] = grouped_spec(groups, chain["data"])
        if "teachers" in fields and not data.get("teachers") and "teachers" in chain and not grouped:
            data["teachers"] = chain["teachers"]
        if "distilled" in fields and not data.get("distilled") and "distilled" in chain:
            data["distilled"] = chain["distilled"]
        if "teacher" in fields and not data.get("teacher") and "teachers" in chain:
            data["teacher"] = chain["teachers"][0]
        if section == "recover" and "prior" in chain:
            for key in ("options", "param_options"):
                if isinstance(data.get(key), dict) and "prior" in data[key] and not data[key]["prior"]:
                    data[key] = {**data[key], "prior": chain["prior"]}
        if "mia" in fields and not data.get("mia") and "mia" in chain:
            data["mia"] = chain["mia"]
        if section.startswith("vl_"):
            _chain_vl(section, data, chain)
        cfg = from_dict(cls, data)
        if section == "squeeze":
            chain["teachers"] = [cfg.out]
            chain["data"] = cfg.data
        if section == "prior_train":
            chain["prior"] = cfg.out
        if section == "recover":
            chain["distilled"] = cfg.out
        if section == "privacy_mia":
            chain["mia"] = cfg.out
        if section == "vl_train":
            chain["vl_model"] = cfg.out
        if section == "vl_distill":
            chain["vl_distilled"] = cfg.out
        out.append((section, cfg))
    return out


def _chain_vl(section: str, data: dict, chain: dict) -> None:
    """Image-text stages: ``model`` is the vl_train folder, ``distilled`` the vl_distill folder (a list for
    vl_evaluate)."""
    if section != "vl_train" and not data.get("model") and "vl_model" in chain:
        data["model"] = chain["vl_model"]
    if section in ("vl_evaluate", "vl_export") and not data.get("distilled") and "vl_distilled" in chain:
        data["distilled"] = [chain["vl_distilled"]] if section == "vl_evaluate" else chain["vl_distilled"]


def apply_overrides(recipe: dict, overrides: list[str]) -> dict:
    """Apply ``--set STAGE.FIELD[.KEY...]=VALUE`` overrides; nested keys reach into mappings, e.g.
    ``recover.options.batch_real=64`` sets ``recipe["recover"]["options"]["batch_real"]``."""
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise DistillError(f"--set expects STAGE.FIELD=VALUE (or STAGE.FIELD.KEY=VALUE), got '{item}'.")
        node = recipe
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise DistillError(f"--set {item}: '{'.'.join(parts[:i + 1])}' is not a mapping, so it has no "
                                   f"key '{parts[i + 1]}'.")
            node = node[part]
        node[parts[-1]] = parse_yaml_value(value, "set")
    return recipe


def plan_recipe(path: str, stages: list[str] | None = None, out_root: str | None = None,
                overrides: list[str] | None = None) -> tuple[str, list[tuple[str, object]]]:
    """``(output root, resolved plan)`` of ``distillset run``: every stage's config built (and validated, plugin
    options included) before any stage runs."""
    recipe = apply_overrides(load_yaml(path), overrides or [])
    root = out_root or recipe.get("out") or f"output/{Path(path).stem}"
    plan = resolve(recipe, root)
    if stages:
        bad = [s for s in stages if s not in dict(plan)]
        if bad:
            raise DistillError(f"stage '{bad[0]}' is not in {path}; it has {', '.join(s for s, _ in plan)}.")
    return root, plan


def _check_skipped_inputs(plan: list[tuple[str, object]], stages: list[str]) -> None:
    """A selected stage whose input an unselected earlier stage of the recipe writes, and which is not there yet,
    is refused up front ("run that stage first") instead of failing later on a missing folder."""
    made = {}
    for section, cfg in plan:
        if section == "squeeze":
            made[cfg.out] = ("squeeze", Path(cfg.out) / "config.json")
        if section == "recover":
            made[cfg.out] = ("recover", Path(cfg.out) / "manifest.json")
    for section, cfg in plan:
        if section not in stages:
            continue
        for value in [*getattr(cfg, "teachers", []), getattr(cfg, "distilled", None)]:
            if value in made and made[value][0] not in stages and not made[value][1].exists():
                raise DistillError(f"stage '{section}' reads {value}, which the recipe's '{made[value][0]}' stage "
                                   f"writes and which does not exist yet; run that stage first (--stages "
                                   f"{made[value][0]},{section}) or run the whole recipe.")


def run_recipe(path: str, stages: list[str] | None = None, out_root: str | None = None,
               overrides: list[str] | None = None) -> dict:
    from distillset.core.io import write_text
    from distillset.core.runtime import get_runtime
    rt = get_runtime()  # sets up logging before the first stage
    root, plan = plan_recipe(path, stages, out_root, overrides)
    if stages:
        _check_skipped_inputs(plan, stages)
    results: dict = {}
    timings: dict = {}
    t_all = time.perf_counter()
    for section, cfg in plan:
        if stages and section not in stages:
            continue
        log.info("== %s ==", section)
        t0 = time.perf_counter()
        results[section] = _load(COMMANDS[_command(section)][1])(cfg)
        timings[section] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    if rt.is_main and "evaluate" in results:
        table = summary_table(results, timings)
        print(table)
        write_text(Path(root) / "summary.md", table + "\n")
    return {"results": results, "seconds": timings}


def summary_table(results: dict, timings: dict) -> str:
    """The demo's table: full-data accuracy, random real vs distilled (hard/soft), label bytes, wall time."""
    m = results["evaluate"]
    ipc = m["ipc"]
    rows = [("full data (teacher)", m.get("full_data_top1"), None)]
    by = {(s["set"], s["labels"]): s for s in m["summary"] if s["arch"] == m["summary"][0]["arch"]}
    for name in ("random", "distilled"):
        for mode in ("hard", "soft"):
            s = by.get((name, mode))
            if s is not None:
                label = f"{'random real' if name == 'random' else 'distilled'} IPC {ipc}, {mode} labels"
                rows.append((label, s["mean"], s["std"]))
    lines = ["| setting | top-1 (%) |", "| --- | --- |"]
    for label, mean, std in rows:
        if mean is None:
            continue
        lines.append(f"| {label} | {100 * mean:.2f}" + (f" +- {100 * std:.2f} |" if std is not None else " |"))
    if m.get("soft_label_bytes_per_image") is not None:
        lines.append(f"| soft-label bytes per image ({m['epochs']} epochs) | {m['soft_label_bytes_per_image']:.0f} |")
    lines.append(f"| wall time (s) | {timings['total']:.1f} |")
    stage_times = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if k != "total")
    return "\n".join(lines) + f"\n\nstages: {stage_times}; students: {m['summary'][0]['n']} seeds x {m['epochs']} " \
                              f"epochs, protocol {m['protocol']}"
