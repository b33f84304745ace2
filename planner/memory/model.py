"""What every family shares: token embedding, the language-model stack (with LLaMA-Factory's gradient
checkpointing), the final norm, lm_head and the loss as the HF Trainer computes it (see sim.py for the engine)."""

from __future__ import annotations

from ..modules import LANGUAGE, PROJECTOR, VISION
from ..setup import Train, TrainSetup
from ..spec import ModelSpec
from . import liger, ops, preference
from .blocks import Context, LlamaLayer, Params
from .packing import PACKED_SAMPLES, varlen_attention_modelled
from .sim import DTYPE_BYTES, CheckpointFrame, Engine, Node, T, rounded
from .stacks import checkpoint_reentrant


# Attention callables (sdpa -> CUDA fused kernel, eager -> transformers eager_attention_forward) -----------------------


class LMAttention:
    """Attention of the language model: sdpa -> the CUDA fused kernel, eager -> transformers
    eager_attention_forward with the (batch, 1, seq, seq) causal mask."""

    def __init__(self, setup: TrainSetup, batch: int, seq: int) -> None:
        self.setup, self.batch, self.seq = setup, batch, seq
        self.mask: T | None = None
        self.packed_sequences = 0  # neat packing under FA2: the samples of the row (BaseModel.language sets it)

    def __call__(self, e: Engine, q: T, k: T, v: T, heads: int, kv_heads: int, name: str) -> T:
        if self.mask is not None and self.setup.neat_packing and self.setup.attn == "sdpa":
            from .packing import block_diagonal_attention

            return block_diagonal_attention(e, q, k, v, self.mask, heads, kv_heads, self.batch * self.seq, name)
        if self.packed_sequences:  # neat packing under FlashAttention-2: the varlen kernel over the samples
            from .packing import flash_varlen_attention

            return flash_varlen_attention(e, q, k, v, heads, kv_heads, self.batch * self.seq, self.packed_sequences,
                                          name, from_position_ids=True)
        if self.setup.attn == "eager":
            return ops.eager_attention(e, q, k, v, heads, kv_heads, self.seq, self.seq, self.batch, self.mask,
                                       name=name)
        if e.autocast:
            q, k, v = (ops.cast(e, t, e.autocast) for t in (q, k, v))
        if q.dtype == "fp32":
            # fp32 without autocast: no fused kernel takes fp32 with GQA; torch falls back to the math kernel
            return ops.eager_attention(e, q, k, v, heads, kv_heads, self.seq, self.seq, self.batch, None, name=name)
        return ops.fused_attention(e, q, k, v, heads, self.batch * self.seq, name=name, seq=self.seq)


def segment_attention(setup: TrainSetup):
    """Vision attention over packed images: one attention call per image (or window), outputs concatenated."""

    def attention(e: Engine, q: T, k: T, v: T, heads: int, segments: list[int], name: str) -> T:
        d = q.numel // _total(segments)
        outs = []
        if e.autocast:
            q, k, v = (ops.cast(e, t, e.autocast) for t in (q, k, v))
        if setup.attn == "fa2":
            # FlashAttention-2: the vision attention passes cu_seqlens, one varlen call over every segment
            from .packing import flash_varlen_attention

            return flash_varlen_attention(e, q, k, v, heads, heads, sum(segments), len(segments), name,
                                          from_position_ids=False)
        fused = setup.attn != "eager" and q.dtype != "fp32"
        frozen = not (q.rg or k.rg or v.rg)
        if fused and frozen:
            calls_by_length = _grouped_calls(segments, lambda n: n * d * DTYPE_BYTES[q.dtype],
                                             lambda n: n * heads * DTYPE_BYTES["fp32"])
        else:
            calls_by_length = [(length, 1) for length in segments]
        for length, calls in calls_by_length:
            # runs of equal segments without gradient: one grouped call, the same memory as `calls` separate ones
            qs, ks, vs = (t.view(length * calls * d) for t in (q, k, v))
            if fused:
                outs.append(ops.fused_attention(e, qs, ks, vs, heads, length, name=name, calls=calls))
            else:
                outs.append(ops.eager_attention(e, qs, ks, vs, heads, heads, length, length, 1, None, name=name))
        del qs, ks, vs
        cat = e.new(q.numel, q.dtype, name=f"{name}.cat")
        e.record(Node("cat", [o for o in outs if o.rg], [], []), cat)
        return cat
    return attention


