"""The one place that turns a TrainSetup into the transformers/peft model as training runs it.

`trace` (fake tensors on the CPU), `profile` (real GPU steps) and the runner all call `prepare_model`, so what we
measure is what we launch. The preparation follows LLaMA-Factory's defaults (src/llamafactory/model/adapter.py,
model_utils/checkpointing.py):

- weights load in the compute dtype (bf16 for bf16 AMP and pure bf16, fp16 for fp16 AMP, fp32 for fp32);
- frozen components get `requires_grad=False`; LoRA targets every `nn.Linear` of the LoRA-trained components
  except `lm_head` and the projector (`find_all_linear_modules` + `patch_target_modules`);
- trainable parameters are upcast to fp32 unless pure bf16 or ZeRO-3 (adapter.py "Upcasting trainable params to
  float32"; "DeepSpeed ZeRO3 detected, remaining trainable params in float32": its partitions stay as loaded);
- gradient checkpointing wraps only layers that hold trainable parameters, with `use_reentrant=True`, and marks the
  layer's hidden-state input as requiring grad (`get_custom_gradient_checkpointing_func`).

`setup.stack` picks the order and the functions (docs/memory-model.md "Training stacks"):

- `vlplan` (`vlplan run`'s own): adapters first, then checkpointing installed directly (`_set_gradient_checkpointing`,
  no `enable_input_require_grads`), so a frozen vision tower runs without building any autograd graph;
- `llamafactory`: LLaMA-Factory's order, its own `prepare_model_for_training` (patch_model) before the adapters, so
  peft's `get_peft_model` sees checkpointing on and calls `enable_input_require_grads`, which hooks the input
  embeddings of every sub-model (the vision tower's patch embedding included);
- `hf-trainer`: a plain transformers Trainer with `gradient_checkpointing=True`: adapters, no fp32 upcast, then
  `activation_checkpointing_enable()` (non-reentrant, every layer, `enable_input_require_grads`).
"""

from __future__ import annotations

import functools
import os
import sys
import types
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlplan.planner.errors import VlplanError
from vlplan.planner.hf_config import spec_to_hf_config
from vlplan.planner.modules import HF_COMPONENT_PREFIXES, LANGUAGE, PROJECTOR, component_of
from vlplan.planner.setup import HF_OPTIM, Train, TrainSetup
from vlplan.planner.spec import ModelSpec

ATTN_IMPLEMENTATION = {"sdpa": "sdpa", "eager": "eager", "fa2": "flash_attention_2"}
COMPUTE_DTYPE = {"bf16": torch.bfloat16, "pure-bf16": torch.bfloat16, "fp16": torch.float16,
                 "fp32": torch.float32}


def compute_dtype(setup: TrainSetup) -> torch.dtype:
    return COMPUTE_DTYPE[setup.precision]


def autocast_dtype(setup: TrainSetup) -> torch.dtype | None:
    """The autocast dtype of the Trainer's forward (bf16/fp16 AMP), None when no autocast runs."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(setup.precision)


def hf_config(spec: ModelSpec, attn: str = "sdpa"):
    d = dict(spec_to_hf_config(spec))
    model_type = d.pop("model_type")
    if getattr(transformers, spec.hf_class or "", None) is None:
        raise VlplanError(f"{spec.name}: transformers {transformers.__version__} has no {spec.hf_class or 'class'} "
                          f"for the {spec.family} family (remote code); trace and profile need an installed model "
                          "class (vlplan estimate covers it)")
    config = transformers.AutoConfig.for_model(model_type, **d)
    config._attn_implementation = ATTN_IMPLEMENTATION[attn]
    for sub in ("text_config", "vision_config"):
        if hasattr(config, sub):
            getattr(config, sub)._attn_implementation = ATTN_IMPLEMENTATION[attn]
    _eager_where_no_sdpa(config)
    # Training never uses the KV cache (LLaMA-Factory patch_config sets use_cache False when trainable). Left on,
    # transformers builds a DynamicCache in every training forward without checkpointing: a copy of K and V per
    # layer, promoted to fp32 by its empty initial tensor, alive until the outputs are dropped.
    config.use_cache = False
    if hasattr(config, "text_config"):
        config.text_config.use_cache = False
    return config


def _eager_where_no_sdpa(config) -> None:
    """A sub-model whose class has no SDPA path (Gemma 2, `_supports_sdpa = False`: SDPA has no logit soft-capping)
    runs eager: transformers resolves its default attention to eager and refuses an explicit "sdpa"
    (modeling_utils `_sdpa_can_dispatch`), so eager is what training with the default attention runs."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    for sub in ("text_config", "vision_config"):
        sub_config = getattr(config, sub, None)
        if sub_config is None or sub_config._attn_implementation != "sdpa":
            continue
        cls = MODEL_MAPPING.get(type(sub_config), None)
        if cls is not None and not getattr(cls, "_supports_sdpa", True):
            sub_config._attn_implementation = "eager"


