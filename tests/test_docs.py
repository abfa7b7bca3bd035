"""Meta-tests (datasette style): the documentation keeps up with the code.

Every hook has a section headed by its exact signature, every method has a page naming each
parameter, every parameter has a description, and the README's commands are the ones CI runs.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import annotated_types
import pytest
import yaml

from negguide import hookspecs
from negguide import registry

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text(encoding="utf-8")
HOOKS_PAGE = (DOCS / "plugins" / "hooks.md").read_text(encoding="utf-8")
SETUP_COMMAND = "bash scripts/setup.sh && .venv/bin/negguide demo"
TEST_COMMAND = ".venv/bin/python -m pytest -q"

HOOKSPECS = {name: f for name, f in vars(hookspecs).items() if hasattr(f, "negguide_spec")}
METHODS = registry.methods(registry.get_plugin_manager(entry_points=False))
BUILTIN_ADAPTERS = registry.adapters(registry.get_plugin_manager(entry_points=False))
FIELDS = [
    (name, field_name, field)
    for name, (cls, _) in METHODS.items()
    for field_name, field in cls.Config.model_fields.items()
]


def _signature(name: str) -> str:
    return f"{name}({', '.join(inspect.signature(HOOKSPECS[name]).parameters)})"


def _section(page: str, heading: str) -> str:
    """The text under ``## heading`` up to the next heading of the same or a higher level."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", page, re.M | re.S)
    assert match, f"no section `## {heading}`"
    return match.group(1)


def _fenced_blocks(text: str) -> list[str]:
    return re.findall(r"^```[\w-]*\n(.*?)^```", text, re.M | re.S)


def _nav_pages(nav: list) -> list[str]:
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


# ---------------------------------------------------------------------------------- hooks


def test_there_are_hooks():
    assert set(HOOKSPECS) == {"register_methods", "register_adapters", "register_judges"}


@pytest.mark.parametrize("hook", sorted(HOOKSPECS))
def test_hook_is_documented_with_its_signature(hook):
    """docs/plugins/hooks.md has a section headed by the hook's exact signature, listing each argument."""
    section = _section(HOOKS_PAGE, _signature(hook))
    for arg in inspect.signature(HOOKSPECS[hook]).parameters:
        assert f"`{arg}`" in section, f"{hook}: argument `{arg}` is not described"
    assert "@negguide.hookimpl" in section or "@hookimpl" in section, f"{hook}: no example"


def test_hooks_page_documents_only_real_hooks():
    headed = re.findall(r"^## (\w+)\(", HOOKS_PAGE, re.M)
    assert sorted(headed) == sorted(HOOKSPECS)


# ---------------------------------------------------------------------------------- methods


