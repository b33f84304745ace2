"""The `vlplan` command: thin wrappers that parse, call one library function and render.

Every usage error (unknown option, a value of the wrong type, a missing argument) is one line `error: ...` on stderr
with exit code 2, like the `VlplanError`s of the commands themselves (`options.errors`), instead of click's
multi-line usage box.
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup

try:  # typer 0.2x vendors click as typer._click; older releases use click itself
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_exceptions

from vlplan import __version__

from .estimate import estimate_command
from .gpus import gpus_command
from .models import models_command
from .scan import scan_command
from .tiny_model import tiny_model_command
from .plan import plan_command
from .profile import profile_command
from .run import run_command
from .tables import tables_command
from .tokens import tokens_command
from .trace import trace_command


def one_line_usage_error(error: click_exceptions.ClickException, command_path: str = "") -> str:
    """`error: <click's message>` plus where to read the command's options, on one line. `command_path` stands in
    when the error carries no context (an option missing its value)."""
    message = " ".join(error.format_message().split())
    ctx = getattr(error, "ctx", None)
    path = ctx.command_path if ctx is not None else command_path
    hint = f" (see `{path} --help`)" if isinstance(error, click_exceptions.UsageError) and path else ""
    return f"error: {message}{hint}"


class _OneLineErrors:
    """Turn click's ClickException (usage errors, bad values) into one line on stderr and click's exit code (2 for
    usage errors). `no_args_is_help` raises a UsageError whose message is the help page: that one is left to click."""

    def __init__(self, command_path: str = ""):
        self.command_path = command_path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None or not issubclass(exc_type, click_exceptions.ClickException) or \
                issubclass(exc_type, getattr(click_exceptions, "NoArgsIsHelpError", ())):
            return False
        typer.echo(one_line_usage_error(exc, self.command_path), err=True)
        raise typer.Exit(exc.exit_code)


class VlplanGroup(TyperGroup):
    """The command group: usage errors of the group and of every command are one line (see `_OneLineErrors`)."""

    def make_context(self, info_name, args, parent=None, **extra):
        with _OneLineErrors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        args = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
        command = args[0] if args and args[0] in self.commands else ""
        with _OneLineErrors(f"{ctx.command_path} {command}".strip()):
            return super().invoke(ctx)


app = typer.Typer(cls=VlplanGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Plan, prove and launch vision-language model fine-tunes.")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"vlplan {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print vlplan's version and exit.")) -> None:
    """Plan, prove and launch vision-language model fine-tunes."""


app.command("estimate")(estimate_command)
app.command("trace")(trace_command)
app.command("plan")(plan_command)
app.command("profile")(profile_command)
app.command("tokens")(tokens_command)
app.command("models")(models_command)
app.command("gpus")(gpus_command)
app.command("scan")(scan_command)
app.command("run")(run_command)
app.command("tiny-model")(tiny_model_command)
app.command("tables")(tables_command)

if __name__ == "__main__":
    app()
