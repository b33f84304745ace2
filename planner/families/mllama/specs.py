"""Llama 3.2 Vision (model_type `mllama`): a tiled ViT, a linear projector, and a Llama 3.1 language model with
cross-attention layers (models/mllama/modeling_mllama.py).

Vision: 32 local layers then 8 gated global layers, 1280 wide, patch 14 on 560x560 tiles (1600 patches + a class
token per tile), up to 4 tiles per image over 8 aspect ratios, gated positional and tile embeddings. The final output
is concatenated with the outputs of local layers 3, 7, 15, 23, 30: 1280 * 6 = 7680 features, projected to 4096 by
one nn.Linear. Text: 40 layers, of which 3, 8, ..., 38 are cross-attention layers (q/k RMSNorm, tanh gates) that
attend to the image features; the embedding has vocab_size + 8 rows, the lm_head vocab_size.

The LLM sequence gets one <|image|> token per image; the tiles reach the LM only through cross-attention. The tile
size is 560 in the HF checkpoint (vision_config.image_size and preprocessor size); the MllamaVisionConfig class
default is 448, so a reader that skips the checkpoint config gets it wrong.
"""

from ...spec import ModelSpec, ProcessorSpec, ProjectorSpec, TextSpec, VisionSpec

MLLAMA_VISION = VisionSpec(
    arch="mllama", num_layers=32, hidden_size=1280, intermediate_size=5120, num_heads=16, patch_size=14,
    image_size=560, mlp="gelu", norm="layernorm", qkv_bias=False, num_global_layers=8, has_cls_token=True,
    pre_layernorm=True, post_layernorm=True, max_num_tiles=4, num_aspect_ratios=8,
    intermediate_layers_indices=(3, 7, 15, 23, 30),
)
MLLAMA_PROCESSOR = ProcessorSpec(
    rule="mllama_tiles", patch_size=14, image_size=560, max_tiles=4,
    tokens_per_view=1,  # one <|image|> token per image in the LLM sequence, whatever the number of tiles
)

SPECS = [
    # https://huggingface.co/meta-llama/Llama-3.2-11B-Vision-Instruct/blob/main/config.json (gated), read through
    # derivatives naming it:
    # https://huggingface.co/OPEA/Llama-3.2-11B-Vision-Instruct-int4-sym-inc/blob/main/config.json
    # (text 4096 / 14336 / 32 heads / 8 kv / max_position_embeddings 131072, cross_attention_layers [3, 8, ..., 38],
    # image token 128256) and https://huggingface.co/Aekanun/thai-handwriting-llm/blame/main/config.json (40 layers,
    # vocab 128256; vision 32 layers / 1280 / 5120 / 16 heads / patch 14 / image_size 560 / vision_output_dim 7680).
    # Tile 560 and max_image_tiles 4 also in the preprocessor_config.json copies, e.g.
    # https://huggingface.co/EricB/Llama-3.2-11B-Vision-Instruct-UQFF/blob/71cea1ed05cc33e22119712f889b067e7f3e353c/
    # preprocessor_config.json.
    ModelSpec(
        name="llama-3.2-11b-vision", family="mllama", hf_id="meta-llama/Llama-3.2-11B-Vision-Instruct",
        source_url="https://huggingface.co/meta-llama/Llama-3.2-11B-Vision-Instruct/blob/main/config.json",
        hf_class="MllamaForConditionalGeneration", vision=MLLAMA_VISION,
        projector=ProjectorSpec(arch="mllama_linear", in_features=1280 * 6, out_features=4096),
        text=TextSpec(arch="mllama", num_layers=40, hidden_size=4096, intermediate_size=14336, num_heads=32,
                      num_kv_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                      max_position_embeddings=131072, cross_attention_layers=(3, 8, 13, 18, 23, 28, 33, 38),
                      extra_embedding_rows=8),
        processor=MLLAMA_PROCESSOR, image_token_id=128256, aliases=("meta-llama/Llama-3.2-11B-Vision",),
        unverified="gated config.json read only through derivatives (a quantization, fine-tunes); "
                   "num_global_layers 8, intermediate_layers_indices [3, 7, 15, 23, 30], max_num_tiles 4 and the 8 "
                   "aspect ratios are MllamaVisionConfig defaults not seen in any copy",
    ),
]
