"""Qwen2-VL (model_type `qwen2_vl`): one ViT for every size, Qwen2 language models.

Vision: 32 blocks, embed 1280, MLP ratio 4 with QuickGELU, LayerNorm, patch 14, temporal patch 2, merge 2, full
attention within each image (transformers models/qwen2_vl/modeling_qwen2_vl.py). Processor limits: the checkpoints'
preprocessor_config.json (min_pixels 3136, max_pixels 12845056), not the class defaults (max 1003520).
"""

from ...spec import ModelSpec, ProcessorSpec, ProjectorSpec, TextSpec, VisionSpec

QWEN2_VL_VISION = VisionSpec(
    arch="qwen2_vl", num_layers=32, hidden_size=1280, intermediate_size=5120, num_heads=16, patch_size=14,
    temporal_patch_size=2, spatial_merge_size=2, mlp="quick_gelu", norm="layernorm",
)
QWEN2_VL_PROCESSOR = ProcessorSpec(
    rule="qwen_smart_resize", patch_size=14, merge_size=2, min_pixels=3136, max_pixels=12845056,
    special_tokens_per_image=2,  # <|vision_start|> ... <|vision_end|>
)


def _qwen2_vl(name, hf_id, url, *, hidden, inter, layers, heads, kv, vocab, tie, unverified=""):
    return ModelSpec(
        name=name, family="qwen2_vl", hf_id=hf_id, source_url=url, hf_class="Qwen2VLForConditionalGeneration",
        vision=QWEN2_VL_VISION,
        projector=ProjectorSpec(arch="qwen_merger", in_features=1280 * 4, hidden_features=1280 * 4,
                                out_features=hidden, norm="layernorm", pixel_shuffle=2),
        text=TextSpec(arch="qwen2", num_layers=layers, hidden_size=hidden, intermediate_size=inter, num_heads=heads,
                      num_kv_heads=kv, head_dim=hidden // heads, vocab_size=vocab, tie_word_embeddings=tie,
                      max_position_embeddings=32768, qkv_bias=True),
        processor=QWEN2_VL_PROCESSOR, image_token_id=151655, unverified=unverified,
    )


SPECS = [
    # https://huggingface.co/Qwen/Qwen2-VL-2B-Instruct/blob/main/config.json
    _qwen2_vl("qwen2-vl-2b", "Qwen/Qwen2-VL-2B-Instruct",
              "https://huggingface.co/Qwen/Qwen2-VL-2B-Instruct/blob/main/config.json",
              hidden=1536, inter=8960, layers=28, heads=12, kv=2, vocab=151936, tie=True),
    # https://huggingface.co/Qwen/Qwen2-VL-7B-Instruct/blob/main/config.json
    _qwen2_vl("qwen2-vl-7b", "Qwen/Qwen2-VL-7B-Instruct",
              "https://huggingface.co/Qwen/Qwen2-VL-7B-Instruct/blob/main/config.json",
              hidden=3584, inter=18944, layers=28, heads=28, kv=4, vocab=152064, tie=False),
    # https://huggingface.co/Qwen/Qwen2-VL-72B-Instruct/blob/main/config.json
    _qwen2_vl("qwen2-vl-72b", "Qwen/Qwen2-VL-72B-Instruct",
              "https://huggingface.co/Qwen/Qwen2-VL-72B-Instruct/blob/main/config.json",
              hidden=8192, inter=29568, layers=80, heads=64, kv=8, vocab=152064, tie=False),
]
