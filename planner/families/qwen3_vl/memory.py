"""Qwen3-VL and Qwen3-VL-MoE (transformers models/qwen3_vl/modeling_qwen3_vl.py,
models/qwen3_vl_moe/modeling_qwen3_vl_moe.py), re-executed on symbolic tensors (see sim.py).

What differs from Qwen2-VL: the vision tower adds a learned position embedding resampled to each image's grid
(bilinear taps gathered from `pos_embed` and weighted), uses LayerNorm blocks with a gelu-tanh MLP
(linear_fc1/linear_fc2), and taps DeepStack features after `deepstack_visual_indexes`: each goes through its own
patch merger (LayerNorm after the 2x2 shuffle) and is added to the image positions of the hidden states after the
first language-model layers. The language model is Qwen3 (RMSNorm on q and k per head) with interleaved MRoPE; the
MoE variant replaces the MLP with a top-k router and fused 3D expert weights run through grouped matmuls
(transformers integrations/moe.py `grouped_mm_experts_forward`, the default experts implementation).

Mirrors transformers 5.23 models/qwen3_vl/modeling_qwen3_vl.py and models/qwen3_vl_moe/modeling_qwen3_vl_moe.py.
"""

from __future__ import annotations

from dataclasses import replace

from ...memory import ops
from ...memory.blocks import Context, Params, TextDecoderLayer, apply_linear, gated_mlp
from ...memory.model import BaseModel, LMAttention, segment_attention
from ...memory.sim import DTYPE_BYTES, Engine, Node, T
from ...memory.vision import vision_rope
from ...modules import LANGUAGE, PROJECTOR, VISION
from ...setup import TrainSetup
from ...spec import ModelSpec
from ..qwen2_vl.memory import video_frames

# Layer types ---------------------------------------------------------------------------------------------------------


def layer_counts(spec: ModelSpec) -> dict[str, int]:
    """Layers of each type: plain vision blocks, plain language-model layers, and DeepStack pairs (a vision block
    whose output feeds a DeepStack merger, plus the language-model layer that feature is added after)."""
    deepstack = len(spec.vision.deepstack_visual_indexes)
    return {"text": spec.text.num_layers - deepstack, "vision": spec.vision.num_layers - deepstack,
            "deepstack": deepstack}


def spec_with_layers(spec: ModelSpec, counts: dict[str, int]) -> ModelSpec:
    """A spec with the given layers per type. The DeepStack taps split the plain vision blocks into equal runs, the
    remainder after the last tap (24 blocks, 3 taps -> 5, 11, 17 as in the 4B); the language model's first
    `deepstack` layers receive the features, as in the real model. The real layer counts give the spec back."""
    if counts == layer_counts(spec):
        return spec
    plain, taps = counts["vision"], counts["deepstack"]
    run = plain // (taps + 1)
    indexes = tuple((i + 1) * (run + 1) - 1 for i in range(taps))
    vision = replace(spec.vision, num_layers=plain + taps, deepstack_visual_indexes=indexes)
    text = replace(spec.text, num_layers=counts["text"] + taps)
    return replace(spec, vision=vision, text=text)


# Vision tower --------------------------------------------------------------------------------------------------------


def _params_of(*groups) -> list:
    out = []
    for group in groups:
        if hasattr(group, "weight"):  # LinearParams
            out += group.tensors
        else:
            out += list(group)
    return out


