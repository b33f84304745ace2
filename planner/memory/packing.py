"""Memory of LLaMA-Factory's neat packing (planner/packing.py) in the language model.

With sdpa or eager attention the collator hands the model a block-diagonal causal mask of (batch, 1, seq, seq) in the
compute dtype (collator.py `prepare_4d_attention_mask`: `torch.where(mask, 0, finfo.min)`, then every floating
feature `.to(compute_dtype)`), and transformers passes a 4D mask through unchanged (masking_utils
`_preprocess_mask_arguments`). It stays alive for the whole step (an input of the batch).
- sdpa: with a mask, transformers expands K and V to every query head (`repeat_kv`; `use_gqa_in_sdpa` is false
  with a mask) and CUDA cannot use FlashAttention: cuDNN attention takes the mask as an additive bias and keeps it,
  the expanded K/V, the output and an fp32 logsumexp for backward (ops.masked_fused_attention; the tracer's
  profiler/emulate.py `_cudnn_masked_sdpa`).
- eager: the mask is added to the scores where the causal mask would be (the same size; no causal mask is built).
- FlashAttention-2: the collator drops the mask and the padding (`_unpad_packed_features`) and transformers runs the
  varlen kernel on the sample boundaries it finds in position_ids: the memory of a dense row of the same tokens.
"""

from __future__ import annotations

from ..setup import TrainSetup
from . import ops
from .sim import DTYPE_BYTES, Engine, Node, T

# Samples in a packed row as the estimate assumes them under FlashAttention-2, where their number enters the varlen
# kernel's backward workspace (128 rows per sample: `flash_varlen_attention`) and cu_seqlens: the tracer's synthetic
# row holds two (profiler/packed_mask.py); each further sample adds heads * (1 + head dim) * 4 * 128 bytes to one
# layer's backward (1.8 MiB for Qwen2.5-VL-7B: 28 heads of 128)
PACKED_SAMPLES = 2

# The families whose language model runs BaseModel.language (planner/memory/model.py) with this mask, held equal to
# traces (tests/test_accuracy_packing.py); the others get a warning that the mask is left out
MASKED_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def block_diagonal_mask_modelled(setup: TrainSetup) -> bool:
    return setup.neat_packing and setup.attn != "fa2" and setup.model.family in MASKED_FAMILIES


def mask_warning(setup: TrainSetup) -> str | None:
    """The warning of a setup whose block-diagonal mask (or FlashAttention-2 varlen path) is not modelled (None when
    there is none to give)."""
    if not setup.neat_packing or setup.model.family in MASKED_FAMILIES:
        return None
    if setup.attn == "fa2":
        return (f"neat_packing with --attn fa2: FlashAttention-2's varlen path (contiguous copies of q and k, the "
                f"per-sample backward workspace) is modelled for Qwen2-VL and Qwen2.5-VL only; the estimate of "
                f"{setup.model.name} counts dense FlashAttention over the row")
    size = setup.batch_size * setup.seq_len**2 * (2 if COMPUTE_DTYPE[setup.precision] != "fp32" else 4)
    return (f"neat_packing with --attn {setup.attn}: LLaMA-Factory's block-diagonal attention mask "
            f"({size / 2**30:.2f} GiB, and the masked attention kernel's K/V copies) is modelled for Qwen2-VL and "
            f"Qwen2.5-VL only; the estimate of {setup.model.name} leaves it out (use --attn fa2, which needs no mask)")


