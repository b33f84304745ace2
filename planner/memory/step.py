"""One training step on symbolic tensors: inputs, vision tower, projector, language model, loss, backward,
gradient clipping and the optimizer step, as the HF Trainer (with accelerate) runs them.

`simulate(setup)` returns the peak of each phase with the live bytes per category at that peak, exactly the
quantities the tracer measures on the real modeling code.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

from ..errors import VlplanError
from ..modules import LANGUAGE, VISION
from ..setup import Train, TrainSetup
from . import ops
from .blocks import Context, LlamaLayer, Params
from .sim import Engine, Node, T
from .vision import ClipLayer, LlavaProjector, QwenMerger, QwenVisionBlock

PHASES = ("forward", "loss", "backward", "optimizer")


@dataclass
class SimResult:
    phase_peaks: dict[str, int]
    phase_breakdown: dict[str, dict[str, int]]
    params_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def peak_phase(self) -> str:
        return max(self.phase_peaks, key=self.phase_peaks.get)


# Attention callables (sdpa -> CUDA fused kernel, eager -> transformers eager_attention_forward) -----------------------


class _LMAttention:
    """Attention of the language model: sdpa -> the CUDA fused kernel, eager -> transformers
    eager_attention_forward with the (batch, 1, seq, seq) causal mask."""

    def __init__(self, setup: TrainSetup, batch: int, seq: int) -> None:
        self.setup, self.batch, self.seq = setup, batch, seq
        self.mask: T | None = None

    def __call__(self, e: Engine, q: T, k: T, v: T, heads: int, kv_heads: int, name: str) -> T:
        if self.setup.attn == "eager":
            return ops.eager_attention(e, q, k, v, heads, kv_heads, self.seq, self.seq, self.batch, self.mask,
                                       name=name)
        if e.autocast:
            q, k, v = (ops.cast(e, t, e.autocast) for t in (q, k, v))
        if q.dtype == "fp32":
            # fp32 without autocast: no fused kernel takes fp32 with GQA; torch falls back to the math kernel
            return ops.eager_attention(e, q, k, v, heads, kv_heads, self.seq, self.seq, self.batch, None, name=name)
        return ops.fused_attention(e, q, k, v, heads, self.batch * self.seq, name=name)


def _segment_attention(setup: TrainSetup):
    """Vision attention over packed images: one attention call per image (or window), outputs concatenated."""

    def attention(e: Engine, q: T, k: T, v: T, heads: int, segments: list[int], name: str) -> T:
        d = q.numel // sum(segments)
        outs = []
        if e.autocast:
            q, k, v = (ops.cast(e, t, e.autocast) for t in (q, k, v))
        for length in segments:
            qs, ks, vs = (t.view(length * d) for t in (q, k, v))
            if setup.attn == "eager" or qs.dtype == "fp32":
                outs.append(ops.eager_attention(e, qs, ks, vs, heads, heads, length, length, 1, None, name=name))
            else:
                out = ops.fused_attention(e, qs, ks, vs, heads, length, name=name)
                outs.append(out)
        del qs, ks, vs
        cat = e.new(q.numel, q.dtype, name=f"{name}.cat")
        e.record(Node("cat", [o for o in outs if o.rg], [], []), cat)
        return cat
    return attention


# The step ---------------------------------------------------------------------------------------------------------


def simulate(setup: TrainSetup, counts: dict[str, int] | None = None, detail: bool = False) -> SimResult:
    family = setup.model.family
    builder = _FAMILIES.get(family)
    if builder is None:
        raise VlplanError(f"no activation model for family {family!r} yet")
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the simulation frees by reference counting alone, as deterministically as torch does
    try:
        return _simulate(builder, setup, counts, detail)
    finally:
        if gc_was_enabled:
            gc.enable()


def _simulate(builder, setup: TrainSetup, counts, detail: bool) -> SimResult:
    e = Engine(detail)
    model = builder(e, setup, counts)
    states = _optimizer_states(e, setup, model)
    inputs = model.inputs(e)
    micro_steps = min(setup.gradient_accumulation_steps, 2)
    for _ in range(micro_steps):
        e.set_phase("forward")
        loss = model.forward(e, inputs)
        e.backward(loss)
        del loss
    e.set_phase("optimizer")
    _optimizer_step(e, setup, model)
    del states
    peaks = {phase: e.phase_peaks[phase][0] for phase in PHASES if phase in e.phase_peaks}
    breakdown = {phase: {k: v for k, v in e.phase_peaks[phase][1].items() if v} for phase in peaks}
    result = SimResult(peaks, breakdown)
    result.blocks = e.phase_blocks
    return result


def _trainable(model) -> list:
    return [p for p in model.e.params if p.trainable]


def _optimizer_states(e: Engine, setup: TrainSetup, model) -> list[T]:
    """Persistent optimizer state (steady state: created at the first step and kept).

    torch AdamW (optim/adam.py `_init_group`): exp_avg and exp_avg_sq in the parameter's dtype, plus a `step`
    counter per parameter that lives on the device for fused/capturable (a 0-d fp32 tensor: one 512-byte block).
    """
    states = []
    for p in _trainable(model):
        if setup.optimizer in ("adamw", "adamw-foreach"):
            states.append(e.new(p.numel, p.dtype, name=f"exp_avg:{p.name}", category="optimizer_states"))
            states.append(e.new(p.numel, p.dtype, name=f"exp_avg_sq:{p.name}", category="optimizer_states"))
            if setup.optimizer == "adamw":
                states.append(e.new(1, "fp32", name=f"step:{p.name}", category="optimizer_states"))
        elif setup.optimizer == "sgd":
            pass
        else:
            raise VlplanError(f"no optimizer-state model for {setup.optimizer!r} yet")
    return states


def _optimizer_step(e: Engine, setup: TrainSetup, model) -> None:
    """clip_grad_norm_ (foreach: one 0-d norm per gradient, stacked), optimizer.step, zero_grad(set_to_none)."""
    trainable = [p for p in _trainable(model) if p.grad is not None]
    norms = [e.new(1, "fp32", name="grad_norm") for _ in trainable]
    stacked = e.new(len(norms), "fp32", name="stack")
    total = e.new(1, "fp32", name="total_norm")
    del norms, stacked
    coef = e.new(1, "fp32", name="clip_coef")
    clamped = e.new(1, "fp32", name="clip_coef_clamped")
    del coef, clamped, total
    if setup.optimizer == "adamw-foreach":
        # _multi_tensor_adam: exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs), per parameter group
        for group in _param_groups(trainable):
            temp = [e.new(p.numel, p.dtype, name="exp_avg_sq_sqrt") for p in group]
            del temp
    for p in trainable:
        p.grad = None


def _param_groups(params: list) -> list[list]:
    """Trainer.create_optimizer: weight-decay params (not bias/norm) and the rest, in two groups."""
    decay = [p for p in params if not (p.name.endswith(".bias") or "norm" in p.name)]
    rest = [p for p in params if p not in decay]
    return [g for g in (decay, rest) if g]


# Families ----------------------------------------------------------------------------------------------------------


class _Model:
    """Shared pieces: token embedding, language stack with optional checkpointing, final norm, lm_head and loss."""

    def __init__(self, e: Engine, setup: TrainSetup, counts: dict[str, int] | None) -> None:
        self.e, self.setup = e, setup
        self.p = Params(e, setup)
        spec = setup.model
        t = spec.text
        text_layers = (counts or {}).get("text", t.num_layers)
        self.batch, self.seq = setup.batch_size, setup.seq_len
        self.tokens = self.batch * self.seq
        first_trainable = text_layers - setup.freeze_trainable_layers if setup.method == "freeze" else 0
        lm_full = setup.trains[LANGUAGE] is Train.FULL and setup.method != "freeze"
        self.embed = e.param("language.embed_tokens", (t.vocab_size + t.extra_embedding_rows) * t.hidden_size,
                             self.p._dtype(lm_full), lm_full, LANGUAGE)
        self.layers = [LlamaLayer(self.p, i, trainable=i >= first_trainable) for i in range(text_layers)]
        self.norm = self.p.vector(LANGUAGE, "language.norm", t.hidden_size, lm_full)
        self.lm_head = None
        if not t.tie_word_embeddings:
            self.lm_head = e.param("lm_head.weight", t.vocab_size * t.hidden_size, self.p._dtype(lm_full), lm_full,
                                   LANGUAGE)

    # Inputs -------------------------------------------------------------------------------------------------------
    def text_inputs(self, e: Engine) -> dict[str, T]:
        """input_ids and labels (int64), as the collator gives them; no attention mask (see profiler/batch.py)."""
        return {"input_ids": e.new(self.tokens, "int64", name="input_ids", category="inputs"),
                "labels": e.new(self.tokens, "int64", name="labels", category="inputs")}

    # Language model -------------------------------------------------------------------------------------------------
    def embed_tokens(self, e: Engine) -> T:
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
        ctx = Context(tokens=self.tokens, attention=_LMAttention(self.setup, self.batch, self.seq))
        ctx.cos, ctx.sin = self.rotary(e, x)
        if self.setup.attn == "eager":
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
        `get_custom_gradient_checkpointing_func`) when gradient checkpointing is on."""
        if not (self.setup.gradient_checkpointing and layer.has_trainable):
            return layer(e, x, ctx)
        x.rg = True  # `arg.requires_grad_(True)` on the hidden states
        was = e.grad_enabled
        e.grad_enabled = False
        out = layer(e, x, ctx)
        e.grad_enabled = was
        out.rg = False
        node = Node("checkpoint", [x], [x], [])
        node.recompute = lambda leaf, layer=layer, ctx=ctx: layer(e, leaf, ctx)
        e.record(node, out)
        return out

    def loss(self, e: Engine, hidden: T) -> T:
        """lm_head; ForCausalLMLoss: logits.float(), cross_entropy (log_softmax + nll_loss); then
        accelerate's convert_outputs_to_fp32 makes an fp32 copy of the logits at the end of forward."""
        t = self.setup.model.text
        h = hidden  # outputs.last_hidden_state: alive until the outputs are dropped
        del hidden
        e.set_phase("loss")
        head = self.lm_head or self.embed
        logits = ops.linear(e, h, head, t.vocab_size, name="logits")
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
        return loss

    def forward(self, e: Engine, inputs: dict[str, T]) -> T:
        e.autocast = {"bf16": "bf16", "fp16": "fp16"}.get(self.setup.precision)
        e.cast_cache = {}
        hidden = self.encode(e, inputs)
        hidden = self.language(e, hidden)  # Qwen2VLModel.forward keeps inputs_embeds referenced meanwhile
        loss = self.loss(e, hidden)
        del hidden
        e.cast_cache = {}
        e.autocast = None
        return loss


