"""``negguide methods``: the installed guidance methods, where they come from, and their parameters."""

from __future__ import annotations

import inspect
import json
from typing import Any

import click

from negguide.cli.output import format_table
from negguide.cli.output import jsonable
from negguide.cli.output import show


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.option("-v", "--verbose", is_flag=True, help="List every parameter with its description.")
def methods(as_json: bool, verbose: bool) -> None:
    """List the installed guidance methods, where they come from, and their parameters.

    A parameter's default is the method's own; where a model family replaces it (the default
    `negguide demo` and `generate` then use), the family's value follows in brackets:
    ``alpha=0.25 (sd3: 0.125)``.
    """
    rows = _method_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    common = {"enabled", "start", "stop", "layers"}
    table = [["METHOD", "LEVEL", "PACKAGE", "VERSION", "PARAMETERS"]]
    for row in rows:
        own = " ".join(f"{p['name']}={_default_text(p)}" for p in row["params"] if p["name"] not in common)
        table.append([row["name"], row["level"], row["package"], row["version"], own])
    click.echo(format_table(table))
    click.echo(
        "\n(family: value) is the default on that model family, used instead of the method's own."
        "\nEvery method also takes enabled=True start=0.0 stop=1.0; attention methods also layers=None "
        "(all blocks).\nSet them with `negguide generate --param key=value` or a --config YAML."
    )
    if verbose:
        for row in rows:
            click.echo(f"\n{row['name']}: {row['summary']}")
            width = max(len(p["name"]) for p in row["params"])
            shown = [_default_text(p) for p in row["params"]]
            value_width = max(8, *(len(text) for text in shown))
            for p, text in zip(row["params"], shown):
                click.echo(f"  {p['name']:<{width}}  {text:<{value_width}}  {p['description']}")
    else:
        click.echo("Descriptions of every parameter: `negguide methods -v` (or --json).")


def _default_text(param: dict[str, Any]) -> str:
    """``0.25``, or ``0.25 (sd3: 0.125)`` where a family replaces the default (``0.25 (sd3: 0.125, wan: 0.5)``)."""
    text = show(param["default"])
    others = [f"{family}: {show(value)}" for family, value in param["family_defaults"].items()]
    return f"{text} ({', '.join(others)})" if others else text


def _method_rows() -> list[dict[str, Any]]:
    import negguide
    from negguide import registry

    families = negguide.list_adapters()
    rows = []
    for name, (cls, info) in sorted(registry.methods().items()):
        # only the families that replace a default; the adapter's value wins over the method's (registry rule)
        by_family = {family: registry.family_defaults(cls, family) for family in families}
        by_family = {family: values for family, values in by_family.items() if values}
        params = []
        for field_name, field in cls.Config.model_fields.items():
            required = field.is_required()
            default = None if required else field.get_default(call_default_factory=True)
            params.append(
                {
                    "name": field_name,
                    "default": jsonable(default),
                    "required": required,
                    "type": _type_name(field.annotation),
                    "description": field.description or "",
                    "family_defaults": {
                        family: jsonable(values[field_name])
                        for family, values in by_family.items()
                        if field_name in values and jsonable(values[field_name]) != jsonable(default)
                    },
                }
            )
        doc = inspect.getdoc(cls) or ""
        rows.append(
            {
                "name": name,
                "level": cls.level,
                "package": info.package,
                "version": info.version,
                "plugin": info.name,
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "summary": doc.splitlines()[0] if doc else "",
                "params": params,
                "family_defaults": jsonable(by_family),
            }
        )
    return rows


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    return text or str(annotation).replace("typing.", "")
