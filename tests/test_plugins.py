"""The plugin registry: hooks, built-ins, entry points, NEGGUIDE_LOAD_PLUGINS, errors."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import types

import pytest

import negguide
from negguide import hookimpl
from negguide.errors import PluginError
from negguide.errors import UnknownMethodError
from negguide.method import AttentionMethod
from negguide.method import SegmentOutputs
from negguide.registry import get_plugin_manager


class FakeNAG(AttentionMethod):
    name = "nag"

    def attend(self, seg):
        return SegmentOutputs(seg.q_img)


class Echo(AttentionMethod):
    """A method that returns the queries: enough to prove registration."""

    name = "echo"

    def attend(self, seg):
        return SegmentOutputs(seg.q_img)


def test_hook_register_methods(pm):
    class EchoPlugin:
        __name__ = "EchoPlugin"

        @hookimpl
        def register_methods(self, register):
            register(Echo)

    pm.register(EchoPlugin(), name="negguide_echo")
    assert negguide.get_method("echo", pm=pm) is Echo
    assert {"cfg", "echo", "nag", "nasa", "vsf"} <= set(negguide.list_methods(pm=pm))
    info = negguide.registry.methods(pm)["echo"][1]
    assert info.name == "negguide_echo"


def test_hook_register_adapters(pm):
    class FakeAdapter(negguide.CrossAttentionAdapter):
        family = "fake"

        @classmethod
        def matches(cls, transformer):
            return getattr(transformer, "is_fake", False)

        def encode_negative(self, text, call, padded):
            raise AssertionError

        def negative_from_embeds(self, embeds, call, padded):
            raise AssertionError

        def attention_modules(self, denoiser):
            raise AssertionError

        def project(self, attn, text, *args, **kwargs):
            raise AssertionError

        def finish(self, attn, projected, image, text):
            raise AssertionError

    class AdapterPlugin:
        @hookimpl
        def register_adapters(self, register):
            register(FakeAdapter)

    pm.register(AdapterPlugin(), name="negguide_fake")
    assert "fake" in negguide.list_adapters(pm=pm)
    transformer = types.SimpleNamespace(is_fake=True)
    assert negguide.get_adapter(transformer, pm=pm) is FakeAdapter


def test_hook_register_judges(pm):
    class Always(negguide.Judge):
        name = "always"

        def judge(self, image, item):
            return negguide.Verdict(positive=True, removed=True, quality=1.0, raw="yes")

    class JudgePlugin:
        @hookimpl
        def register_judges(self, register):
            register(Always)

    pm.register(JudgePlugin(), name="negguide_always")
    assert {"always", "toyworld"} <= set(negguide.list_judges(pm=pm))
    assert negguide.get_judge("always", pm=pm) is Always
    assert negguide.registry.judges(pm)["always"][1].name == "negguide_always"


def test_plugin_hooks_have_tests():
    """Every hook in hookspecs has a test_hook_<name> in this module (datasette's rule)."""
    pm = get_plugin_manager(entry_points=False)
    hooks = [name for name in dir(pm.hook) if not name.startswith("_")]
    tests = [name for name in globals() if name.startswith("test_hook_")]
    assert hooks
    for hook in hooks:
        assert f"test_hook_{hook}" in tests, f"Plugin hook is missing tests: {hook}"


def test_builtins_register_through_hooks(pm):
    assert negguide.list_methods(pm=pm) == ["cfg", "nag", "nasa", "vsf"]
    # every module of negguide.adapters is a built-in adapter whose family is its module name
    modules = sorted(name.rsplit(".", 1)[1] for name in negguide.registry.DEFAULT_PLUGINS if ".adapters." in name)
    assert negguide.list_adapters(pm=pm) == modules and {"flux", "sd3", "wan"} <= set(modules)
    source = negguide.registry.methods(pm)["vsf"][1]
    assert source.package == "negguide" and source.name == "negguide.plugins.vsf"


def test_duplicate_name_names_both_sources(pm):
    class DupPlugin:
        @hookimpl
        def register_methods(self, register):
            register(FakeNAG)

    pm.register(DupPlugin(), name="negguide_nag_plus")
    with pytest.raises(
        PluginError, match="'nag' registered twice: by 'negguide.plugins.nag' and by 'negguide_nag_plus'"
    ):
        negguide.get_method("vsf", pm=pm)


def test_registering_a_non_method_is_an_error(pm):
    class Bad:
        @hookimpl
        def register_methods(self, register):
            register(object())

    pm.register(Bad(), name="bad")
    with pytest.raises(PluginError, match="expected a subclass of GuidanceMethod"):
        negguide.list_methods(pm=pm)


def test_unknown_method_lists_installed(pm):
    with pytest.raises(UnknownMethodError, match="no guidance method 'nga'; installed: 'cfg', 'nag', 'nasa', 'vsf'"):
        negguide.get_method("nga", pm=pm)


# ---------------------------------------------------------------------- entry points, faked (pluggy style)


class FakeDist:
    def __init__(self, name):
        self.name = name
        self.version = "9.9"
        self.metadata = {"name": name}


class FakeEntryPoint:
    group = "negguide"

    def __init__(self, name, module, dist=None, error=None):
        self.name = name
        self.value = getattr(module, "__name__", str(module))
        self._module = module
        self._error = error
        self.dist = dist or FakeDist(f"negguide-{name}")

    def load(self):
        if self._error:
            raise self._error
        return self._module


@pytest.fixture
def fake_entry_points(monkeypatch):
    good = types.ModuleType("negguide_echo")

    @hookimpl
    def register_methods(register):
        register(Echo)

    good.register_methods = register_methods
    eps = [
        FakeEntryPoint("echo", good),
        FakeEntryPoint("broken", "negguide_broken", error=ImportError("no module named torchvision")),
    ]

    def entry_points(group=None, **kw):
        return [ep for ep in eps if group in (None, ep.group)]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return eps


def test_entry_points_load_and_broken_plugin_warns(fake_entry_points, monkeypatch):
    monkeypatch.delenv("NEGGUIDE_LOAD_PLUGINS", raising=False)
    with pytest.warns(RuntimeWarning, match="'broken'.*failed to load"):
        pm = get_plugin_manager()
    methods = negguide.registry.methods(pm)
    assert methods["echo"][0] is Echo
    assert methods["echo"][1].package == "negguide-echo" and methods["echo"][1].version == "9.9"
    assert {"cfg", "nag", "nasa", "vsf"} <= set(methods)


@pytest.mark.parametrize(("value", "expected"), [("", False), ("echo", True), ("other,echo", True), ("other", False)])
def test_load_plugins_env(fake_entry_points, monkeypatch, value, expected):
    monkeypatch.setenv("NEGGUIDE_LOAD_PLUGINS", value)
    pm = get_plugin_manager()  # "broken" is never requested here, so no warning either
    assert ("echo" in negguide.list_methods(pm=pm)) is expected


def test_loading_is_lazy_and_idempotent():
    """import negguide loads no plugin and imports neither diffusers nor the plugin modules."""
    code = (
        "import sys, negguide, negguide.registry as r;"
        "assert r._default is None;"
        "assert 'diffusers' not in sys.modules and 'negguide.plugins.vsf' not in sys.modules;"
        "a = r.default_plugin_manager(); b = r.default_plugin_manager(); assert a is b;"
        "print(negguide.list_methods())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "vsf" in out.stdout


def test_public_api_is_sorted():
    assert negguide.__all__ == sorted(negguide.__all__)
    for name in negguide.__all__:
        assert hasattr(negguide, name)


def test_an_adapter_that_breaks_the_contract_fails_at_registration(pm):
    class Incomplete(negguide.JointAttentionAdapter):
        family = "incomplete"

        @classmethod
        def matches(cls, denoiser):
            return False

    class NoLayout(negguide.Adapter):
        family = "nolayout"
        pipeline_cfg = "sometimes"

    class Plugin:
        @hookimpl
        def register_adapters(self, register):
            register(Incomplete)

    pm.register(Plugin(), name="negguide_incomplete")
    with pytest.raises(
        PluginError,
        match=r"plugin 'negguide_incomplete' registered the adapter Incomplete \('incomplete'\), which breaks the "
        r"adapter contract: it lacks the method\(s\) `attention_modules`, `encode_negative`, `finish`, "
        r"`negative_from_embeds`, `project`",
    ):
        negguide.list_adapters(pm=pm)
    pm.unregister(name="negguide_incomplete")

    class Plugin2:
        @hookimpl
        def register_adapters(self, register):
            register(NoLayout)

    pm.register(Plugin2(), name="negguide_nolayout")
    with pytest.raises(PluginError, match=r"`layout` \('joint' or 'cross'\), got None.*`pipeline_cfg`.*'sometimes'"):
        negguide.list_adapters(pm=pm)


def test_a_method_that_breaks_the_contract_fails_at_registration(pm):
    class NoAttend(AttentionMethod):
        name = "noattend"

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(NoAttend)

    pm.register(Plugin(), name="negguide_noattend")
    with pytest.raises(
        PluginError, match=r"'negguide_noattend' registered the method NoAttend .* lacks the method\(s\) `attend`"
    ):
        negguide.list_methods(pm=pm)


def test_adapter_plugins_contribute_family_defaults(pm):
    """A third-party adapter gives VSF defaults for its family; where a method plugin gives one too, the adapter's
    value wins."""

    class Fake(negguide.CrossAttentionAdapter):
        family = "fake"
        defaults = {"vsf": {"scale": 2.0}, "nag": {"alpha": 0.5}}

        @classmethod
        def matches(cls, denoiser):
            return False

        def encode_negative(self, text, call, padded):
            raise AssertionError

        def negative_from_embeds(self, embeds, call, padded):
            raise AssertionError

        def attention_modules(self, denoiser):
            raise AssertionError

        def project(self, attn, text, *args, **kwargs):
            raise AssertionError

        def finish(self, attn, projected, image, text):
            raise AssertionError

    class Tuned(AttentionMethod):
        name = "tuned"
        defaults = {"fake": {"layers": [0], "start": 0.25}}

        def attend(self, seg):
            return SegmentOutputs(seg.q_img)

    class Plugin:
        @hookimpl
        def register_adapters(self, register):
            register(Fake)

        @hookimpl
        def register_methods(self, register):
            register(Tuned)

    pm.register(Plugin(), name="negguide_fake")
    vsf = negguide.get_method("vsf", pm=pm)
    assert negguide.registry.family_defaults(vsf, "fake", pm) == {"scale": 2.0}
    assert negguide.registry.family_defaults(vsf, "sd3", pm) == {"scale": 3.5, "bias": 0.1}
    tuned = negguide.get_method("tuned", pm=pm)
    assert negguide.registry.family_defaults(tuned, "fake", pm) == {"layers": [0], "start": 0.25}
    Fake.defaults = {"tuned": {"start": 0.5}}
    assert negguide.registry.family_defaults(tuned, "fake", pm) == {"layers": [0], "start": 0.5}