class _QwenVL(_Model):
    """Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration."""

    def __init__(self, e: Engine, setup: TrainSetup, counts: dict[str, int] | None) -> None:
        super().__init__(e, setup, counts)
        v = setup.model.vision
        self.images = setup.image_tokens()
        if counts and "vision_full" in counts:
            window, full = counts["vision_window"], counts["vision_full"]
            kinds = [False] * window + [True] * full
        elif counts and "vision" in counts:
            kinds = [True] * counts["vision"]
        else:
            kinds = [(not v.fullatt_block_indexes) or i in v.fullatt_block_indexes for i in range(v.num_layers)]
        self.patch_embed = e.param("vision.patch_embed", v.in_channels * v.temporal_patch_size * v.patch_size ** 2
                                   * v.hidden_size, self.p._dtype(self.p.full(VISION)), self.p.full(VISION), VISION)
        self.blocks = [QwenVisionBlock(self.p, i, full) for i, full in enumerate(kinds)]
        self.merger = QwenMerger(self.p)

    def inputs(self, e: Engine) -> dict[str, T]:
        v = self.setup.model.vision
        inputs = self.text_inputs(e)
        inputs["mm_token_type_ids"] = e.new(self.tokens, "int32", name="mm_token_type_ids", category="inputs")
        patches = sum(t.vision_patches for t in self.images) * self.batch
        if patches:
            patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
            inputs["pixel_values"] = e.new(patches * patch_dim, "fp32", name="pixel_values", category="inputs")
            n = len(self.images) * self.batch
            inputs["image_grid_thw"] = e.new(n * 3, "int64", name="image_grid_thw", category="inputs")
            inputs["position_ids"] = e.new(3 * self.tokens, "int64", name="position_ids", category="inputs")
            inputs["image_position_ids"] = e.new(patches * 2, "int64", name="vision_position_ids",
                                                 category="inputs")
            inputs["image_cu_seqlens"] = e.new(n + 1, "int32", name="cu_seqlens", category="inputs")
            if v.window_size:
                windows = _window_segments(self.images, v, self.batch)
                inputs["image_window_index"] = e.new(patches // 4, "int64", name="window_index", category="inputs")
                inputs["image_cu_window_seqlens"] = e.new(len(windows) + 1, "int32", name="cu_window_seqlens",
                                                          category="inputs")
        return inputs

    def encode(self, e: Engine, inputs: dict[str, T]) -> T:
        x = self.embed_tokens(e)
        if not self.images:
            return x
        v = self.setup.model.vision
        patches = sum(t.vision_patches for t in self.images) * self.batch
        # get_image_features: pixel_values.type(self.visual.dtype); PatchEmbed casts to the conv weight dtype
        pixels = ops.cast(e, inputs["pixel_values"], self.patch_embed.dtype, name="pixel_values:cast")
        hidden = e.new(patches * v.hidden_size, e.autocast or self.patch_embed.dtype, name="patch_embed")
        saved = [ops.input_for_matmul(e, pixels)] if self.patch_embed.trainable else []
        e.record(Node("conv3d", [], saved, [self.patch_embed] if self.patch_embed.trainable else []), hidden)
        del pixels, saved
        ctx = _VisionContext(patches, self.images, v, self.batch, _segment_attention(self.setup))
        ctx.cos = e.new(patches * v.head_dim, "fp32", name="vision.cos")
        ctx.sin = e.new(patches * v.head_dim, "fp32", name="vision.sin")
        for block in self.blocks:
            hidden = self._run_layer(e, block, hidden, ctx)
        del ctx
        merged = self.merger(e, hidden, patches)
        # get_image_features splits per image; forward cats them and casts to the text embeddings' dtype
        cat = e.new(merged.numel, merged.dtype, name="image_embeds")
        e.record(Node("cat", [merged] if merged.rg else [], [], []), cat)
        image_embeds = ops.cast(e, cat, x.dtype, name="image_embeds:cast")
        if image_embeds is not cat:
            pass
        mask = e.new(self.tokens, "bool", name="image_mask")
        out = e.new(x.numel, x.dtype, name="inputs_embeds:scatter")
        inputs_ = [t for t in (x, image_embeds) if t.rg]
        e.record(Node("masked_scatter", inputs_, [mask] if inputs_ else [], []), out)
        # The vision outputs (last_hidden_state, pooler_output) and image_embeds stay referenced until the
        # language model returns (mm_encoder_outputs / image_embeds locals of Qwen2VLModel.forward)
        self._keep = (hidden, merged, cat, image_embeds)
        del mask
        return out

    def language(self, e: Engine, x: T) -> T:
        out = super().language(e, x)
        self._keep = None
        return out


class _VisionContext:
    def __init__(self, tokens: int, images, v, batch: int, attention) -> None:
        self.tokens = tokens
        self.segments = [t.vision_patches for t in images] * batch
        self.window_segments = _window_segments(images, v, batch) if v.window_size else self.segments
        self.attention_segments = attention
        self.cos = self.sin = None


def _window_segments(images, v, batch: int) -> list[int]:
    """transformers vision_utils.get_vision_window_index: windows of window_size // merge // patch merged units,
    the grid padded up to whole windows; each window holds up to (8x8) patches of one image."""
    unit = v.window_size // v.spatial_merge_size // v.patch_size
    merge = v.spatial_merge_size ** 2
    segments = []
    for image in images:
        gh = image.resized_height // v.patch_size // v.spatial_merge_size
        gw = image.resized_width // v.patch_size // v.spatial_merge_size
        rows = [min(unit, gh - r) for r in range(0, gh, unit)]
        cols = [min(unit, gw - c) for c in range(0, gw, unit)]
        segments += [r * c * merge for r in rows for c in cols]
    return segments * batch


class _Llava(_Model):
    """LlavaForConditionalGeneration with a CLIP vision tower (vision_feature_layer -2, strategy "default")."""

    def __init__(self, e: Engine, setup: TrainSetup, counts: dict[str, int] | None) -> None:
        super().__init__(e, setup, counts)
        v = setup.model.vision
        layers = (counts or {}).get("vision", v.num_layers)
        full = self.p.full(VISION)
        dt = self.p._dtype(full)
        d = v.hidden_size
        self.patch = e.param("vision.patch_embedding", v.in_channels * v.patch_size ** 2 * d, dt, full, VISION)
        self.cls = e.param("vision.class_embedding", d, dt, full, VISION)
        positions = (v.image_size // v.patch_size) ** 2 + 1
        self.pos = e.param("vision.position_embedding", positions * d, dt, full, VISION)
        self.pre_ln = (self.p.vector(VISION, "vision.pre_layrnorm.weight", d),
                       self.p.vector(VISION, "vision.pre_layrnorm.bias", d))
        self.post_ln = (self.p.vector(VISION, "vision.post_layernorm.weight", d),
                        self.p.vector(VISION, "vision.post_layernorm.bias", d))
        self.vision_layers = [ClipLayer(self.p, i) for i in range(layers)]
        self.projector = LlavaProjector(self.p)
        self.n_images = len(setup.images) * self.batch

    def inputs(self, e: Engine) -> dict[str, T]:
        v = self.setup.model.vision
        inputs = self.text_inputs(e)
        if self.n_images:
            inputs["pixel_values"] = e.new(self.n_images * v.in_channels * v.image_size ** 2, "fp32",
                                           name="pixel_values", category="inputs")
        return inputs

    def encode(self, e: Engine, inputs: dict[str, T]) -> T:
        x = self.embed_tokens(e)
        if not self.n_images:
            return x
        v = self.setup.model.vision
        d = v.hidden_size
        grid = (v.image_size // v.patch_size) ** 2
        tokens = self.n_images * (grid + 1)
        # CLIPVisionEmbeddings: conv on pixel_values.to(conv dtype), flatten, cat with class embedding, + positions
        pixels = ops.cast(e, inputs["pixel_values"], self.patch.dtype, name="pixel_values:cast")
        patches = e.new(self.n_images * grid * d, e.autocast or self.patch.dtype, name="patch_embeds")
        saved = [ops.input_for_matmul(e, pixels)] if self.patch.trainable else []
        e.record(Node("conv2d", [], saved, [self.patch] if self.patch.trainable else []), patches)
        del pixels, saved
        cat = e.new(tokens * d, ops.promote(patches.dtype, self.cls.dtype), name="embeddings.cat")
        e.record(Node("cat", [patches] if patches.rg else [], [], [self.cls] if self.cls.trainable else []), cat)
        del patches
        pos = e.new(tokens * d, self.pos.dtype, name="position_embedding")  # embedding lookup
        e.record(Node("embedding", [], [], [self.pos] if self.pos.trainable else []), pos)
        emb = ops.add(e, cat, pos, name="embeddings")
        del cat, pos
        hidden = ops.layer_norm(e, emb, self.pre_ln[0], self.pre_ln[1], tokens, name="pre_layrnorm")
        del emb
        ctx = _VisionContext(tokens, [], v, self.n_images, _segment_attention(self.setup))
        ctx.segments = [grid + 1] * self.n_images
        selected = None
        for index, layer in enumerate(self.vision_layers):
            hidden = self._run_layer(e, layer, hidden, ctx)
            if index == len(self.vision_layers) - 2:
                selected = hidden  # hidden_states[-2]: captured by the output-capturing hook
        # CLIPVisionModel: post_layernorm on the CLS token of the last hidden state (pooler_output)
        cls = e.new(self.n_images * d, hidden.dtype, name="pooled")
        pooled = ops.layer_norm(e, cls, self.post_ln[0], self.post_ln[1], self.n_images, name="post_layernorm")
        del cls
        features = selected.view(self.n_images * grid * d, name="selected[:, 1:]")  # a slice: a view
        image_features = self.projector(e, features)
        del features
        cat = e.new(image_features.numel, image_features.dtype, name="image_features.cat")
        e.record(Node("cat", [image_features] if image_features.rg else [], [], []), cat)
        cast = ops.cast(e, cat, x.dtype, name="image_features:cast")
        mask = e.new(self.tokens, "bool", name="image_mask")
        out = e.new(x.numel, x.dtype, name="inputs_embeds:scatter")
        inputs_ = [t for t in (x, cast) if t.rg]
        e.record(Node("masked_scatter", inputs_, [mask] if inputs_ else [], []), out)
        self._keep = (hidden, pooled, image_features, cat, cast)
        del mask
        return out

    def language(self, e: Engine, x: T) -> T:
        out = super().language(e, x)
        self._keep = None
        return out


_FAMILIES = {"qwen2_vl": _QwenVL, "qwen2_5_vl": _QwenVL, "llava": _Llava}
