"""The ``negguide`` command line: list methods, run the offline demo, generate an image.

Built on the public API only. torch, diffusers and negguide itself are imported inside the
commands, so ``negguide --help`` answers at once.

One module per command (`methods`, `demo`, `generate`, `compare`, `evaluate` for ``eval``, `judges`;
``negguide toyworld`` lives with ToyWorld), and `output` for what they share. This module is the group: it
turns every user error into one line on stderr, silences the libraries' known noise while a command runs,
and registers the commands.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from negguide.cli import compare
from negguide.cli import demo
from negguide.cli import evaluate
from negguide.cli import generate
from negguide.cli import judges
from negguide.cli import methods
from negguide.cli.output import CLIError
from negguide.cli.output import quiet_known_noise
from negguide.toyworld.cli import toyworld

__all__ = ["CLIError", "main"]


def _usage_line(exc: click.UsageError) -> str:
    message = exc.format_message()
    if exc.ctx is not None:
        message = f"{message} (see `{exc.ctx.command_path} --help`)"
    return message


class _Group(click.Group):
    """A group whose errors (negguide's own and click's usage errors) are one line on stderr."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise CLIError(_usage_line(exc), exit_code=exc.exit_code) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with quiet_known_noise():  # what a command prints is what matters to the user
                return super().invoke(ctx)
        except CLIError:
            raise
        except click.UsageError as exc:
            raise CLIError(_usage_line(exc), exit_code=exc.exit_code) from None
        except Exception as exc:
            # negguide is imported lazily; an error of its kind can only exist once it is imported
            errors = sys.modules.get("negguide.errors")
            if errors is not None and isinstance(exc, errors.NegGuideError):
                raise CLIError(str(exc)) from None
            raise


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="negguide", prog_name="negguide")
def main() -> None:
    """Negative prompts that work on diffusers pipelines (VSF, NAG, NASA, CFG).

    \b
    negguide methods             the installed guidance methods and their parameters
    negguide demo                every method on a small offline pipeline, side by side
    negguide generate ...        one image with a method, parameters embedded in the PNG
    negguide compare ...         several settings on the same seeds, side by side in a grid
    negguide eval ...            measure negative adherence: settings x prompt set x seeds, judged
    negguide judges              the installed judges of negguide eval and their parameters
    negguide toyworld ...        train the ToyWorld model and run its negative-adherence bench
    """


# the submodules keep their names (``negguide.cli.demo`` is the module; its command is ``demo.demo``)
main.add_command(methods.methods)
main.add_command(demo.demo)
main.add_command(generate.generate)
main.add_command(compare.compare)
main.add_command(evaluate.evaluate)
main.add_command(judges.judges)
main.add_command(toyworld)
