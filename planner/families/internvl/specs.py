"""InternVL3 in the transformers-native format (model_type `internvl`, the OpenGVLab/InternVL3-*-hf repos):
InternViT, pixel shuffle 0.5, an MLP projector (LayerNorm, Linear, GELU, Linear) and a Qwen2.5 language model
(models/internvl/modeling_internvl.py).

InternViT-300M-448px-V2_5 (1B/2B/8B): 24 layers, 1024 wide, LayerNorm, qkv bias, layer scale. InternViT-6B-448px-V2_5
(38B): 45 layers, 3200 wide, RMSNorm, no qkv bias, q/k RMSNorm. Both keep the CLS token (dropped by the "default"
feature strategy) and mean pooling (no final LayerNorm); vision_feature_layer -1.

TRAP: transformers 5.23 `InternVLConfig.tie_word_embeddings` defaults to True at the top level, and the -hf configs
seen carry no tie key at either level, so 5.23 ties lm_head to the embeddings. The checkpoints are untied (the
original InternVL configs say `tie_word_embeddings: false`; published sizes 0.94/2.09/7.94/38.4B match untied), so
every entry here is untied and `spec_to_hf_config` writes `tie_word_embeddings: false` explicitly.

Processor: each 448x448 tile is 1024 patches -> 256 tokens after pixel shuffle, inside <img>...</img>. Up to 12 tiles
plus a thumbnail with crop_to_patches; the -hf processor (GotOcr2 image processor) and LLaMA-Factory leave
crop_to_patches off by default, so one tile per image unless it is turned on.
"""

from ...spec import ModelSpec, ProcessorSpec, ProjectorSpec, TextSpec, VisionSpec

INTERN_VIT_300M = VisionSpec(
    arch="intern_vit", num_layers=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=14,
    image_size=448, mlp="gelu", norm="layernorm", qkv_bias=True, layer_scale=True, has_cls_token=True,
    feature_layers=(-1,),
)
INTERN_VIT_6B = VisionSpec(
    arch="intern_vit", num_layers=45, hidden_size=3200, intermediate_size=12800, num_heads=25, patch_size=14,
    image_size=448, mlp="gelu", norm="rmsnorm", qkv_bias=False, qk_norm=True, layer_scale=True, has_cls_token=True,
    feature_layers=(-1,),
)
INTERNVL_PROCESSOR = ProcessorSpec(
    rule="internvl_tiles", patch_size=14, merge_size=2, image_size=448, tokens_per_view=256, max_tiles=12,
    min_tiles=1, use_thumbnail=True, crop_to_patches=False,
    special_tokens_per_image=2,  # <img> ... </img>
)
# What no InternVL3 -hf entry could confirm from its own files: the untied lm_head (the -hf config.json carries no
# tie key, so it rests on the original InternVL configs and the published sizes, see the module docstring) and the
# tile processor, read from a sibling -hf file with the same GotOcr2 processor,
# https://huggingface.co/internlm/Intern-S1-mini/blob/refs%2Fpr%2F2/preprocessor_config.json (448 x 448,
# max_patches 12, min_patches 1, crop_to_patches false)
UNVERIFIED = ("untied lm_head assumed (the -hf config.json has no tie key; the original configs and the published "
              "sizes are untied); -hf preprocessor_config.json not read (448 px tiles, max 12, from a sibling file)")


def _internvl(name, hf_id, url, *, vision, hidden, inter, layers, heads, kv, aliases, unverified):
    return ModelSpec(
        name=name, family="internvl", hf_id=hf_id, source_url=url, hf_class="InternVLForConditionalGeneration",
        vision=vision,
        projector=ProjectorSpec(arch="internvl_mlp", in_features=vision.hidden_size * 4, hidden_features=hidden,
                                out_features=hidden, norm="layernorm", pixel_shuffle=2),
        text=TextSpec(arch="qwen2", num_layers=layers, hidden_size=hidden, intermediate_size=inter, num_heads=heads,
                      num_kv_heads=kv, head_dim=hidden // heads, vocab_size=151674, tie_word_embeddings=False,
                      max_position_embeddings=32768, qkv_bias=True),
        processor=INTERNVL_PROCESSOR, image_token_id=151667, aliases=aliases, unverified=unverified,
    )


SPECS = [
    # https://huggingface.co/OpenGVLab/InternVL3-1B-hf/blob/main/config.json, read through HF's fixture
    # https://huggingface.co/hf-internal-testing/tiny-processor-internvl/blame/main/config.json (the 1B -hf file:
    # downsample_ratio 0.5, image_seq_length 256, image token 151667, text 896 / 4864 / 24 layers / 14 heads / 2 kv /
    # vocab 151674 / max_position_embeddings 32768)
    _internvl("internvl3-1b", "OpenGVLab/InternVL3-1B-hf",
              "https://huggingface.co/OpenGVLab/InternVL3-1B-hf/blob/main/config.json",
              vision=INTERN_VIT_300M, hidden=896, inter=4864, layers=24, heads=14, kv=2,
              aliases=("OpenGVLab/InternVL3-1B",),
              unverified=UNVERIFIED + "; config.json read through an HF test-fixture copy"),
    # https://huggingface.co/OpenGVLab/InternVL3-2B-hf/blob/main/config.json (Qwen2.5-1.5B language model)
    _internvl("internvl3-2b", "OpenGVLab/InternVL3-2B-hf",
              "https://huggingface.co/OpenGVLab/InternVL3-2B-hf/blob/main/config.json",
              vision=INTERN_VIT_300M, hidden=1536, inter=8960, layers=28, heads=12, kv=2,
              aliases=("OpenGVLab/InternVL3-2B",),
              unverified=UNVERIFIED + "; text numbers (Qwen2.5-1.5B shape) from a test fixture"),
    # https://huggingface.co/OpenGVLab/InternVL3-8B-hf/blob/main/config.json (Qwen2.5-7B language model)
    _internvl("internvl3-8b", "OpenGVLab/InternVL3-8B-hf",
              "https://huggingface.co/OpenGVLab/InternVL3-8B-hf/blob/main/config.json",
              vision=INTERN_VIT_300M, hidden=3584, inter=18944, layers=28, heads=28, kv=4,
              aliases=("OpenGVLab/InternVL3-8B",),
              unverified=UNVERIFIED + "; text numbers (Qwen2.5-7B shape) from MindSpeed-MM's model file"),
    # https://huggingface.co/OpenGVLab/InternVL3-38B-hf/blob/refs%2Fpr%2F2/config.json (Qwen2.5-32B language model;
    # this file names the token `image_token_index`)
    _internvl("internvl3-38b", "OpenGVLab/InternVL3-38B-hf",
              "https://huggingface.co/OpenGVLab/InternVL3-38B-hf/blob/refs%2Fpr%2F2/config.json",
              vision=INTERN_VIT_6B, hidden=5120, inter=27648, layers=64, heads=40, kv=8,
              aliases=("OpenGVLab/InternVL3-38B",), unverified=UNVERIFIED),
]
