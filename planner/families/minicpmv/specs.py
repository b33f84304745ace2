"""MiniCPM-V 2.6 (remote code, model_type `minicpmv`; no transformers class): a NaViT SigLIP-400M, a one-layer
perceiver resampler with 64 queries, and Qwen2-7B (the hub repo's modeling_minicpmv.py, modeling_navit_siglip.py,
resampler.py).

Modules (names as in the remote MiniCPMV class): `vpm` = SiglipVisionTransformer (embeddings with a 70x70 = 4900-entry
position embedding for 980 px, 27 encoder layers, post_layernorm, no pooling head; drop_vision_last_layer false);
`resampler` = Resampler(num_queries=64, embed_dim=3584, num_heads=3584 // 128, kv_dim=1152): query, kv_proj (no
bias), nn.MultiheadAttention, ln_q/ln_kv/ln_post, proj (a 3584x3584 parameter); `llm` = Qwen2ForCausalLM (vocab
151666, untied).

Processor (remote image_processing_minicpmv.py defaults and config slice_config): the source image resized to about
448x448 plus up to 9 slices of about 448x448 each, 64 tokens per view inside <image>...</image> or
<slice>...</slice>.

Parameter count: the analytic inventory gives 8,099,175,152 (LM 7,612,763,648 + vision 417,792,240 + resampler
68,619,264). Published: "a total of 8B parameters" (model card); the bf16 safetensors of a full copy total
4.87 + 4.93 + 4.33 + 2.06 = 16.19 GB, i.e. about 8.10B parameters. `PUBLISHED_TOTAL_PARAMS` holds 8.10e9.
"""

from ...spec import ModelSpec, ProcessorSpec, ProjectorSpec, TextSpec, VisionSpec

# Published total (see the docstring) and where it came from; tests hold the inventory to it within 0.5%
PUBLISHED_TOTAL_PARAMS = {
    "minicpm-v-2.6": (8.10e9, "https://huggingface.co/MCG-NJU/MiniCPM-V-2_6-RA/tree/main (bf16 shards, 16.19 GB)"),
}

MINICPMV_SIGLIP = VisionSpec(
    arch="siglip", num_layers=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=14,
    image_size=980, mlp="gelu_tanh", norm="layernorm", post_layernorm=True,
)

SPECS = [
    # https://huggingface.co/openbmb/MiniCPM-V-2_6/blob/main/config.json, read through copies saved from it:
    # https://huggingface.co/CTW-g123/MiniCPM/blob/main/config.json (_name_or_path openbmb/MiniCPM-V-2_6, the whole
    # file: text 3584 / 18944 / 28 layers / 28 heads / 4 kv / vocab 151666 / untied / max_position_embeddings 32768,
    # image_size 448, patch 14, query_num 64, slice_config.max_slice_nums 9, vision 27 / 1152 / 4304 / 16 heads /
    # 980 px) and https://huggingface.co/second-state/MiniCPM-V-2_6-GGUF/blob/ef896bc1af331809d16519e2ddb49a523412cac5/
    # config.json. Processor: the duplicate of the official int4 repo,
    # https://huggingface.co/jchevallard/MiniCPM-V-2_6-int4/blob/7d6ebc036dd3951188336c02b59fa14554122bf0/
    # preprocessor_config.json (max_slice_nums 9, scale_resolution 448, patch 14, image_feature_size 64).
    ModelSpec(
        name="minicpm-v-2.6", family="minicpmv", hf_id="openbmb/MiniCPM-V-2_6",
        source_url="https://huggingface.co/openbmb/MiniCPM-V-2_6/blob/main/config.json", hf_class="",
        vision=MINICPMV_SIGLIP,
        projector=ProjectorSpec(arch="resampler", in_features=1152, hidden_features=3584, out_features=3584,
                                norm="layernorm", num_queries=64, num_heads=28),
        text=TextSpec(arch="qwen2", num_layers=28, hidden_size=3584, intermediate_size=18944, num_heads=28,
                      num_kv_heads=4, head_dim=128, vocab_size=151666, tie_word_embeddings=False,
                      max_position_embeddings=32768, qkv_bias=True),
        processor=ProcessorSpec(rule="minicpmv_slices", patch_size=14, image_size=448, tokens_per_view=64,
                                max_tiles=9, use_thumbnail=True,
                                special_tokens_per_image=2),  # <image> ... </image> around the source view
        image_token_id=0, aliases=("minicpm-v-2_6", "openbmb/MiniCPM-V-2.6"),
        unverified="remote code, no transformers class: the module inventory (resampler internals from copies of "
                   "resampler.py) is analytic, checked only against the published total; config.json read through "
                   "copies saved from the checkpoint, not the file itself",
    ),
]
