"""Model states and communication buffers under PyTorch FSDP2 (`fully_shard`), as accelerate applies it.

What accelerate's `fsdp2_prepare_model` (accelerate 1.16 utils/fsdp_utils.py) does to the model, and what that costs
per GPU:

- **Wrap policy** (TRANSFORMER_BASED_WRAP, `fsdp_transformer_layer_cls_to_wrap` defaulting to the model's
  `_no_split_modules`): one FSDP unit per language-model decoder layer and per vision block, plus the root unit
  holding everything else (embeddings, lm_head, final norm, projector, patch embedding). `fsdp_units`.
- **Dtypes**: under mixed precision accelerate upcasts every trainable parameter to fp32 ("FSDP2 requires uniform
  orig_dtype among trainable params"), frozen ones stay as loaded (the compute dtype); peft's adapters are fp32.
  The `MixedPrecisionPolicy` is param_dtype = reduce_dtype = the AMP dtype (`FullyShardedDataParallelPlugin
  .set_mixed_precision`). QLoRA: bitsandbytes 4-bit weights stored in the compute dtype
  (`bnb_4bit_quant_storage`, LLaMA-Factory model_utils/quantization.py) shard like any parameter, and accelerate
  skips the upcast; their quant state (absmax, codes) is an attribute, not a parameter: every GPU keeps all of it.
- **Sharded states** (`fsdp/sharded_parameters`, `fsdp/sharded_gradients`, the optimizer's states): 1/N of each,
  N = the shard group (every GPU for full_shard and shard_grad_op, the GPUs of a node for hybrid_shard, 1 for
  no_shard). Each parameter is chunked on dim 0, padded to a multiple of N (torch/distributed/fsdp/_fully_shard/
  _fsdp_param.py); the padding (under N rows per parameter) is not counted.
- **Buffers of the units in flight** (torch 2.13 _fsdp_param_group.py, _fsdp_collectives.py), walked unit by unit
  in `_forward_peak` and `_backward_peak`: the all-gather output (`foreach_all_gather`, the unit in param_dtype), the
  unsharded parameters it is copied out to (`foreach_all_gather_copy_out`), the unsharded gradients autograd makes
  (param_dtype), the reduce-scatter input (`foreach_reduce`, reduce_dtype) kept alive until the next unit's
  reduce-scatter (`reduce_scatter_states`, one buffer), and the next unit's all-gather prefetched in backward
  (`_backward_prefetch`).
- **CPU offload** (`CPUOffloadPolicy`, `--offload all`): sharded parameters, gradients and the optimizer step live
  in pinned host memory; the GPU keeps only the buffers of the units in flight.

`tests/test_fsdp.py` holds these terms, phase by phase, against torch's own `FSDPMemTracker` over `fully_shard` on
fake tensors (profiler/fsdp_trace.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..modules import (
    LANGUAGE,
    PROJECTOR,
    VISION,
    _siglip_head,
    mllama_cross_layer_linears,
    mllama_cross_layer_other_params,
    model_inventory,
    text_layer_linears,
    text_layer_other_params,
    vision_layer_linears,
    vision_layer_other_params,
)
from ..setup import Train, TrainSetup
from .stacks import input_embeddings_hooked

# vision towers whose embeddings module is an FSDP unit of its own, and families whose projector is one
EMBEDDING_UNIT_ARCHS = ("clip", "siglip")
PROJECTOR_UNIT_FAMILIES = ("paligemma",)
COMPUTE_BYTES = {"bf16": 2, "fp16": 2, "pure-bf16": 2, "fp32": 4}
ADAPTER_BYTES = 4  # peft creates adapters in fp32 (get_peft_model autocast_adapter_dtype=True)


@dataclass(frozen=True)
class Unit:
    """One `fully_shard` unit: bytes of its parameters as stored (sharded 1/N), as all-gathered (param_dtype), of
    its unsharded gradients (param_dtype), of its reduce-scatter input (reduce_dtype) and of its sharded gradients
    (the trainable parameters' stored dtype); `backward`: its backward hooks run (autograd reaches it)."""

    name: str
    stored_bytes: int
    gathered_bytes: int
    grad_bytes: int
    reduce_bytes: int
    sharded_grad_bytes: int
    backward: bool
    replicated_bytes: int = 0  # QLoRA quant state: attributes of the 4-bit weights, whole on every GPU
    component: str = ""
    params: int = 0


def shard_size(setup: TrainSetup) -> int:
    """GPUs a parameter is sharded over: all of them (full_shard, shard_grad_op), a node's (hybrid_shard: shard
    within a node, replicate across nodes), or none (no_shard: every GPU holds everything, gradients all-reduced)."""
    return {"full_shard": setup.world_size, "shard_grad_op": setup.world_size, "hybrid_shard": setup.num_gpus,
            "no_shard": 1}[setup.fsdp]


def _quantized_bytes(numel: int, out_features: int, bits: int) -> tuple[int, int]:
    """(weight bytes, quant state bytes) of one bitsandbytes weight, as planner/memory/blocks.py `_quantized`
    counts them: 4-bit packs two weights a byte (absmax per 64 weights as uint8 with an fp32 absmax per 256 blocks,
    two fp32 code tables); 8-bit one byte per weight with an fp32 scale per output row."""
    if bits == 4:
        blocks = -(-numel // 64)
        return numel // 2, blocks + 4 * -(-blocks // 256) + 4 * (16 + 256)
    return numel, 4 * out_features


def _layer_unit(setup: TrainSetup, name: str, component: str, linears, other_params: int, trainable: bool,
                backward: bool, gets_gradient: bool = True) -> Unit:
    """A decoder layer or vision block: its linears (quantized for QLoRA's language model, with LoRA adapters where
    targeted) and other parameters. `trainable`: the layer trains (method freeze trains the last layers only);
    `gets_gradient`: the loss reaches it."""
    c = COMPUTE_BYTES[setup.precision]
    mode = setup.trains[component]
    full = mode is Train.FULL and trainable
    stored_dtype = _stored_dtype(setup, full)
    param_dtype = c  # MixedPrecisionPolicy(param_dtype=AMP dtype); without AMP the stored dtype is the compute one
    quant = setup.quant_bits if (setup.method == "qlora" and component == LANGUAGE) else None
    stored = gathered = replicated = trainable_params = adapter_bytes = 0
    for linear in linears:
        numel = linear.in_features * linear.out_features
        bias = linear.out_features if linear.bias else 0
        if quant:
            weight, state = _quantized_bytes(numel, linear.out_features, quant)
            stored += weight
            gathered += weight
            replicated += state
            stored += bias * stored_dtype
            gathered += bias * param_dtype
        else:
            stored += (numel + bias) * stored_dtype
            gathered += (numel + bias) * param_dtype
            if full:
                trainable_params += numel + bias
        if mode is Train.LORA and linear.lora_all and ("all" in setup.lora.targets or
                                                       linear.name in setup.lora.targets):
            adapter = setup.lora.rank * (linear.in_features + linear.out_features)
            adapter += linear.out_features if setup.lora.dora else 0
            adapter_bytes += adapter * ADAPTER_BYTES
            gathered += adapter * param_dtype
            trainable_params += adapter
    stored += other_params * stored_dtype + adapter_bytes
    gathered += other_params * param_dtype
    if full:
        trainable_params += other_params
    grad_dtype = ADAPTER_BYTES if mode is Train.LORA else stored_dtype
    params = sum(linear.params for linear in linears) + other_params
    if not gets_gradient:
        trainable_params = 0
    return Unit(name, stored, gathered, trainable_params * param_dtype, trainable_params * param_dtype,
                trainable_params * grad_dtype, backward, replicated, component, params)


def _stored_dtype(setup: TrainSetup, trainable: bool) -> int:
    """Bytes per stored parameter: accelerate upcasts trainable ones to fp32 under mixed precision; frozen ones stay
    in the compute dtype they were loaded in; pure bf16 keeps everything in bf16."""
    if setup.precision == "pure-bf16":
        return 2
    return 4 if trainable else COMPUTE_BYTES[setup.precision]


def _root_unit(setup: TrainSetup, units: list[Unit]) -> Unit:
    """Whatever no other unit holds: embeddings, lm_head and final norm of the language model, the projector, the
    vision tower's patch embedding, final norms and heads (where the model's `_no_split_modules` does not make them
    units of their own). None of it is quantized (bitsandbytes leaves embeddings and lm_head in the compute dtype) or
    carries LoRA adapters."""
    c = COMPUTE_BYTES[setup.precision]
    stored = gathered = trainable = grads = 0
    for component, inv in model_inventory(setup.model).items():
        params = inv.params - sum(u.params for u in units if u.component == component)
        full = setup.trains[component] is Train.FULL and not (component == LANGUAGE and setup.method == "freeze")
        stored += params * _stored_dtype(setup, full)
        gathered += params * c
        if full:
            trainable += params
            grads += params * _stored_dtype(setup, True)
    return Unit("root", stored, gathered, trainable * c, trainable * c, grads, True)


def _whole_unit(setup: TrainSetup, name: str, component: str, params: int, backward: bool) -> Unit:
    """A unit of parameters without linears LoRA targets (vision embeddings, pooling head, projector)."""
    c = COMPUTE_BYTES[setup.precision]
    full = setup.trains[component] is Train.FULL
    trainable = params if full else 0
    return Unit(name, params * _stored_dtype(setup, full), params * c, trainable * c, trainable * c,
                trainable * _stored_dtype(setup, True), backward, component=component, params=params)


def _embedding_unit_params(vision) -> int:
    """CLIPVisionEmbeddings / SiglipVisionEmbeddings: a unit of its own (in their models' `_no_split_modules`)."""
    d, p = vision.hidden_size, vision.patch_size
    if vision.arch == "clip":
        return vision.in_channels * p * p * d + d + ((vision.image_size // p) ** 2 + 1) * d
    return vision.in_channels * p * p * d + d + (vision.image_size // p) ** 2 * d


def fsdp_units(setup: TrainSetup) -> list[Unit]:
    """The FSDP units in forward order: the root (its pre-forward runs first), then the vision tower's units
    (embeddings, blocks, pooling head), the projector where it is a unit, then the language model's decoder layers.
    The wrap policy is accelerate's TRANSFORMER_BASED_WRAP over the model's `_no_split_modules` (transformers 5.23
    instances: decoder layers and vision blocks everywhere; CLIPVisionEmbeddings for LLaVA, SiglipVisionEmbeddings
    and SiglipMultiheadAttentionPoolingHead for Gemma 3 and PaliGemma, PaliGemmaMultiModalProjector)."""
    text, vision = setup.model.text, setup.model.vision
    freeze_from = text.num_layers - setup.freeze_trainable_layers if setup.method == "freeze" else 0
    # autograd reaches a vision unit when the tower trains, or when the stack hooks its input embeddings
    vision_backward = setup.vision is not Train.FROZEN or input_embeddings_hooked(setup)
    units: list[Unit] = []
    if vision is not None and vision.num_layers:
        if vision.arch in EMBEDDING_UNIT_ARCHS:
            units.append(_whole_unit(setup, "vision embeddings", VISION, _embedding_unit_params(vision),
                                     vision_backward))
        block = (vision_layer_linears(vision), vision_layer_other_params(vision))
        blocks = vision.num_layers + vision.num_global_layers
        # LLaVA reads the features of `vision_feature_layer` (-2): the blocks after it run, but the loss never
        # reaches them (no backward, no gradients; planner/families/llava/memory.py `_clip_selected_index`)
        used = vision.feature_layers[0] % (blocks + 1) if vision.feature_layers else blocks
        units += [_layer_unit(setup, f"vision block {i}", VISION, *block, True, vision_backward and i < used,
                              i < used) for i in range(blocks)]
        if vision.arch == "siglip" and vision.use_head:
            head_linears, head_other = _siglip_head(vision)
            units.append(_whole_unit(setup, "vision head", VISION,
                                     sum(l.params for l in head_linears) + head_other, vision_backward))
    if setup.model.family in PROJECTOR_UNIT_FAMILIES:
        projector = model_inventory(setup.model)[PROJECTOR].params
        units.append(_whole_unit(setup, "projector", PROJECTOR, projector,
                                 setup.projector is not Train.FROZEN or vision_backward))
    cross = set(text.cross_attention_layers)
    for i in range(text.num_layers):
        layer = ((mllama_cross_layer_linears(text), mllama_cross_layer_other_params(text)) if i in cross else
                 (text_layer_linears(text), text_layer_other_params(text)))
        units.append(_layer_unit(setup, f"language layer {i}", LANGUAGE, *layer, i >= freeze_from, True))
    return [_root_unit(setup, units)] + units


# The units in flight ----------------------------------------------------------------------------------------------


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _forward_walk(units: list[Unit], n: int, reshard: bool) -> tuple[dict[str, int], dict[str, int]]:
    """Largest FSDP buffers of the forward, and those at its end (the loss runs in the root's forward).

    At a unit's pre-forward (`FSDPParamGroup.pre_forward`: `unshard` then `wait_for_unshard`): its all-gather output
    (param_dtype) is allocated while the previous unit's is still held (`comm_ctx.all_gather_state`, kept for the
    next copy-out to overlap), then its unsharded parameters are allocated by the copy-out before that previous
    output is dropped (`wait_for_unshard` binds it to a local, `prev_all_gather_state`, alive until it returns).
    `reshard_after_forward` frees the unsharded parameters at post-forward; the root's stay until the root's own
    post-forward after the loss. One GPU per shard group (no_shard) all-gathers nothing: the parameters are copied."""
    held = unsharded = 0
    peak: dict[str, int] = {}
    for index, unit in enumerate(units):
        gather = unit.gathered_bytes if n > 1 else 0
        moment = {"fsdp/unsharded_parameters": unsharded + unit.gathered_bytes,
                  "fsdp/all_gather_buffers": held + gather}
        if sum(moment.values()) > sum(peak.values()):
            peak = moment
        held, unsharded = gather, unsharded + unit.gathered_bytes
        if index and reshard:
            unsharded -= unit.gathered_bytes
    return peak, {"fsdp/unsharded_parameters": unsharded, "fsdp/all_gather_buffers": held}


def _backward_walk(units: list[Unit], n: int, reshard: bool, root_early_grad_bytes: int,
                   accumulated: int = 0) -> dict[str, int]:
    """The largest sum of FSDP buffers and sharded gradients over the backward, unit by unit in reverse post-forward
    order (the root first: its pre-backward runs first, its post-backward last).

    Per unit (`pre_backward`, autograd, `post_backward`): the all-gather (unless prefetched) and copy-out, the
    all-gather output freed at once (backward keeps no all_gather_state); the next unit's all-gather prefetched
    (`_backward_prefetch`, one unit, whether or not autograd will reach it: a frozen vision block's output waits
    until the end of backward); the unsharded gradients (param_dtype); at post-backward the unit reshards, the
    previous reduce-scatter input is released (`reduce_scatter_states`, one buffer), the unsharded gradients are
    copied into this unit's reduce-scatter input (reduce_dtype) and freed, and the reduce-scatter output (1/N of it)
    becomes the sharded gradients (cast to the stored dtype). `accumulated`: the unsharded gradients kept from the
    earlier micro-steps of gradient accumulation (reduced, and freed, unit by unit in the last one)."""
    root, layers = units[0], units[1:]
    order = [root] + layers[::-1]
    unsharded = sum(u.gathered_bytes for u in units) if not reshard else 0
    prefetched: dict[int, int] = {}
    rs_held = grads = 0
    peak: dict[str, int] = {}

    def note(**terms: int) -> None:
        nonlocal peak
        moment = {"fsdp/unsharded_parameters": unsharded, "fsdp/all_gather_buffers": sum(prefetched.values()),
                  "fsdp/unsharded_gradients": 0, "fsdp/reduce_scatter_buffers": rs_held, "gradients/fsdp_shard": grads,
                  ACCUMULATED_GRADIENTS: accumulated}
        for key, value in terms.items():
            moment[key] = moment.get(key, 0) + value
        if sum(moment.values()) > sum(peak.values()):
            peak = moment

    def unshard(index: int, unit: Unit) -> None:
        nonlocal unsharded
        if not reshard:
            return
        gather = prefetched.pop(index, unit.gathered_bytes if n > 1 else 0)
        unsharded += unit.gathered_bytes
        note(**{"fsdp/all_gather_buffers": gather})
        following = index + 1
        if following < len(order) and n > 1:
            prefetched[following] = order[following].gathered_bytes

    def reduce(unit: Unit, unsharded_grads: int, early: int = 0) -> None:
        nonlocal unsharded, rs_held, grads, accumulated
        note(**{"fsdp/unsharded_gradients": unsharded_grads, EARLY_GRADIENT: early})
        unsharded -= unit.gathered_bytes
        if not unit.grad_bytes:
            return
        accumulated -= min(accumulated, unit.grad_bytes)  # copied into the reduce-scatter input, then freed
        rs_held = 0
        output = _ceil_div(unit.reduce_bytes, n)
        shard = _ceil_div(unit.sharded_grad_bytes, n)
        note(**{"fsdp/reduce_scatter_buffers": unit.reduce_bytes + output + (shard if shard != output else 0)})
        rs_held, grads = unit.reduce_bytes, grads + shard

    unshard(0, root)
    for index, unit in enumerate(order[1:], start=1):
        if not unit.backward:
            continue
        unshard(index, unit)
        reduce(unit, unit.grad_bytes, root_early_grad_bytes)
    reduce(root, root.grad_bytes)
    return peak


@dataclass(frozen=True)
class FsdpStates:
    """Per phase, the FSDP terms of one GPU (they replace the single-GPU weights, gradients and optimizer states);
    and the host bytes per node that CPU offload holds."""

    gpu: dict[str, dict[str, int]]
    cpu_per_node: dict[str, int]
    units: list[Unit]


def fsdp_states(setup: TrainSetup, optimizer_bytes: int, step_counter_bytes: int = 0) -> FsdpStates:
    """The FSDP terms of each phase for `setup`; `optimizer_bytes`: the single-GPU optimizer states (the simulation's,
    of the trainable parameters), sharded like the parameters they belong to; `step_counter_bytes`: fused AdamW's
    0-d step tensors, one per parameter on every GPU (with `--offload all` on the host)."""
    n = shard_size(setup)
    units = fsdp_units(setup)
    reshard = setup.fsdp != "shard_grad_op"
    offload = setup.offload == "all"
    params = sum(_ceil_div(u.stored_bytes, n) for u in units)
    grads = sum(_ceil_div(u.sharded_grad_bytes, n) for u in units)
    optimizer = _ceil_div(optimizer_bytes, n)
    replicated = sum(u.replicated_bytes for u in units)
    persistent = {"weights/fsdp_shard": 0 if offload else params, "weights/quant_state": replicated,
                  "optimizer/fsdp_shard": 0 if offload else optimizer,
                  "optimizer/step_counters": 0 if offload else step_counter_bytes}
    forward, after_forward = _forward_walk(units, n, reshard)
    t = setup.model.text
    early = 0
    if units[0].grad_bytes and not t.tie_word_embeddings:  # lm_head's gradient exists from the start of backward
        early = t.vocab_size * t.hidden_size * COMPUTE_BYTES[setup.precision]
    # gradient accumulation: the HF Trainer runs the earlier micro-steps under accelerate's no_sync
    # (`set_requires_gradient_sync(False)`): every unit keeps its unsharded gradients (param_dtype, equal to
    # reduce_dtype: FSDPParam.to_accumulated_grad_if_needed keeps them) until the last micro-step reduces them
    accumulated = sum(u.grad_bytes for u in units) if setup.gradient_accumulation_steps > 1 else 0
    if accumulated:
        forward[ACCUMULATED_GRADIENTS] = after_forward[ACCUMULATED_GRADIENTS] = accumulated
    backward = _backward_walk(units, n, reshard, early, accumulated)
    if offload:  # the sharded gradients are copied to the host as each unit's reduce-scatter finishes
        backward["gradients/fsdp_shard"] = 0
    gpu = {"forward": {**persistent, **forward}, "loss": {**persistent, **after_forward},
           "backward": {**persistent, **backward},
           "optimizer": {**persistent, "gradients/fsdp_shard": 0 if offload else grads}}
    cpu: dict[str, int] = {}
    if offload:
        # pinned host copies of this node's GPUs' shards (CPUOffloadPolicy(pin_memory=True))
        cpu = {"offload/fsdp_parameters": params * setup.num_gpus, "offload/fsdp_gradients": grads * setup.num_gpus,
               "offload/fsdp_optimizer": optimizer * setup.num_gpus}
    return FsdpStates({phase: {k: v for k, v in terms.items() if v} for phase, terms in gpu.items()}, cpu, units)


# lm_head's unsharded gradient (an untied lm_head that trains): autograd makes it at the start of backward, before
# any unit's post-backward; FSDPMemTracker counts it as a temporary until the root's post-backward
EARLY_GRADIENT = "fsdp/lm_head_unsharded_gradient"
ACCUMULATED_GRADIENTS = "fsdp/accumulated_unsharded_gradients"
def activation_setup(setup: TrainSetup) -> TrainSetup:
    """The single-GPU setup whose simulated activations an FSDP step has. Under mixed precision the units compute
    with parameters all-gathered in param_dtype (MixedPrecisionPolicy), so autocast finds half-precision weights and
    keeps no fp32-to-half weight copies, and gradients come out in the half dtype: the step of a module cast to the
    compute dtype, which the simulation runs for DeepSpeed (ZeRO casts the module; step.py). Without autocast (fp32,
    pure bf16) the parameters already are in the compute dtype."""
    if setup.precision not in ("bf16", "fp16"):
        return setup
    return replace(setup, sharding="zero", fsdp="full_shard", zero=3, offload="none")


MODEL_STATE_PREFIXES = ("weights/", "adapters/", "gradients/", "optimizer/")
REPLICATED_OPTIMIZER_TERMS = ("optimizer/step_counters",)  # a 0-d step tensor per parameter, not sharded


def single_gpu_optimizer_bytes(breakdown: dict[str, int]) -> int:
    """The simulation's optimizer states that FSDP shards (all but the per-parameter step counters)."""
    return sum(v for k, v in breakdown.items()
               if k.startswith("optimizer/") and k not in REPLICATED_OPTIMIZER_TERMS)


def fsdp_breakdown(breakdown: dict[str, int], phase: str, states: FsdpStates) -> dict[str, int]:
    """One phase of the simulation (of `activation_setup`) with its model states replaced by the FSDP terms of one
    GPU."""
    out = {k: v for k, v in breakdown.items() if not k.startswith(MODEL_STATE_PREFIXES)}
    out.update(states.gpu[phase])
    return out


# Sharded QLoRA under DeepSpeed ZeRO-3 -------------------------------------------------------------------------------


def quantized_linear_params(setup: TrainSetup) -> int:
    """Parameters of the language model's linears that bitsandbytes quantizes (all but lm_head, which transformers'
    `get_keys_to_not_convert` leaves in the compute dtype)."""
    if setup.method != "qlora":
        return 0
    return sum(linear.params - linear.out_features * linear.bias
               for linear in model_inventory(setup.model)[LANGUAGE].linears if linear.lora_all)


def zero3_partitioned_params(setup: TrainSetup, total_params: int) -> int:
    """Elements ZeRO-3 partitions, in the half dtype. A 4-bit weight stored in the compute dtype
    (`bnb_4bit_quant_storage`, as LLaMA-Factory sets it for ZeRO-3 and FSDP) packs four weights per bf16 element."""
    quantized = quantized_linear_params(setup)
    return total_params - quantized + quantized // 4


def quantized_weight_bytes(setup: TrainSetup) -> int:
    """QLoRA's bitsandbytes weights as stored outside ZeRO-3 and FSDP: packed (uint8 for 4-bit, int8 for 8-bit) with
    their quant state. ZeRO-1/2 cast the parameters to the half dtype (DeepSpeedEngine
    `_cast_module_mixed_precision`: only dtypes in CASTABLE_DTYPES, the floating-point ones), so these stay as they
    are."""
    if setup.method != "qlora":
        return 0
    return sum(linear.count * sum(_quantized_bytes(linear.in_features * linear.out_features, linear.out_features,
                                                   setup.quant_bits))
               for linear in model_inventory(setup.model)[LANGUAGE].linears if linear.lora_all)


def quant_state_bytes(setup: TrainSetup) -> int:
    """The 4-bit weights' quant state (absmax, codes): attributes of the weights, whole on every GPU."""
    if setup.method != "qlora":
        return 0
    return sum(linear.count * _quantized_bytes(linear.in_features * linear.out_features, linear.out_features,
                                               setup.quant_bits)[1]
               for linear in model_inventory(setup.model)[LANGUAGE].linears if linear.lora_all)


# Communication (for the step-time model, planner/throughput.py) ----------------------------------------------------


def fsdp_communication_bytes(setup: TrainSetup) -> dict[str, float]:
    """Bytes each GPU sends per optimizer step by collective, before the ring factor, for `throughput.step_time`:
    - `allgather_parameters`: every unit in param_dtype at each forward, and again in backward for the units that
      run it unless shard_grad_op keeps them unsharded (FSDPParamGroup.pre_forward / pre_backward);
    - `reduce_scatter_gradients`: each trainable unit's gradients in reduce_dtype, once per optimizer step (the HF
      Trainer accumulates under accelerate's no_sync, `set_requires_gradient_sync(False)`, until the last
      micro-step);
    - `allreduce_gradients` (hybrid_shard across nodes, no_shard across all GPUs): the reduced gradients (1/N of
      them for hybrid_shard) all-reduced over the replicas (`foreach_reduce` with `all_reduce_group`);
    - `offload_parameters` (CPU offload): each all-gather's shard copied host to device, each gradient shard back.
    Keys map to parts of the step time; a shard group of one GPU all-gathers nothing."""
    units = fsdp_units(setup)
    n = shard_size(setup)
    micro_steps = setup.gradient_accumulation_steps
    gathered = sum(u.gathered_bytes for u in units)
    regathered = sum(u.gathered_bytes for u in units if u.backward) if setup.fsdp != "shard_grad_op" else 0
    reduced = sum(u.reduce_bytes for u in units)
    out: dict[str, float] = {}
    if n > 1:
        out["allgather_parameters"] = micro_steps * (gathered + regathered)
        out["reduce_scatter_gradients"] = reduced
    if setup.fsdp in ("hybrid_shard", "no_shard") and setup.world_size > n:
        out["allreduce_gradients"] = 2 * reduced / n
    if setup.offload == "all":
        stored = sum(u.stored_bytes for u in units) / n
        grads = sum(u.sharded_grad_bytes for u in units) / n
        out["offload_parameters"] = micro_steps * 2 * stored + grads
    return out