# LLaMA-Factory model_args.compute_dtype (hparams/parser.py `_set_transformers_logging` / get_train_args:
# bf16 or pure_bf16 -> bfloat16, fp16 -> float16, else float32)
COMPUTE_DTYPE = {"bf16": "bf16", "pure-bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def packed_attention_mask(e: Engine, setup: TrainSetup) -> T:
    return e.new(setup.batch_size * setup.seq_len * setup.seq_len, COMPUTE_DTYPE[setup.precision],
                 name="attention_mask", category="inputs/batch")


def block_diagonal_attention(e: Engine, q: T, k: T, v: T, mask: T, heads: int, kv_heads: int, tokens: int,
                             name: str) -> T:
    """transformers sdpa_attention_forward with a 4D mask: repeat_kv, then the masked CUDA kernel."""
    key, value = (_repeat_kv(e, t, heads, kv_heads, name) for t in (k, v))
    if e.autocast:
        q, key, value = (ops.cast(e, t, e.autocast) for t in (q, key, value))
    return ops.masked_fused_attention(e, q, key, value, mask, heads, tokens, name=name)


def _repeat_kv(e: Engine, x: T, heads: int, kv_heads: int, name: str) -> T:
    """`x[:, :, None].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)`: a copy to every query head (a view
    when there is one K/V head per query head or a single one)."""
    if heads == kv_heads:
        return x
    if kv_heads == 1:
        return x.view(x.numel * heads, name=f"{name}.{x.name}_rep")
    return ops._copy(e, x, x.numel * (heads // kv_heads), f"{name}.{x.name}_rep")


# FlashAttention-2's varlen path (the flash-attn package, flash_attn_interface.py `FlashAttnVarlenFunc` and
# csrc/flash_attn/flash_api.cpp `mha_varlen_fwd` / `mha_varlen_bwd`, v2.x) ------------------------------------------


def varlen_attention_modelled(setup: TrainSetup) -> bool:
    """Neat packing under FlashAttention-2: the collator drops the mask (collator.py
    SFTDataCollatorWith4DAttentionMask: `features["attention_mask"] = None` with `neat_packing` and
    flash_attention_2), the text position ids restart per sample, and transformers' `_flash_attention_forward` takes
    its `_is_packed_sequence` branch: `flash_attn_varlen_func` over the samples."""
    return setup.neat_packing and setup.attn == "fa2" and setup.model.family in MASKED_FAMILIES


def flash_varlen_attention(e: Engine, q: T, k: T, v: T, heads: int, kv_heads: int, tokens: int, sequences: int,
                           name: str, from_position_ids: bool) -> T:
    """One `flash_attn_varlen_func` call over `tokens` packed query/key tokens of `sequences` sequences.

    - `from_position_ids` (the language model): transformers `_prepare_from_posids` runs `query.contiguous()`,
      `key.contiguous()`, `value.contiguous()` on the (batch, seq, heads, dim) transposes of the attention's states.
      q and k come from RoPE in (batch, heads, seq, dim): copies, which the kernel saves instead of them (their
      backward hands the gradient through); v is a transposed view of v_proj's output, already contiguous.
      `prepare_fa_kwargs_from_position_ids` makes the int32 cu_seqlens (sequences + 1) in every layer, which the
      kernel saves too. The vision towers pass their cu_seqlens in and their (seq, heads, dim) states reshape
      without a copy.
    - forward (`mha_varlen_fwd`): the output (total_q, heads, dim) in the input dtype, `softmax_lse` fp32
      (heads, total_q) (unpadded) and `rng_state` int64 (2); FlashAttnVarlenFunc saves q, k, v, the output, the
      logsumexp, cu_seqlens and rng_state.
    - backward (`mha_varlen_bwd`): dq, dk, dv (`torch.empty_like`), `softmax_d` fp32 (heads, total_q + 128 *
      sequences), `dq_accum` fp32 (total_q + 128 * sequences, heads, head dim rounded to 32, or 256 above 192) and,
      with grouped-query attention, dk/dv per query head (total_k, heads, head dim) before the sum over each group."""
    if e.autocast:  # fa_peft_integration_check casts fp32 inputs to the autocast dtype; q, k, v come in it
        q, k, v = (ops.cast(e, t, e.autocast) for t in (q, k, v))
    cu_seqlens = None
    if from_position_ids:
        q, k = (_contiguous(e, t, f"{name}.{t.name}_contiguous") for t in (q, k))
        cu_seqlens = e.new(sequences + 1, "int32", name=f"{name}.cu_seqlens")
    head_dim = q.numel // (tokens * heads)
    out = e.new(q.numel, q.dtype, name=name)
    lse = e.new(heads * tokens, "fp32", name=f"{name}.lse")
    rng_state = e.new(2, "int64", name=f"{name}.rng_state")
    inputs = [t for t in (q, k, v) if t.rg]
    padded = tokens + 128 * sequences
    dim_rounded = ops._round_up(head_dim, 32) if head_dim <= 192 else 256
    workspace = heads * padded * 4 + padded * heads * dim_rounded * 4
    if kv_heads != heads:
        workspace += 2 * tokens * heads * head_dim * DTYPE_BYTES[k.dtype]
    saved = [t for t in (q, k, v, out, lse, cu_seqlens, rng_state) if t is not None] if inputs else []
    e.record(Node("flash_attn_varlen", inputs, saved, [], workspace=workspace), out)
    del lse, rng_state, cu_seqlens, saved
    return out


def _contiguous(e: Engine, x: T, name: str) -> T:
    """`.contiguous()` of a transposed view: a copy whose backward hands the gradient through."""
    out = e.new(x.numel, x.dtype, name=name)
    node = Node("contiguous", [x] if x.rg else [], [], [])
    node.grad_dtype[0] = "passthrough"
    e.record(node, out)
    return out
