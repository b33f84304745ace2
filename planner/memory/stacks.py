"""What each training stack (`TrainSetup.stack`) does to the model before the first step, as far as memory goes.

profiler/build.py `prepare_model` runs each stack's own code for the tracer; this module states the same choices for
the simulation (docs/memory-model.md "Training stacks"):

- `vlplan`: adapters first, then LLaMA-Factory's checkpointing function installed directly; no input hooks, so a
  frozen vision tower builds no autograd graph. Trainable parameters in fp32 (LLaMA-Factory's upcast).
- `llamafactory`: LLaMA-Factory 0.9.5 `load_model` runs `patch_model` (-> `prepare_model_for_training`: reentrant
  checkpointing of the layers that hold trainable parameters) before `init_adapter`. peft's `get_peft_model` then sees
  `is_gradient_checkpointing` and calls `model.enable_input_require_grads()` (peft_model.py
  `_prepare_model_for_gradient_checkpointing`; skipped for quantized models, so not under QLoRA), which hooks the input
  embeddings of every sub-model: the vision tower's patch embedding output requires grad and its frozen blocks, run
  un-checkpointed, save their activations. Full and freeze tuning use no peft: no hook. Trainable parameters in fp32.
- `hf-trainer`: a plain transformers Trainer: no fp32 upcast of trainable parameters (peft's adapters are fp32), and
  with gradient checkpointing `activation_checkpointing_enable()`: non-reentrant checkpointing of every layer (frozen
  ones too; sim.py `CheckpointFrame`) and `enable_input_require_grads()` whatever the method.
"""

from __future__ import annotations

from ..setup import TrainSetup


def input_embeddings_hooked(setup: TrainSetup) -> bool:
    """Whether `enable_input_require_grads` runs before the step: the outputs of every sub-model's input embeddings
    (the text embedding, and the vision tower's patch embedding where its class returns one) require grad."""
    if not setup.any_checkpointing:
        return False
    if setup.stack == "llamafactory":
        return setup.method in ("lora", "oft")  # peft on an unquantized model; QLoRA's 4/8-bit model skips the hook
    return setup.stack == "hf-trainer"


def upcasts_trainable(setup: TrainSetup) -> bool:
    """Trainable parameters upcast to fp32 (LLaMA-Factory adapter.py `init_adapter`, `cast_trainable_params_to_fp32`:
    not under pure bf16 or ZeRO-3); a plain HF Trainer keeps the loaded dtype."""
    return setup.stack != "hf-trainer"


def checkpoint_reentrant(setup: TrainSetup) -> bool:
    """Reentrant checkpointing of the layers with trainable parameters (LLaMA-Factory's function, use_reentrant_gc
    True: vlplan and llamafactory), or non-reentrant checkpointing of every layer (a plain HF Trainer: transformers 5
    `_activation_checkpointing_enable` defaults to `{"use_reentrant": False}`)."""
    return setup.stack != "hf-trainer"

