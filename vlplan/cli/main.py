"""The `vlplan` command: thin wrappers that parse, call one library function and render."""

from __future__ import annotations

import typer

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

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Plan, prove and launch vision-language model fine-tunes.")
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
