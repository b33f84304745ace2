"""LLaVA-1.5 and LLaVA-style models (model_type `llava`): a CLIP (or Pixtral) vision tower, a 2-layer GELU MLP
projector and a LLaMA-family language model (models/llava/modeling_llava.py).

llava-hf configs omit every value equal to the LlamaConfig / CLIPVisionConfig class defaults, so the text numbers
of llava-1.5-7b are LlamaConfig's defaults (4096/11008/32 layers/32 heads).

Pixtral-12B (mistral-community/pixtral-12b) is a `llava` config with a `pixtral` vision tower (RMSNorm, gated MLP,
2D RoPE, patch 16, native resolution up to 1024 px on the longest edge; models/pixtral/modeling_pixtral.py), the same
2-layer projector, vision_feature_layer -1 with strategy "full", and a Mistral-NeMo language model.
"""

from ...spec import ModelSpec, ProcessorSpec, ProjectorSpec, TextSpec, VisionSpec

# CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336): 24 layers, 1024 wide, QuickGELU
CLIP_VIT_L_336 = VisionSpec(
    arch="clip", num_layers=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=14,
    image_size=336, mlp="quick_gelu", norm="layernorm", has_cls_token=True, pre_layernorm=True,
    post_layernorm=True, feature_layers=(-2,),
)
CLIP_336_PROCESSOR = ProcessorSpec(
    rule="fixed", patch_size=14, image_size=336, tokens_per_view=576,  # 24x24 patches, CLS dropped ("default")
)
# Pixtral-ViT of Pixtral-12B (PixtralVisionConfig defaults plus the checkpoint's patch 16 / image 1024)
PIXTRAL_VISION = VisionSpec(
    arch="pixtral", num_layers=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
    image_size=1024, mlp="gated_silu", norm="rmsnorm", qkv_bias=False, feature_layers=(-1,),
)
# PixtralImageProcessor: longest edge 1024, patch 16; rows of [IMG] tokens each closed by [IMG_BREAK] / [IMG_END]
PIXTRAL_PROCESSOR = ProcessorSpec(rule="pixtral", patch_size=16, image_size=1024, longest_edge=1024)


def _llava_text(*, hidden, inter, layers, heads, kv, vocab, max_pos, arch="llama", head_dim=0):
    return TextSpec(arch=arch, num_layers=layers, hidden_size=hidden, intermediate_size=inter, num_heads=heads,
                    num_kv_heads=kv, head_dim=head_dim or hidden // heads, vocab_size=vocab,
                    tie_word_embeddings=False, max_position_embeddings=max_pos)


def _llava(name, hf_id, url, text, *, image_token_id, dtype="float16", unverified="", aliases=(),
           vision=CLIP_VIT_L_336, processor=CLIP_336_PROCESSOR):
    return ModelSpec(
        name=name, family="llava", hf_id=hf_id, source_url=url, hf_class="LlavaForConditionalGeneration",
        vision=vision,
        projector=ProjectorSpec(arch="mlp2x_gelu", in_features=vision.hidden_size, hidden_features=text.hidden_size,
                                out_features=text.hidden_size),
        text=text, processor=processor, image_token_id=image_token_id, dtype=dtype,
        unverified=unverified, aliases=aliases,
    )


SPECS = [
    # https://huggingface.co/llava-hf/llava-1.5-7b-hf/blob/main/config.json
    _llava("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf",
           "https://huggingface.co/llava-hf/llava-1.5-7b-hf/blob/main/config.json",
           _llava_text(hidden=4096, inter=11008, layers=32, heads=32, kv=32, vocab=32064, max_pos=4096),
           image_token_id=32000, aliases=("liuhaotian/llava-v1.5-7b",)),
    # https://huggingface.co/llava-hf/llava-1.5-13b-hf/blob/main/config.json
    _llava("llava-1.5-13b", "llava-hf/llava-1.5-13b-hf",
           "https://huggingface.co/llava-hf/llava-1.5-13b-hf/blob/main/config.json",
           _llava_text(hidden=5120, inter=13824, layers=40, heads=40, kv=40, vocab=32064, max_pos=4096),
           image_token_id=32000, aliases=("liuhaotian/llava-v1.5-13b",)),
    # https://huggingface.co/xtuner/llava-llama-3-8b-v1_1-transformers/blob/main/config.json, read through a fine-tune
    # saved from it, https://huggingface.co/asadfgglie/banban-vision-8b-v1-pretrain-zh/blame/
    # 6718488a8c1f835d2ac41912bbd996ba89a62401/config.json (_name_or_path xtuner/llava-llama-3-8b-v1_1-transformers:
    # text 14336 / 8 kv / max_position_embeddings 8192 / vocab 128320, image token 128257, gelu projector, CLIP
    # ViT-L/14-336); hidden 4096, 32 layers and 32 heads are LlamaConfig defaults the file omits.
    # Llama-3-8B-Instruct with the vocabulary padded to 128320 rows (128256 + added tokens, multiple of 64);
    # <image> is 128257, <pad> 128258. Not the older xtuner/llava-llama-3-8b-v1_1-hf (vocab 128256, silu projector).
    _llava("llava-llama-3-8b", "xtuner/llava-llama-3-8b-v1_1-transformers",
           "https://huggingface.co/xtuner/llava-llama-3-8b-v1_1-transformers/blob/main/config.json",
           _llava_text(hidden=4096, inter=14336, layers=32, heads=32, kv=8, vocab=128320, max_pos=8192),
           image_token_id=128257, aliases=("xtuner/llava-llama-3-8b-v1_1",),
           unverified="config.json read through fine-tunes saved from this checkpoint, not the file itself "
                      "(the official repo's config.json was not in any corpus searched)"),
    # https://huggingface.co/mistral-community/pixtral-12b/blob/main/config.json: the repo's own commit
    # https://huggingface.co/mistral-community/pixtral-12b/commit/cb1ea9faf3f6cdbc4984b9f3c2268dc5a9f134a6 shows text
    # 5120 / 14336 / 40 layers / vocab 131072 / max_position_embeddings 1024000 and vision patch 16 / 1024 px; the
    # mlx-community conversion https://huggingface.co/mlx-community/pixtral-12b-8bit/blob/
    # 79e24b66302d4ac5e75491767f8914b2aa6ac1f8/config.json shows the whole file (head_dim 128, 8 kv, image token 10,
    # vision head_dim 64 and intermediate 4096), and HF's copy
    # https://huggingface.co/varb15/hf-internal-testing-pixtral-12b/blob/c4f9e1170af0f46f9be34fcc9a46d27edf63bd79/
    # config.json writes the 32 heads out. The vision depth 24 and width 1024 are the PixtralVisionConfig defaults the
    # file relies on. Processor:
    # https://huggingface.co/mlx-community/pixtral-12b-8bit/blame/main/preprocessor_config.json
    # (size.longest_edge 1024, patch 16), the same as HF's fixture hf-internal-testing/tiny-processor-pixtral.
    _llava("pixtral-12b", "mistral-community/pixtral-12b",
           "https://huggingface.co/mistral-community/pixtral-12b/blob/main/config.json",
           _llava_text(hidden=5120, inter=14336, layers=40, heads=32, kv=8, vocab=131072, max_pos=1024000,
                       arch="mistral", head_dim=128),
           image_token_id=10, dtype="bfloat16", vision=PIXTRAL_VISION, processor=PIXTRAL_PROCESSOR,
           aliases=("mistralai/Pixtral-12B-2409",)),
]
