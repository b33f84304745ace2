"""Idefics3 (model_type `idefics3`): a SigLIP vision model, a pixel-shuffle connector and a Llama language model
(models/idefics3/modeling_idefics3.py). SmolVLM-Instruct is an `idefics3` checkpoint too
(Idefics3ForConditionalGeneration; only SmolVLM2 and SmolVLM-256M/500M use model_type `smolvlm`).

Connector: pixel shuffle by `scale_factor` (2 -> 4x fewer tokens, 3 -> 9x), then modality_projection.proj, a Linear
without bias from 1152 * scale_factor**2 to the LM width. Tokens per tile: (image_size / 14)**2 / scale_factor**2,
the processor's image_seq_len (169 for Idefics3-8B at 364 px, 81 for SmolVLM at 384 px).

Processor: the image is resized so its longest edge is `size.longest_edge` (small images are upscaled), then split
into tiles of max_image_size (364 / 384 px) plus one global view when there is more than one tile; each tile is
wrapped in <fake_token_around_image><row_r_col_c>.
"""

from ...spec import ModelSpec, ProcessorSpec, ProjectorSpec, TextSpec, VisionSpec


def idefics3_vision(image_size: int) -> VisionSpec:
    # Idefics3VisionConfig with the checkpoint numbers (the class defaults are 12 layers / patch 32 / 224 px)
    return VisionSpec(arch="idefics3", num_layers=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                      patch_size=14, image_size=image_size, mlp="gelu_tanh", norm="layernorm", post_layernorm=True)


def _idefics3(name, hf_id, url, *, image_size, scale, longest_edge, text, image_token_id, aliases=(), unverified=""):
    vision = idefics3_vision(image_size)
    return ModelSpec(
        name=name, family="idefics3", hf_id=hf_id, source_url=url, hf_class="Idefics3ForConditionalGeneration",
        vision=vision,
        projector=ProjectorSpec(arch="idefics3", in_features=vision.hidden_size * scale**2,
                                out_features=text.hidden_size, bias=False, pixel_shuffle=scale),
        text=text,
        processor=ProcessorSpec(rule="idefics3_tiles", patch_size=14, merge_size=scale, image_size=image_size,
                                longest_edge=longest_edge,
                                tokens_per_view=(image_size // 14) ** 2 // scale**2),
        image_token_id=image_token_id, aliases=aliases, unverified=unverified,
    )


def _llama(*, hidden, inter, layers, heads, kv, vocab, max_pos):
    return TextSpec(arch="llama", num_layers=layers, hidden_size=hidden, intermediate_size=inter, num_heads=heads,
                    num_kv_heads=kv, head_dim=hidden // heads, vocab_size=vocab, tie_word_embeddings=False,
                    max_position_embeddings=max_pos)


SPECS = [
    # https://huggingface.co/HuggingFaceM4/Idefics3-8B-Llama3/blob/main/config.json; the file at
    # https://huggingface.co/HuggingFaceM4/Idefics3-8B-Llama3/blob/92a708af3b96e7fe9aeac5d439a1f64083868a05/config.json
    # shows scale_factor 2, image token 128257, text 4096 / 14336 / max_position_embeddings 131072 (only its opening
    # was read: heads, kv, vocab and the vision block come from copies quoting it and from Llama-3.1-8B)
    # preprocessor: size.longest_edge 1456; max_image_size was removed from the file (commit 30d4b60), so the
    # Idefics3ImageProcessor default 364 applies
    _idefics3("idefics3-8b", "HuggingFaceM4/Idefics3-8B-Llama3",
              "https://huggingface.co/HuggingFaceM4/Idefics3-8B-Llama3/blob/main/config.json",
              image_size=364, scale=2, longest_edge=1456, image_token_id=128257,
              text=_llama(hidden=4096, inter=14336, layers=32, heads=32, kv=8, vocab=128259, max_pos=131072),
              unverified="only the opening of the official config.json read: vision 27 x 1152 / 4304 / 364 px from "
                         "copies quoting it, text vocab 128259 from one test file, heads 32 / kv 8 from Llama-3.1-8B"),
    # https://huggingface.co/HuggingFaceTB/SmolVLM-Instruct/blob/main/config.json, read through copies:
    # https://huggingface.co/chflame163/ComfyUI_LayerStyle/blob/main/ComfyUI/models/smol/SmolVLM-Instruct/config.json
    # and https://huggingface.co/Pinatpong/SmolVLM-Instruct/blob/main/config.json (scale_factor 3, image_seq_len 81,
    # image token 49153, text 2048 / 8192 / 24 layers / head_dim 64 / max_position_embeddings 16384) and
    # https://huggingface.co/Tj/SmolVLM_Proxy/blob/main/config.json (32 heads, 32 kv)
    # preprocessor (current): size.longest_edge 1536, max_image_size 384; processor_config image_seq_len 81
    _idefics3("smolvlm", "HuggingFaceTB/SmolVLM-Instruct",
              "https://huggingface.co/HuggingFaceTB/SmolVLM-Instruct/blob/main/config.json",
              image_size=384, scale=3, longest_edge=1536, image_token_id=49153, aliases=("smolvlm-instruct",),
              text=_llama(hidden=2048, inter=8192, layers=24, heads=32, kv=32, vocab=49155, max_pos=16384),
              unverified="config.json read from copies of the released file that end before vocab_size (49155) "
                         "and tie_word_embeddings (false)"),
]
