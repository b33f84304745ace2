"""Named tables. `committed` is the one whose files live in tables/generated/ (sizing.md, sizing.csv and its plots);
`vlplan tables --preset committed --out tables/generated` regenerates them and `vlplan tables --check` fails when
they differ from what the code computes.

Its size is bounded by that check, which runs in the test suite: 10 models x 4 methods x 5 sequence/image points =
200 row groups (each group runs the few simulations its 6 GPU rows share), well under a minute on 2 cores.
Sequence lengths are swept at 768x768 (LLaMA-Factory's default image) and image sizes at 4096 tokens (where a
1920x1080 image fits every model), rather than their full cross.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..planner.errors import VlplanError
from .compute import Conditions
from .spec import COMMON_GPUS, Table, TableSpec


@dataclass(frozen=True)
class Preset:
    table: Table
    formats: tuple[str, ...]  # the data files --out writes and --check compares
    plot: bool  # whether --out also draws the plots
    directory: Path | None = None  # where its files are committed (the default --out of --check)
    regenerate: str = ""  # the command that rewrites the committed files


COMMITTED_DIR = Path(__file__).resolve().parent / "generated"
COMMITTED_MODELS = ("qwen2-vl-2b", "qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2.5-vl-32b", "qwen2.5-vl-72b",
                    "qwen3-vl-8b", "llava-1.5-7b", "internvl3-8b", "gemma-3-27b", "llama-3.2-11b-vision")
# 1920x1080 is planned at its full size: the committed tables raise LLaMA-Factory's image_max_pixels cap (589,824
# by default, which would downscale it to about 1024x576) to its pixel count. Images up to 768x768 are below both.
COMMITTED_CONDITIONS = Conditions(image_max_pixels=1920 * 1080)


def _committed() -> Preset:
    def part(seq_lens, image_sizes):
        return TableSpec(models=COMMITTED_MODELS, gpus=COMMON_GPUS, seq_lens=seq_lens, image_sizes=image_sizes,
                         conditions=COMMITTED_CONDITIONS)

    table = Table(stem="sizing", parts=(part((2048, 4096, 8192), ((768, 768),)),
                                        part((4096,), ((448, 448), (1920, 1080)))),
                  command="vlplan tables --preset committed")
    return Preset(table, formats=("md", "csv"), plot=True, directory=COMMITTED_DIR,
                  regenerate="vlplan tables --preset committed --out tables/generated")


PRESETS = {"committed": _committed}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise VlplanError(f"--preset {name!r} is not one of {', '.join(PRESETS)}")
    return PRESETS[name]()
