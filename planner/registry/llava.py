"""LLaVA-1.5 and LLaVA-style models (model_type `llava`): a CLIP (or Pixtral) vision tower, a 2-layer GELU MLP
projector and a LLaMA-family language model (models/llava/modeling_llava.py).

llava-hf configs omit every value equal to the LlamaConfig / CLIPVisionConfig class defaults, so the text numbers
of llava-1.5-7b are LlamaConfig's defaults (4096/11008/32 layers/32 heads).
"""

from ..spec import ModelSpec, ProcessorSpec, ProjectorSpec, TextSpec, VisionSpec

# CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336): 24 layers, 1024 wide, QuickGELU
CLIP_VIT_L_336 = VisionSpec(
    arch="clip", num_layers=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=14,
    image_size=336, mlp="quick_gelu", norm="layernorm", has_cls_token=True, pre_layernorm=True,
    post_layernorm=True, feature_layers=(-2,),
)
CLIP_336_PROCESSOR = ProcessorSpec(
    rule="fixed", patch_size=14, image_size=336, tokens_per_view=576,  # 24x24 patches, CLS dropped ("default")
)


def _llava_text(*, hidden, inter, layers, heads, kv, vocab, max_pos, arch="llama"):
    return TextSpec(arch=arch, num_layers=layers, hidden_size=hidden, intermediate_size=inter, num_heads=heads,
                    num_kv_heads=kv, head_dim=hidden // heads, vocab_size=vocab, tie_word_embeddings=False,
                    max_position_embeddings=max_pos)


def _llava(name, hf_id, url, text, *, image_token_id, dtype="float16", unverified="", aliases=()):
    return ModelSpec(
        name=name, family="llava", hf_id=hf_id, source_url=url, hf_class="LlavaForConditionalGeneration",
        vision=CLIP_VIT_L_336,
        projector=ProjectorSpec(arch="mlp2x_gelu", in_features=1024, hidden_features=text.hidden_size,
                                out_features=text.hidden_size),
        text=text, processor=CLIP_336_PROCESSOR, image_token_id=image_token_id, dtype=dtype,
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
]
