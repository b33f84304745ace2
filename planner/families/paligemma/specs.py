"""PaliGemma 2 (model_type `paligemma`, text `gemma2`): SigLIP-so400m, one Linear projector, Gemma 2 language models
(models/paligemma/modeling_paligemma.py).

One fixed-size view per image: 224 px -> 256 tokens, 448 px -> 1024, 896 px -> 4096 (image_seq_length), placed
before the BOS token; image and prefix attend bidirectionally. The entries here are the 448-px pretrained
checkpoints; the same sizes exist as pt-224 / pt-896, mix-224 / mix-448 and ft-docci-448 (keras-hub presets), which
differ only in vision image_size (position-embedding rows) and image_seq_length. Parameters published by keras-hub:
3b-224 3,032,094,960; 3b-448 3,032,979,696; 3b-896 3,036,518,640; 10b-448 9,663,294,192. The
transformers models here are larger by exactly 64 embedding rows x LM width (HF text vocab 257216, padded from the
257152 keras-hub counts): 3,033,127,152 and 9,663,523,568.
"""

from ...spec import ModelSpec, ProcessorSpec, ProjectorSpec, TextSpec, VisionSpec

SIGLIP_448 = VisionSpec(
    arch="siglip", num_layers=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=14,
    image_size=448, mlp="gelu_tanh", norm="layernorm", post_layernorm=True,
)
PALIGEMMA_448_PROCESSOR = ProcessorSpec(rule="siglip_fixed", patch_size=14, image_size=448, tokens_per_view=1024)


def _paligemma2(name, hf_id, url, *, hidden, inter, layers, heads, kv, unverified=""):
    return ModelSpec(
        name=name, family="paligemma", hf_id=hf_id, source_url=url, hf_class="PaliGemmaForConditionalGeneration",
        vision=SIGLIP_448,
        projector=ProjectorSpec(arch="linear", in_features=SIGLIP_448.hidden_size, out_features=hidden),
        text=TextSpec(arch="gemma2", num_layers=layers, hidden_size=hidden, intermediate_size=inter, num_heads=heads,
                      num_kv_heads=kv, head_dim=256, vocab_size=257216, tie_word_embeddings=True,
                      max_position_embeddings=8192, mlp="gated_gelu_tanh", sliding_window=4096,
                      sliding_window_pattern=2),
        processor=PALIGEMMA_448_PROCESSOR, image_token_id=257152, unverified=unverified,
    )


SPECS = [
    # https://huggingface.co/google/paligemma2-3b-pt-448/blob/main/config.json (gated; Gemma2-2B language model), read
    # through fine-tunes of its 448-px siblings: https://huggingface.co/ACIDE/User-VLM-3B-base/blob/main/config.json
    # (from paligemma2-3b-ft-docci-448) and https://huggingface.co/Mostafa3zazi/exp3_code_only/blob/main/config.json
    # (from paligemma2-3b-mix-448): text 2304 / 9216 / 26 layers / 4 kv / vocab 257216 / sliding 4096, vision 27 /
    # 1152 / 4304 / 16 heads / patch 14 / 448 px, image token 257152; the 8 heads and head_dim 256 are Gemma2Config
    # defaults the files omit.
    _paligemma2("paligemma2-3b", "google/paligemma2-3b-pt-448",
                "https://huggingface.co/google/paligemma2-3b-pt-448/blob/main/config.json",
                hidden=2304, inter=9216, layers=26, heads=8, kv=4,
                unverified="gated config.json read only through fine-tunes of sibling 3B checkpoints (mix-448, "
                           "ft-docci-448), not the pt-448 file or an exact copy"),
    # https://huggingface.co/google/paligemma2-10b-pt-448/blob/main/config.json (gated; Gemma2-9B language model). No
    # copy found; the text numbers are Gemma2-9B's (3584 / 14336 / 42 layers / 16 heads / 8 kv / head_dim 256 /
    # sliding 4096, as in Gemma-2-9B fine-tunes such as
    # https://huggingface.co/theprint/CleverBoi-Gemma-2-9B-v2/commit/e796094bed6aad824bc38077321930d64e12d42b)
    _paligemma2("paligemma2-10b", "google/paligemma2-10b-pt-448",
                "https://huggingface.co/google/paligemma2-10b-pt-448/blob/main/config.json",
                hidden=3584, inter=14336, layers=42, heads=16, kv=8,
                unverified="no copy of the gated config.json found: text numbers are Gemma2-9B's; the parameter count "
                           "matches keras-hub's 9,663,294,192 up to the 64 padded vocab rows"),
]
