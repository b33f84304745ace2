"""One-line explanations of each breakdown term: what it is, its formula and the code or paper it models."""

from __future__ import annotations

_TERMS = {
    "weights/": "parameters of {component}: frozen ones in the compute dtype, trainable ones upcast to fp32 unless "
                "pure bf16 (LLaMA-Factory adapter.py); QLoRA linears as bitsandbytes NF4/int8 with their quant state",
    "adapters/": "LoRA A and B of {component}: rank x (in + out) per targeted linear, fp32 (peft get_peft_model "
                 "autocast_adapter_dtype); OFT: blocks x b(b-1)/2 fp32 per targeted linear and its int64 "
                 "triu_indices buffers (peft tuners/oft/layer.py)",
    "optimizer/adam_states": "AdamW exp_avg and exp_avg_sq: 2 x trainable params x param dtype (torch optim/adam.py "
                             "_init_group)",
    "optimizer/step_counters": "fused AdamW keeps a 0-d fp32 step tensor per parameter on the device (one 512-byte "
                               "allocator block each)",
    "optimizer/fp32_grads_master_adam": "DeepSpeed ZeRO: fp32 gradients + fp32 master weights + Adam states, 16 bytes "
                                        "x trainable params / data-parallel ranks (stage_1_and_2.py, stage3.py)",
    "gradients/half": "ZeRO-1: half-precision gradients of every trainable parameter (2 bytes each)",
    "gradients/half_partition": "ZeRO-2: this rank's partition of the half-precision gradients (2 bytes x trainable "
                                "/ ranks)",
    "gradients/": "gradients of {component}'s trainable parameters in their dtype (.grad, accumulated by autograd's "
                  "AccumulateGrad)",
    "weights/half": "ZeRO-1/2: every parameter in the half dtype on every rank (DeepSpeed casts the module)",
    "weights/half_partition": "ZeRO-3: this rank's partition of all parameters (2 bytes x params / ranks)",
    "zero3/live_parameters": "ZeRO-3 gathered parameters in flight: 4 bytes x the largest module "
                             "(DeepSpeed estimate_zero3_model_states_mem_needs)",
    "zero/reduce_bucket": "DeepSpeed IPG gradient-reduction buffer: reduce_bucket_size elements of the half dtype "
                          "(HF 'auto': hidden_size**2), twice with overlap_comm",
    "weights/fsdp_shard": "FSDP2: this rank's shard of every parameter as stored (trainable ones fp32 under mixed "
                          "precision, accelerate fsdp2_prepare_model; frozen ones in the compute dtype) / shard group",
    "weights/quantized": "QLoRA under ZeRO-1/2: the bitsandbytes weights packed (4-bit two a byte, 8-bit one) with their quant "
                         "state; DeepSpeed casts floating-point parameters to the half dtype, not these (engine.py "
                         "_cast_module_mixed_precision)",
    "weights/quant_state": "QLoRA sharded: the 4-bit weights' absmax and code tables, attributes of the weights, "
                           "whole on every GPU",
    "optimizer/fsdp_shard": "FSDP2: the optimizer states of this rank's parameter shards (AdamW: 2 x stored dtype)",
    "gradients/fsdp_shard": "FSDP2: sharded gradients in the stored dtype, made by each unit's reduce-scatter "
                            "(_fsdp_collectives.py foreach_reduce); in backward those of the units done so far",
    "fsdp/unsharded_parameters": "FSDP2: all-gathered parameters in param_dtype of the root and the units in flight "
                                 "(_fsdp_param_group.py unshard / wait_for_unshard)",
    "fsdp/all_gather_buffers": "FSDP2: all-gather outputs alive (the previous unit's held for overlap in forward, "
                               "the next unit's prefetched in backward)",
    "fsdp/unsharded_gradients": "FSDP2: the unit's gradients autograd makes in param_dtype before its reduce-scatter",
    "fsdp/reduce_scatter_buffers": "FSDP2: reduce-scatter inputs in reduce_dtype (the previous unit's kept until the "
                                   "next reduce-scatter)",
    "fsdp/lm_head_unsharded_gradient": "FSDP2: an untied trainable lm_head's gradient, made at the start of "
                                       "backward and reduced with the root unit at its end",
    "ddp/grad_buckets": "torch DDP reducer buckets: a flat copy of all gradients (gradient_as_bucket_view=False)",
    "inputs/": "the batch: input_ids, labels, pixel values and the vision index tensors the collator produces",
    "activations/vision": "tensors saved for backward and live temporaries of the vision tower (nothing is saved when "
                          "it is frozen with nothing trainable before it)",
    "activations/projector": "the projector's saved tensors and the image features handed to the language model",
    "activations/language": "tensors the language-model layers save for backward (with checkpointing: each layer's "
                            "input, plus one layer recomputed during its backward) and live temporaries",
    "activations/loss": "logits (b x s x vocab in the compute dtype), their fp32 upcast and log_softmax output "
                        "(transformers ForCausalLMLoss), accelerate's fp32 copy of the logits",
    "temporaries/loss": "backward of the loss: nll_loss and log_softmax gradients, b x s x vocab fp32 each",
    "temporaries/": "transient tensors of the backward pass or optimizer step in {component} (gradients flowing "
                    "between layers, kernel workspaces, recomputed activations)",
    "cuda/context": "CUDA context and lazily loaded kernels outside the caching allocator (named constant, "
                    "overheads.CUDA_CONTEXT_BYTES)",
    "cuda/cublas_workspace": "cuBLAS workspaces: 32 MiB per handle on Hopper (8 MiB elsewhere), forward and autograd "
                             "threads (CublasHandlePool.cpp)",
    "cuda/allocator_reserve": "memory the CUDA caching allocator reserves beyond the live tensors at the peak "
                              "(max_memory_reserved - max_memory_allocated): the step's allocations replayed "
                              "through its rules (memory/allocator.py; --expandable-segments for "
                              "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)",
    "cuda/nccl_buffers": "NCCL communicator buffers outside the allocator (overheads.NCCL_BYTES)",
}


def explain_term(name: str, result=None) -> str:
    component = name.split("/", 1)[1] if "/" in name else name
    for prefix in sorted(_TERMS, key=len, reverse=True):
        if name == prefix or (prefix.endswith("/") and name.startswith(prefix)):
            return _TERMS[prefix].format(component=component)
    return ""
