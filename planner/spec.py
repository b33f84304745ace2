"""Model specs: the architecture numbers of a vision-language model, as data.

A `ModelSpec` describes the three components that train differently (vision tower, projector, language model)
separately, plus the image processor's limits. Specs are frozen dataclasses; the registry (`registry/`) holds
literal entries, each preceded by the URL of the config it came from (planner/families/<family>/specs.py);
`registry.resolve` resolves registry names and hub ids, `ModelSpec.from_hf_config` reads a local `config.json` (or
model directory) without transformers.

The fields that select code (`arch`, `mlp`, `norm`) are typed choices: a value outside the `Literal` is refused at
construction, so no consumer reads an unknown value as some default (an unknown vision norm was once read as RMSNorm).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args

from .errors import VlplanError

from .families import MODEL_TYPES as FAMILIES  # the transformers model_types of the registered families

# The decoder-layer code of the language model (see TextSpec)
TextArch = Literal["qwen2", "qwen3", "qwen3_moe", "llama", "mistral", "gemma2", "gemma3", "mllama", "phi3"]
TextMlp = Literal["gated_silu", "gated_gelu_tanh"]
# The vision encoder code (see VisionSpec)
VisionArch = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "clip", "siglip", "idefics3", "intern_vit", "pixtral",
                     "mllama"]
VisionMlp = Literal["gelu", "quick_gelu", "gelu_tanh", "gated_silu"]
Norm = Literal["layernorm", "rmsnorm"]
# The connector code (see ProjectorSpec)
ProjectorArch = Literal["qwen_merger", "qwen3_merger", "mlp2x_gelu", "internvl_mlp", "gemma3", "linear",
                        "mllama_linear", "idefics3", "resampler", "phi3v"]
ProjectorNorm = Literal["", "layernorm", "rmsnorm"]


def check_choices(spec, where: str, **fields) -> None:
    """Refuse a field whose value is not one of its `Literal` choices (`fields`: name -> the Literal type)."""
    for name, choices in fields.items():
        value, allowed = getattr(spec, name), get_args(choices)
        if value not in allowed:
            raise VlplanError(f"{where}.{name} {value!r} is not a modelled choice; use one of "
                              f"{', '.join(repr(a) for a in allowed)}")


@dataclass(frozen=True)
class TextSpec:
    """The language model (decoder) of a VLM.

    `arch` names the decoder-layer code whose memory we model: "qwen2" (Qwen2/2.5: qkv bias), "qwen3" (q/k RMSNorm,
    no bias), "qwen3_moe", "llama" (also Vicuna, InternLM-free LLaMA clones), "mistral" (LLaMA layers, written back
    as a MistralConfig), "gemma2", "gemma3" (extra pre/post feed-forward norms, gelu-tanh gated MLP, q/k norm),
    "mllama" (self-attention plus cross-attention layers), "phi3" (fused qkv and gate_up projections). MiniCPM-V's
    Qwen2 is "qwen2".
    """

    arch: TextArch
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    mlp: TextMlp = "gated_silu"
    norm: Literal["rmsnorm"] = "rmsnorm"  # every modelled language model; a LayerNorm LM would need its own terms
    qkv_bias: bool = False
    qk_norm: bool = False
    # Mixture of experts (Qwen3-VL-MoE): every layer's MLP is `num_experts` experts of `moe_intermediate_size`
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    # Sliding-window layers (Gemma 3): None means every layer attends to the whole sequence
    sliding_window: int | None = None
    sliding_window_pattern: int = 0  # every N-th layer is global (Gemma 3: 6), 0: no sliding layers
    # Mllama: indexes of the cross-attention layers among `num_layers`
    cross_attention_layers: tuple[int, ...] = ()
    # Rows of the embedding beyond `vocab_size` (Mllama adds 8)
    extra_embedding_rows: int = 0

    def __post_init__(self) -> None:
        check_choices(self, "text", arch=TextArch, mlp=TextMlp, norm=Literal["rmsnorm"])
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                     "vocab_size"):
            if getattr(self, name) <= 0:
                raise VlplanError(f"text.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise VlplanError(
                f"text.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.num_experts and (self.num_experts_per_tok <= 0 or self.moe_intermediate_size <= 0):
            raise VlplanError("a MoE text spec needs num_experts_per_tok and moe_intermediate_size")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


@dataclass(frozen=True)
class VisionSpec:
    """The vision encoder.

    `arch` names the encoder code: "qwen2_vl" (LayerNorm, QuickGELU MLP, full attention per image), "qwen2_5_vl"
    (RMSNorm, gated SiLU MLP, windowed attention except `fullatt_block_indexes`), "qwen3_vl" (LayerNorm, gelu-tanh
    MLP, learned position embedding, DeepStack mergers), "clip" (CLIP ViT with CLS token and pre-LayerNorm),
    "siglip" (SigLIP ViT, no CLS), "idefics3" (the same SigLIP modules in Idefics3/SmolVLM), "intern_vit" (InternViT
    with layer scale), "pixtral" (RMSNorm, gated SiLU MLP, 2D RoPE), "mllama" (local + global tiled ViT).
    """

    arch: VisionArch
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    patch_size: int
    in_channels: int = 3
    image_size: int = 0  # fixed input resolution (CLIP 336, SigLIP 384/896); 0 for native-resolution encoders
    temporal_patch_size: int = 1
    spatial_merge_size: int = 1
    mlp: VisionMlp = "gelu"
    norm: Norm = "layernorm"
    qkv_bias: bool = True
    # Qwen2.5-VL windowed attention
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()
    # Qwen3-VL
    num_position_embeddings: int = 0
    deepstack_visual_indexes: tuple[int, ...] = ()
    # Layers actually run for the features the projector reads (LLaVA's vision_feature_layer -2 runs all layers but
    # only uses the second to last; transformers still runs every layer).
    feature_layers: tuple[int, ...] = ()
    # Mllama: global (gated) layers after the local ones
    num_global_layers: int = 0
    # InternViT: the 6B variant uses RMSNorm and qk-norm
    qk_norm: bool = False
    layer_scale: bool = False
    has_cls_token: bool = False
    pre_layernorm: bool = False
    post_layernorm: bool = False
    # Qwen3-VL: the LM width the DeepStack mergers project to (vision_config.out_hidden_size)
    out_hidden_size: int = 0
    # SigLIP attention-pooling head (vision_use_head); every VLM here builds its SigLIP without it
    use_head: bool = False
    # Mllama: tiles per image, supported aspect ratios (rows of the tile embeddings minus one) and the local layers
    # whose outputs are concatenated to the final one (vision_output_dim = hidden * (1 + len(...)))
    max_num_tiles: int = 0
    num_aspect_ratios: int = 0
    intermediate_layers_indices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_choices(self, "vision", arch=VisionArch, mlp=VisionMlp, norm=Norm)
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "patch_size"):
            if getattr(self, name) <= 0:
                raise VlplanError(f"vision.{name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ProjectorSpec:
    """The connector from vision features to language-model embeddings.

    `arch`: "qwen_merger" (LayerNorm or RMSNorm, 2x2 concat, Linear-GELU-Linear), "qwen3_merger" (the same with
    linear_fc1/linear_fc2 names), "mlp2x_gelu" (LLaVA: Linear-GELU-Linear), "internvl_mlp" (pixel shuffle, LayerNorm,
    Linear-GELU-Linear), "gemma3" (avg-pool, RMSNorm, matmul with a plain weight), "linear" (PaliGemma),
    "mllama_linear" (Mllama: one Linear named multi_modal_projector), "idefics3" (pixel shuffle, Linear),
    "resampler" (MiniCPM-V perceiver), "phi3v" (HD transform, Linear-GELU-Linear).
    """

    arch: ProjectorArch
    in_features: int
    out_features: int
    hidden_features: int = 0
    bias: bool = True
    norm: ProjectorNorm = ""  # "": no norm
    pixel_shuffle: int = 1  # spatial merge factor applied before the projector (2 for 2x2)
    num_queries: int = 0  # resampler
    num_heads: int = 0  # resampler

    def __post_init__(self) -> None:
        check_choices(self, "projector", arch=ProjectorArch, norm=ProjectorNorm)


@dataclass(frozen=True)
class ProcessorSpec:
    """The checkpoint image processor's limits (its preprocessor_config.json, not the transformers class defaults).

    `rule` selects the image-to-token rule in `tokens.py`: "qwen_smart_resize", "fixed" (one fixed-size view),
    "llava_next_anyres", "internvl_tiles", "gemma3", "mllama_tiles", "idefics3_tiles", "pixtral", "minicpmv_slices",
    "phi3v_crops".
    """

    rule: str
    patch_size: int
    merge_size: int = 1
    min_pixels: int = 0
    max_pixels: int = 0
    image_size: int = 0  # fixed view / tile side
    tokens_per_view: int = 0  # LLM tokens per fixed view or tile
    max_tiles: int = 0
    min_tiles: int = 1
    use_thumbnail: bool = False
    crop_to_patches: bool = False
    pinpoints: tuple[tuple[int, int], ...] = ()
    longest_edge: int = 0
    do_pan_and_scan: bool = False
    # Gemma 3 pan & scan (Gemma3ImageProcessor call defaults): crops no smaller than this, only above this aspect ratio
    pan_and_scan_min_crop_size: int = 0
    pan_and_scan_min_ratio: float = 0.0
    # special text tokens the chat template puts around each image (vision_start/end, <img></img>, ...)
    special_tokens_per_image: int = 0


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    hf_id: str
    source_url: str
    vision: VisionSpec
    projector: ProjectorSpec
    text: TextSpec
    processor: ProcessorSpec
    dtype: str = "bfloat16"
    aliases: tuple[str, ...] = ()
    # Which numbers were not confirmed from the model's own official config.json / preprocessor_config.json, or from
    # an exact copy of it whose numbers match in full, and why (empty: every architecture number is confirmed; the
    # source is the comment before the registry entry). Shown by `vlplan models`; `unverified_warning` turns it into
    # the warning estimate/plan/trace print.
    unverified: str = ""
    # The transformers class that builds it ("" for remote-code families, which the tests cannot instantiate)
    hf_class: str = ""
    # Token ids the synthetic batches and the runner need
    image_token_id: int = 0
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise VlplanError(f"unknown family {self.family!r}; known: {', '.join(FAMILIES)}")

    # Constructors (a registry name or hub id: `registry.resolve`) ------------------------------------------------
    @classmethod
    def from_hf_config(cls, path: str | Path) -> "ModelSpec":
        from .hf_config import spec_from_hf_config

        return spec_from_hf_config(path)

    def with_text_layers(self, num_layers: int) -> "ModelSpec":
        return replace(self, text=replace(self.text, num_layers=num_layers))


def unverified_warning(spec: ModelSpec) -> str | None:
    """A one-line warning naming what is unverified about `spec`'s architecture numbers, or None when it is verified.

    Registry entries carry `unverified` when some number was not confirmed from the model's own config.json (a gated
    file read only through derivatives, a value taken from a sibling model, ...). A spec read from a local config.json
    has its numbers from that file; the remote-code readers (MiniCPM-V, Phi-3-vision) keep their registry entry's
    note, which is about their analytic module inventory as much as about numbers.
    """
    note = " ".join(spec.unverified.split())
    if not note:
        return None
    # A registry entry cites a URL; a spec read from a local file carries that file's path
    advice = ("check them against the model's config.json or pass --model <local config.json>"
              if spec.source_url.startswith(("http://", "https://")) else
              f"the rest comes from {spec.source_url}")
    return f"{spec.name}: some architecture numbers are unverified ({note}); {advice}"
