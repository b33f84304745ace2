"""Phi-3.5-vision (remote code, model_type `phi3_v`; no transformers class): CLIP ViT-L/14-336, an HD-transform MLP
projector, and Phi-3-mini (the hub repo's modeling_phi3_v.py, image_embedding_phi3_v.py).

Modules (names as in the remote Phi3VForCausalLM): `model.vision_embed_tokens.img_processor` = CLIPVisionModel
(ViT-L/14-336 with pre/post LayerNorm; features from layer -2, CLS dropped); `model.vision_embed_tokens.glb_GN` and
`sub_GN` (learnable separators over the 2x2-merged width 4096) and `img_projection` = Sequential(Linear(4096, 3072),
GELU, Linear(3072, 3072)); `model.embed_tokens`, `model.layers` (Phi-3: fused qkv_proj and gate_up_proj),
`model.norm`, `lm_head` (untied, vocab 32064).

Processor (preprocessor_config.json: num_crops 4, num_img_tokens 144): up to 4 crops of 336x336 plus a global view,
144 tokens each after the 2x2 merge, plus row separators. Image placeholders in input_ids are negative ids
(-1 for <|image_1|>, ...), so `image_token_id` is left 0.

Parameter count: the analytic inventory gives 4,146,621,440 (LM 3,821,079,552 + CLIP 303,507,456 + projector
22,034,432). Published: 4.15B ("Model size 4.15B params" on the hub page of a phi3_v checkpoint with the same
architecture; the official bf16 shards are 4.94 + 3.35 = 8.29 GB, i.e. about 4.15B); the model card says 4.2B.
"""

from ...spec import ModelSpec, ProcessorSpec, ProjectorSpec, TextSpec
from ..llava.specs import CLIP_VIT_L_336

PUBLISHED_TOTAL_PARAMS = {
    "phi-3.5-vision": (4.15e9, "https://huggingface.co/nvjkkartik/Phi3Vision-Lora-Merge (phi3_v, 4.15B params)"),
}

SPECS = [
    # https://huggingface.co/microsoft/Phi-3.5-vision-instruct/blob/main/config.json, read through conversions of it:
    # https://huggingface.co/FusionQuill/Phi-3.5-vision-instruct-onnx-cpu-dml/blob/main/config.json (text 3072 / 8192 /
    # 32 layers / 32 heads / 32 kv / max_position_embeddings 131072, img_processor CLIP ViT-L/14-336 with
    # image_dim_out 1024 and num_img_tokens 144, HD-transform MLP projector) and
    # https://huggingface.co/TIGER-Lab/VLM2Vec-Full/blame/0f078450a78f421b62630e4ade3da5778efd98fd/config.json.
    # Processor: https://huggingface.co/FriendliAI/Phi-3.5-vision-instruct/blob/main/preprocessor_config.json (a
    # duplicate of the official repo: num_crops 4, num_img_tokens 144).
    ModelSpec(
        name="phi-3.5-vision", family="phi3_v", hf_id="microsoft/Phi-3.5-vision-instruct",
        source_url="https://huggingface.co/microsoft/Phi-3.5-vision-instruct/blob/main/config.json", hf_class="",
        vision=CLIP_VIT_L_336,
        projector=ProjectorSpec(arch="phi3v", in_features=CLIP_VIT_L_336.hidden_size * 4, hidden_features=3072,
                                out_features=3072, pixel_shuffle=2),
        text=TextSpec(arch="phi3", num_layers=32, hidden_size=3072, intermediate_size=8192, num_heads=32,
                      num_kv_heads=32, head_dim=96, vocab_size=32064, tie_word_embeddings=False,
                      max_position_embeddings=131072),
        processor=ProcessorSpec(rule="phi3v_crops", patch_size=14, merge_size=2, image_size=336, tokens_per_view=144,
                                max_tiles=4, use_thumbnail=True),
        image_token_id=0, aliases=("phi-3.5-vision-instruct",),
        unverified="remote code, no transformers class: the module inventory is analytic, checked only against "
                   "the published total; config.json read through conversions whose visible part ends before "
                   "vocab_size (32064) and tie_word_embeddings (false)",
    ),
]
