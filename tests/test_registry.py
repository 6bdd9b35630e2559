"""The one registry mechanism: metadata and option schemas, and third-party entry points loaded only on demand, never
shadowing a built-in, failing in one line when the plugin asked for cannot be imported."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import sys

import pytest

from distillset.core.data import SOURCES
from distillset.core.errors import DistillError
from distillset.core.registry import Registry
from distillset.generative.prior import PRIORS
from distillset.launch.cli import main
from distillset.recover import base
from distillset.recover.config import RecoverConfig
from distillset.squeeze.models import BACKBONES

PROBE = '''
from dataclasses import dataclass
from distillset.recover.base import Objective

IMPORTED = True


class Probe(Objective):
    """A third-party objective."""

    @dataclass
    class Config:
        """Attributes:
            gain: a number.
        """

        gain: float = 1.0

    def loss(self, syn, ctx):
        return syn.render().mean() * self.cfg.gain
'''


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    """Entry points of the distillset.objectives group pointing at modules written to ``tmp_path``."""
    (tmp_path / "ds_probe_plugin.py").write_text(PROBE)
    (tmp_path / "ds_broken_plugin.py").write_text("raise ImportError('missing dependency frobnicate')\n")
    (tmp_path / "ds_shadow_plugin.py").write_text("class DM:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [importlib.metadata.EntryPoint(name=n, group="distillset.objectives", value=v) for n, v in [
        ("probe", "ds_probe_plugin:Probe"), ("broken", "ds_broken_plugin:Nothing"), ("dm", "ds_shadow_plugin:DM")]]
    real = importlib.metadata.entry_points

    def fake(**kw):
        return list(eps) if kw.get("group") == "distillset.objectives" else real(**kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    base.OBJECTIVES.forget_plugins()
    for m in ("ds_probe_plugin", "ds_broken_plugin", "ds_shadow_plugin"):
        sys.modules.pop(m, None)
    yield
    base.OBJECTIVES.forget_plugins()


def test_plugins_are_imported_only_when_a_name_no_builtin_has_is_asked_for(fake_plugins):
    cfg = RecoverConfig(method="dm", options={"batch_real": 8})  # resolving a built-in imports no plugin
    assert cfg.plugins()[0][0] is base.get("objective", "dm")
    assert "ds_probe_plugin" not in sys.modules and "ds_shadow_plugin" not in sys.modules
    cls, pcfg = RecoverConfig(method="probe", options={"gain": 2}).plugins()[0]
    assert "ds_probe_plugin" in sys.modules and cls.name == "probe" and pcfg.gain == 2.0
    assert "ds_broken_plugin" not in sys.modules and "ds_shadow_plugin" not in sys.modules
    entry = base.OBJECTIVES.entry("probe")
    assert not entry.builtin and [o.name for o in entry.options()] == ["gain"]
    with pytest.raises(DistillError, match="unknown objective 'probe' option 'gane'.*Did you mean 'gain'"):
        RecoverConfig(method="probe", options={"gane": 2})


def test_a_plugin_may_not_shadow_a_builtin(fake_plugins):
    assert base.get("objective", "dm").__name__ == "DistributionMatching"  # asking for dm never reads the plugin
    with pytest.raises(DistillError) as e:
        base.OBJECTIVES.names()  # listing reads every plugin, and the shadowing one is refused
    msg = str(e.value)
    assert "ds_shadow_plugin" in msg and "'dm'" in msg and "shadow" in msg and "\n" not in msg


def test_a_plugin_that_fails_to_import_is_an_error_when_asked_for(fake_plugins):
    with pytest.raises(DistillError) as e:
        RecoverConfig(method="broken")
    msg = str(e.value)
    assert "ds_broken_plugin" in msg and "frobnicate" in msg and "uninstall" in msg and "\n" not in msg


def test_registering_a_taken_name_is_refused():
    reg = Registry("widget", "distillset.widgets")
    reg.register("a", paper="P 2020", description="first", colour="red")(int)
    entry = reg.entry("a")
    assert (entry.kind, entry.paper, entry.description, entry.metadata) == ("widget", "P 2020", "first",
                                                                             {"colour": "red"})
    with pytest.raises(DistillError, match="already taken"):
        reg.register("a")(float)
    with pytest.raises(DistillError, match="unknown widget 'b'"):
        reg.get("b")


def test_every_registry_lists_its_builtins_with_metadata():
    assert {"sre2l", "gvbsm", "dc", "dsa", "dm", "cafe", "datadam", "mtt", "datm", "dd", "random"} <= set(
        base.OBJECTIVES.names())
    assert base.PARAMETRIZATIONS.names() == ["glad", "ld3m", "pixel"]
    assert {"curriculum_crop", "dsa", "diffaugment", "none"} <= set(base.AUGMENTATIONS.names())
    assert {"digits", "npz", "folder", "hf", "wds"} <= set(SOURCES.names())
    assert {"glad", "ld3m"} <= set(PRIORS.names())
    assert BACKBONES.entry("convnet_bn").metadata["has_bn"] and not BACKBONES.entry("convnet").metadata["has_bn"]
    dm = base.OBJECTIVES.entry("dm")
    assert "Distribution Matching" in dm.paper and dm.description
    opts = {o.name: o for o in dm.options()}
    assert opts["batch_real"].type == "int" and opts["batch_real"].default == 256 and opts["batch_real"].doc


def test_methods_and_models_print_the_registry(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "objectives:" in out and "Zhao & Bilen 2023" in out and "curriculum_crop" in out
    assert main(["methods", "sre2l"]) == 0
    out = capsys.readouterr().out
    assert "sre2l (objective)" in out and "arXiv:2306.13092" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("r_bn "))
    assert "float" in line and "1.0" in line and "weight of the BN term" in line
    assert main(["methods", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"objectives", "parametrizations", "augmentations", "refinements", "evaluators"}
    assert [e["name"] for e in data["evaluators"]] == ["diversity", "mia"]
    mtt = next(e for e in data["objectives"] if e["name"] == "mtt")
    ema = next(o for o in mtt["options"] if o["name"] == "ema")
    assert mtt["paper"] and (ema["type"], ema["default"]) == ("float", 0.0)
    assert main(["models", "--json"]) == 0
    models = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert models["convnet_bn"]["metadata"]["has_bn"] is True and models["convnet"]["metadata"]["has_bn"] is False
    assert main(["methods", "nosuch"]) == 2
    assert "unknown method or plugin 'nosuch'" in capsys.readouterr().err


def test_declared_names_are_the_registries_names():
    """The source scan that refuses unknown names before torch loads sees exactly what the registries register."""
    from distillset.recover import base
    from distillset.recover.config import declared_names

    declared = declared_names()
    for kind, reg in base.REGISTRIES.items():
        ours = {e.name for e in reg.entries() if e.builtin and e.obj.__module__.startswith("distillset.")}
        assert declared[kind] == ours, kind  # (tests register objectives of their own at run time)


def test_unknown_method_is_refused_before_torch_loads(tmp_path):
    import subprocess
    import sys

    code = ("import sys\nfrom distillset.launch.cli import main\n"
            f"rc = main(['recover', '--method', 'sre2', '--out', {str(tmp_path / 'x')!r}])\n"
            "print(rc, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.stdout.split() == ["2", "False"], (r.stdout, r.stderr)
    assert "Did you mean 'sre2l'?" in r.stderr


@pytest.mark.parametrize("name, base, option", [("ftd", "mtt", "ema"), ("acc-dd", "dc", "model_pool"),
                                                ("ast", "mtt", "intermediate"), ("EDC", "sre2l", "class_aware")])
def test_refinements_are_named_and_point_to_their_options(name, base, option, capsys):
    from distillset.recover.base import get
    from distillset.recover.config import RecoverConfig
    from distillset.recover.refinements import REFINEMENTS

    ref = REFINEMENTS.entry(name.lower()).obj
    for m in ref.methods:  # every option a refinement names is an option of each base method it names
        assert set(ref.options) <= {f.name for f in dataclasses.fields(get("objective", m).Config)}, m
    with pytest.raises(DistillError, match=f"refinement of {base}.*: use --method {base} --options '.{option}: "):
        RecoverConfig(method=name)
    assert main(["methods"]) == 0 and name.lower() in capsys.readouterr().out
