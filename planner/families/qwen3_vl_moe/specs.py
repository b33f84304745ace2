"""Qwen3-VL mixture of experts (model_type `qwen3_vl_moe`): the Qwen3-VL ViT with a Qwen3-MoE language model.

Every decoder layer's MLP is a router (`mlp.gate`, an nn.Linear) plus 128 experts stored as two fused 3D parameters
(`mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj` (E, H, I)), not nn.Linear modules: LoRA cannot target
them (models/qwen3_vl_moe/modeling_qwen3_vl_moe.py). The dense `intermediate_size` 6144 in the config builds nothing
(decoder_sparse_step 1, mlp_only_layers empty).
"""

from ...spec import ModelSpec, TextSpec
from ..qwen3_vl.specs import QWEN3_VL_PROCESSOR, QWEN3_VL_VISION, qwen3_merger, qwen3_vl_vision

SPECS = [
    # https://huggingface.co/Qwen/Qwen3-VL-30B-A3B-Instruct/blob/main/config.json at commit 1fc78ad, read through a
    # public test fixture that transcribes that file byte for byte (every key used here): text 2048 / intermediate
    # 6144 / 48 layers / 32 heads / 4 kv / head_dim 128 / vocab 151936 / max_position_embeddings 262144, 128 experts,
    # top-8, moe_intermediate_size 768, decoder_sparse_step 1, mlp_only_layers [], tie_word_embeddings false; vision
    # 27 / 1152 / 4304 / 16 heads, patch 16, merge 2, temporal 2, 2304 positions, deepstack [8, 16, 24], out 2048;
    # image token 151655. Processor: see families/qwen3_vl/specs.py.
    ModelSpec(
        name="qwen3-vl-30b-a3b", family="qwen3_vl_moe", hf_id="Qwen/Qwen3-VL-30B-A3B-Instruct",
        source_url="https://huggingface.co/Qwen/Qwen3-VL-30B-A3B-Instruct/blob/main/config.json",
        hf_class="Qwen3VLMoeForConditionalGeneration",
        vision=qwen3_vl_vision(QWEN3_VL_VISION, 2048), projector=qwen3_merger(QWEN3_VL_VISION, 2048),
        text=TextSpec(arch="qwen3_moe", num_layers=48, hidden_size=2048, intermediate_size=6144, num_heads=32,
                      num_kv_heads=4, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
                      max_position_embeddings=262144, qk_norm=True, num_experts=128, num_experts_per_tok=8,
                      moe_intermediate_size=768),
        processor=QWEN3_VL_PROCESSOR, image_token_id=151655,
    ),
]