def _total(lengths: list[int]) -> int:
    """sum(lengths); a symbolic repetition of per-sample lengths (planner/memory/symbolic.py `Repeated`) sums itself."""
    total = getattr(lengths, "total", None)
    return total() if total is not None else sum(lengths)


def _grouped_calls(lengths: list[int], out_bytes, lse_bytes) -> list[tuple[int, int]]:
    """(length, calls) groups that reproduce the peak of calling attention once per segment in order, when no input
    needs a gradient: each call keeps its output and drops its logsumexp. If every output block outweighs every
    logsumexp, the running total only grows, so the peak is all outputs plus the last call's logsumexp, whatever
    the order: segments are grouped by length and the last one stays last. Otherwise only consecutive equal
    lengths are grouped (the same sequence of totals). A symbolic repetition of per-sample lengths
    (planner/memory/symbolic.py `Repeated`) groups itself, its counts symbolic in the micro-batch."""
    grouped = getattr(lengths, "grouped_calls", None)
    if grouped is not None:
        return grouped(out_bytes, lse_bytes)
    if len(lengths) > 1 and min(rounded(out_bytes(n)) for n in set(lengths)) >= max(
            rounded(lse_bytes(n)) for n in set(lengths)):
        counts: dict[int, int] = {}
        for length in lengths[:-1]:
            counts[length] = counts.get(length, 0) + 1
        return list(counts.items()) + [(lengths[-1], 1)]
    runs: list[list[int]] = []
    for length in lengths:
        if runs and runs[-1][0] == length:
            runs[-1][1] += 1
        else:
            runs.append([length, 1])
    return [(length, count) for length, count in runs]


