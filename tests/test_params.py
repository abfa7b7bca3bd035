"""``KEY=VALUE`` parameters, read the same by ``negguide generate --param`` and ``toyworld bench --setting``."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from negguide.params import parse_param
from negguide.params import parse_params


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("scale=2", ("scale", 2)),
        ("scale=2.5", ("scale", 2.5)),
        ("enabled=false", ("enabled", False)),
        ("bias=inf", ("bias", math.inf)),
        ("layers=null", ("layers", None)),
        ("layers=[0, -1]", ("layers", [0, -1])),
        ("attention=split", ("attention", "split")),
        (" name = a=b ", ("name", "a=b")),
    ],
)
def test_parse_param_reads_values(text, expected):
    assert parse_param(text) == expected
    assert type(parse_param(text)[1]) is type(expected[1])


@pytest.mark.parametrize(
    ("text", "option", "message"),
    [
        ("scale", "--param", "expected KEY=VALUE, got 'scale'"),
        ("=2", "--param", "expected KEY=VALUE, got '=2'"),
        ("layers=[0,", "--setting", "layers: '[0,' is not valid JSON (Expecting value)"),
    ],
)
def test_parse_param_names_the_option_in_a_bad_parameter(text, option, message):
    import click

    with pytest.raises(click.BadParameter) as excinfo:
        parse_param(text, option)
    assert excinfo.value.format_message() == f"Invalid value for '{option}': {message}"


def test_parse_params_reads_every_item_and_a_later_key_wins():
    assert parse_params(("scale=2", "bias=inf", "scale=3")) == {"scale": 3, "bias": math.inf}
    assert parse_params(()) == {}


def test_params_imports_neither_the_command_line_nor_click():
    """A leaf module: any command (negguide.cli, negguide.toyworld.cli) can use it without an import cycle."""
    code = (
        "import sys, negguide.params; "
        "print(sorted(m for m in sys.modules if m == 'click' or m.startswith(('negguide.cli', 'negguide.toyworld'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
