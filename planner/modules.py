"""Module inventory: every parameter of a model spec, per component, as the transformers classes build it.

The inventory serves three purposes: parameter counts (held equal to the transformers classes on the meta device by
`tests/test_params.py`), the list of `nn.Linear` modules that LoRA can target (by the last component of the module
name, as peft matches `target_modules`), and the per-layer shapes the activation model uses.

Each `*_inventory` function mirrors one transformers modeling file; the file is named in its docstring.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from .errors import VlplanError
from .spec import ModelSpec, ProjectorSpec, TextSpec, VisionSpec

VISION, PROJECTOR, LANGUAGE = "vision", "projector", "language"
COMPONENTS = (VISION, PROJECTOR, LANGUAGE)


@dataclass(frozen=True)
class Linear:
    """`count` identical `nn.Linear(in_features, out_features, bias)` modules named `name` (the last name component)."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    count: int = 1
    # False for linears LoRA "all" never targets (lm_head)
    lora_all: bool = True

    @property
    def params(self) -> int:
        return self.count * (self.in_features * self.out_features + (self.out_features if self.bias else 0))


@dataclass(frozen=True)
class Inventory:
    """The parameters of one component: its linears plus everything else (norms, embeddings, convolutions)."""

    linears: tuple[Linear, ...]
    other_params: int
    # Of `other_params`: parameters of token embeddings (kept separately: some methods treat them specially)
    embedding_params: int = 0
    # Linears per repeated layer (one entry per module, count 1), for the activation model
    layer_linears: tuple[Linear, ...] = ()

    @cached_property  # computed once per (immutable) inventory: the plan's throughput model asks many times
    def linear_params(self) -> int:
        return sum(linear.params for linear in self.linears)

    @cached_property
    def params(self) -> int:
        return self.linear_params + self.other_params


def _times(linears: list[Linear], count: int) -> tuple[Linear, ...]:
    return tuple(Linear(l.name, l.in_features, l.out_features, l.bias, l.count * count, l.lora_all) for l in linears)


def _norm_params(norm: str, dim: int) -> int:
    if norm == "layernorm":
        return 2 * dim
    if norm == "rmsnorm":
        return dim
    raise VlplanError(f"unknown norm type {norm!r}")


# Language models ---------------------------------------------------------------------------------------------------


def text_layer_linears(text: TextSpec) -> list[Linear]:
    """Linears of one decoder layer (transformers models/{qwen2,llama,mistral,qwen3,gemma3,...}/modeling_*.py)."""
    h, q_out, kv_out = text.hidden_size, text.num_heads * text.head_dim, text.num_kv_heads * text.head_dim
    attn = [
        Linear("q_proj", h, q_out, text.qkv_bias),
        Linear("k_proj", h, kv_out, text.qkv_bias),
        Linear("v_proj", h, kv_out, text.qkv_bias),
        Linear("o_proj", q_out, h, False),
    ]
    if text.arch == "phi3":
        # Phi-3: fused qkv_proj and gate_up_proj (remote modeling_phi3_v.py)
        attn = [Linear("qkv_proj", h, q_out + 2 * kv_out, False), Linear("o_proj", q_out, h, False)]
        return attn + [Linear("gate_up_proj", h, 2 * text.intermediate_size, False),
                       Linear("down_proj", text.intermediate_size, h, False)]
    if text.is_moe:
        # Qwen3-VL-MoE (transformers 5.23): the router (Qwen3VLMoeTextTopKRouter, `mlp.gate.weight`) and the experts
        # (fused 3D parameters) are plain nn.Parameters, not nn.Linear: LoRA cannot target them. See
        # text_layer_other_params.
        return attn
    return attn + [
        Linear("gate_proj", h, text.intermediate_size, False),
        Linear("up_proj", h, text.intermediate_size, False),
        Linear("down_proj", text.intermediate_size, h, False),
    ]


def text_layer_other_params(text: TextSpec) -> int:
    """Norms (and MoE expert weights) of one decoder layer."""
    h = text.hidden_size
    norms = 2 * h  # input_layernorm, post_attention_layernorm
    if text.arch in ("gemma2", "gemma3"):
        norms += 2 * h  # pre_feedforward_layernorm, post_feedforward_layernorm
    if text.qk_norm:
        norms += 2 * text.head_dim  # q_norm, k_norm over head_dim
    experts = 0
    if text.is_moe:
        # Qwen3VLMoeTextExperts: gate_up_proj (E, 2*I, h) and down_proj (E, h, I); the router weight (E, h)
        experts = text.num_experts * 3 * h * text.moe_intermediate_size + text.num_experts * h
    return norms + experts


