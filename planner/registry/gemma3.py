"""Gemma 3 (model_type `gemma3`): SigLIP-so400m at 896 px, a pooling projector, Gemma 3 language models
(models/gemma3/modeling_gemma3.py).

Vision: 27 layers, 1152 wide, patch 14 -> 64x64 = 4096 patches, no pooling head (vision_use_head false).
Projector: average-pool 64x64 -> 16x16 (256 tokens per image), mm_soft_emb_norm (RMSNorm), then a matmul with
mm_input_projection_weight (a plain parameter, not an nn.Linear). Text: q/k RMSNorm, four norms per layer, gelu-tanh
gated MLP, 5 sliding-window (1024) layers per global layer, tied embeddings (vocab 262208, a Gemma3TextConfig default
the files omit).

Processor: every view is resized to 896x896 -> 256 tokens inside "\n\n<start_of_image>" ... "<end_of_image>\n\n".
Pan & scan is off in the checkpoints' preprocessor_config.json (do_pan_and_scan null); when on, up to 4 crops of at
least 256 px, only for aspect ratios above 1.2 (Gemma3ImageProcessor call defaults).
"""

from ..spec import ModelSpec, ProcessorSpec, ProjectorSpec, TextSpec, VisionSpec

SIGLIP_896 = VisionSpec(
    arch="siglip", num_layers=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=14,
    image_size=896, mlp="gelu_tanh", norm="layernorm", post_layernorm=True,
)
GEMMA3_PROCESSOR = ProcessorSpec(
    rule="gemma3", patch_size=14, image_size=896, tokens_per_view=256, max_tiles=4, do_pan_and_scan=False,
    pan_and_scan_min_crop_size=256, pan_and_scan_min_ratio=1.2,
    special_tokens_per_image=4,  # "\n\n", <start_of_image>, <end_of_image>, "\n\n"
)


def _gemma3(name, hf_id, url, *, hidden, inter, layers, heads, kv, head_dim, aliases=(), unverified=""):
    return ModelSpec(
        name=name, family="gemma3", hf_id=hf_id, source_url=url, hf_class="Gemma3ForConditionalGeneration",
        vision=SIGLIP_896,
        projector=ProjectorSpec(arch="gemma3", in_features=SIGLIP_896.hidden_size, out_features=hidden, bias=False,
                                norm="rmsnorm", pixel_shuffle=4),  # 4x4 average pooling
        text=TextSpec(arch="gemma3", num_layers=layers, hidden_size=hidden, intermediate_size=inter, num_heads=heads,
                      num_kv_heads=kv, head_dim=head_dim, vocab_size=262208, tie_word_embeddings=True,
                      max_position_embeddings=131072, mlp="gated_gelu_tanh", qk_norm=True, sliding_window=1024,
                      sliding_window_pattern=6),
        processor=GEMMA3_PROCESSOR, image_token_id=262144, aliases=aliases, unverified=unverified,
    )


SPECS = [
    # https://huggingface.co/google/gemma-3-4b-it/blob/main/config.json
    _gemma3("gemma-3-4b", "google/gemma-3-4b-it", "https://huggingface.co/google/gemma-3-4b-it/blob/main/config.json",
            hidden=2560, inter=10240, layers=34, heads=8, kv=4, head_dim=256, aliases=("google/gemma-3-4b-pt",),
            unverified="config.json read from a copy (mlx); heads 8 / kv 4 are Gemma3TextConfig defaults the file "
                       "omits"),
    # https://huggingface.co/google/gemma-3-12b-it/blob/main/config.json
    _gemma3("gemma-3-12b", "google/gemma-3-12b-it",
            "https://huggingface.co/google/gemma-3-12b-it/blob/main/config.json",
            hidden=3840, inter=15360, layers=48, heads=16, kv=8, head_dim=256, aliases=("google/gemma-3-12b-pt",),
            unverified="config.json read from a derivative (unsloth GGUF repo), not the gated original"),
    # https://huggingface.co/google/gemma-3-27b-it/blob/main/config.json (query_pre_attn_scalar 168)
    _gemma3("gemma-3-27b", "google/gemma-3-27b-it",
            "https://huggingface.co/google/gemma-3-27b-it/blob/main/config.json",
            hidden=5376, inter=21504, layers=62, heads=32, kv=16, head_dim=128, aliases=("google/gemma-3-27b-pt",),
            unverified="config.json read from copies in TensorRT-LLM tests, not the gated original"),
]