class VisionBlock:
    """Qwen3VLVisionBlock: x + attn(norm1(x)); x + mlp(norm2(x)) with LayerNorm and Qwen3VLVisionMLP
    linear_fc2(gelu_tanh(linear_fc1(x))). Qwen3VLVisionAttention: qkv -> unbind -> apply_rotary_pos_emb_vision (q and
    k in fp32, cast back) -> attention per image -> cat -> proj."""

    def __init__(self, p: Params, index: int) -> None:
        v = p.setup.model.vision
        self.v = v
        d, prefix = v.hidden_size, f"vision.blocks.{index}"
        self.norm1 = (p.vector(VISION, f"{prefix}.norm1.weight", d), p.vector(VISION, f"{prefix}.norm1.bias", d))
        self.norm2 = (p.vector(VISION, f"{prefix}.norm2.weight", d), p.vector(VISION, f"{prefix}.norm2.bias", d))
        self.qkv = p.linear(VISION, f"{prefix}.attn.qkv", d, 3 * d, True)
        self.proj = p.linear(VISION, f"{prefix}.attn.proj", d, d, True)
        self.fc1 = p.linear(VISION, f"{prefix}.mlp.linear_fc1", d, v.intermediate_size, True)
        self.fc2 = p.linear(VISION, f"{prefix}.mlp.linear_fc2", v.intermediate_size, d, True)
        self.params = _params_of(self.norm1, self.norm2, self.qkv, self.proj, self.fc1, self.fc2)

    @property
    def has_trainable(self) -> bool:
        return any(q.trainable for q in self.params)

    def __call__(self, e: Engine, x: T, ctx) -> T:
        tokens = ctx.tokens
        h = ops.layer_norm(e, x, self.norm1[0], self.norm1[1], tokens, name="norm1")
        attn = self._attention(e, h, ctx)
        del h  # the attention's argument lives until it returns
        x = ops.add(e, x, attn, name="attn_residual")
        del attn
        h = ops.layer_norm(e, x, self.norm2[0], self.norm2[1], tokens, name="norm2")
        fc1 = apply_linear(e, h, self.fc1, "linear_fc1")
        act = ops.unary(e, "gelu_tanh", fc1, name="act")
        del fc1
        mlp = apply_linear(e, act, self.fc2, "linear_fc2")
        del act, h
        return ops.add(e, x, mlp, name="mlp_residual")

    def _attention(self, e: Engine, h: T, ctx) -> T:
        v = self.v
        qkv = apply_linear(e, h, self.qkv, "qkv")
        # .reshape(tokens, 3, heads, -1).permute(1, 0, 2, 3).unbind(0): views; value_states keeps qkv alive
        query, key, value = _chunks(e, qkv, 3, ("q", "k", "v"))
        del qkv
        q, k = vision_rope(e, query, key, ctx)
        del query, key
        attn = ctx.attention_segments(e, q, k, value, v.num_heads, ctx.segments, "attn")
        out = apply_linear(e, attn, self.proj, "proj")
        del attn, q, k, value  # locals of the attention forward until it returns
        return out


class PatchMerger:
    """Qwen3VLVisionPatchMerger: LayerNorm (over the vision width, or over the 2x2-shuffled width when
    `use_postshuffle_norm`, the DeepStack mergers), view to (tokens/4, 4*d), linear_fc1, GELU, linear_fc2."""

    def __init__(self, p: Params, prefix: str, component: str, postshuffle: bool) -> None:
        spec = p.setup.model
        d = spec.vision.hidden_size
        merged = d * spec.vision.spatial_merge_size ** 2
        self.postshuffle, self.unit = postshuffle, spec.vision.spatial_merge_size ** 2
        width = merged if postshuffle else d
        self.norm = (p.vector(component, f"{prefix}.norm.weight", width),
                     p.vector(component, f"{prefix}.norm.bias", width))
        self.fc1 = p.linear(component, f"{prefix}.linear_fc1", merged, merged, True)
        self.fc2 = p.linear(component, f"{prefix}.linear_fc2", merged, spec.projector.out_features, True)

    def __call__(self, e: Engine, x: T, tokens: int) -> T:
        rows = tokens // self.unit if self.postshuffle else tokens
        h = ops.layer_norm(e, x, self.norm[0], self.norm[1], rows, name="merger.norm")
        a = apply_linear(e, h, self.fc1, "merger.linear_fc1")
        g = ops.unary(e, "gelu", a, name="merger.gelu")
        del a
        out = apply_linear(e, g, self.fc2, "merger.linear_fc2")
        del g, h  # `x = self.norm(...)` is rebound only once linear_fc2 returns
        return out


class VisionContext:
    def __init__(self, tokens: int, segments: list[int], attention) -> None:
        self.tokens, self.segments, self.attention_segments = tokens, segments, attention
        self.cos = self.sin = None


# Language model ------------------------------------------------------------------------------------------------------


