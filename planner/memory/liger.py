"""Liger kernels (liger-kernel 0.8.5) in the symbolic step: which swaps apply, and what the swapped loss keeps.

LLaMA-Factory's `enable_liger_kernel: true` (llamafactory/model/model_utils/liger_kernel.py `apply_liger_kernel`)
calls liger's `apply_liger_kernel_to_<model_type>()` with its defaults before the model is built, for the model types
it lists; for any other model type it logs "Current model does not support liger kernel" and changes nothing (Qwen3-VL,
InternVL, LLaVA-NeXT, Idefics3, Phi-3-vision, MiniCPM-V: modelled as no change). The class-level patches
(liger_kernel/transformers/monkey_patch.py) rebind names in the family's transformers modeling module:

- llava: `LlavaForConditionalGeneration.forward` -> liger's llava `lce_forward` only (without a model instance the
  text and vision towers are not patched): the fused linear cross-entropy below, and no logits in the output.

Not modelled (a warning, and the estimate without Liger: an upper bound):
- qwen2_vl, qwen2_5_vl: liger 0.8.5's Qwen forwards subclass `Qwen2VLCausalLMOutputWithPast` /
  `Qwen2_5_VLCausalLMOutputWithPast` and read `outputs.rope_deltas`, which transformers 5.23 no longer has: the patch
  fails at import (so LLaMA-Factory's load fails) on the release vlplan models.
- gemma3, mllama, paligemma: their patches swap RMSNorm (gemma casting), GEGLU/SwiGLU and, globally,
  `torch.nn.LayerNorm` (mllama, paligemma), which are not modelled yet.
- the vlplan and hf-trainer stacks: transformers' Trainer applies `use_liger_kernel` to the model instance
  (`_apply_liger_kernel_to_instance`), which patches other modules (llava's text tower too).
"""

from __future__ import annotations

from .sim import DTYPE_BYTES, Engine, Node, Param, T

# Model types LLaMA-Factory's apply_liger_kernel dispatches (0.9.5), restricted to the families vlplan knows
LLAMAFACTORY_LIGER_FAMILIES = frozenset({"gemma3", "llava", "mllama", "paligemma", "qwen2_vl", "qwen2_5_vl"})
# The swaps modelled per family (class-level patches as LLaMA-Factory applies them; see the module docstring)
SWAPS = {
    "llava": frozenset({"fused_linear_cross_entropy"}),
}

def modelled(setup) -> bool:
    """Whether the estimate models `setup.liger_kernel` (True also where it changes nothing)."""
    if not setup.liger_kernel:
        return True
    if setup.stack != "llamafactory":
        return False
    family = setup.model.family
    return family in SWAPS or family not in LLAMAFACTORY_LIGER_FAMILIES


def not_modelled_reason(setup) -> str:
    family = setup.model.family
    if setup.stack != "llamafactory":
        return (f"Liger kernels are modelled as LLaMA-Factory applies them (enable_liger_kernel, --stack "
                f"llamafactory); the {setup.stack} stack's use_liger_kernel patches the model instance, which is not "
                "modelled: the estimate keeps the logits and fp32 loss temporaries (an upper bound)")
    why = ("liger 0.8.5's Qwen forward does not import against transformers 5.x" if family in ("qwen2_vl", "qwen2_5_vl")
           else "its norm and MLP swaps are not modelled yet")
    return (f"Liger kernels for {family} are not modelled ({why}; modelled: {', '.join(sorted(SWAPS))}, and no change "
            "for the families LLaMA-Factory does not patch); the estimate keeps the logits and fp32 loss temporaries "
            "(an upper bound)")


def swaps(setup) -> frozenset:
    """The swapped ops the simulated step runs (empty without Liger, or where it changes nothing)."""
    if not setup.liger_kernel or setup.stack != "llamafactory":
        return frozenset()
    return SWAPS.get(setup.model.family, frozenset())


