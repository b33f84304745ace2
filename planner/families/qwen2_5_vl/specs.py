"""Qwen2.5-VL (model_type `qwen2_5_vl`): the same windowed-attention ViT in every size (but for its MLP width), Qwen2.5
language models.

Vision: 32 blocks, hidden 1280, gated SiLU MLP, RMSNorm, patch 14, temporal 2, merge 2, window 112 px (8x8 patches)
except the full-attention blocks 7, 15, 23, 31 (models/qwen2_5_vl/modeling_qwen2_5_vl.py). The MLP is 3420 wide in the
3B and 7B (the 7B config says 3420; the 3B file omits it, so the Qwen2_5_VLVisionConfig default 3420 applies) but 3456
in the 32B and 72B, whose files write `vision_config.intermediate_size: 3456` (sources before the entries; Qwen's AWQ
repacks keep the vision tower unquantized, and the 7B one has no such key while the 72B one says 3456). One tower for
every size would undercount the 32B/72B vision MLP by 32 x (3 x 36 x 1280 + 2 x 36) = 4,425,984 parameters.
"""

from dataclasses import replace

from ...spec import ModelSpec, ProjectorSpec, TextSpec, VisionSpec
from ..qwen2_vl.specs import QWEN2_VL_PROCESSOR

QWEN2_5_VL_VISION = VisionSpec(
    arch="qwen2_5_vl", num_layers=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
    temporal_patch_size=2, spatial_merge_size=2, mlp="gated_silu", norm="rmsnorm", window_size=112,
    fullatt_block_indexes=(7, 15, 23, 31),
)
# The 32B/72B tower: the same but for the MLP width (see the module docstring)
QWEN2_5_VL_VISION_3456 = replace(QWEN2_5_VL_VISION, intermediate_size=3456)


def _qwen2_5_vl(name, hf_id, url, *, hidden, inter, layers, heads, kv, vocab, tie, vision=QWEN2_5_VL_VISION,
                unverified=""):
    return ModelSpec(
        name=name, family="qwen2_5_vl", hf_id=hf_id, source_url=url, hf_class="Qwen2_5_VLForConditionalGeneration",
        vision=vision,
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
    # https://huggingface.co/Qwen/Qwen2.5-VL-32B-Instruct/blob/main/config.json, read through a public project that
    # fetched https://huggingface.co/Qwen/Qwen2.5-VL-32B-Instruct/raw/main/config.json and quotes its numbers: text
    # 5120 / 27648 / 64 layers / 40 heads / 8 kv / vocab 152064, vision hidden 1280, out 5120, MLP 3456, patch 14.
    # Not quoted there: tie_word_embeddings (false in the Qwen2.5-32B text config,
    # https://huggingface.co/Qwen/Qwen2.5-32B/blob/main/config.json) and max_position_embeddings (128000 as in the
    # 7B and 72B VL files).
    _qwen2_5_vl("qwen2.5-vl-32b", "Qwen/Qwen2.5-VL-32B-Instruct",
                "https://huggingface.co/Qwen/Qwen2.5-VL-32B-Instruct/blob/main/config.json",
                hidden=5120, inter=27648, layers=64, heads=40, kv=8, vocab=152064, tie=False,
                vision=QWEN2_5_VL_VISION_3456,
                unverified="config.json read through a third-party quotation, not the file itself; "
                           "tie_word_embeddings (false) and max_position_embeddings (128000) not in that quotation"),
    # https://huggingface.co/Qwen/Qwen2.5-VL-72B-Instruct/blob/main/config.json, read through Qwen's own AWQ repack of
    # it, https://huggingface.co/Qwen/Qwen2.5-VL-72B-Instruct-AWQ/blob/666b8f5f61eebf73e8deff3e33a0f8934038d69f/
    # config.json (_name_or_path Qwen/Qwen2.5-VL-72B-Instruct): hidden 8192, 80 layers, 64 heads, 8 kv, untied,
    # max_position_embeddings 128000, vision MLP 3456 and out 8192 (the vision tower is not quantized:
    # modules_to_not_convert ["visual"]). Its text intermediate_size 29696 is AWQ padding (29568 / 128 = 231 groups
    # rounded up to 232); 29568 is Qwen2.5-72B's and Qwen2-72B's
    # (https://huggingface.co/Qwen/Qwen2-72B-Instruct/blob/7c7b4195787f74b15d14d70a52653ca5cf0c4d75/config.json).
    _qwen2_5_vl("qwen2.5-vl-72b", "Qwen/Qwen2.5-VL-72B-Instruct",
                "https://huggingface.co/Qwen/Qwen2.5-VL-72B-Instruct/blob/main/config.json",
                hidden=8192, inter=29568, layers=80, heads=64, kv=8, vocab=152064, tie=False,
                vision=QWEN2_5_VL_VISION_3456,
                unverified="config.json read through Qwen's AWQ repack, not the bf16 file: text intermediate_size "
                           "29568 (the AWQ file pads it to 29696) and vocab 152064 taken from Qwen2.5-72B"),
]
