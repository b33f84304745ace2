"""`vlplan tiny-model`: a tiny random model directory of a family, loadable offline by transformers."""

from __future__ import annotations

from pathlib import Path

import typer

from .options import errors
from .render import console, print_json


def tiny_model_command(
    out: Path = typer.Argument(..., help="Directory to create (must not exist, or be empty)."),
    family: str = typer.Option(..., "--family", help="qwen2.5-vl | qwen2-vl | llava."),
    text_layers: int = typer.Option(2, "--text-layers", help="Language-model layers."),
    vision_layers: int = typer.Option(2, "--vision-layers", help="Vision-tower layers."),
    json_: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Write a tiny random model of a family (config, safetensors, tokenizer with the family's special tokens and
    chat template, processor config): smoke-test a pipeline before spending GPU hours."""
    from vlplan.runner.tiny import write_tiny_model

    with errors():
        if text_layers <= 0 or vision_layers <= 0:
            from vlplan.planner.errors import VlplanError

            raise VlplanError("--text-layers and --vision-layers must be positive")
        spec = write_tiny_model(family, out, text_layers=text_layers, vision_layers=vision_layers)
    files = sorted(p.name for p in out.iterdir())
    if json_:
        print_json({"path": str(out), "family": family, "model_type": spec.family, "hf_class": spec.hf_class,
                    "image_token_id": spec.image_token_id, "files": files})
        return
    console.print(f"wrote a tiny {family} model ({spec.hf_class}, {spec.text.num_layers} text + "
                  f"{spec.vision.num_layers} vision layers) to {out}: {', '.join(files)}")