def load_model(setup: TrainSetup, path: str | Path, *, random_init: bool = False,
               config_spec: ModelSpec | None = None) -> nn.Module:
    """The transformers model of a run or a profile loaded from the model directory `path`: `from_pretrained` in the
    compute dtype with the setup's attention kernel (QLoRA: quantized by bitsandbytes while loading, LLaMA-Factory's
    config). `random_init`: random weights from the directory's config.json, or where `path` is no directory from
    `config_spec` (default the setup's spec). The KV cache is off, as LLaMA-Factory's patch_config sets it."""
    cls = getattr(transformers, setup.model.hf_class or "", None)
    if cls is None:
        raise VlplanError(f"{setup.model.name}: transformers {transformers.__version__} has no model class for the "
                          f"{setup.model.family} family; vlplan run needs an installed model class")
    attn = ATTN_IMPLEMENTATION[setup.attn]
    path = Path(path)
    if random_init:
        if setup.method == "qlora":
            raise VlplanError("--random-init builds unquantized weights; QLoRA quantizes while loading a checkpoint")
        if path.is_dir():
            config = transformers.AutoConfig.from_pretrained(path)
        else:
            config = hf_config(config_spec or setup.model, setup.attn)
        model = cls._from_config(config, dtype=compute_dtype(setup), attn_implementation=attn)
    else:
        kwargs = dict(dtype=compute_dtype(setup), attn_implementation=attn)
        if setup.method == "qlora":
            kwargs.update(quantization_config=bnb_config(setup),
                          device_map={"": int(os.environ.get("LOCAL_RANK", "0"))})
        try:
            model = cls.from_pretrained(path, **kwargs)
        except ImportError as err:
            raise VlplanError(f"loading {path}: {str(err).strip().splitlines()[0]}") from None
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config.use_cache = False  # LLaMA-Factory patch_config: no KV cache in training
    return model


def bnb_config(setup: TrainSetup):
    """LLaMA-Factory's bitsandbytes config (model_utils/quantization.py) for QLoRA."""
    if not torch.cuda.is_available():
        raise VlplanError("QLoRA quantizes with bitsandbytes, which needs a CUDA GPU; use --method lora on this "
                          "machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise VlplanError("QLoRA needs bitsandbytes; pip install bitsandbytes") from None
    if setup.quant_bits == 8:
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype(setup),
                                           bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_quant_storage=compute_dtype(setup))


def create_model(setup: TrainSetup, spec: ModelSpec | None = None) -> nn.Module:
    """The transformers model of `spec` (default: the setup's) with random weights, in the compute dtype.

    Call it inside a FakeTensorMode to get fake parameters, or under `torch.device("cuda")` for a GPU run.
    """
    spec = spec or setup.model
    config = hf_config(spec, setup.attn)  # refuses families transformers has no class for
    return getattr(transformers, spec.hf_class)._from_config(config, dtype=compute_dtype(setup))


def lora_target_modules(model: nn.Module, setup: TrainSetup) -> list[str]:
    """Full module names LoRA wraps: `nn.Linear`s of LoRA-trained components, never lm_head or the projector."""
    family = setup.model.family
    wanted = set(setup.lora.targets)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not name or name.startswith("lm_head"):
            continue
        component = component_of(family, name)
        if component == PROJECTOR or setup.trains[component] is not Train.LORA:
            continue
        if "all" in wanted or name.rsplit(".", 1)[-1] in wanted:
            names.append(name)
    if not names:
        raise VlplanError(f"--lora-target {','.join(setup.lora.targets)} selects no linear layer of {setup.model.name}")
    return names


