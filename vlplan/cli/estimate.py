"""`vlplan estimate`: per-GPU peak memory of one training step, with its breakdown."""

from __future__ import annotations

import typer

from vlplan import estimate
from vlplan.planner.memory.estimate import Estimate
from vlplan.planner.memory.explain import explain_term

from .options import errors, setup_command
from .render import console, gib, print_json, table


@setup_command
def estimate_command(setup, resolved, json_: bool = typer.Option(False, "--json", help="Print JSON."),
                     explain: bool = typer.Option(False, "--explain", help="Explain every term with its source.")):
    """Estimate per-GPU peak VRAM (and host RAM) of one training step.

    Defaults follow LLaMA-Factory: vision tower and projector frozen, LoRA rank 8 on every language-model linear,
    gradient checkpointing on, sdpa, bf16 AMP, seq 2048, batch 1, one image at the image_max_pixels cap, one H100.
    The setup can come from a LLaMA-Factory YAML (--from-llamafactory), a DeepSpeed JSON (--deepspeed) and a
    dataset's longest sample (--dataset); flags given on the command line override them.
    """
    with errors():
        result = estimate(setup)
    if json_:
        print_json({**result.to_dict(), **resolved.json_extras()})
        return
    if resolved.scan is not None and setup.packing:
        console.print(f"dataset {resolved.scan.path}: {resolved.scan.samples} samples packed into rows of "
                      f"{setup.seq_len} tokens; planning for the row with the most vision tokens (see the warning)")
    elif resolved.scan is not None:
        longest = resolved.scan.to_dict()["longest"]
        console.print(f"dataset {resolved.scan.path}: {resolved.scan.samples} samples; planning for sample "
                      f"#{resolved.sample} ({setup.seq_len} tokens; the longest has {longest['total_tokens']})")
    render_estimate(result, explain)


def render_estimate(result: Estimate, explain: bool = False) -> None:
    s = result.setup
    trains = ", ".join(f"{k} {v.value}" for k, v in s.trains.items())
    images = ", ".join(f"{w}x{h}" for w, h in s.images) or "none"
    if s.videos:
        images += "; videos " + ", ".join(f"{v.label()} ({t.frames} frames sampled, grid {t.grid_t}x{t.grid_h}x"
                                          f"{t.grid_w})" for v, t in zip(s.videos, s.video_tokens()))
    console.print(f"[bold]{s.model.name}[/bold] {s.method} ({trains}); {s.precision}, {s.optimizer}, "
                  f"{s.attn}, checkpointing {'on' if s.gradient_checkpointing else 'off'}, {s.stack} stack"
                  + (f"; stage dpo, pref_loss {s.pref_loss} (chosen + rejected: {s.rows_per_micro_batch} rows per "
                     "micro-batch" + (", reference forward)" if s.uses_reference else ")") if s.stage == "dpo" else "")
                  + (f"; stage kto (target and KL rows: 4 forwards of {s.batch_size} rows, 3 without grad, 2 on the "
                     "reference)" if s.stage == "kto" else ""))
    console.print(f"seq {s.seq_len} x batch {s.batch_size}; images {images} -> {s.vision_tokens_per_sample} vision "
                  f"tokens ({s.vision_patches_per_sample} encoder patches) per sample; "
                  f"{s.num_gpus * s.num_nodes} x {s.gpu.name}, "
                  + (f"FSDP {s.fsdp}" if s.sharding == "fsdp" else f"ZeRO {s.zero}") + f", offload {s.offload}")
    p, t = result.params, result.trainable_params
    console.print(f"parameters {p['total'] / 1e9:.3f} B (vision {p['vision'] / 1e9:.3f}, projector "
                  f"{p['projector'] / 1e9:.3f}, language {p['language'] / 1e9:.3f}); trainable {t['total'] / 1e6:.2f} M")
    rows = [[name, gib(value), f"{100 * value / result.peak_bytes:.1f}%"] + (
        [explain_term(name, result)] if explain else [])
        for name, value in sorted(result.breakdown_bytes.items(), key=lambda kv: -kv[1])]
    columns = ["term", "bytes", "share"] + (["how it is computed"] if explain else [])
    console.print(table(f"breakdown at the peak ({result.peak_phase})", columns, rows, {1, 2}))
    verdict = "[green]fits[/green]" if result.fits else "[red]does not fit[/red]"
    console.print(f"peak {gib(result.peak_bytes)} (live tensors {gib(result.allocated_peak_bytes)}) on "
                  f"{s.gpu.name} with {gib(s.gpu.memory_bytes)}: {verdict}; host RAM per node "
                  f"{gib(result.cpu_ram_bytes)}")