class BaseModel:
    """Shared pieces: token embedding, language stack with optional checkpointing, final norm, lm_head and loss."""

    # Checkpointed layers' non-tensor arguments live until the loss is dropped (`keep_checkpoint_arguments`); the
    # families whose traces show it set this (with ConditionalGenerationStep, whose loss hands them on)
    keeps_checkpoint_arguments = False
    # The order of the components' parameters in `model.named_parameters()`, which is the order an optimizer steps
    # them in: the transformers classes register the vision tower and projector before the language model, and the
    # ForConditionalGeneration's lm_head after the model
    param_order = (VISION, PROJECTOR, LANGUAGE)
    # The exact shortcuts of step._simulate_extrapolated that hold for the family (tests/test_speed_shortcuts.py
    # holds every registry model to the full simulation and fails where a family breaks one): one more frozen
    # vision layer adds only its weights to every segment of the step
    frozen_vision_layers_add_weights_only = True

    @classmethod
    def text_layer_delta_shared(cls, spec: ModelSpec) -> bool:
        """Whether one more language-model layer adds the same to every segment of the step whatever the images'
        sizes (so one difference serves a table's image sizes)."""
        return True

    @staticmethod
    def check_setup(setup: TrainSetup) -> None:
        """Raise VlplanError for a setup the family cannot train (the real step fails): cheap, before any
        simulation (plan asks it of the settings it considers); the model's construction runs it too."""

    def optimizer_order(self, params: list) -> list:
        """`params` in named_parameters order, as far as it matters for memory: by component (`param_rank`), in
        creation order within one."""
        rank = {component: i for i, component in enumerate(self.param_order)}
        return sorted(params, key=lambda p: self.param_rank(p, rank))

    def param_rank(self, p, rank: dict[str, int]) -> float:
        return len(rank) if p is getattr(self, "lm_head", None) else rank[p.component]

    def __init__(self, e: Engine, setup: TrainSetup, counts: dict[str, int] | None) -> None:
        self.check_setup(setup)
        self.e, self.setup = e, setup
        self.p = Params(e, setup)
        spec = setup.model
        t = spec.text
        text_layers = (counts or {}).get("text", t.num_layers)
        self.batch, self.seq = setup.batch_size, setup.seq_len
        self.tokens = self.batch * self.seq
        first_trainable = text_layers - setup.freeze_trainable_layers if setup.method == "freeze" else 0
        lm_full = setup.trains[LANGUAGE] is Train.FULL and setup.method != "freeze"
        rows = t.vocab_size + t.extra_embedding_rows
        self.embed = e.param("language.embed_tokens", rows * t.hidden_size, self.p._dtype(lm_full), lm_full,
                             LANGUAGE, shape=(rows, t.hidden_size))
        self.layers = [LlamaLayer(self.p, i, trainable=i >= first_trainable) for i in range(text_layers)]
        self.norm = self.p.vector(LANGUAGE, "language.norm", t.hidden_size, lm_full)
        # rotary embedding buffers: inv_freq and original_inv_freq, head_dim/2 fp32 each
        self.buffers = [e.param(f"language.rotary_emb.{n}", t.head_dim // 2, "fp32", False, LANGUAGE)
                        for n in ("inv_freq", "original_inv_freq")]
        self.lm_head = None
        if not t.tie_word_embeddings:
            self.lm_head = e.param("lm_head.weight", t.vocab_size * t.hidden_size, self.p._dtype(lm_full), lm_full,
                                   LANGUAGE, shape=(t.vocab_size, t.hidden_size))

    # Inputs -------------------------------------------------------------------------------------------------------
    def graph_held_inputs(self, e: Engine) -> tuple[str, ...]:
        """The batch inputs the autograd graph keeps (saved by its nodes) until backward. They are the batch's own
        tensors, alive anyway, except under DPO, whose trainer clones the batch per forward (planner/memory/
        preference.py): a trainable embedding saves its indices (EmbeddingBackward)."""
        return ("input_ids",) if self.embed.trainable else ()

    def text_inputs(self, e: Engine) -> dict[str, T]:  # noqa: D401
        """input_ids and labels (int64), as the collator gives them; no attention mask (see profiler/batch.py), except
        neat packing's block-diagonal one (planner/memory/packing.py)."""
        inputs = {"input_ids": e.new(self.tokens, "int64", name="input_ids", category="inputs/batch"),
                  "labels": e.new(self.tokens, "int64", name="labels", category="inputs/batch")}
        from .packing import block_diagonal_mask_modelled, packed_attention_mask

        if block_diagonal_mask_modelled(self.setup):
            inputs["attention_mask"] = self.packed_mask = packed_attention_mask(e, self.setup)
        if varlen_attention_modelled(self.setup):
            # neat packing under FA2: the collator's per-sample rope positions with the text row prepended,
            # (4, batch, seq) int64 (profiler/packed_mask.py `packed_position_ids`)
            inputs["position_ids"] = e.new(4 * self.tokens, "int64", name="position_ids", category="inputs/batch")
        return inputs

    # Language model -------------------------------------------------------------------------------------------------
    def embed_tokens(self, e: Engine) -> T:
        """The language model's input embeddings module, with `enable_input_require_grads`' hook on its output."""
        return e.hook_input(self.embedding(e))

    def embedding(self, e: Engine) -> T:
        """nn.Embedding: saves the indices (already an input)."""
        out = e.new(self.tokens * self.setup.model.text.hidden_size, self.embed.dtype, name="inputs_embeds")
        e.record(Node("embedding", [], [], [self.embed] if self.embed.trainable else []), out)
        return out

    def rotary(self, e: Engine, x: T) -> tuple[T, T]:
        """Rotary embedding tables: cos and sin of (batch, seq, head_dim), cast to the hidden states' dtype."""
        hd = self.setup.model.text.head_dim
        cos = e.new(self.tokens * hd, x.dtype, name="cos")
        sin = e.new(self.tokens * hd, x.dtype, name="sin")
        return cos, sin

    def language(self, e: Engine, x: T) -> T:
        ctx = Context(tokens=self.tokens, attention=LMAttention(self.setup, self.batch, self.seq))
        ctx.cos, ctx.sin = self.rotary(e, x)
        if getattr(self, "packed_mask", None) is not None:
            # neat packing: create_causal_mask returns the collator's 4D mask as is (masking_utils
            # `_preprocess_mask_arguments`: "If the mask is already 4D, simply return as-is")
            ctx.attention.mask = self.packed_mask
        elif varlen_attention_modelled(self.setup):
            ctx.attention.packed_sequences = PACKED_SAMPLES
        elif self.setup.attn == "eager":
            # masking_utils.create_causal_mask for eager: a (batch, 1, seq, seq) additive mask in the hidden dtype;
            # checkpointed layers keep it (and the RoPE tables) in their saved forward arguments until backward
            ctx.attention.mask = e.new(self.batch * self.seq * self.seq, x.dtype, name="causal_mask")
        for layer in self.layers:
            x = self._run_layer(e, layer, x, ctx)
        del ctx
        # `hidden_states = self.norm(hidden_states)`: the last layer's output dies here unless saved
        return ops.rms_norm(e, x, self.norm, self.tokens, name="norm")

    def _run_layer(self, e: Engine, layer, x: T, ctx) -> T:
        """A layer, checkpointed (reentrant, only layers with trainable parameters; LLaMA-Factory's
        `get_custom_gradient_checkpointing_func`) when gradient checkpointing is on; under a plain HF Trainer every
        layer, non-reentrant (planner/memory/stacks.py)."""
        checkpointed = self.setup.checkpointing(_layer_component(layer))  # per component (ms-swift vit_gc)
        if checkpointed and not checkpoint_reentrant(self.setup):
            frame = CheckpointFrame(x, lambda leaf, layer=layer, ctx=ctx: layer(e, leaf, ctx), e.autocast)
            e.frame = frame
            try:
                return layer(e, x, ctx)
            finally:
                e.frame = None
        if not (checkpointed and layer.has_trainable):
            return layer(e, x, ctx)
        x.rg = True  # `arg.requires_grad_(True)` on the hidden states
        was = e.grad_enabled
        e.grad_enabled = False
        out = layer(e, x, ctx)
        e.grad_enabled = was
        out.rg = False
        if self.setup.offload_checkpoints:
            # LLaMA-Factory's UnslothGradientCheckpointing (checkpointing.py): `hidden_states.to("cpu")` is saved
            # instead of the input; backward copies it back to the GPU before the recompute (sim.py `_recompute`)
            node = Node("checkpoint", [x], [], [])
            node.offloaded = e.offload(x)
        else:
            node = Node("checkpoint", [x], [x], [])
        node.recompute = lambda leaf, layer=layer, ctx=ctx: layer(e, leaf, ctx)
        node.autocast = e.autocast
        e.record(node, out)
        if self.keeps_checkpoint_arguments:
            keep_checkpoint_arguments(self, out, ctx)
        return out

    def loss(self, e: Engine, hidden: T) -> T:
        """lm_head; ForCausalLMLoss: logits.float(), cross_entropy (log_softmax + nll_loss); then
        accelerate's convert_outputs_to_fp32 makes an fp32 copy of the logits at the end of forward."""
        t = self.setup.model.text
        h = hidden  # outputs.last_hidden_state: alive until the outputs are dropped
        del hidden
        e.set_phase("loss")
        e.scope = "loss"
        head = self.lm_head or self.embed
        if "fused_linear_cross_entropy" in e.liger:  # Liger's lce_forward: no logits (planner/memory/liger.py)
            loss = liger.fused_linear_cross_entropy(e, h, head, self.tokens, self.batch, t.hidden_size, t.vocab_size)
            del h
            e.scope = "language"
            return loss
        logits = ops.linear(e, h, head, t.vocab_size, name="logits")
        if self.setup.preference:  # no labels: the fp32 logits go to the DPO / KTO trainer (preference.py)
            # the forward returns (the last hidden state goes unless saved), the autocast region ends with its
            # weight-cast cache, then accelerate's convert_outputs_to_fp32 copies the logits
            del h
            e.cast_cache = {}
            logits32 = preference.logits_output(e, logits)
            del logits
            e.scope = "language"
            return logits32
        logits32 = ops.cast(e, logits, "fp32", name="logits.float")
        labels = e.new(self.tokens + self.batch, "int64", name="labels_pad")
        shifted = e.new(self.tokens, "int64", name="shift_labels")
        del labels
        logp = e.new(logits32.numel, "fp32", name="log_softmax")
        e.record(Node("log_softmax", [logits32] if logits32.rg else [], [logp], []), logp)
        del logits32
        loss = e.new(1, "fp32", name="loss")
        total_weight = e.new(1, "fp32", name="total_weight")
        e.record(Node("nll_loss", [logp] if logp.rg else [], [shifted, total_weight], []), loss)
        del logp, shifted, total_weight
        if e.autocast:
            converted = e.new(logits.numel, "fp32", name="logits:fp32_output")
            del converted
        del logits, h  # the model output (last_hidden_state, logits) is dropped after compute_loss
        e.scope = "language"
        return loss

    def forward(self, e: Engine, inputs: dict[str, T]) -> T:
        # accelerate autocasts the forward for bf16/fp16 AMP; under DeepSpeed the module itself is half precision
        e.autocast = None if self.setup.zero else {"bf16": "bf16", "fp16": "fp16"}.get(self.setup.precision)
        e.cast_cache = {}
        hidden = self.encode(e, inputs)
        hidden = self.language(e, hidden)  # Qwen2VLModel.forward keeps inputs_embeds referenced meanwhile
        loss = self.loss(e, hidden)
        del hidden
        e.cast_cache = {}
        e.autocast = None
        return loss




def _layer_component(layer) -> str:
    """The component (vision or language) whose layer this is, from its parameters."""
    return next((p.component for p in getattr(layer, "params", ())), LANGUAGE)


def keep_checkpoint_arguments(model: BaseModel, out: T, ctx) -> None:
    """A reentrant checkpoint keeps its non-tensor arguments (`ctx.run_function`, the partial holding the layer's
    keyword arguments: masks, RoPE tables, position_ids) as a Python attribute of its graph node, which lives until
    the graph does, i.e. until the loss tensor is dropped after backward (torch/utils/checkpoint.py
    CheckpointFunction; only saved tensors are released as each node runs). Collect the contexts of checkpointed
    layers for `attach_checkpoint_arguments`."""
    if out.node is not None and out.node.recompute is not None:
        refs = model.__dict__.setdefault("_checkpoint_arguments", [])
        if not any(ref is ctx for ref in refs):
            refs.append(ctx)


def attach_checkpoint_arguments(model: BaseModel, loss: T) -> None:
    """Hand the collected checkpoint arguments to the loss's graph node: they die with the loss tensor."""
    refs = model.__dict__.pop("_checkpoint_arguments", [])
    if loss.node is not None and refs:
        loss.node.checkpoint_arguments = refs


class ConditionalGenerationStep:
    """The Trainer's step around a `...ForConditionalGeneration` (a mixin before BaseModel): the last hidden state
    dies where the model's forward returns, and accelerate's fp32 conversion copies the whole output, whose
    `image_hidden_states` the family leaves in `self._outputs` (from `encode` or `language` on)."""

    # Gemma 2 `final_logit_softcapping` (logits / cap, tanh, * cap before the loss); None: no soft-capping
    final_logit_softcapping: float | None = None
    _outputs: tuple = ()

    def forward(self, e: Engine, inputs: dict[str, T]) -> T:
        """The model under accelerate's autocast, then the output's fp32 conversion outside it. The last hidden state
        goes to `loss` in a list so that it dies where the model's forward returns."""
        e.autocast = None if self.setup.zero else {"bf16": "bf16", "fp16": "fp16"}.get(self.setup.precision)
        e.cast_cache = {}
        x = self.encode(e, inputs)
        hidden = [self.language(e, x)]  # the model's forward keeps inputs_embeds referenced meanwhile
        del x
        loss = self.loss(e, hidden)
        e.autocast = None
        return loss

    def loss(self, e: Engine, hidden: list) -> T:
        """lm_head, the optional final logit soft-capping (Gemma 2: /30, tanh, *30), ForCausalLMLoss (logits.float();
        labels padded by one, `labels[..., 1:].contiguous()` a view for batch 1; cross_entropy = log_softmax +
        nll_loss), whose locals die when it returns. The forward then returns (the last hidden state goes), the
        autocast region ends (its weight-cast cache is cleared), and accelerate's convert_outputs_to_fp32 copies every
        half-precision tensor of the output (logits, image_hidden_states) to fp32 while the originals live.
        Checkpointed layers' arguments go with the graph (`loss`)."""
        t = self.setup.model.text
        h = hidden.pop()
        e.set_phase("loss")
        e.scope = "loss"
        if "fused_linear_cross_entropy" in e.liger:
            return self._fused_loss(e, h)
        logits = ops.linear(e, h, self.lm_head or self.embed, t.vocab_size, name="logits")
        if self.final_logit_softcapping is not None:
            divided = ops.scale(e, logits, name="logits/softcap")
            del logits
            capped = e.new(divided.numel, divided.dtype, name="logits.tanh")
            e.record(Node("tanh", [divided] if divided.rg else [], [capped], []), capped)
            del divided
            logits = ops.scale(e, capped, name="logits*softcap")
            del capped
        if self.setup.preference:
            return self._logits_output(e, logits, h)
        logits32 = ops.cast(e, logits, "fp32", name="logits.float")
        labels = e.new(self.tokens + self.batch, "int64", name="labels_pad")
        shifted = labels if self.batch == 1 else e.new(self.tokens, "int64", name="shift_labels")
        logp = e.new(logits32.numel, "fp32", name="log_softmax")
        e.record(Node("log_softmax", [logits32] if logits32.rg else [], [logp], []), logp)
        loss = e.new(1, "fp32", name="loss")
        total_weight = e.new(1, "fp32", name="total_weight")
        e.record(Node("nll_loss", [logp] if logp.rg else [], [shifted, total_weight], []), loss)
        del logp, shifted, total_weight, logits32, labels, h
        outputs = [logits, *self._outputs]
        self._outputs = ()
        e.cast_cache = {}
        if e.autocast:
            converted = [e.new(o.numel, "fp32", name=f"{o.name}:fp32_output") for o in outputs if o.dtype != "fp32"]
            del converted
        del logits, outputs
        e.scope = "language"
        attach_checkpoint_arguments(self, loss)
        return loss


    def _logits_output(self, e: Engine, logits: T, h: T) -> T:
        """DPO (no labels, no loss in the model): the forward returns (the last hidden state goes), the autocast region
        ends, accelerate's convert_outputs_to_fp32 copies the output's half-precision tensors to fp32 while the
        originals live, and the trainer keeps the fp32 logits (`.logits.to(torch.float32)`: a copy only without
        autocast). planner/memory/preference.py."""
        del h
        outputs = [logits, *self._outputs]
        self._outputs = ()
        e.cast_cache = {}
        if e.autocast:
            converted = [preference.logits_output(e, o) if o.dtype != "fp32" else o for o in outputs]
        else:
            converted = [preference.logits_output(e, logits)]
        logits32 = converted[0]
        del converted, outputs, logits
        e.scope = "language"
        attach_checkpoint_arguments(self, logits32)
        return logits32

    def _fused_loss(self, e: Engine, h: T) -> T:
        """Liger's `lce_forward` (liger_kernel/transformers/model/<family>.py): the fused linear cross-entropy on the
        last hidden state (planner/memory/liger.py) and no logits in the output; the forward then returns, the
        autocast region ends, and accelerate converts the output's other half-precision tensors to fp32."""
        t = self.setup.model.text
        loss = liger.fused_linear_cross_entropy(e, h, self.lm_head or self.embed, self.tokens, self.batch,
                                                t.hidden_size, t.vocab_size)
        del h
        outputs = list(self._outputs)
        self._outputs = ()
        e.cast_cache = {}
        if e.autocast:
            converted = [e.new(o.numel, "fp32", name=f"{o.name}:fp32_output") for o in outputs if o.dtype != "fp32"]
            del converted
        del outputs
        e.scope = "language"
        attach_checkpoint_arguments(self, loss)
        return loss


def layer_counts(spec: ModelSpec) -> dict[str, int]:
    """Layers of each type in the full model (the tracer extrapolates from a few of each)."""
    counts = {"text": spec.text.num_layers}
    vision = spec.vision
    if vision.fullatt_block_indexes:
        full = len([i for i in vision.fullatt_block_indexes if i < vision.num_layers])
        counts["vision_window"] = vision.num_layers - full
        counts["vision_full"] = full
    else:
        counts["vision"] = vision.num_layers
    return counts


def spec_with_layers(spec: ModelSpec, counts: dict[str, int]) -> ModelSpec:
    """A spec with the given number of layers per type. Windowed Qwen2.5-VL blocks come first (block 0 is windowed in
    the real model), full-attention blocks after them."""
    from dataclasses import replace

    text = replace(spec.text, num_layers=counts["text"])
    vision = spec.vision
    if "vision_full" in counts:
        window, full = counts["vision_window"], counts["vision_full"]
        vision = replace(vision, num_layers=window + full, fullatt_block_indexes=tuple(range(window, window + full)))
    else:
        vision = replace(vision, num_layers=counts["vision"])
    return replace(spec, text=text, vision=vision)
