"""Qwen3-VL dense (model_type `qwen3_vl`): a SigLIP-2-style ViT with DeepStack mergers, Qwen3 language models.

Vision: LayerNorm blocks with a gelu-tanh MLP (linear_fc1/linear_fc2), patch 16, temporal patch 2, merge 2, a learned
position embedding of 2304 entries, and DeepStack: the outputs of `deepstack_visual_indexes` go through their own
patch mergers and are added to the first language-model layers (models/qwen3_vl/modeling_qwen3_vl.py). The 4B uses a
24-block, 1024-wide ViT; the 8B and 32B the 27-block, 1152-wide one. Text: Qwen3 (q/k RMSNorm, no qkv bias,
head_dim 128), interleaved MRoPE.

Processor limits: the checkpoints' preprocessor_config.json `size` {shortest_edge 65536, longest_edge 16777216}
(min/max pixels; 16777216 = 16384 * 32**2), patch 16, merge 2. Every Qwen3-VL checkpoint ships the same 390-byte
file; read in Qwen's own https://huggingface.co/Qwen/Qwen3-VL-Reranker-2B/blob/main/preprocessor_config.json and in
copies such as https://huggingface.co/hfmaster/Qwen3-VL-2B/blob/eb87926/preprocessor_config.json.
"""

from dataclasses import replace

from ...spec import ModelSpec, ProcessorSpec, ProjectorSpec, TextSpec, VisionSpec

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
# What was read from derivatives of the official files rather than the files themselves
COPY_NOTE = "config.json read from fine-tunes of the checkpoint (their numbers agree), not the file or an exact copy"


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
    # https://huggingface.co/Qwen/Qwen3-VL-4B-Instruct/blob/main/config.json, read through
    # https://huggingface.co/TechCarbasa/MyModels/commit/400bbbf998ac875feb9b2182d409b81aa3601ac8 (an upload of the
    # downloaded Qwen3-VL-4B-Instruct/config.json: text 2560 / 9728 / 36 layers / 32 heads / 8 kv / head_dim 128) and
    # the fine-tunes chamber111/PVM-4B and amburger66/robometer-4b-lora-robotsmith-task03 (vision 24 layers / 1024 /
    # 4096 / 16 heads, deepstack [5, 11, 17], tied at both levels; the latter resized its vocab to 151674).
    _qwen3_vl("qwen3-vl-4b", "Qwen/Qwen3-VL-4B-Instruct",
              "https://huggingface.co/Qwen/Qwen3-VL-4B-Instruct/blob/main/config.json",
              vision=QWEN3_VL_VISION_SMALL, hidden=2560, inter=9728, layers=36, heads=32, kv=8, tie=True,
              unverified="config.json read through an upload of the file (seen only up to the text rope settings) "
                         "and fine-tunes; vocab 151936 from the Qwen3 text models (one fine-tune resized it)"),
    # https://huggingface.co/Qwen/Qwen3-VL-8B-Instruct/blob/main/config.json, read through the fine-tunes
    # https://huggingface.co/Steinate/Cortex/blame/main/config.json (transformers 4.57.0, the release's layout) and
    # https://huggingface.co/Chhagan005/CSM-DocExtract-8N/blob/main/config.json: text 4096 / 12288 / 36 / 32 / 8,
    # vocab 151936, untied; vision 27 / 1152 / 4304 / 16, deepstack [8, 16, 24], out 4096.
    _qwen3_vl("qwen3-vl-8b", "Qwen/Qwen3-VL-8B-Instruct",
              "https://huggingface.co/Qwen/Qwen3-VL-8B-Instruct/blob/main/config.json",
              vision=QWEN3_VL_VISION, hidden=4096, inter=12288, layers=36, heads=32, kv=8, tie=False),
    # https://huggingface.co/Qwen/Qwen3-VL-32B-Instruct/blob/main/config.json, read through the fine-tune
    # https://huggingface.co/quanliang/F1/blob/main/config.json (text 5120 / 25600 / 64 / 64 heads / 8 kv, head_dim 128,
    # vocab 151936, untied; vision 27 / 1152 / 4304, out 5120) and a public test fixture quoting, verbatim, the
    # text_config and vision_config of a released text encoder built on Qwen3-VL-32B (the same numbers; no tie key).
    _qwen3_vl("qwen3-vl-32b", "Qwen/Qwen3-VL-32B-Instruct",
              "https://huggingface.co/Qwen/Qwen3-VL-32B-Instruct/blob/main/config.json",
              vision=QWEN3_VL_VISION, hidden=5120, inter=25600, layers=64, heads=64, kv=8, tie=False,
              unverified=COPY_NOTE + "; tie_word_embeddings (false) from one fine-tune only"),
]
