"""Estimate vs trace over a matrix of configurations: the estimator's live-tensor peak (`allocated_peak_bytes`) and
peak phase against the tracer's (fake tensors, real transformers/peft code, extrapolated from a few layers).

    python benchmarks/accuracy_trace.py                 # the full matrix (~50 configurations, minutes on 2 cores)
    python benchmarks/accuracy_trace.py --quick         # a handful, for a smoke run
    python benchmarks/accuracy_trace.py --write         # also rewrite the table in docs/accuracy.md

Results go to benchmarks/results/accuracy_trace.json (accuracy_trace_quick.json for --quick, so a smoke run never
replaces the full results); --write replaces the block between the markers in docs/accuracy.md (full matrix only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- accuracy_trace:begin -->", "<!-- accuracy_trace:end -->"

SQ448, SQ1024, HD = (448, 448), (1024, 1024), (1920, 1080)


def _clip():
    """A 10 s 720p clip of 300 frames: LLaMA-Factory samples 20 frames at 2 fps (planner/video.py)."""
    from vlplan.planner.video import Video

    return (Video(1280, 720, frames=300, duration_s=10.0),)

# (model, settings): every traced family (Qwen2/2.5/3-VL incl. MoE, LLaVA-1.5/NeXT, Pixtral, InternVL3, Gemma 3,
# Llama 3.2 Vision, Idefics3/SmolVLM, PaliGemma 2); methods full (language only and with vision + projector), freeze,
# LoRA (with and without dropout), DoRA, LoRA on the vision encoder; checkpointing on/off; sdpa and eager; seq
# 512-8192; 0, 1 and 4 images of 448^2 to 1920x1080; batch 1 and 4; bf16 AMP and pure bf16; AdamW and Adafactor;
# gradient accumulation.
MATRIX = [
    ("qwen2.5-vl-7b", dict(method="lora")),
    ("qwen2.5-vl-7b", dict(method="lora", image_size=HD)),
    ("qwen2.5-vl-7b", dict(method="lora", num_images=4, image_size=SQ448, seq_len=4096)),
    ("qwen2.5-vl-7b", dict(method="lora", gradient_checkpointing=False, seq_len=1024, image_size=SQ448)),
    ("qwen2.5-vl-7b", dict(method="lora", lora_dropout=0.05, gradient_checkpointing=False, seq_len=1024,
                           image_size=SQ448)),
    ("qwen2.5-vl-7b", dict(method="lora", train_vision=True, image_size=SQ1024)),
    ("qwen2.5-vl-7b", dict(method="lora", train_vision=True, gradient_checkpointing=False, seq_len=1024,
                           image_size=SQ448)),
    ("qwen2.5-vl-7b", dict(method="lora", attn="eager", seq_len=1024, image_size=SQ448)),
    ("qwen2.5-vl-7b", dict(method="lora", batch_size=4, seq_len=1024, image_size=SQ448)),
    ("qwen2.5-vl-7b", dict(method="lora", seq_len=8192, num_images=4, image_size=SQ1024)),
    ("qwen2.5-vl-7b", dict(method="full", image_size=SQ448)),
    ("qwen2.5-vl-7b", dict(method="full", train_vision=True, train_projector=True, image_size=SQ1024)),
    ("qwen2.5-vl-7b", dict(method="full", precision="pure-bf16", image_size=SQ448)),
    ("qwen2.5-vl-7b", dict(method="freeze", image_size=HD)),
    ("qwen2.5-vl-7b", dict(method="lora", num_images=0, seq_len=512)),
    ("qwen2.5-vl-3b", dict(method="lora", batch_size=4, num_images=4, image_size=SQ448, seq_len=4096)),
    ("qwen2.5-vl-3b", dict(method="full", train_vision=True, train_projector=True, gradient_checkpointing=False,
                           seq_len=1024, image_size=SQ448)),
    ("qwen2.5-vl-3b", dict(method="lora", precision="pure-bf16", image_size=HD)),
    ("qwen2.5-vl-3b", dict(method="lora", attn="eager", gradient_checkpointing=False, seq_len=512,
                           image_size=SQ448)),
    ("qwen2-vl-7b", dict(method="lora")),
    ("qwen2-vl-7b", dict(method="lora", image_size=HD, seq_len=4096)),
    ("qwen2-vl-7b", dict(method="lora", gradient_checkpointing=False, seq_len=1024, image_size=SQ448)),
    ("qwen2-vl-7b", dict(method="lora", train_vision=True, image_size=SQ448)),
    ("qwen2-vl-7b", dict(method="lora", attn="eager", image_size=SQ448, seq_len=1024)),
    ("qwen2-vl-7b", dict(method="full", image_size=SQ1024)),
    ("qwen2-vl-7b", dict(method="full", train_vision=True, train_projector=True, batch_size=4, seq_len=1024,
                         image_size=SQ448)),
    ("qwen2-vl-7b", dict(method="freeze", seq_len=8192, num_images=4, image_size=HD)),
    ("qwen2-vl-2b", dict(method="lora", batch_size=4, image_size=SQ1024)),
    ("qwen2-vl-2b", dict(method="lora", dora=True, lora_dropout=0.05, gradient_checkpointing=False, seq_len=1024,
                         image_size=SQ448)),
    ("qwen2-vl-2b", dict(method="full", precision="pure-bf16", gradient_checkpointing=False, seq_len=1024,
                         image_size=SQ448)),
    ("qwen2-vl-2b", dict(method="full", train_vision=True, train_projector=True, num_images=4, image_size=SQ448,
                         seq_len=2048)),
    ("qwen2-vl-2b", dict(method="lora", num_images=0, seq_len=8192)),
    ("llava-1.5-7b", dict(method="lora", seq_len=1024)),
    ("llava-1.5-7b", dict(method="lora", seq_len=2048, num_images=0)),
    ("llava-1.5-7b", dict(method="lora", gradient_checkpointing=False, seq_len=1024)),
    ("llava-1.5-7b", dict(method="lora", lora_dropout=0.1, seq_len=1024)),
    ("llava-1.5-7b", dict(method="lora", train_vision=True, train_projector=True, seq_len=1024)),
    ("llava-1.5-7b", dict(method="lora", train_vision=True, gradient_checkpointing=False, seq_len=1024)),
    ("llava-1.5-7b", dict(method="lora", attn="eager", seq_len=1024)),
    ("llava-1.5-7b", dict(method="lora", batch_size=4, seq_len=2048)),
    ("llava-1.5-7b", dict(method="full", seq_len=1024)),
    ("llava-1.5-7b", dict(method="full", train_vision=True, train_projector=True, seq_len=2048)),
    ("llava-1.5-7b", dict(method="full", precision="pure-bf16", seq_len=1024)),
    ("llava-1.5-7b", dict(method="freeze", seq_len=4096, num_images=4)),
    ("llava-1.5-13b", dict(method="lora", seq_len=4096)),
    ("llava-1.5-13b", dict(method="lora", train_vision=True, attn="eager", gradient_checkpointing=False,
                           seq_len=1024)),
    ("llava-1.5-13b", dict(method="full", batch_size=4, seq_len=1024)),
    ("qwen2-vl-2b", dict(method="lora", dora=True, gradient_checkpointing=False, seq_len=1024, image_size=SQ448)),
    ("qwen2-vl-2b", dict(method="full", gradient_accumulation_steps=2, seq_len=1024, image_size=SQ448)),
    ("qwen2-vl-2b", dict(method="full", optimizer="adafactor", seq_len=1024, image_size=SQ448)),
    ("qwen3-vl-8b", dict(method="lora", image_size=SQ1024)),
    ("qwen3-vl-4b", dict(method="full", train_vision=True, train_projector=True, seq_len=1024, image_size=SQ448)),
    ("qwen3-vl-30b-a3b", dict(method="lora", seq_len=1024, image_size=SQ448)),
    ("llava-v1.6-mistral-7b", dict(method="lora", image_size=(672, 672), seq_len=4096)),
    ("llava-llama-3-8b", dict(method="lora", seq_len=1024)),
    ("pixtral-12b", dict(method="lora", image_size=SQ1024, seq_len=4096)),
    ("internvl3-8b", dict(method="lora", image_size=SQ1024)),
    ("internvl3-2b", dict(method="full", train_vision=True, train_projector=True, image_size=SQ448)),
    ("gemma-3-4b", dict(method="lora", seq_len=1024)),
    ("gemma-3-12b", dict(method="lora", attn="eager", seq_len=1024)),
    ("llama-3.2-11b-vision", dict(method="lora", seq_len=1024, image_size=SQ448)),
    ("idefics3-8b", dict(method="lora", seq_len=4096, image_size=SQ1024)),
    ("smolvlm", dict(method="full", seq_len=2048, image_size=SQ448)),
    ("paligemma2-3b", dict(method="lora", seq_len=1024)),
    # LLaMA-Factory's stack (checkpointing before peft: the frozen vision tower's input requires grad, its blocks run
    # un-checkpointed and save activations) and a plain HF Trainer's (non-reentrant, every layer)
    ("qwen2.5-vl-7b", dict(method="lora", stack="llamafactory")),
    ("qwen2.5-vl-7b", dict(method="lora", stack="llamafactory", seq_len=4096, num_images=2, image_size=(1344, 1008),
                           image_max_pixels=1344 * 1008)),
    ("qwen2.5-vl-3b", dict(method="lora", stack="llamafactory", image_size=SQ448)),
    ("llava-1.5-7b", dict(method="lora", stack="llamafactory", batch_size=4, seq_len=2048)),
    ("internvl3-8b", dict(method="lora", stack="llamafactory", image_size=SQ1024)),
    ("qwen2.5-vl-7b", dict(method="lora", stack="hf-trainer")),
    # memory levers (docs/memory-model.md "Memory levers"): Liger's fused linear cross-entropy (LLaMA-Factory
    # enable_liger_kernel), per-component checkpointing (ms-swift vit_gradient_checkpointing), offloaded checkpointing
    # (LLaMA-Factory use_unsloth_gc), LoRA on the language model with a full vision tower (ms-swift lora_llm_full_vit)
    ("llava-1.5-7b", dict(method="lora", stack="llamafactory", liger_kernel=True, seq_len=2048)),
    ("llava-1.5-7b", dict(method="full", stack="llamafactory", liger_kernel=True, seq_len=1024)),
    ("qwen2.5-vl-7b", dict(method="full", train_vision=True, train_projector=True, vision_gradient_checkpointing=False,
                           image_size=SQ1024)),
    ("qwen2.5-vl-7b", dict(method="full", train_vision=True, train_projector=True, gradient_checkpointing=False,
                           vision_gradient_checkpointing=True, seq_len=1024, image_size=SQ448)),
    ("llava-1.5-7b", dict(method="full", train_vision=True, stack="hf-trainer", vision_gradient_checkpointing=False,
                          seq_len=1024)),
    ("qwen2.5-vl-7b", dict(method="lora", stack="llamafactory", offload_checkpoints=True)),
    ("qwen2-vl-7b", dict(method="full", train_vision=True, stack="llamafactory", offload_checkpoints=True,
                         image_size=SQ448)),
    ("qwen2.5-vl-7b", dict(method="lora", vision="full", projector="full", image_size=SQ448)),
    # videos (Qwen2-VL, Qwen2.5-VL) and neat packing's block-diagonal mask
    ("qwen2.5-vl-7b", dict(method="lora", num_images=0, videos=_clip(), seq_len=4096)),
    ("qwen2.5-vl-7b", dict(method="lora", train_vision=True, image_size=SQ448, videos=_clip(), seq_len=4096)),
    ("qwen2-vl-7b", dict(method="full", num_images=0, videos=_clip(), seq_len=4096)),
    ("qwen2.5-vl-7b", dict(method="lora", packing=True, neat_packing=True, seq_len=4096, image_size=SQ448)),
    ("qwen2-vl-7b", dict(method="full", packing=True, neat_packing=True, seq_len=2048, image_size=SQ448)),
    # OFT (LLaMA-Factory finetuning_type oft; peft's OFT layer: Cayley-Neumann rotation of each linear's input)
    ("qwen2.5-vl-7b", dict(method="oft", stack="llamafactory", image_size=SQ448)),
    ("llava-1.5-7b", dict(method="oft", oft_block_size=16, gradient_checkpointing=False, seq_len=1024)),
    # preference training (LLaMA-Factory stage dpo; traced at full depth): DPO with the LoRA policy's adapters
    # disabled as the reference, ORPO (no reference)
    ("qwen2.5-vl-7b", dict(method="lora", stack="llamafactory", stage="dpo", seq_len=1024, image_size=SQ448)),
    ("llava-1.5-7b", dict(method="lora", stack="llamafactory", stage="dpo", pref_loss="orpo", seq_len=1024)),
    # Liger on Qwen2.5-VL / Qwen2-VL (planner/memory/liger.py: liger 0.8.5's Qwen forward does not import against
    # transformers 5.23, so the trace runs liger's own patch over a port of its lce_forward): fused loss, LigerRMSNorm
    # (2.5-VL: vision norms too), LigerSwiGLUMLP, LigerLayerNorm (2-VL vision)
    ("qwen2.5-vl-7b", dict(method="lora", stack="llamafactory", liger_kernel=True)),
    ("qwen2-vl-7b", dict(method="full", stack="llamafactory", liger_kernel=True, seq_len=1024, image_size=SQ448)),
    # Qwen3-VL videos (timestamps between the temporal patches, DeepStack features of the video) and neat packing
    # under FlashAttention-2 (flash-attn's varlen kernel emulated: profiler/flash_emulate.py)
    ("qwen3-vl-8b", dict(method="lora", num_images=0, videos=_clip(), seq_len=4096)),
    ("qwen2.5-vl-7b", dict(method="lora", packing=True, neat_packing=True, attn="fa2", seq_len=4096,
                           image_size=SQ448)),
    # KTO (LLaMA-Factory stage kto; traced at full depth): target and KL forwards on the policy, both on the LoRA
    # policy with adapters disabled as the reference
    ("qwen2.5-vl-7b", dict(method="lora", stack="llamafactory", stage="kto", seq_len=1024, image_size=SQ448)),
    ("llava-1.5-7b", dict(method="lora", stack="llamafactory", stage="kto", batch_size=2, seq_len=1024)),
    # Liger on Gemma 3 (Gemma RMSNorm, GEGLU, in-place RoPE, SigLIP LayerNorm, fused loss) and Mllama (RMSNorm,
    # SwiGLU, RoPE, vision LayerNorm; no fused loss: liger patches MllamaForCausalLM only). Mllama without
    # checkpointing: LLaMA-Factory's reentrant checkpointing of two or more cross-attention layers fails in the trace
    # with or without Liger ("backward through the graph a second time")
    ("gemma-3-4b", dict(method="lora", stack="llamafactory", liger_kernel=True)),
    ("llama-3.2-11b-vision", dict(method="lora", stack="llamafactory", liger_kernel=True, gradient_checkpointing=False,
                                  seq_len=1024, image_size=SQ448)),
]
QUICK = [0, 3, 10, 18, 30, 33, 47, 53]


def run(models: list[tuple[str, dict]]) -> list[dict]:
    from vlplan.planner.errors import VlplanError
    from vlplan.planner.memory.estimate import estimate
    from vlplan.planner.registry import resolve
    from vlplan.planner.setup import make_setup
    from vlplan.profiler.trace import trace

    rows = []
    for index, (model, settings) in enumerate(models, 1):
        try:
            setup = make_setup(resolve(model), **settings)
        except VlplanError as err:
            print(f"[{index}/{len(models)}] {model} {settings}: skipped ({err})", file=sys.stderr)
            continue
        start = time.perf_counter()
        est = estimate(setup)
        estimate_s = time.perf_counter() - start
        traced = trace(setup)
        error = (est.allocated_peak_bytes - traced.allocated_peak_bytes) / traced.allocated_peak_bytes
        row = {"model": model, "settings": {k: _plain(v) for k, v in settings.items()},
               "estimate_allocated_peak_bytes": est.allocated_peak_bytes,
               "trace_allocated_peak_bytes": traced.allocated_peak_bytes,
               "error": error, "estimate_phase": est.peak_phase, "trace_phase": traced.peak_phase,
               "estimate_s": estimate_s, "trace_s": traced.seconds,
               "vision_tokens": setup.vision_tokens_per_sample}
        rows.append(row)
        print(f"[{index}/{len(models)}] {model} {describe(settings)}: estimate {gib(est.allocated_peak_bytes)} "
              f"trace {gib(traced.allocated_peak_bytes)} error {100 * error:+.2f}% phase "
              f"{est.peak_phase}/{traced.peak_phase} ({traced.seconds:.1f} s)", file=sys.stderr)
    return rows


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _plain(value):
    """A setting as JSON: tuples as lists, videos as their labels."""
    if isinstance(value, tuple):
        return [item.label() if hasattr(item, "label") else item for item in value]
    return value


def describe(settings: dict) -> str:
    return ", ".join(f"{k}={'; '.join(v) if k == 'videos' else 'x'.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in ((k, _plain(v)) for k, v in settings.items()))


def summary(rows: list[dict]) -> dict:
    errors = [abs(r["error"]) for r in rows]
    return {"configurations": len(rows), "median_abs_error": statistics.median(errors), "max_abs_error": max(errors),
            "phase_agreement": sum(r["estimate_phase"] == r["trace_phase"] for r in rows) / len(rows)}


def markdown(rows: list[dict], stats: dict, versions: dict) -> str:
    lines = [BEGIN,
             f"Measured {time.strftime('%Y-%m-%d')} with {versions}; {stats['configurations']} configurations: "
             f"median |error| **{100 * stats['median_abs_error']:.3f}%**, worst **{100 * stats['max_abs_error']:.3f}%**"
             f", peak phase agrees in **{100 * stats['phase_agreement']:.0f}%**.",
             "",
             "| model | settings (LLaMA-Factory defaults otherwise) | vision tokens | estimate | trace | error | phase "
             "(estimate / trace) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {describe(r['settings'])} | {r['vision_tokens']} | "
                     f"{gib(r['estimate_allocated_peak_bytes'])} | {gib(r['trace_allocated_peak_bytes'])} | "
                     f"{100 * r['error']:+.3f}% | {r['estimate_phase']} / {r['trace_phase']} |")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="run a handful of configurations")
    parser.add_argument("--write", action="store_true", help="rewrite the table in docs/accuracy.md")
    args = parser.parse_args()
    import torch
    import transformers

    matrix = [MATRIX[i] for i in QUICK] if args.quick else MATRIX
    rows = run(matrix)
    stats = summary(rows)
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if args.quick and args.write:
        parser.error("--write publishes the full matrix: drop --quick")
    out = ROOT / "benchmarks" / "results" / ("accuracy_trace_quick.json" if args.quick else "accuracy_trace.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"versions": versions, "summary": stats, "rows": rows}, indent=2) + "\n")
    print(json.dumps(stats))
    if args.write:
        doc = ROOT / "docs" / "accuracy.md"
        text = doc.read_text()
        start, end = text.index(BEGIN), text.index(END) + len(END)
        doc.write_text(text[:start] + markdown(rows, stats, versions) + text[end:])


if __name__ == "__main__":
    main()
