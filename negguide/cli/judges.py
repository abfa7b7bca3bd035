"""``negguide judges``: the installed judges for ``negguide eval``, where they come from, and their settings."""

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
def judges(as_json: bool) -> None:
    """List the installed judges (they score a generated image: subject there, negative gone, quality)."""
    rows = _judge_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = [["JUDGE", "PACKAGE", "VERSION", "PARAMETERS"]]
    for row in rows:
        params = " ".join(f"{p['name']}={show(p['default'])}" for p in row["params"])
        table.append([row["name"], row["package"], row["version"], params])
    click.echo(format_table(table))
    click.echo("Every parameter's description: `negguide judges --json`.")


def _judge_rows() -> list[dict[str, Any]]:
    from negguide import registry

    rows = []
    for name, (cls, info) in sorted(registry.judges().items()):
        params = []
        for field_name, field in cls.Config.model_fields.items():
            required = field.is_required()
            params.append(
                {
                    "name": field_name,
                    "default": None if required else jsonable(field.get_default(call_default_factory=True)),
                    "required": required,
                    "description": field.description or "",
                }
            )
        doc = inspect.getdoc(cls) or ""
        rows.append(
            {
                "name": name,
                "package": info.package,
                "version": info.version,
                "plugin": info.name,
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "summary": doc.splitlines()[0] if doc else "",
                "params": params,
            }
        )
    return rows
