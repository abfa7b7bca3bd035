"""``negguide methods``: the installed methods as a table and as JSON."""

from __future__ import annotations

import json
import re

import negguide
from tests.cli.helpers import BUILTINS
from tests.cli.helpers import _invoke


def test_methods_table_lists_builtins_with_level_and_params():
    result = _invoke(["methods"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:] if line.strip()}
    for name in BUILTINS:
        assert name in rows
        assert rows[name][1] == ("prediction" if name == "cfg" else "attention")
        assert rows[name][2] == "negguide"
    assert "scale=3.5" in rows["vsf"] and "bias=0.1" in rows["vsf"]
    assert "tau=2.5" in rows["nag"]
    header = result.stdout.splitlines()[0].split()
    assert header == ["METHOD", "LEVEL", "PACKAGE", "VERSION", "PARAMETERS"]


def test_methods_json_has_every_method_with_params():
    result = _invoke(["methods", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == negguide.list_methods()
    by_name = {r["name"]: r for r in rows}
    for name in BUILTINS:
        row = by_name[name]
        assert {"name", "package", "version", "level", "params"} <= set(row)
        assert row["level"] == negguide.get_method(name).level
        fields = negguide.get_method(name).Config.model_fields
        assert [p["name"] for p in row["params"]] == list(fields)
        for p in row["params"]:
            assert {"name", "default", "description"} <= set(p)
            assert p["description"]
    assert {p["name"]: p["default"] for p in by_name["vsf"]["params"]}["scale"] == 3.5


def test_methods_table_shows_family_defaults_beside_the_generic_ones():
    """The demo runs NAG with alpha=0.125 on SD3: the table says so next to the generic 0.25."""
    result = _invoke(["methods"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith("nag "))
    nag = negguide.get_method("nag")
    sd3 = negguide.registry.family_defaults(nag, "sd3")
    generic = nag.Config.model_fields["alpha"].default
    assert sd3["alpha"] != generic
    # the generic default, then the families that replace it (in family order), sd3's among them
    assert re.search(rf"alpha={generic} \((\w+: [\d.]+, )*sd3: {sd3['alpha']}(, \w+: [\d.]+)*\)", line), line
    verbose = _invoke(["methods", "-v"]).stdout
    alpha = next(line for line in verbose.split("\nnag:")[1].splitlines() if line.strip().startswith("alpha "))
    assert re.search(rf"{generic} \((\w+: [\d.]+, )*sd3: {sd3['alpha']}(, \w+: [\d.]+)*\)", alpha), alpha


def test_methods_json_has_the_family_defaults_of_every_installed_adapter():
    rows = {r["name"]: r for r in json.loads(_invoke(["methods", "--json"]).stdout)}
    for name in BUILTINS:
        cls = negguide.get_method(name)
        expected = {f: negguide.registry.family_defaults(cls, f) for f in negguide.list_adapters()}
        assert rows[name]["family_defaults"] == {f: v for f, v in expected.items() if v}
    alpha = next(p for p in rows["nag"]["params"] if p["name"] == "alpha")
    assert alpha["family_defaults"]["sd3"] == 0.125 and "flux" not in alpha["family_defaults"]


def test_methods_shows_defaults_an_adapter_plugin_contributes(pm, monkeypatch):
    """An adapter plugin's defaults (registry.family_defaults) show, not only the method plugin's own."""

    class Fake(negguide.CrossAttentionAdapter):
        family = "fake"
        defaults = {"nasa": {"scale": 0.5}}

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

    class Plugin:
        @negguide.hookimpl
        def register_adapters(self, register):
            register(Fake)

    pm.register(Plugin(), name="negguide_fake")
    monkeypatch.setattr(negguide.registry, "default_plugin_manager", lambda: pm)
    result = _invoke(["methods"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith("nasa "))
    assert "scale=0.25 (fake: 0.5)" in line