def chunk_size(tokens: int, hidden: int, vocab: int, chunk_mem_const: int = 1) -> int:
    """fused_linear_cross_entropy_forward: inc_factor = ceil(V / (C * H)); chunk_size = next_power_of_2(ceil(BT /
    inc_factor)), at most BT: the transient logits stay within about BT x H elements."""
    inc_factor = -(-vocab // (chunk_mem_const * hidden))
    rows = -(-tokens // inc_factor)
    return min(1 << (rows - 1).bit_length(), tokens)


# Swapped ops ---------------------------------------------------------------------------------------------------------


def fused_linear_cross_entropy(e: Engine, h: T, head: Param, tokens: int, batch: int, hidden: int,
                               vocab: int) -> T:
    """`LigerForCausalLMLoss` -> `LigerFusedLinearCrossEntropyFunction` (reduction mean, accum_dtype None):

    - labels padded by one (int64, batch x (seq + 1)); `labels[..., 1:].contiguous()` a copy unless batch is 1;
    - in the forward, with grad off: grad_input like the hidden states, grad_weight like the head weight when it
      trains, loss_1d fp32 per token, the `target != ignore_index` mask (and its 0-d sum, read on the host);
    - chunks of `chunk_size` tokens: with operands of one dtype that is the autocast dtype, logits and dX go into a
      preallocated (chunk, V) buffer with `out=` (`_can_use_mm_out`); otherwise each chunk's `x @ W.t()` is an
      autocast matmul (input chunk cast, weight cast through the autocast cache when it trains), its dX product a
      (chunk, H) temporary copied into grad_input, and for an fp32 grad_weight the input chunk cast to the gradient's
      dtype for `addmm(out_dtype=fp32)` (sm_80+);
    - saved for backward: grad_input and grad_weight, handed back as the gradients (no logits, no log-softmax).
    """
    labels = e.new(tokens + batch, "int64", name="labels_pad")
    shifted = labels if batch == 1 else e.new(tokens, "int64", name="shift_labels")
    was = e.grad_enabled
    e.grad_enabled = False
    grad_input = e.new(h.numel, h.dtype, name="flce.grad_input")
    grad_weight = e.new(head.numel, head.dtype, name="flce.grad_weight") if h.rg and head.trainable else None
    loss_1d = e.new(tokens, "fp32", name="flce.loss_1d")
    mask = e.new(tokens, "bool", name="flce.target_mask")
    count = e.new(1, "int64", name="flce.n_non_ignore")
    del count
    compute = e.autocast
    mm_out = h.dtype == head.dtype and (compute is None or h.dtype == compute)
    size = chunk_size(tokens, hidden, vocab)
    storage = e.new(size * vocab, h.dtype, name="flce.logits") if mm_out else None
    start = 0
    while start < tokens:
        rows = min(size, tokens - start)
        start += rows
        if storage is not None:
            logits = storage
        else:
            xin = e.new(rows * hidden, compute, name="flce.input_chunk") if compute and h.dtype != compute else None
            w = _weight_cast(e, head, cached=False)  # `weight.t()` is a view: autocast never caches views
            logits = e.new(rows * vocab, compute or h.dtype, name="flce.logits")
            del xin, w
        if h.rg and not (mm_out and logits.dtype == grad_input.dtype):
            w = _weight_cast(e, head)
            product = e.new(rows * hidden, compute or logits.dtype, name="flce.dx_chunk")
            del product, w
        if grad_weight is not None:
            half = logits.dtype in ("bf16", "fp16")
            if half and (grad_weight.dtype == "fp32" or grad_weight.dtype == logits.dtype):
                aligned = e.new(rows * hidden, logits.dtype, name="flce.input_chunk") if h.dtype != logits.dtype \
                    else None
                del aligned
            else:  # legacy fallback: mm(grad_logits.t(), x).float() added into grad_weight
                product = e.new(head.numel, promote_dtype(logits.dtype, h.dtype), name="flce.dw_chunk")
                as_float = e.new(head.numel, "fp32", name="flce.dw_chunk_fp32") if product.dtype != "fp32" else None
                del product, as_float
        del logits
    del storage
    loss = e.new(1, "fp32", name="loss")
    del loss_1d, mask
    e.grad_enabled = was
    params = [head] if grad_weight is not None else []
    node = Node("fused_linear_cross_entropy", [h] if h.rg else [], [grad_input] + ([grad_weight] if params else []),
                params, workspace=4)  # backward: `torch.tensor(1.0)` for its grad_output == 1 test
    if h.rg:
        node.grad_dtype = {0: grad_input}
    if params:
        node.param_grads = {id(head): grad_weight}
    e.record(node, loss)
    del grad_input, grad_weight, labels, shifted
    return loss


def _weight_cast(e: Engine, head: Param, cached: bool = True) -> T | None:
    """The head weight as an autocast matmul sees it: itself in the compute dtype, else a half-precision copy, cached
    for the autocast region when the weight is a trainable leaf and not a view (autocast_mode.cpp `cached_cast`)."""
    if e.autocast is None or head.dtype == e.autocast:
        return None
    if head.trainable and cached:
        cached = e.cast_cache.get(id(head))
        if cached is None:
            cached = e.new(head.numel, e.autocast, name=f"{head.name}:cast")
            e.cast_cache[id(head)] = cached
        return cached
    return e.new(head.numel, e.autocast, name=f"{head.name}:cast")


def promote_dtype(a: str, b: str) -> str:
    return a if DTYPE_BYTES[a] >= DTYPE_BYTES[b] else b
