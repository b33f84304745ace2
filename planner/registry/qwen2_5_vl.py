"""Qwen2.5-VL (model_type `qwen2_5_vl`): a windowed-attention ViT shared by every size, Qwen2.5 language models.

Vision: 32 blocks, hidden 1280, gated SiLU MLP of 3420, RMSNorm, patch 14, temporal 2, merge 2, window 112 px
(8x8 patches) except the full-attention blocks 7, 15, 23, 31 (models/qwen2_5_vl/modeling_qwen2_5_vl.py).
"""

from ..spec import ModelSpec, ProjectorSpec, TextSpec, VisionSpec
from .qwen2_vl import QWEN2_VL_PROCESSOR

QWEN2_5_VL_VISION = VisionSpec(
    arch="qwen2_5_vl", num_layers=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
    temporal_patch_size=2, spatial_merge_size=2, mlp="gated_silu", norm="rmsnorm", window_size=112,
    fullatt_block_indexes=(7, 15, 23, 31),
)


def _qwen2_5_vl(name, hf_id, url, *, hidden, inter, layers, heads, kv, vocab, tie, unverified=""):
    return ModelSpec(
        name=name, family="qwen2_5_vl", hf_id=hf_id, source_url=url, hf_class="Qwen2_5_VLForConditionalGeneration",
        vision=QWEN2_5_VL_VISION,
        projector=ProjectorSpec(arch="qwen_merger", in_features=1280 * 4, hidden_features=1280 * 4,
                                out_features=hidden, norm="rmsnorm", pixel_shuffle=2),
        text=TextSpec(arch="qwen2", num_layers=layers, hidden_size=hidden, intermediate_size=inter, num_heads=heads,
                      num_kv_heads=kv, head_dim=hidden // heads, vocab_size=vocab, tie_word_embeddings=tie,
                      max_position_embeddings=128000, qkv_bias=True),
        processor=QWEN2_VL_PROCESSOR, image_token_id=151655, unverified=unverified,
    )


SPECS = [
    # https://huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct/blob/main/config.json
    _qwen2_5_vl("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct",
                "https://huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct/blob/main/config.json",
                hidden=2048, inter=11008, layers=36, heads=16, kv=2, vocab=151936, tie=True),
    # https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/config.json
    _qwen2_5_vl("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct",
                "https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/config.json",
                hidden=3584, inter=18944, layers=28, heads=28, kv=4, vocab=152064, tie=False),
    # https://huggingface.co/Qwen/Qwen2.5-VL-32B-Instruct/blob/main/config.json
    _qwen2_5_vl("qwen2.5-vl-32b", "Qwen/Qwen2.5-VL-32B-Instruct",
                "https://huggingface.co/Qwen/Qwen2.5-VL-32B-Instruct/blob/main/config.json",
                hidden=5120, inter=27648, layers=64, heads=40, kv=8, vocab=152064, tie=False,
                unverified="language-model numbers taken from Qwen2.5-32B (not read from the VL config)"),
    # https://huggingface.co/Qwen/Qwen2.5-VL-72B-Instruct/blob/main/config.json
    _qwen2_5_vl("qwen2.5-vl-72b", "Qwen/Qwen2.5-VL-72B-Instruct",
                "https://huggingface.co/Qwen/Qwen2.5-VL-72B-Instruct/blob/main/config.json",
                hidden=8192, inter=29568, layers=80, heads=64, kv=8, vocab=152064, tie=False,
                unverified="language-model numbers taken from Qwen2-72B (not read from the VL config)"),
]
