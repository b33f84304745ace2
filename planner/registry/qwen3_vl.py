"""Qwen3-VL dense (model_type `qwen3_vl`): a SigLIP-2-style ViT with DeepStack mergers, Qwen3 language models.

Vision: LayerNorm blocks with a gelu-tanh MLP (linear_fc1/linear_fc2), patch 16, temporal patch 2, merge 2, a learned
position embedding of 2304 entries, and DeepStack: the outputs of `deepstack_visual_indexes` go through their own
patch mergers and are added to the first language-model layers (models/qwen3_vl/modeling_qwen3_vl.py). The 4B uses a
24-block, 1024-wide ViT; the 8B and 32B the 27-block, 1152-wide one. Text: Qwen3 (q/k RMSNorm, no qkv bias,
head_dim 128), interleaved MRoPE.

Processor limits: the checkpoints' preprocessor_config.json `size` {shortest_edge 65536, longest_edge 16777216}
(min/max pixels; 16777216 = 16384 * 32**2), patch 16, merge 2.
"""

from dataclasses import replace

from ..spec import ModelSpec, ProcessorSpec, ProjectorSpec, TextSpec, VisionSpec

# The 27-block ViT of the 8B/32B/30B-A3B (also the Qwen3VLVisionConfig class defaults)
QWEN3_VL_VISION = VisionSpec(
    arch="qwen3_vl", num_layers=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
    temporal_patch_size=2, spatial_merge_size=2, mlp="gelu_tanh", norm="layernorm", num_position_embeddings=2304,
    deepstack_visual_indexes=(8, 16, 24),
)
# The 24-block ViT of the 4B
QWEN3_VL_VISION_SMALL = replace(QWEN3_VL_VISION, num_layers=24, hidden_size=1024, intermediate_size=4096,
                                deepstack_visual_indexes=(5, 11, 17))
QWEN3_VL_PROCESSOR = ProcessorSpec(
    rule="qwen_smart_resize", patch_size=16, merge_size=2, min_pixels=65536, max_pixels=16777216,
    special_tokens_per_image=2,  # <|vision_start|> ... <|vision_end|>
)
# What was read from copies of the official files rather than the files themselves
COPY_NOTE = "config.json read from faithful copies of the official file (same numbers in each copy), not the original"


def qwen3_vl_vision(vision: VisionSpec, text_hidden: int) -> VisionSpec:
    """The tower with its DeepStack mergers projecting to the language-model width."""
    return replace(vision, out_hidden_size=text_hidden)


def qwen3_merger(vision: VisionSpec, text_hidden: int) -> ProjectorSpec:
    merged = vision.hidden_size * vision.spatial_merge_size**2
    return ProjectorSpec(arch="qwen3_merger", in_features=merged, hidden_features=merged, out_features=text_hidden,
                         norm="layernorm", pixel_shuffle=vision.spatial_merge_size)


def _qwen3_vl(name, hf_id, url, *, vision, hidden, inter, layers, heads, kv, tie, unverified=COPY_NOTE):
    return ModelSpec(
        name=name, family="qwen3_vl", hf_id=hf_id, source_url=url, hf_class="Qwen3VLForConditionalGeneration",
        vision=qwen3_vl_vision(vision, hidden), projector=qwen3_merger(vision, hidden),
        text=TextSpec(arch="qwen3", num_layers=layers, hidden_size=hidden, intermediate_size=inter, num_heads=heads,
                      num_kv_heads=kv, head_dim=128, vocab_size=151936, tie_word_embeddings=tie,
                      max_position_embeddings=262144, qk_norm=True),
        processor=QWEN3_VL_PROCESSOR, image_token_id=151655, unverified=unverified,
    )


SPECS = [
    # https://huggingface.co/Qwen/Qwen3-VL-4B-Instruct/blob/main/config.json
    # (copies: amburger66/robometer-4b-lora-robotsmith-task03 and chamber111/PVM-4B; tied at the top level)
    _qwen3_vl("qwen3-vl-4b", "Qwen/Qwen3-VL-4B-Instruct",
              "https://huggingface.co/Qwen/Qwen3-VL-4B-Instruct/blob/main/config.json",
              vision=QWEN3_VL_VISION_SMALL, hidden=2560, inter=9728, layers=36, heads=32, kv=8, tie=True,
              unverified=COPY_NOTE + "; vocab 151936 taken from the reference notes (one copy is a resized fine-tune)"),
    # https://huggingface.co/Qwen/Qwen3-VL-8B-Instruct/blob/main/config.json
    # (copies: Steinate/Cortex, Chhagan005/CSM-DocExtract-8N)
    _qwen3_vl("qwen3-vl-8b", "Qwen/Qwen3-VL-8B-Instruct",
              "https://huggingface.co/Qwen/Qwen3-VL-8B-Instruct/blob/main/config.json",
              vision=QWEN3_VL_VISION, hidden=4096, inter=12288, layers=36, heads=32, kv=8, tie=False),
    # https://huggingface.co/Qwen/Qwen3-VL-32B-Instruct/blob/main/config.json (copy: quanliang/F1, one copy only)
    _qwen3_vl("qwen3-vl-32b", "Qwen/Qwen3-VL-32B-Instruct",
              "https://huggingface.co/Qwen/Qwen3-VL-32B-Instruct/blob/main/config.json",
              vision=QWEN3_VL_VISION, hidden=5120, inter=25600, layers=64, heads=64, kv=8, tie=False,
              unverified=COPY_NOTE + " (a single copy)"),
]
