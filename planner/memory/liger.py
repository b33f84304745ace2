"""Liger kernels (liger-kernel 0.8.5) in the symbolic step: which swaps apply, and what the swapped loss keeps.

LLaMA-Factory's `enable_liger_kernel: true` (llamafactory/model/model_utils/liger_kernel.py `apply_liger_kernel`)
calls liger's `apply_liger_kernel_to_<model_type>()` with its defaults before the model is built, for the model types
it lists; for any other model type it logs "Current model does not support liger kernel" and changes nothing (Qwen3-VL,
InternVL, LLaVA-NeXT, Idefics3, Phi-3-vision, MiniCPM-V: modelled as no change). The class-level patches
(liger_kernel/transformers/monkey_patch.py) rebind names in the family's transformers modeling module:

- llava: `LlavaForConditionalGeneration.forward` -> liger's llava `lce_forward` only (without a model instance the
  text and vision towers are not patched): the fused linear cross-entropy below, and no logits in the output.
- qwen2_5_vl: `Qwen2_5_VLForConditionalGeneration.forward` -> liger's qwen2_5_vl `lce_forward` (the fused loss, no
  logits); `Qwen2_5_VLRMSNorm` -> `LigerRMSNorm` (every instance built afterwards: the text layers' and final norms,
  and the vision blocks' norm1/norm2 and the merger's ln_q, which use the same class); `Qwen2MLP` (the text MLP) ->
  `LigerSwiGLUMLP`. Its `rope` swap rebinds `apply_multimodal_rotary_pos_emb`, which transformers 5.23's attention
  no longer calls (the M-RoPE sections are composed in `Qwen2_5_VLRotaryEmbedding`): no change.
- qwen2_vl: the same, with `Qwen2VLRMSNorm` (text only) and the vision tower's `LayerNorm` (norm1/norm2 and the
  merger's ln_q, `from torch.nn import LayerNorm` rebound in the modeling module) -> `LigerLayerNorm`.

The Qwen patches do not apply on the versions vlplan models: liger 0.8.5's `model/qwen2_vl.py` and
`model/qwen2_5_vl.py` import `LigerQwen2VLCausalLMOutputWithPast` / `LigerQwen2_5_VLCausalLMOutputWithPast`, which
`model/output_classes.py` defines only when transformers has `Qwen2VLCausalLMOutputWithPast` /
`Qwen2_5_VLCausalLMOutputWithPast` (transformers 5.23 has neither), and `apply_liger_kernel_to_qwen2(_5)_vl` imports
that module before it patches anything, so LLaMA-Factory's `apply_liger_kernel` raises ImportError and training
never starts. The estimate says so (`import_failure`) and models the patch as it applies where it imports.

The swapped Functions (liger_kernel/ops/*.py), what they allocate and save:
- `LigerRMSNormFunction` (rms_norm.py): Y like X (X's dtype, whatever the weight's), RSTD fp32 per row; saves X, W,
  RSTD. Backward: dX written into dY in place (`in_place=True`, LigerRMSNorm's default; else `zeros_like(dY)`);
  with a trainable weight a (SMs x H) fp32 partial-sum buffer, then `_dW.sum(0).to(W.dtype)`.
- `LigerSiLUMulFunction` (swiglu.py) / `LigerGELUMulFunction` (geglu.py): c like a; saves a (gate_proj's output)
  and b (up_proj's); backward writes da and db into a and b in place and returns them: no new gradient tensors,
  and the activation's output is never saved.
- `LigerLayerNormFunction` (layer_norm.py, the nvidia-triton implementation that `liger_kernel.functional.
  layer_norm` dispatches to on a plain install): Y like X, Mean and RSTD fp32 per row; saves X, W, B, Mean, RSTD.
  Backward: DX like X; per trainable weight/bias a (SMs x H) fp32 buffer, summed and cast to the parameter dtype.

- gemma3 (`apply_liger_kernel_to_gemma3`): `Gemma3RMSNorm` -> `LigerRMSNormForGemma3` (offset 1, gemma casting, not
  in place; every instance, the projector's mm_soft_emb_norm too), `Gemma3MLP` -> `LigerGEGLUMLP`,
  `apply_rotary_pos_emb` -> `liger_rotary_pos_emb` (transformers 5.23's Gemma 3 attention calls the module global),
  SigLIP's `nn.LayerNorm` -> `LigerLayerNorm`, and `Gemma3ForConditionalGeneration.forward` -> `multimodal_forward`
  (the fused loss). q_norm/k_norm run on transposed projections: `@ensure_contiguous` copies (`rms_norm`
  `transposed`), and RoPE then copies the norm's output (`rope`).
- mllama (`apply_liger_kernel_to_mllama`): `MllamaTextRMSNorm` -> `LigerRMSNorm`, `MllamaTextMLP` ->
  `LigerSwiGLUMLP`, the RoPE swap (on the projections themselves: no copy), `nn.LayerNorm` (rebound on torch.nn
  itself through `modeling_mllama.nn`) -> `LigerLayerNorm`. Its fused loss patches `MllamaForCausalLM.forward`, which
  a `MllamaForConditionalGeneration` fine-tune never calls: the logits stay.

Not modelled (a warning, and the estimate without Liger: an upper bound):
- paligemma: the patch applies, but its `lce_forward` fails at the first step on transformers 5.23
  (`RUNTIME_FAILURES`).
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
    "qwen2_5_vl": frozenset({"fused_linear_cross_entropy", "rms_norm", "swiglu"}),
    "qwen2_vl": frozenset({"fused_linear_cross_entropy", "rms_norm", "swiglu", "layer_norm"}),
    # apply_liger_kernel_to_gemma3: the text patch (Gemma3RMSNorm -> LigerRMSNormForGemma3, Gemma3MLP ->
    # LigerGEGLUMLP, apply_rotary_pos_emb -> liger_rotary_pos_emb), SigLIP's nn.LayerNorm -> LigerLayerNorm, and
    # Gemma3ForConditionalGeneration.forward -> multimodal_forward (the fused loss)
    "gemma3": frozenset({"fused_linear_cross_entropy", "rms_norm", "geglu", "rope", "layer_norm"}),
    # apply_liger_kernel_to_mllama: MllamaTextRMSNorm -> LigerRMSNorm, MllamaTextMLP -> LigerSwiGLUMLP,
    # apply_rotary_pos_emb, nn.LayerNorm -> LigerLayerNorm (the vision tower); its fused loss patches
    # MllamaForCausalLM.forward, which MllamaForConditionalGeneration never calls: the logits stay
    "mllama": frozenset({"rms_norm", "swiglu", "rope", "layer_norm"}),
}
# The swaps whose backward allocates a (SMs x H) fp32 buffer per trainable weight: the GPU's SM count enters
NORM_SWAPS = frozenset({"rms_norm", "layer_norm"})
# Families whose liger 0.8.5 patch module does not import against transformers 5.23 (see the module docstring):
# (liger module, the output class it imports, the transformers class that is gone)
IMPORT_FAILURES = {
    "qwen2_vl": ("liger_kernel/transformers/model/qwen2_vl.py", "LigerQwen2VLCausalLMOutputWithPast",
                 "Qwen2VLCausalLMOutputWithPast"),
    "qwen2_5_vl": ("liger_kernel/transformers/model/qwen2_5_vl.py", "LigerQwen2_5_VLCausalLMOutputWithPast",
                   "Qwen2_5_VLCausalLMOutputWithPast"),
}
# Families whose liger 0.8.5 patch applies on transformers 5.23 but whose patched forward fails at the first step
RUNTIME_FAILURES = {
    "paligemma": ("liger 0.8.5's PaliGemma lce_forward (liger_kernel/transformers/model/paligemma.py) fails at the "
                  "first step on transformers 5.23: `self.get_image_features(pixel_values)` now returns a "
                  "BaseModelOutputWithPooling, so `image_features.numel()` raises AttributeError"),
}
# `torch.cuda.get_device_properties(...).multi_processor_count` of the catalog's GPUs (NVIDIA's datasheets and
# architecture whitepapers; MI300X: 304 compute units, which ROCm reports there), read by liger's norm backward
# (ops/rms_norm.py `rms_norm_backward`, ops/layer_norm.py `layer_norm_backward`) for its partial-sum buffers
SM_COUNTS = {"t4-16g": 40, "l4-24g": 58, "a10g-24g": 80, "rtx3090-24g": 82, "rtx4090-24g": 128, "rtx5090-32g": 170,
             "v100-32g": 80, "a100-40g": 108, "l40s-48g": 142, "a6000-48g": 84, "a100-80g": 108,
             "h100-pcie-80g": 114, "h100-80g": 132, "h20-96g": 78, "h200-141g": 132, "mi300x-192g": 304}
DEFAULT_SM_COUNT = 132  # an unknown GPU: the H100 SXM's (the planner's default GPU)


def sm_count(gpu_name: str) -> int:
    return SM_COUNTS.get(gpu_name, DEFAULT_SM_COUNT)


def import_failure(setup) -> str | None:
    """The one-line reason `enable_liger_kernel` fails at load for `setup` on the modelled versions, or None."""
    if not setup.liger_kernel or setup.stack != "llamafactory" or setup.model.family not in IMPORT_FAILURES:
        return None
    module, liger_class, gone = IMPORT_FAILURES[setup.model.family]
    return (f"with liger-kernel 0.8.5 and transformers 5.23 LLaMA-Factory 0.9.5's apply_liger_kernel raises "
            f"ImportError at load ({module} imports {liger_class}, defined only when transformers has {gone}; "
            f"5.23 has not): training does not start on these versions; estimated as the patch applies where it "
            f"imports (fused loss, Liger RMSNorm/SwiGLU{'/LayerNorm' if 'layer_norm' in SWAPS[setup.model.family] else ''})")


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
    why = RUNTIME_FAILURES.get(family, "not modelled yet")
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


def rms_norm(e: Engine, x: T, weight: Param, rows: int, name: str = "", in_place: bool = True,
             transposed: bool = False) -> T:
    """`LigerRMSNorm.forward` -> `LigerRMSNormFunction` (ops/rms_norm.py `rms_norm_forward`): Y like X (X's dtype,
    whatever the weight's), RSTD fp32 per row (llama and gemma casting); saves X, W, RSTD. Backward
    (`rms_norm_backward`): dX is dY itself with `in_place` (`LigerRMSNorm`'s default), else `zeros_like(dY)`; a
    trainable weight adds a (SMs x H) fp32 buffer and `_dW.sum(0).to(W.dtype)`.

    `transposed`: X is a (batch, heads, seq, head_dim) view of a projection laid out (batch, seq, heads, head_dim)
    (Gemma 3's q_norm/k_norm, Mllama's cross-attention q_norm/k_norm): `@ensure_contiguous` copies it (the copy is
    what the Function saves) and, in backward, copies dY (the attention's gradient comes back in the projection's
    layout) before the kernel; dX is then that copy (in place) or a fresh one, laid out (batch, heads, seq, dim),
    and the projection's `.view(...).transpose(1, 2)` reshapes it back to a copy (ViewBackward)."""
    if transposed and x.rg:  # the `.view(hidden_shape).transpose(1, 2)` whose backward reshapes a copy
        view = x.view(name=f"{name}.transposed")
        e.record(Node("reshape_copy", [x], [], []), view)
        x = view
    saved = e.new(x.numel, x.dtype, name=f"{name}.contiguous") if transposed else x
    out = e.new(x.numel, x.dtype, name=name)
    rstd = e.new(rows, "fp32", name=f"{name}.rstd")
    params = [weight] if weight.trainable else []
    workspace = sm_count(e.gpu_name) * weight.numel * 4 if params else 0
    if transposed and x.rg and not in_place:  # `dY.contiguous()`, alive until the backward returns
        workspace += x.numel * DTYPE_BYTES[x.dtype]
    node = Node("liger_rms_norm", [x] if x.rg else [], [saved, rstd], params, workspace=workspace)
    node.param_grad_via = "fp32"  # `_dW.sum(dim=0)` in fp32, then `.to(W.dtype)`
    if in_place and x.rg and not transposed:
        node.grad_dtype[0] = "passthrough"
    e.record(node, out)
    del rstd, saved
    return out


def rope(e: Engine, x: T, copy: bool, name: str = "") -> T:
    """`liger_rotary_pos_emb` -> `LigerRopeFunction` (ops/rope.py `rope_forward`): x transposed back to its physical
    (batch, seq, heads, dim) layout and `.contiguous()`, rotated in place, returned transposed; saves cos and sin
    (the model's tables, no copy). Straight after a projection's `.view(...).transpose(1, 2)` that layout is
    contiguous: no copy, the projection's output itself is rotated and returned (`copy` False). After Gemma 3's
    q_norm/k_norm (laid out (batch, heads, seq, dim)) it is a copy. Backward rotates dq/dk in place (the attention's
    gradients come back laid out (batch, seq, heads, dim)): nothing allocated."""
    if not copy:
        return x
    out = e.new(x.numel, x.dtype, name=name)
    node = Node("liger_rope", [x] if x.rg else [], [], [])
    if x.rg:
        node.grad_dtype[0] = "passthrough"
    e.record(node, out)
    return out


def gated_product(e: Engine, a: T, b: T, kind: str, name: str = "") -> T:
    """`LigerSiLUMulFunction` (ops/swiglu.py, `kind` "swiglu") / `LigerGELUMulFunction` (ops/geglu.py, "geglu"):
    `c = torch.empty_like(a)`; saves a and b (the gate and up projections); backward writes da and db into a and b
    in place and returns them (no new gradients)."""
    out = e.new(a.numel, a.dtype, name=name)
    inputs = [t for t in (a, b) if t.rg]
    node = Node(f"liger_{kind}", inputs, [a, b], [])
    for index, t in enumerate(inputs):
        node.grad_dtype[index] = t
    e.record(node, out)
    return out


def layer_norm(e: Engine, x: T, weight: Param, bias: Param, rows: int, name: str = "") -> T:
    """`LigerLayerNorm.forward` -> `LigerLayerNormFunction` (ops/layer_norm.py `layer_norm_forward`): Y like X, Mean
    and RSTD fp32 per row, no autocast cast (a custom Function); saves X, W, B, Mean, RSTD. Backward
    (`layer_norm_backward`): DX like X; each trainable weight/bias a (SMs x H) fp32 buffer, summed and cast to its
    dtype."""
    out = e.new(x.numel, x.dtype, name=name)
    mean = e.new(rows, "fp32", name=f"{name}.mean")
    rstd = e.new(rows, "fp32", name=f"{name}.rstd")
    params = [p for p in (weight, bias) if p.trainable]
    node = Node("liger_layer_norm", [x] if x.rg else [], [x, mean, rstd], params,
                workspace=len(params) * sm_count(e.gpu_name) * weight.numel * 4)
    node.param_grad_via = "fp32"
    e.record(node, out)
    del mean, rstd
    return out