def text_inventory(text: TextSpec) -> Inventory:
    self_attn_layers = text.num_layers - len(text.cross_attention_layers)
    layer = text_layer_linears(text)
    linears = list(_times(layer, self_attn_layers))
    other = self_attn_layers * text_layer_other_params(text)
    if text.cross_attention_layers:
        linears += list(_times(mllama_cross_layer_linears(text), len(text.cross_attention_layers)))
        other += len(text.cross_attention_layers) * mllama_cross_layer_other_params(text)
    embedding = (text.vocab_size + text.extra_embedding_rows) * text.hidden_size
    other += embedding + text.hidden_size  # embed_tokens, final norm
    if not text.tie_word_embeddings:
        linears.append(Linear("lm_head", text.hidden_size, text.vocab_size, False, lora_all=False))
    return Inventory(tuple(linears), other, embedding, tuple(layer))


def mllama_cross_layer_linears(text: TextSpec) -> list[Linear]:
    """MllamaCrossAttentionDecoderLayer (models/mllama/modeling_mllama.py): cross-attention plus the gated MLP."""
    h, q_out, kv_out = text.hidden_size, text.num_heads * text.head_dim, text.num_kv_heads * text.head_dim
    return [
        Linear("q_proj", h, q_out, False),
        Linear("k_proj", h, kv_out, False),
        Linear("v_proj", h, kv_out, False),
        Linear("o_proj", q_out, h, False),
        Linear("gate_proj", h, text.intermediate_size, False),
        Linear("up_proj", h, text.intermediate_size, False),
        Linear("down_proj", text.intermediate_size, h, False),
    ]


def mllama_cross_layer_other_params(text: TextSpec) -> int:
    # input_layernorm, post_attention_layernorm, q_norm, k_norm (head_dim), cross_attn_attn_gate, cross_attn_mlp_gate
    return 2 * text.hidden_size + 2 * text.head_dim + 2


# Vision towers -----------------------------------------------------------------------------------------------------


def vision_layer_linears(vision: VisionSpec) -> list[Linear]:
    d, i = vision.hidden_size, vision.intermediate_size
    if vision.arch == "qwen2_vl":
        # Qwen2VLVisionBlock: VisionAttention(qkv, proj) + VisionMlp(fc1, fc2), all with bias
        return [Linear("qkv", d, 3 * d, True), Linear("proj", d, d, True),
                Linear("fc1", d, i, True), Linear("fc2", i, d, True)]
    if vision.arch == "qwen2_5_vl":
        # Qwen2_5_VLVisionBlock: qkv/proj with bias + Qwen2_5_VLMLP(gate, up, down, bias=True)
        return [Linear("qkv", d, 3 * d, True), Linear("proj", d, d, True),
                Linear("gate_proj", d, i, True), Linear("up_proj", d, i, True), Linear("down_proj", i, d, True)]
    if vision.arch == "qwen3_vl":
        # Qwen3VLVisionBlock: qkv/proj with bias + Qwen3VLVisionMLP(linear_fc1, linear_fc2, bias=True)
        return [Linear("qkv", d, 3 * d, True), Linear("proj", d, d, True),
                Linear("linear_fc1", d, i, True), Linear("linear_fc2", i, d, True)]
    if vision.arch in ("clip", "siglip", "idefics3"):
        # CLIPEncoderLayer / SiglipEncoderLayer / Idefics3EncoderLayer: q/k/v/out_proj and fc1/fc2, all with bias
        return [Linear("q_proj", d, d, True), Linear("k_proj", d, d, True), Linear("v_proj", d, d, True),
                Linear("out_proj", d, d, True), Linear("fc1", d, i, True), Linear("fc2", i, d, True)]
    if vision.arch == "intern_vit":
        # InternVLVisionLayer (models/internvl/modeling_internvl.py): q/k/v (bias = qkv_bias), projection_layer, fc1/fc2
        return [Linear("q_proj", d, d, vision.qkv_bias), Linear("k_proj", d, d, vision.qkv_bias),
                Linear("v_proj", d, d, vision.qkv_bias), Linear("projection_layer", d, d, True),
                Linear("fc1", d, i, True), Linear("fc2", i, d, True)]
    if vision.arch == "pixtral":
        # PixtralAttentionLayer: q/k/v/o_proj without bias + PixtralMLP gate/up/down without bias
        return [Linear("q_proj", d, d, False), Linear("k_proj", d, d, False), Linear("v_proj", d, d, False),
                Linear("o_proj", d, d, False), Linear("gate_proj", d, i, False), Linear("up_proj", d, i, False),
                Linear("down_proj", i, d, False)]
    if vision.arch == "mllama":
        # MllamaVisionEncoderLayer: q/k/v/o_proj without bias + MllamaVisionMLP fc1/fc2 with bias
        return [Linear("q_proj", d, d, False), Linear("k_proj", d, d, False), Linear("v_proj", d, d, False),
                Linear("o_proj", d, d, False), Linear("fc1", d, i, True), Linear("fc2", i, d, True)]
    raise VlplanError(f"no vision layer inventory for arch {vision.arch!r}")