class Qwen3Layer(TextDecoderLayer):
    """Qwen3VLTextDecoderLayer / Qwen3VLMoeTextDecoderLayer: input_layernorm -> self_attn (q_proj -> q_norm,
    k_proj -> k_norm (RMSNorm over head_dim), v_proj, RoPE, attention, o_proj) -> residual ->
    post_attention_layernorm -> MLP (gate/up/down) or sparse MoE block -> residual: the shared layer with q/k norm
    on each projection; its own part is the MoE block."""

    qk_norm, rope_frees, attn_prefix, inputs_die_before_o_proj = "projection", "both", "self_attn.", False

    def make_mlp(self, p: Params, prefix: str, trainable: bool):
        return SparseMoe(p, prefix, trainable) if self.t.is_moe else DenseMlp(p, prefix, trainable)


class DenseMlp:
    """Qwen3VLTextMLP: down_proj(act(gate_proj(x)) * up_proj(x))."""

    def __init__(self, p: Params, prefix: str, trainable: bool) -> None:
        t = p.setup.model.text
        h, i = t.hidden_size, t.intermediate_size
        self.gate = p.linear(LANGUAGE, f"{prefix}.mlp.gate_proj", h, i, False, trainable)
        self.up = p.linear(LANGUAGE, f"{prefix}.mlp.up_proj", h, i, False, trainable)
        self.down = p.linear(LANGUAGE, f"{prefix}.mlp.down_proj", i, h, False, trainable)
        self.params = _params_of(self.gate, self.up, self.down)

    def __call__(self, e: Engine, h: T, tokens: int) -> T:
        return gated_mlp(e, h, self.gate, self.up, self.down)


class SparseMoe:
    """Qwen3VLMoeTextSparseMoeBlock: the router (Qwen3VLMoeTextTopKRouter: F.linear with a plain weight, softmax in
    fp32, top-k, renormalise, cast to the logits' dtype), then the experts through `grouped_mm_experts_forward`
    (integrations/moe.py): sort the (token, expert) pairs by expert, gather the hidden states, grouped matmul with
    gate_up_proj, SiLU(gate) * up, grouped matmul with down_proj, scale by the routing weights, un-permute, sum over
    the top-k (fp32 under autocast), cast back."""

    def __init__(self, p: Params, prefix: str, trainable: bool) -> None:
        t = p.setup.model.text
        self.t = t
        h, i, n = t.hidden_size, t.moe_intermediate_size, t.num_experts
        full = p.full(LANGUAGE, trainable)
        dtype = p._dtype(full)
        # created in the block's registration order (experts, then the router gate): an optimizer steps them so
        self.gate_up = p.e.param(f"{prefix}.mlp.experts.gate_up_proj", n * 2 * i * h, dtype, full, LANGUAGE,
                                 shape=(n, 2 * i, h))
        self.down = p.e.param(f"{prefix}.mlp.experts.down_proj", n * h * i, dtype, full, LANGUAGE,
                              shape=(n, h, i))
        self.router = p.e.param(f"{prefix}.mlp.gate.weight", n * h, dtype, full, LANGUAGE, shape=(n, h))
        self.params = [self.router, self.gate_up, self.down]

    def __call__(self, e: Engine, x: T, tokens: int) -> T:
        logits, scores, indices = self._router(e, x, tokens)
        out = self._experts(e, x, scores, indices, tokens)
        del logits, scores, indices  # `_, routing_weights, selected_experts = self.gate(...)`: locals until return
        return out

    def _router(self, e: Engine, x: T, tokens: int) -> tuple[T, T, T]:
        """Qwen3VLMoeTextTopKRouter.forward."""
        t = self.t
        n, k = t.num_experts, t.num_experts_per_tok
        logits = ops.linear(e, x, self.router, n, name="router_logits")
        probs = e.new(tokens * n, "fp32", name="router_probs")  # softmax(dtype=float) saves its result
        e.record(Node("softmax", [logits] if logits.rg else [], [probs], []), probs)
        top = e.new(tokens * k, "fp32", name="router_top_value")
        indices = e.new(tokens * k, "int64", name="router_indices")
        e.record(Node("topk", [probs] if probs.rg else [], [indices], []), top)
        total = e.new(tokens, "fp32", name="router_top_sum")  # sum(-1, keepdim=True)
        e.record(Node("sum", [top] if top.rg else [], [], []), total)
        # `router_top_value /= ...` in place: the divisor's gradient needs the original values, which autograd
        # clones before the in-place op; DivBackward keeps the clone and the divisor
        original = e.new(tokens * k, "fp32", name="router_top_value:original") if top.rg else None
        divided = top.view()
        e.record(Node("div_", [top, total] if top.rg else [], [total, original] if top.rg else [], []), divided)
        del total, top, original
        scores = ops.cast(e, divided, logits.dtype, name="router_scores")
        del divided, probs
        return logits, scores, indices

    def _experts(self, e: Engine, x: T, scores: T, indices: T, tokens: int) -> T:
        """grouped_mm_experts_forward (integrations/moe.py); its locals live until it returns."""
        t = self.t
        h, i, n, k = t.hidden_size, t.moe_intermediate_size, t.num_experts, t.num_experts_per_tok
        pairs = tokens * k
        expert_ids = e.new(pairs, "int64", name="expert_ids_g")  # torch.sort: values and permutation
        perm = e.new(pairs, "int64", name="perm")
        token_index = e.new(pairs, "int64", name="perm//top_k")
        selected = e.new(pairs * h, x.dtype, name="selected_hidden_states_g")
        e.record(_index_node(x, token_index), selected)
        del token_index
        weights = e.new(pairs, scores.dtype, name="sample_weights_g")
        e.record(_index_node(scores, perm), weights)
        histc_input = e.new(pairs, "fp32", name="histc_input")  # .float() on the CPU, .int() on CUDA: 4 bytes
        tokens_per_expert = e.new(n, "fp32", name="tokens_per_expert")
        offsets = e.new(n, "int32", name="offsets")
        up = _grouped_mm(e, selected, self.gate_up, offsets, h, 2 * i, "gate_up_proj")
        gated = _gated_silu(e, up)
        del up
        down = _grouped_mm(e, gated, self.down, offsets, i, h, "down_proj")
        del gated
        weighted = ops.mul(e, down, weights, name="weighted_out")
        inv_perm = e.new(pairs, "int64", name="inv_perm")
        arange = e.new(pairs, "int64", name="arange")
        del arange
        unpermuted = e.new(pairs * h, weighted.dtype, name="weighted_out[inv_perm]")
        e.record(_index_node(weighted, inv_perm), unpermuted)
        del weighted
        # .view(tokens, top_k, h).sum(dim=1): fp32 under autocast (sum is on CUDA's fp32 list)
        summed = e.new(tokens * h, "fp32" if e.autocast else unpermuted.dtype, name="experts_sum")
        e.record(Node("sum", [unpermuted] if unpermuted.rg else [], [], []), summed)
        out = ops.cast(e, summed, x.dtype, name="experts_out")
        del summed, unpermuted, inv_perm, down, offsets, tokens_per_expert, histc_input, weights, selected
        del perm, expert_ids
        return out