def _freeze_layers_for_freeze_method(model: nn.Module, setup: TrainSetup) -> None:
    """LLaMA-Factory freeze tuning: only the last `freeze_trainable_layers` language-model layers train."""
    num_layers = setup.model.text.num_layers
    first_trainable = max(0, num_layers - setup.freeze_trainable_layers)
    prefix = _language_layers_prefix(setup.model.family)
    for name, param in model.named_parameters():
        if not name.startswith(prefix):
            if component_of(setup.model.family, name) == LANGUAGE:
                param.requires_grad_(False)
            continue
        index = int(name[len(prefix):].split(".", 1)[0])
        param.requires_grad_(index >= first_trainable)


def _language_layers_prefix(family: str) -> str:
    for prefix, component in HF_COMPONENT_PREFIXES[family]:
        if component == LANGUAGE and prefix != "lm_head":
            return prefix + ".layers."
    raise VlplanError(f"no language-model layers known for {family}")


def apply_method(model: nn.Module, setup: TrainSetup, upcast: bool = True) -> nn.Module:
    """Freeze per component, wrap LoRA/DoRA with peft, upcast trainable parameters (LLaMA-Factory adapter.py
    `init_adapter`; `upcast=False`: a plain HF Trainer, which keeps the loaded dtype)."""
    family = setup.model.family
    for name, param in model.named_parameters():
        param.requires_grad_(setup.trains[component_of(family, name)] is Train.FULL)
    if setup.method == "freeze":
        _freeze_layers_for_freeze_method(model, setup)
    if setup.method in ("lora", "qlora", "oft"):
        import peft

        if setup.method == "oft":
            # LLaMA-Factory adapter.py `_setup_lora_tuning`: OFTConfig(r=oft_rank, oft_block_size=oft_block_size,
            # target_modules=<lora_target>, module_dropout=module_dropout, modules_to_save=additional_target)
            config = peft.OFTConfig(r=setup.oft.rank, oft_block_size=setup.oft.block_size,
                                    module_dropout=setup.oft.module_dropout,
                                    target_modules=lora_target_modules(model, setup), bias="none")
        else:
            config = peft.LoraConfig(r=setup.lora.rank, lora_alpha=setup.lora.alpha, lora_dropout=setup.lora.dropout,
                                     target_modules=lora_target_modules(model, setup), use_dora=setup.lora.dora,
                                     bias="none")
        model = peft.get_peft_model(model, config)
        # peft froze everything but the adapters; components trained in full (e.g. the projector) train again
        base = model.get_base_model()
        adapter_prefix = "oft_" if setup.method == "oft" else "lora_"
        for name, param in base.named_parameters():
            if adapter_prefix not in name and setup.trains[component_of(family, name)] is Train.FULL:
                param.requires_grad_(True)
    if upcast and setup.precision != "pure-bf16" and setup.zero != 3:
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.to(torch.float32)
    return model


def _checkpoint_trainable_only(gradient_checkpointing_func):
    """LLaMA-Factory `get_custom_gradient_checkpointing_func`: checkpoint only layers with trainable parameters,
    and mark the first floating-point argument (the hidden states) as requiring grad so reentrant checkpointing
    propagates gradients."""

    @functools.wraps(gradient_checkpointing_func)
    def custom(func, *args, **kwargs):
        module = _module_of(func)
        if not any(param.requires_grad for param in module.parameters()):
            return func(*args, **kwargs)
        for arg in args:
            if torch.is_tensor(arg) and torch.is_floating_point(arg):
                arg.requires_grad_(True)
                break
        return gradient_checkpointing_func(func, *args, **kwargs)

    return custom


def _module_of(func) -> nn.Module:
    while isinstance(func, functools.partial):
        if func.args and isinstance(func.args[0], nn.Module):
            return func.args[0]
        func = func.func
    return func.__self__


def enable_gradient_checkpointing(model: nn.Module) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    func = _checkpoint_trainable_only(functools.partial(checkpoint, use_reentrant=True))
    base._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=func)
    base.config.use_cache = False


