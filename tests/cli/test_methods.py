"""``negguide methods``: the installed methods as a table and as JSON."""

from __future__ import annotations

import json

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