def test_builtin_methods_are_registered():
    assert {"cfg", "nag", "nasa", "vsf"} <= set(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_page_names_every_parameter(name):
    """docs/methods/<name>.md exists and mentions each Config field in backticks."""
    page = DOCS / "methods" / f"{name}.md"
    assert page.is_file(), f"method {name!r} has no page docs/methods/{name}.md"
    text = page.read_text(encoding="utf-8")
    missing = [f for f in METHODS[name][0].Config.model_fields if f"`{f}`" not in text]
    assert not missing, f"docs/methods/{name}.md does not mention {missing}"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_page_lists_the_family_defaults(name):
    """Each per-family default (the method's own and those its families' adapters give) appears in one table row
    of the method's page."""
    text = (DOCS / "methods" / f"{name}.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("|")]
    from negguide.registry import family_defaults
    from negguide.registry import list_adapters

    method = METHODS[name][0]
    families = sorted(set(method.defaults) | set(list_adapters()))
    table = {f: family_defaults(method, f) for f in families}
    for family, params in ((f, p) for f, p in table.items() if p):
        row = next((r for r in rows if f"`{family}`" in r), None)
        assert row is not None, f"docs/methods/{name}.md has no table row for family `{family}`"
        cells = [c.strip() for c in row.split("|")]
        for key, value in params.items():
            assert str(value) in cells, f"{name}: {family} default {key}={value} is not in the row {row!r}"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_page_says_untuned_where_no_default_exists(name):
    """Every built-in family without published values for the method is named on an "untuned" line of its page (or
    the page says the method is untuned on every family): no invented numbers, no silent gaps."""
    from negguide.registry import family_defaults

    text = (DOCS / "methods" / f"{name}.md").read_text(encoding="utf-8")
    untuned = [line for line in text.splitlines() if "untuned" in line]
    method = METHODS[name][0]
    for family in sorted(BUILTIN_ADAPTERS):
        if family_defaults(method, family):
            continue
        assert any(f"`{family}`" in line or "every family" in line for line in untuned), (
            f"docs/methods/{name}.md: family `{family}` has no defaults for {name} and no line says it is untuned"
        )


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_page_cites_the_reference(name):
    """The arXiv reference of the method's docstring is cited on its page."""
    refs = re.findall(r"arxiv\.org/abs/([\d.]+\d)", inspect.getdoc(METHODS[name][0]) or "")
    text = (DOCS / "methods" / f"{name}.md").read_text(encoding="utf-8")
    for ref in refs:
        assert ref in text, f"docs/methods/{name}.md does not cite arXiv {ref}"


@pytest.mark.parametrize(("name", "field_name", "field"), FIELDS, ids=[f"{n}.{f}" for n, f, _ in FIELDS])
def test_config_field_has_a_description(name, field_name, field):
    assert field.description and field.description.strip(), f"{name}: `{field_name}` has no description"


@pytest.mark.parametrize(("name", "field_name", "field"), FIELDS, ids=[f"{n}.{f}" for n, f, _ in FIELDS])
def test_numeric_config_field_has_a_lower_bound(name, field_name, field):
    """Numbers are bounded below (an upper bound is optional: beta = inf, for one, is meaningful)."""
    if field.annotation not in (int, float):
        return
    assert any(isinstance(m, annotated_types.Ge | annotated_types.Gt) for m in field.metadata), (
        f"{name}: `{field_name}` has no lower bound; add Field(ge=...)"
    )


# ---------------------------------------------------------------------------------- command line


def _cli_commands():
    from negguide.cli import main

    return sorted(main.commands.items())


@pytest.mark.parametrize(("name", "command"), _cli_commands(), ids=[n for n, _ in _cli_commands()])
def test_cli_command_is_documented_with_every_option(name, command):
    """docs/cli.md has a section per command that names each of its options."""
    import click

    section = _section((DOCS / "cli.md").read_text(encoding="utf-8"), f"`negguide {name}`")
    options = [o for p in command.params if isinstance(p, click.Option) for o in p.opts if o.startswith("--")]
    missing = [o for o in options if f"`{o}" not in section]
    assert not missing, f"docs/cli.md, `negguide {name}`: options {missing} are not documented"


# ---------------------------------------------------------------------------------- README and CI


def test_readme_starts_with_the_two_commands():
    """The first fenced code blocks are the snippet and the two commands, in that order."""
    lines = [line.strip() for block in _fenced_blocks(README)[:3] for line in block.splitlines()]
    assert SETUP_COMMAND in lines and TEST_COMMAND in lines
    assert lines.index(SETUP_COMMAND) < lines.index(TEST_COMMAND)


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash scripts/setup.sh" in ci
    assert TEST_COMMAND in ci


def test_readme_states_the_tested_version_ranges():
    """The ranges in the README are the ones pyproject.toml declares."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = dict(re.match(r"([A-Za-z0-9_.-]+)(.*)", d).groups() for d in project["dependencies"])
    for package in ("torch", "diffusers", "transformers"):
        assert f"`{package}{specs[package]}`" in README, f"README does not state {package}{specs[package]}"
    assert project["requires-python"] in README


def test_readme_links_resolve():
    for target in re.findall(r"\]\((?!https?://)([^)#\s]+)", README):
        assert (ROOT / target).exists(), f"README links to a missing file {target}"


# ---------------------------------------------------------------------------------- site


def test_every_page_is_in_the_nav_and_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = set(_nav_pages(config["nav"]))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    pages = {p for p in pages if not p.startswith("_")}
    assert pages == nav


def test_snippet_includes_exist():
    for page in DOCS.rglob("*.md"):
        for target in re.findall(r'--8<--\s+"([^"]+)"', page.read_text(encoding="utf-8")):
            assert (ROOT / target.split(":")[0]).is_file(), f"{page.name} includes a missing file {target}"