def prepare_model(model: nn.Module, setup: TrainSetup) -> nn.Module:
    """Everything training does to a freshly built or loaded model before the first step, per `setup.stack`."""
    if setup.stack == "llamafactory":
        model = _prepare_llamafactory(model, setup)
    elif setup.stack == "hf-trainer":
        model = _prepare_hf_trainer(model, setup)
    else:
        # vlplan: adapters first (peft sees no checkpointing: no input hooks), then LLaMA-Factory's trainable-only
        # reentrant checkpointing installed directly. A frozen vision tower's input never requires grad, so it
        # builds no graph (tests/test_accuracy_stack.py proves it on the trace).
        model = apply_method(model, setup)
        if setup.any_checkpointing:
            enable_gradient_checkpointing(model)
    checkpoint_components(model, setup)
    model.train()
    return model


def checkpoint_components(model: nn.Module, setup: TrainSetup) -> None:
    """Per-component checkpointing (ms-swift's `vit_gradient_checkpointing`): checkpointing switched off again
    (`GradientCheckpointingLayer.gradient_checkpointing = False`) for the layers of the component that is not
    checkpointed."""
    if setup.vision_gradient_checkpointing is None:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, module in base.named_modules():
        if getattr(module, "gradient_checkpointing", None) is not True:
            continue
        try:
            component = component_of(setup.model.family, name)
        except VlplanError:
            component = LANGUAGE
        if not setup.checkpointing(component):
            module.gradient_checkpointing = False


# LLaMA-Factory's preparation (llamafactory 0.9.5) ----------------------------------------------------------------

# LLaMA-Factory's ModelArguments defaults that prepare_model_for_training reads (hparams/model_args.py):
# upcast_layernorm False, use_reentrant_gc True, use_unsloth_gc False, upcast_lmhead_output False. The dataclass
# itself cannot be built here: `llamafactory.hparams` refuses transformers 5.23 at import ("transformers>=4.55.0,
# <=5.6.0 is required", extras/misc.py check_dependencies) unless DISABLE_VERSION_CHECK is set process-wide.
LLAMAFACTORY_MODEL_ARGS = dict(upcast_layernorm=False, use_reentrant_gc=True, use_unsloth_gc=False,
                               upcast_lmhead_output=False)


def llamafactory_checkpointing():
    """LLaMA-Factory's `model.model_utils.checkpointing` module. `llamafactory.model/__init__.py` imports the loader,
    which imports `trl` (`from trl import AutoModelForCausalLMWithValueHead`, not installed: its pins fight ours), so
    when that fails the package is entered without running its __init__ (the submodules import fine)."""
    try:
        from llamafactory.model.model_utils import checkpointing
    except ModuleNotFoundError as err:
        if err.name != "trl":
            raise VlplanError(f"--stack llamafactory traces with LLaMA-Factory's own code: {err} "
                              "(pip install --no-deps llamafactory==0.9.5)") from None
        import llamafactory

        for name in [n for n in sys.modules if n == "llamafactory.model" or n.startswith("llamafactory.model.")]:
            del sys.modules[name]  # the half-imported package
        package = types.ModuleType("llamafactory.model")
        package.__path__ = [os.path.join(os.path.dirname(llamafactory.__file__), "model")]
        sys.modules["llamafactory.model"] = package
        from llamafactory.model.model_utils import checkpointing
    return checkpointing


def _bound_layer_call(custom):
    """LLaMA-Factory's `get_custom_gradient_checkpointing_func` finds the layer as `func.func.__self__` (a partial of
    a bound method, transformers <= 5.6). transformers 5.23's GradientCheckpointingLayer passes
    `partial(forward, self, **kwargs)` (modeling_layers.py `forward_with_checkpointing`): an unbound function, so
    LLaMA-Factory's function raises AttributeError: 'function' object has no attribute '__self__' at the first
    checkpointed layer. Hand it the same call as a partial of the bound method; everything else (which layers,
    `requires_grad_` on the hidden states, the checkpoint call) stays LLaMA-Factory's code."""

    @functools.wraps(custom)
    def adapted(func, *args, **kwargs):
        if (isinstance(func, functools.partial) and func.args and isinstance(func.args[0], nn.Module)
                and not hasattr(func.func, "__self__")):
            func = functools.partial(types.MethodType(func.func, func.args[0]), *func.args[1:], **func.keywords)
        return custom(func, *args, **kwargs)

    return adapted