def vision_layer_other_params(vision: VisionSpec) -> int:
    d = vision.hidden_size
    other = 2 * _norm_params(vision.norm, d)  # the two per-layer norms (layer_norm1/2, norm1/2, attention/ffn_norm)
    if vision.qk_norm:
        other += 2 * d  # InternViT-6B q_norm/k_norm (RMSNorm over the full width)
    if vision.layer_scale:
        other += 2 * d  # InternViT lambda_1, lambda_2
    return other


def _siglip_head(vision: VisionSpec) -> tuple[list[Linear], int]:
    """SiglipMultiheadAttentionPoolingHead (models/siglip/modeling_siglip.py), built when vision_use_head is true."""
    d, i = vision.hidden_size, vision.intermediate_size
    # nn.MultiheadAttention: in_proj_weight/bias are plain parameters, out_proj is an nn.Linear subclass
    linears = [Linear("out_proj", d, d, True), Linear("fc1", d, i, True), Linear("fc2", i, d, True)]
    other = d + 3 * d * d + 3 * d + 2 * d  # probe, in_proj weight + bias, layernorm
    return linears, other


def vision_inventory(vision: VisionSpec) -> Inventory:
    layer = vision_layer_linears(vision)
    layers = vision.num_layers + vision.num_global_layers
    linears = list(_times(layer, layers))
    other = layers * vision_layer_other_params(vision)
    d, p = vision.hidden_size, vision.patch_size
    if vision.arch in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        other += vision.in_channels * vision.temporal_patch_size * p * p * d  # Conv3d patch_embed, no bias
        if vision.arch == "qwen3_vl":
            other += d  # the Conv3d has a bias in Qwen3-VL
            other += vision.num_position_embeddings * d  # learned pos_embed (nn.Embedding)
            # DeepStack mergers (Qwen3VLVisionPatchMerger, use_postshuffle_norm=True): LayerNorm over the merged
            # width, then linear_fc1 / GELU / linear_fc2. Counted with the VISION component: they live under
            # model.visual.deepstack_merger_list and LLaMA-Factory's composite registration lists them with the
            # vision tower keys, so freezing the vision tower freezes them.
            merged = d * vision.spatial_merge_size**2
            n = len(vision.deepstack_visual_indexes)
            if n:
                linears += [Linear("linear_fc1", merged, merged, True, n),
                            Linear("linear_fc2", merged, vision.out_hidden_size, True, n)]
                other += n * _norm_params("layernorm", merged)
    elif vision.arch == "clip":
        other += vision.in_channels * p * p * d  # Conv2d patch_embedding, no bias
        other += d  # class_embedding
        other += ((vision.image_size // p) ** 2 + 1) * d  # position_embedding
        other += 2 * _norm_params("layernorm", d)  # pre_layrnorm, post_layernorm
    elif vision.arch in ("siglip", "idefics3"):
        # SiglipVisionEmbeddings / Idefics3VisionEmbeddings (MiniCPM-V's NaViT SigLIP is the same module set)
        other += vision.in_channels * p * p * d + d  # Conv2d patch_embedding with bias
        other += (vision.image_size // p) ** 2 * d  # position_embedding
        other += _norm_params("layernorm", d)  # post_layernorm
        if vision.use_head:
            head_linears, head_other = _siglip_head(vision)
            linears += head_linears
            other += head_other
    elif vision.arch == "intern_vit":
        # InternVLVisionEmbeddings (models/internvl/modeling_internvl.py)
        other += vision.in_channels * p * p * d + d  # patch_embeddings Conv2d with bias
        other += d  # cls_token
        other += ((vision.image_size // p) ** 2 + 1) * d  # position_embeddings
        if vision.post_layernorm:
            other += _norm_params("layernorm", d)  # InternVLVisionModel.layernorm unless use_mean_pooling
    elif vision.arch == "pixtral":
        other += vision.in_channels * p * p * d  # patch_conv, no bias
        other += d  # ln_pre RMSNorm
    elif vision.arch == "mllama":
        # MllamaVisionModel (models/mllama/modeling_mllama.py)
        patches = (vision.image_size // p) ** 2 + 1  # per tile, with the class token
        aspect_rows = vision.num_aspect_ratios + 1  # nn.Embedding(max_aspect_ratio_id + 1, ...)
        other += vision.in_channels * p * p * d  # patch_embedding Conv2d, no bias
        other += d  # class_embedding
        # gated_positional_embedding: gate, embedding (patches, d), tile_embedding (rows, tiles * patches * d)
        other += 1 + patches * d + aspect_rows * vision.max_num_tiles * patches * d
        # pre_tile_positional_embedding and post_tile_positional_embedding: gate + (rows, tiles * d) each
        other += 2 * (1 + aspect_rows * vision.max_num_tiles * d)
        other += 2 * _norm_params("layernorm", d)  # layernorm_pre, layernorm_post
        other += 2 * vision.num_global_layers  # gate_attn, gate_ffn of each global layer
    else:
        raise VlplanError(f"no vision embedding inventory for arch {vision.arch!r}")
    return Inventory(tuple(linears), other, 0, tuple(layer))


# Projectors --------------------------------------------------------------------------------------------------------


def projector_inventory(projector: ProjectorSpec, vision: VisionSpec) -> Inventory:
    arch, bias = projector.arch, projector.bias
    inp, out = projector.in_features, projector.out_features
    if arch in ("qwen_merger", "qwen3_merger"):
        # Qwen2-VL PatchMerger (ln_q, mlp.0, GELU, mlp.2) / Qwen3VLVisionPatchMerger (norm, linear_fc1, linear_fc2):
        # the norm runs over the vision width before the 2x2 concat
        names = ("0", "2") if arch == "qwen_merger" else ("linear_fc1", "linear_fc2")
        norm = _norm_params(projector.norm, vision.hidden_size)
        linears = (Linear(names[0], inp, inp, True), Linear(names[1], inp, out, True))
        return Inventory(linears, norm, 0, linears)
    if arch == "mlp2x_gelu":
        # LlavaMultiModalProjector: linear_1, act, linear_2 (bias = multimodal_projector_bias)
        linears = (Linear("linear_1", inp, out, bias), Linear("linear_2", out, out, bias))
        return Inventory(linears, 0, 0, linears)
    if arch == "internvl_mlp":
        # InternVLMultiModalProjector: layer_norm over the pixel-shuffled width, linear_1, GELU, linear_2
        linears = (Linear("linear_1", inp, out, True), Linear("linear_2", out, out, True))
        return Inventory(linears, _norm_params("layernorm", inp), 0, linears)
    if arch == "gemma3":
        # Gemma3MultiModalProjector: avg-pool, mm_soft_emb_norm (RMSNorm over the vision width), then a matmul with
        # mm_input_projection_weight, a plain nn.Parameter (not an nn.Linear: LoRA cannot target it)
        return Inventory((), inp * out + _norm_params("rmsnorm", inp), 0, ())
    if arch == "linear":
        # PaliGemmaMultiModalProjector.linear (vision width -> projection_dim, with bias)
        linears = (Linear("linear", inp, out, True),)
        return Inventory(linears, 0, 0, linears)
    if arch == "mllama_linear":
        # MllamaModel.multi_modal_projector is itself the nn.Linear(vision_output_dim, text hidden, bias=True)
        linears = (Linear("multi_modal_projector", inp, out, True),)
        return Inventory(linears, 0, 0, linears)
    if arch == "idefics3":
        # Idefics3Connector: pixel shuffle by scale_factor, then modality_projection.proj without bias
        linears = (Linear("proj", inp, out, False),)
        return Inventory(linears, 0, 0, linears)
    if arch == "resampler":
        # MiniCPM-V 2.6 resampler.py Resampler: query, kv_proj (no bias), nn.MultiheadAttention (in_proj weight and
        # bias are plain parameters, out_proj an nn.Linear subclass), ln_q/ln_kv/ln_post, proj (a plain parameter)
        linears = [Linear("out_proj", out, out, True)]
        if inp != out:
            linears.insert(0, Linear("kv_proj", inp, out, False))
        other = projector.num_queries * out + 3 * out * out + 3 * out + 3 * _norm_params("layernorm", out) + out * out
        return Inventory(tuple(linears), other, 0, tuple(linears))
    if arch == "phi3v":
        # Phi3ImageEmbedding (remote image_embedding_phi3_v.py): glb_GN and sub_GN separators over the 2x2-merged
        # width, img_projection = Sequential(Linear(4*1024, H), GELU, Linear(H, H))
        linears = (Linear("0", inp, out, True), Linear("2", out, out, True))
        return Inventory(linears, 2 * inp, 0, linears)
    raise VlplanError(f"no projector inventory for arch {arch!r}")


# Whole model -------------------------------------------------------------------------------------------------------


def model_inventory(spec: ModelSpec) -> dict[str, Inventory]:
    """Inventories per component. Family-specific extras (e.g. LLaVA-NeXT's image_newline) are added here. Memoized
    on the spec object itself (a frozen dataclass: hashing a whole spec per lookup would cost more than the
    inventory); setups derived with `dataclasses.replace` share their spec."""
    hit = _INVENTORIES.get(id(spec))
    if hit is not None and hit[0] is spec:
        return dict(hit[1])
    inventories = _model_inventory(spec)
    if len(_INVENTORIES) >= 256:
        _INVENTORIES.clear()
    _INVENTORIES[id(spec)] = (spec, inventories)  # the spec is kept alive, so its id is not reused meanwhile
    return dict(inventories)


_INVENTORIES: dict[int, tuple[ModelSpec, dict[str, Inventory]]] = {}


def _model_inventory(spec: ModelSpec) -> dict[str, Inventory]:
    vision = vision_inventory(spec.vision)
    projector = projector_inventory(spec.projector, spec.vision)
    language = text_inventory(spec.text)
    if spec.family == "llava_next":
        # LlavaNextModel.image_newline: one learned vector of the LM width, counted with the projector
        projector = Inventory(projector.linears, projector.other_params + spec.text.hidden_size, 0,
                              projector.layer_linears)
    return {VISION: vision, PROJECTOR: projector, LANGUAGE: language}


def param_counts(spec: ModelSpec) -> dict[str, int]:
    counts = {name: inv.params for name, inv in model_inventory(spec).items()}
    counts["total"] = sum(counts.values())
    return counts


# Where each component lives in the transformers model (module-name prefixes, most specific first), from each family's
# config.py (`COMPONENT_PREFIXES`), read on first use (a family config.py imports this module). The profiler uses these
# to freeze components and to attribute parameters; tests use them to count parameters per component.
class _ComponentPrefixes(Mapping):
    """model_type -> ((module-name prefix, component), ...), gathered from the family registry on first access."""

    @cached_property
    def _table(self) -> dict[str, tuple[tuple[str, str], ...]]:
        from .families import FAMILIES, part

        return {model_type: part(model_type, "config").COMPONENT_PREFIXES[model_type]
                for family in FAMILIES for model_type in family.model_types}

    def __getitem__(self, model_type: str) -> tuple[tuple[str, str], ...]:
        return self._table[model_type]

    def __iter__(self):
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


HF_COMPONENT_PREFIXES: Mapping[str, tuple[tuple[str, str], ...]] = _ComponentPrefixes()


def component_of(family: str, module_name: str) -> str:
    """The component (vision / projector / language) a transformers parameter or module name belongs to."""
    for prefix, component in HF_COMPONENT_PREFIXES[family]:
        if module_name == prefix or module_name.startswith(prefix + "."):
            return component
    raise VlplanError(f"{module_name!r} belongs to no known component of a {family} model")
