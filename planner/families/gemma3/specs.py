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

from ...spec import ModelSpec, ProcessorSpec, ProjectorSpec, TextSpec, VisionSpec

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


# The google/gemma-3-* repositories are gated, so their files were read through copies that name the checkpoint. The
# -it/-pt files omit every Gemma3TextConfig default (vocab 262208, head_dim 256, heads 8 / kv 4), which transformers
# fills in exactly as for the gated file; copies re-saved by unsloth write them out.
SPECS = [
    # https://huggingface.co/google/gemma-3-4b-it/blob/main/config.json, read through
    # https://huggingface.co/mlx-community/gemma-3-4b-it-bf16/blob/main/config.json (the release's keys: text 2560 /
    # 10240 / 34 layers, sliding 1024; vision 27 / 1152 / 4304 / 16 heads / patch 14 / 896 px, no head; image token
    # 262144, 256 tokens per image) and the unsloth re-upload of the -pt twin,
    # https://huggingface.co/unsloth/gemma-3-4b-pt/blame/main/config.json (heads 8, kv 4, head_dim 256,
    # max_position_embeddings 131072 written out).
    _gemma3("gemma-3-4b", "google/gemma-3-4b-it", "https://huggingface.co/google/gemma-3-4b-it/blob/main/config.json",
            hidden=2560, inter=10240, layers=34, heads=8, kv=4, head_dim=256, aliases=("google/gemma-3-4b-pt",)),
    # https://huggingface.co/google/gemma-3-12b-it/blob/main/config.json, read through unsloth's copy,
    # https://huggingface.co/unsloth/gemma-3-12b-it-GGUF/blame/main/config.json (text 3840 / 15360 / 48 layers /
    # 16 heads / 8 kv / head_dim 256 / vocab 262208 / max_position_embeddings 131072 / sliding 1024, pattern 6) and
    # https://huggingface.co/mlx-community/gemma-3-12b-pt-4bit/blob/refs%2Fpr%2F1/config.json (the same vision tower).
    _gemma3("gemma-3-12b", "google/gemma-3-12b-it",
            "https://huggingface.co/google/gemma-3-12b-it/blob/main/config.json",
            hidden=3840, inter=15360, layers=48, heads=16, kv=8, head_dim=256, aliases=("google/gemma-3-12b-pt",)),
    # https://huggingface.co/google/gemma-3-27b-it/blob/main/config.json (query_pre_attn_scalar 168), read through
    # copies in TensorRT-LLM tests and an mlx 4-bit conversion
    # (https://huggingface.co/Abc7347/copytext27binstructgmn/blob/main/config.json: 5376 / 21504 / 62 layers /
    # 32 heads / 16 kv / head_dim 128, the same vision tower)
    _gemma3("gemma-3-27b", "google/gemma-3-27b-it",
            "https://huggingface.co/google/gemma-3-27b-it/blob/main/config.json",
            hidden=5376, inter=21504, layers=62, heads=32, kv=16, head_dim=128, aliases=("google/gemma-3-27b-pt",),
            unverified="gated config.json read only through copies that do not name the checkpoint (TensorRT-LLM "
                       "test data, an anonymous mlx conversion); vocab 262208 is the Gemma3TextConfig default"),
]