def _index_node(source: T, index: T) -> Node:
    """IndexBackward of `source[index]`: saves the index; its backward, index_backward (FunctionsManual.cpp), fills
    `grad.new_zeros(source)` and scatters the gradient into it in place (`_index_put_impl_`): the zeros are the
    gradient, the engine's one allocation. (Under a dispatch mode torch takes the out-of-place `index_put` branch;
    the tracer counts it in place, as a plain CUDA run does.)"""
    inputs = [source] if source.rg else []
    return Node("index", inputs, [index] if inputs else [], [])


def _index_put(e: Engine, target: T, values: T, mask: T) -> T:
    """`target[mask, :] = values` in place. IndexPutBackward0 (derivatives.yaml `index_put_`) saves the indices;
    its backward gives `values` grad[mask] and, when the target needs a gradient, the target
    grad.index_put(mask, zeros_like(values)): the zeros are the backward's transient workspace."""
    out = target.view(name=f"{target.name}:index_put")
    inputs = [t for t in (target, values) if t.rg]
    workspace = values.numel * DTYPE_BYTES[values.dtype] if target.rg else 0
    e.record(Node("index_put_", inputs, [mask] if inputs else [], [], workspace=workspace), out)
    return out


def _grouped_mm(e: Engine, x: T, weight, offsets: T, in_features: int, out_features: int, name: str) -> T:
    """transformers `_grouped_linear` -> torch.nn.functional.grouped_mm(input.to(weight.dtype), weight.transpose(-2,
    -1), offs): not autocast-enabled, so it runs in the weight's dtype (fp32 for trained experts: CUDA's
    `_grouped_mm_fallback`, one mm per expert into the output); saves the offsets, the input when the weight trains
    and the weight when the input needs a gradient."""
    xin = ops.cast(e, x, weight.dtype, name=f"{name}.input")
    out = e.new(x.numel // in_features * out_features, weight.dtype, name=name)
    saved = [offsets] + ([xin] if weight.trainable else []) + ([weight.tensor] if xin.rg else [])
    e.record(Node(f"grouped_mm:{name}", [xin] if xin.rg else [], saved, [weight] if weight.trainable else []), out)
    return out


def _chunks(e: Engine, x: T, parts: int, names: tuple[str, ...]) -> list[T]:
    """Equal views of `x` (chunk / unbind). Their backward (SplitBackward / UnbindBackward) keeps one gradient per
    part in its input buffer, then concatenates (stacks) them into one gradient of `x`: the parts after the first
    are the node's workspace here, the engine's allocation the gradient of `x`."""
    part = x.numel // parts
    first = x.view(part, name=names[0])
    e.record(Node("split", [x] if x.rg else [], [], [], workspace=(parts - 1) * part * DTYPE_BYTES[x.dtype]), first)
    return [first] + [first.view(name=name) for name in names[1:]]


def _gated_silu(e: Engine, up: T) -> T:
    """_default_apply_gate: gate, up = chunk(2); act_fn(gate) * up (views of the grouped-matmul output)."""
    gate_view, up_view = _chunks(e, up, 2, ("gate", "up"))
    act = ops.unary(e, "silu", gate_view, name="expert_act")
    del gate_view
    out = ops.mul(e, act, up_view, name="expert_act*up")
    del act, up_view
    return out


# The model -----------------------------------------------------------------------------------------------------------


class Qwen3VLModel(BaseModel):
    """Qwen3VLForConditionalGeneration / Qwen3VLMoeForConditionalGeneration."""

    def param_rank(self, p, rank: dict[str, int]) -> float:
        """The vision model registers its DeepStack mergers after the merger (the projector)."""
        if p.name.startswith("vision.deepstack_merger_list."):
            return rank[PROJECTOR] + 0.5
        return super().param_rank(p, rank)

    def __init__(self, e: Engine, setup: TrainSetup, counts: dict[str, int] | None) -> None:
        spec = spec_with_layers(setup.model, counts) if counts else setup.model
        super().__init__(e, setup, {"text": 0})  # the embedding, final norm and lm_head; Qwen3 layers below
        v, t = spec.vision, spec.text
        first_trainable = t.num_layers - setup.freeze_trainable_layers if setup.method == "freeze" else 0
        self.layers = [Qwen3Layer(self.p, i, trainable=i >= first_trainable) for i in range(t.num_layers)]
        self.images = setup.image_tokens()
        full = self.p.full(VISION)
        dtype = self.p._dtype(full)
        d = v.hidden_size
        self.patch_embed = e.param("vision.patch_embed.proj.weight", v.in_channels * v.temporal_patch_size
                                   * v.patch_size ** 2 * d, dtype, full, VISION,
                                   shape=(d, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size))
        self.patch_bias = e.param("vision.patch_embed.proj.bias", d, dtype, full, VISION)
        self.pos_embed = e.param("vision.pos_embed", v.num_position_embeddings * d, dtype, full, VISION,
                                 shape=(v.num_position_embeddings, d))
        self.blocks = [VisionBlock(self.p, i) for i in range(v.num_layers)]
        self.deepstack_indexes = v.deepstack_visual_indexes
        self.deepstack_mergers = [PatchMerger(self.p, f"vision.deepstack_merger_list.{i}", VISION, True)
                                  for i in range(len(v.deepstack_visual_indexes))]
        self.merger = PatchMerger(self.p, "merger", PROJECTOR, False)
        # Qwen3VLVisionRotaryEmbedding buffers inv_freq and original_inv_freq: head_dim/4 fp32 each (the language
        # model's rotary buffers come with BaseModel)
        self.vision_buffers = [e.param(f"vision.rotary_pos_emb.{n}", v.head_dim // 4, "fp32", False, VISION)
                               for n in ("inv_freq", "original_inv_freq")]
        # videos (planner/video.py): grid_t frames of grid_h x grid_w patches each, one attention segment per frame
        # (vision_utils.get_vision_cu_seqlens repeats h*w grid_t times), through the same tower after the images
        self.videos = setup.video_tokens()
        self.video_frames = video_frames(self.videos)
        self.image_patches = sum(t.vision_patches for t in self.images) * self.batch
        self.video_patches = sum(t.vision_patches for t in self.videos) * self.batch
        self.patches = self.image_patches + self.video_patches
        # the language-model positions DeepStack features are added to: image and video placeholders
        self.visual_tokens = sum(t.llm_tokens for t in (*self.images, *self.videos)) * self.batch

    def inputs(self, e: Engine) -> dict[str, T]:
        inputs = self.text_inputs(e)
        inputs["mm_token_type_ids"] = e.new(self.tokens, "int32", name="mm_token_type_ids", category="inputs/batch")
        if self.image_patches:
            self._vision_inputs(e, inputs, "image", self.image_patches, len(self.images), len(self.images))
        if self.video_patches:
            # pixel_values_videos, video_grid_thw and the video_* helpers (get_video_features is wrapped by
            # accepts_precomputed_kwargs(modality="video")); cu_seqlens has one boundary per frame
            self._vision_inputs(e, inputs, "video", self.video_patches, len(self.videos), len(self.video_frames))
        return inputs

    def _vision_inputs(self, e: Engine, inputs: dict[str, T], kind: str, patches: int, count: int,
                       segments: int) -> None:
        v = self.setup.model.vision
        batch = dict(category="inputs/batch")
        patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        pixels = "pixel_values" if kind == "image" else "pixel_values_videos"
        inputs[pixels] = e.new(patches * patch_dim, "fp32", name=pixels, **batch)
        inputs[f"{kind}_grid_thw"] = e.new(count * self.batch * 3, "int64", name=f"{kind}_grid_thw", **batch)
        inputs[f"{kind}_position_ids"] = e.new(patches * 2, "int64", name="vision_position_ids", **batch)
        inputs[f"{kind}_cu_seqlens"] = e.new(segments * self.batch + 1, "int32", name="cu_seqlens", **batch)
        # get_vision_interpolation_indices_and_weights (bilinear): 4 taps per patch, every frame of a video too
        inputs[f"{kind}_interp_indices"] = e.new(patches * 4, "int64", name="interp_indices", **batch)
        inputs[f"{kind}_interp_weights"] = e.new(patches * 4, "fp32", name="interp_weights", **batch)
        if "position_ids" not in inputs:
            inputs["position_ids"] = e.new(3 * self.tokens, "int64", name="position_ids", **batch)

    # Vision -----------------------------------------------------------------------------------------------------
    def vision(self, e: Engine, inputs: dict[str, T], kind: str = "image") -> tuple[T, T, list[T]]:
        """Qwen3VLModel.get_image_features (get_video_features calls it on the videos) + Qwen3VLVisionModel.forward:
        (last hidden state, merged features, DeepStack features)."""
        v = self.setup.model.vision
        if kind == "image":
            pixel_values, items, patches = inputs["pixel_values"], self.images, self.image_patches
        else:
            pixel_values, items, patches = inputs["pixel_values_videos"], self.video_frames, self.video_patches
        d = v.hidden_size
        e.scope = "vision"
        # get_image_features: `pixel_values = pixel_values.type(self.visual.dtype)`, a local until it returns
        pixels = ops.cast(e, pixel_values, self.patch_embed.dtype, name="pixel_values:cast")
        hidden = self._patch_embed(e, pixels, patches)
        # pos_embed(interp_indices) * interp_weights[:, :, None] -> .sum(1) (fp32 under autocast) -> .to(bf16)
        taps = e.new(patches * 4 * d, self.pos_embed.dtype, name="pos_embed.taps")
        e.record(Node("embedding", [], [], [self.pos_embed] if self.pos_embed.trainable else []), taps)
        weighted = ops.mul(e, taps, inputs[f"{kind}_interp_weights"], name="pos_embed.weighted")
        del taps
        pos_embeds = e.new(patches * d, "fp32" if e.autocast else weighted.dtype, name="pos_embeds")
        e.record(Node("sum", [weighted] if weighted.rg else [], [], []), pos_embeds)
        del weighted
        pos_cast = ops.cast(e, pos_embeds, hidden.dtype, name="pos_embeds:cast")
        hidden = ops.add(e, hidden, pos_cast, name="hidden+pos")
        del pos_cast
        ctx = VisionContext(patches, [t.vision_patches for t in items] * self.batch, segment_attention(self.setup))
        # Qwen3VLVisionRotaryEmbedding (no grad): cos and sin of (patches, head_dim) fp32
        ctx.cos = e.new(patches * v.head_dim, "fp32", name="vision.cos")
        ctx.sin = e.new(patches * v.head_dim, "fp32", name="vision.sin")
        features = []
        for index, block in enumerate(self.blocks):
            hidden = self._run_layer(e, block, hidden, ctx)
            if index in self.deepstack_indexes:
                merger = self.deepstack_mergers[self.deepstack_indexes.index(index)]
                features.append(merger(e, hidden, patches))
        e.scope = "projector"
        merged = self.merger(e, hidden, patches)
        del ctx, pos_embeds, pixels  # locals of the vision forward / get_image_features
        return hidden, merged, features

    def _patch_embed(self, e: Engine, pixels: T, patches: int) -> T:
        """Qwen3VLVisionPatchEmbed: Conv3d with bias, output (patches, d)."""
        v = self.setup.model.vision
        return ops.patch_conv(e, pixels, self.patch_embed, self.patch_bias, patches * v.hidden_size, "patch_embed")

    def encode(self, e: Engine, inputs: dict[str, T]) -> T:
        """Qwen3VLModel.forward up to the language model: the image tower, then the video tower (get_video_features),
        then each one's features scattered into its placeholder positions, and the DeepStack features (cat of the
        per-item splits: copies; with images and videos both, merged into one (visual tokens, d) tensor per layer)
        for the first layers."""
        x = self.embed_tokens(e)
        self._deepstack, self._mask, self._keep = [], None, None
        if not self.patches:
            return x
        towers = [(kind, self.vision(e, inputs, kind)) for kind, patches in
                  (("image", self.image_patches), ("video", self.video_patches)) if patches]
        e.scope = "language"
        keep, masks = [], {}
        out = x
        for kind, (hidden, merged, features) in towers:
            # pooler_output split per item, then torch.cat(...).to(inputs_embeds.dtype): a copy
            cat = e.new(merged.numel, merged.dtype, name=f"{kind}_embeds")
            e.record(Node("cat", [merged] if merged.rg else [], [], []), cat)
            embeds = ops.cast(e, cat, x.dtype, name=f"{kind}_embeds:cast")
            del cat  # a temporary unless the cast is a no-op
            # get_placeholder_mask returns both masks: `image_mask, _ = ...` keeps the video one in `_`, then
            # `_, video_mask = ...` rebinds `_` to the second image mask (the first video mask is freed)
            image_mask = e.new(self.tokens, "bool", name="image_mask")
            video_mask = e.new(self.tokens, "bool", name="video_mask")
            masks[kind] = image_mask if kind == "image" else video_mask
            masks["_"] = video_mask if kind == "image" else image_mask
            del image_mask, video_mask
            out = ops.masked_scatter(e, out, masks[kind], embeds, name=f"inputs_embeds:scatter_{kind}")
            keep += [hidden, merged, features, embeds]
        if len(towers) == 1:
            (kind, (_, _, features)), = towers
            deepstack = [self._cat(e, feature, "deepstack_visual_embeds") for feature in features]
            mask = masks[kind]
        else:
            mask, deepstack, joint = self._joint_deepstack(e, masks, towers[0][1][2], towers[1][1][2])
            keep.append(joint)
        # mm_encoder_outputs (last_hidden_state, pooler_output, deepstack_features) and the locals of
        # Qwen3VLModel.forward stay referenced until the language model returns
        self._keep = (keep, masks)
        self._deepstack, self._mask = deepstack, mask
        return out

    def _cat(self, e: Engine, feature: T, name: str) -> T:
        copy = e.new(feature.numel, feature.dtype, name=name)
        e.record(Node("cat", [feature] if feature.rg else [], [], []), copy)
        return copy

    def _joint_deepstack(self, e: Engine, masks: dict, image_features: list[T], video_features: list[T]):
        """Qwen3VLModel.forward with images and videos: visual_pos_masks = image_mask | video_mask; the masks of
        each kind within it (`image_mask[visual_pos_masks]`); per DeepStack layer the image and video features
        concatenated (copies), a `new_zeros(visual tokens, d)` and both written into it in place (index_put_).
        Returns (visual_pos_masks, the per-layer joint features, the loop's last locals)."""
        visual = e.new(self.tokens, "bool", name="visual_pos_masks")
        joint_masks = [e.new(self.visual_tokens, "bool", name=f"{kind}_mask_joint") for kind in ("image", "video")]
        width = self.setup.model.projector.out_features
        deepstack = []
        img = vid = None
        for image_feature, video_feature in zip(image_features, video_features):
            # `img_embed = torch.cat(img_embed, dim=0)`: the loop rebinds them, freeing the previous layer's copies
            img = self._cat(e, image_feature, "deepstack_image_embeds")
            vid = self._cat(e, video_feature, "deepstack_video_embeds")
            joint = e.new(self.visual_tokens * width, img.dtype, name="embed_joint")
            joint = _index_put(e, joint, img, joint_masks[0])
            deepstack.append(_index_put(e, joint, vid, joint_masks[1]))
            del joint
        return visual, deepstack, (joint_masks, img, vid)

    # Language model ----------------------------------------------------------------------------------------------
    def language(self, e: Engine, x: T) -> T:
        """Qwen3VLTextModel.forward: layers, each of the first ones followed by `_deepstack_process`; the loop's
        `layer_outputs` keeps the last layer's output alive past the final norm until the model returns."""
        attention = LMAttention(self.setup, self.batch, self.seq)
        ctx = Context(tokens=self.tokens, attention=attention)
        ctx.cos, ctx.sin = self.rotary(e, x)
        if self.setup.attn == "eager":
            attention.mask = e.new(self.batch * self.seq * self.seq, x.dtype, name="causal_mask")
        deepstack, mask = self._deepstack, self._mask
        # without images no 3D position ids come in: arange(seq) + past_seen_tokens, expanded; each layer gets row 0
        # as `position_ids` (a checkpoint keeps it with the other keyword arguments)
        ctx.position_ids = e.new(self.seq, "int64", name="position_ids") if not self.patches else None
        hidden = x
        layer_outputs = None
        for index, layer in enumerate(self.layers):
            layer_outputs = self._run_layer(e, layer, hidden, ctx)
            hidden = layer_outputs
            if index < len(deepstack):
                hidden = self._deepstack_process(e, hidden, mask, deepstack[index])
        del ctx, attention
        out = ops.rms_norm(e, hidden, self.norm, self.tokens, name="norm")
        del hidden, layer_outputs, deepstack, mask
        self._deepstack, self._mask, self._keep = [], None, None
        return out

    def _deepstack_process(self, e: Engine, hidden: T, mask: T, embeds: T) -> T:
        """visual_embeds.to(hidden dtype); hidden.clone(); hidden[mask, :] + visual_embeds; index_put_ back."""
        rows = self.visual_tokens
        width = self.setup.model.text.hidden_size
        visual = ops.cast(e, embeds, hidden.dtype, name="deepstack:cast")
        clone = e.new(hidden.numel, hidden.dtype, name="deepstack:clone")
        e.record(Node("clone", [hidden] if hidden.rg else [], [], []), clone)
        gathered = e.new(rows * width, hidden.dtype, name="deepstack:gather")
        e.record(_index_node(clone, mask), gathered)
        local = ops.add(e, gathered, visual, name="deepstack:add")
        del gathered, visual
        out = clone.view(name="deepstack:index_put")
        inputs = [t for t in (clone, local) if t.rg]
        # IndexPutBackward: grad.index_put(mask, zeros_like(values)) for the clone, grad[mask] for the values
        e.record(Node("index_put_", inputs, [mask] if inputs else [], [],
                      workspace=local.numel * DTYPE_BYTES[local.dtype] if inputs else 0), out)
        del clone, local
        return out


MODELS = {"qwen3_vl": Qwen3VLModel, "qwen3_vl_moe": Qwen3VLModel}