def reference_model(setup: TrainSetup, spec: ModelSpec | None = None) -> nn.Module:
    """The DPO reference model of a full or freeze fine-tune: LLaMA-Factory's `create_ref_model` loads the model
    again with `is_trainable=False` (model/loader.py `load_model`: `model.requires_grad_(False)`, fp32 parameters
    cast to the compute dtype, `model.eval()`; no checkpointing, no adapters, no input hooks)."""
    model = create_model(setup, spec)
    model.requires_grad_(False)
    return model.eval()


def _prepare_llamafactory(model: nn.Module, setup: TrainSetup) -> nn.Module:
    """LLaMA-Factory's loader order (model/loader.py `load_model`: patch_model, then init_adapter).

    1. `patch_model` -> `prepare_model_for_training` (LLaMA-Factory's own function, run here): checkpointing with
       `get_custom_gradient_checkpointing_func` (trainable layers only, reentrant per use_reentrant_gc=True).
       patch_model's other steps do not touch memory for these models (generation config, tags;
       `autocast_projector_dtype` acts only on quantized models, which trace does not run).
    2. `init_adapter` mirrored by `apply_method` (adapter.py `_setup_lora_tuning` / `_setup_full_tuning` /
       `_setup_freeze_tuning`, fp32 upcast of trainable parameters): `init_adapter` itself imports, but needs
       LLaMA-Factory's FinetuningArguments (see LLAMAFACTORY_MODEL_ARGS). peft's `get_peft_model` sees
       `is_gradient_checkpointing` and calls `enable_input_require_grads` (peft_model.py
       `_prepare_model_for_gradient_checkpointing`): every sub-model's input embeddings' output requires grad."""
    checkpointing = llamafactory_checkpointing()
    args = types.SimpleNamespace(**dict(LLAMAFACTORY_MODEL_ARGS, use_unsloth_gc=setup.offload_checkpoints),
                                 disable_gradient_checkpointing=not setup.gradient_checkpointing)
    checkpointing.prepare_model_for_training(model, args)  # use_unsloth_gc: the trace emulates its copies
    if setup.gradient_checkpointing:
        for module in model.modules():
            func = getattr(module, "_gradient_checkpointing_func", None)
            if func is not None:
                module._gradient_checkpointing_func = _bound_layer_call(func)
    return apply_method(model, setup)


def _prepare_hf_trainer(model: nn.Module, setup: TrainSetup) -> nn.Module:
    """A plain transformers Trainer: the model as loaded (no fp32 upcast of trainable parameters; peft's adapters
    are fp32, `autocast_adapter_dtype=True`), and with `gradient_checkpointing=True` the Trainer's own call
    (trainer.py: `self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=None, ...)`): every
    layer, `use_reentrant=False`, and `enable_input_require_grads()` since a VLM's main input is `input_ids`
    (modeling_utils.py `_activation_checkpointing_enable`). A peft model forwards the call to the base model."""
    model = apply_method(model, setup, upcast=False)
    if setup.any_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=None, every_n_layers=1, offload=False)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.config.use_cache = False
    return model


def make_optimizer(model: nn.Module, setup: TrainSetup, *, emulate_cuda: bool = False) -> torch.optim.Optimizer:
    """The optimizer the HF Trainer builds (Trainer.create_optimizer: weight-decay and no-decay groups).

    `emulate_cuda`: AdamW without `fused` defaults to foreach only for CUDA tensors; the CPU tracer asks for it.
    """
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir="/tmp/vlplan-unused", optim=HF_OPTIM[setup.optimizer], use_cpu=True,
                             report_to=[], weight_decay=0.0, learning_rate=1e-5)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    decay = set(Trainer.get_decay_parameter_names(None, model))
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decay and p.requires_grad], "weight_decay": 0.0},
        {"params": [p for n, p in model.named_parameters() if n not in decay and p.requires_grad],
         "weight_decay": 0.0},
    ]
    if emulate_cuda and cls is torch.optim.AdamW and not kwargs.get("fused"):
        kwargs = dict(kwargs, foreach=True)
    return cls(groups, **kwargs)
