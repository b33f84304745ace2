"""`vlplan tiny-model`: a tiny random model directory of a family, loadable offline by transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from vlplan.planner.errors import VlplanError
from vlplan.planner.io.files import check_output_dir, writing

from .options import errors
from .render import console, print_json

# A tiny model is for smoke tests: more layers than the deepest registry checkpoint (80 in Qwen2.5-VL-72B) makes it
# no longer tiny, and a typo such as --text-layers 100000 ate 23 GB before this bound
MAX_TINY_LAYERS = 128


def tiny_model_command(
    out: Path = typer.Argument(..., help="Directory to create (must not exist, or be empty)."),
    family: str = typer.Option(..., "--family", help="qwen2.5-vl | qwen2-vl | llava."),
    text_layers: int = typer.Option(2, "--text-layers", help=f"Language-model layers (1 to {MAX_TINY_LAYERS})."),
    vision_layers: int = typer.Option(2, "--vision-layers", help=f"Vision-tower layers (1 to {MAX_TINY_LAYERS})."),
    json_: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Write a tiny random model of a family (config, safetensors, tokenizer with the family's special tokens and
    chat template, processor config): smoke-test a pipeline before spending GPU hours."""
    with errors():
        for value, flag in ((text_layers, "--text-layers"), (vision_layers, "--vision-layers")):
            if not 1 <= value <= MAX_TINY_LAYERS:
                raise VlplanError(f"{flag} must be 1 to {MAX_TINY_LAYERS} (a tiny model), got {value}")
        from vlplan.runner.tiny import TINY_FAMILIES, write_tiny_model  # light: write_tiny_model imports torch

        if family not in TINY_FAMILIES:  # before torch and transformers load (seconds)
            raise VlplanError(f"--family {family!r} is not one of {', '.join(TINY_FAMILIES)}")
        check_output_dir(out, "OUT")
        if out.exists() and any(out.iterdir()):
            raise VlplanError(f"{out} exists and is not an empty directory; choose a new path")

        existed = out.exists()
        try:
            with writing([out], "OUT"):
                out.mkdir(parents=True, exist_ok=True)  # an unwritable place fails now, not after the model is built
                spec = write_tiny_model(family, out, text_layers=text_layers, vision_layers=vision_layers)
        except BaseException:
            if existed and out.is_dir():  # it was empty: leave it empty
                for child in out.iterdir():
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            raise
    files = sorted(p.name for p in out.iterdir())
    if json_:
        print_json({"path": str(out), "family": family, "model_type": spec.family, "hf_class": spec.hf_class,
                    "image_token_id": spec.image_token_id, "files": files})
        return
    console.print(f"wrote a tiny {family} model ({spec.hf_class}, {spec.text.num_layers} text + "
                  f"{spec.vision.num_layers} vision layers) to {out}: {', '.join(files)}")
