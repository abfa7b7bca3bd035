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
    """List the installed guidance methods, where they come from, and their parameters."""
    rows = _method_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    common = {"enabled", "start", "stop", "layers"}
    table = [["METHOD", "LEVEL", "PACKAGE", "VERSION", "PARAMETERS"]]
    for row in rows:
        own = " ".join(f"{p['name']}={show(p['default'])}" for p in row["params"] if p["name"] not in common)
        table.append([row["name"], row["level"], row["package"], row["version"], own])
    click.echo(format_table(table))
    click.echo(
        "\nEvery method also takes enabled=True start=0.0 stop=1.0; attention methods also layers=None "
        "(all blocks).\nSet them with `negguide generate --param key=value` or a --config YAML."
    )
    if verbose:
        for row in rows:
            click.echo(f"\n{row['name']}: {row['summary']}")
            width = max(len(p["name"]) for p in row["params"])
            for p in row["params"]:
                click.echo(f"  {p['name']:<{width}}  {show(p['default']):<8}  {p['description']}")
            for family, params in row["family_defaults"].items():
                click.echo(f"  defaults on {family}: " + " ".join(f"{k}={show(v)}" for k, v in params.items()))
    else:
        click.echo("Descriptions of every parameter: `negguide methods -v` (or --json).")


def _method_rows() -> list[dict[str, Any]]:
    from negguide import registry

    rows = []
    for name, (cls, info) in sorted(registry.methods().items()):
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
                "family_defaults": jsonable(dict(getattr(cls, "defaults", {}) or {})),
            }
        )
    return rows


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    return text or str(annotation).replace("typing.", "")
