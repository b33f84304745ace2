"""LLaMA-Factory's preference stage (`stage: dpo`) on symbolic tensors: what replaces the SFT loss in the step.

The trainer is `CustomDPOTrainer` (llamafactory 0.9.5, train/dpo/trainer.py), a subclass of TRL's DPOTrainer; the
HF Trainer's `compute_loss` goes to its `get_batch_loss_metrics`, which runs, in this order:

1. `concatenated_forward(model, batch)`: the pairwise collator's batch (data/collator.py
   `PairwiseDataCollatorWithPadding`: the chosen then the rejected sequence of each sample, 2 x batch_size rows, each
   with the sample's images) is cloned when a reference model is used (`nested_detach(batch, clone=True)`), the
   labels are popped (the model computes no loss), `model(**batch).logits.to(torch.float32)` (accelerate's
   convert_outputs_to_fp32 already gives fp32 logits under AMP), then `get_batch_logps` (train/trainer_utils.py):
   `labels[:, 1:].clone()`, the loss mask, `logits[:, :-1, :].log_softmax(-1)` (a non-contiguous view: CUDA's
   `host_softmax` runs on `input_.contiguous()`, aten/src/ATen/native/cuda/SoftMax.cu), `torch.gather` of the label
   log-probs, `(per_token_logps * loss_mask).sum(-1)`. The fp32 logits stay referenced by the returned dict
   (`chosen_logits`, `rejected_logits` for the metrics) until `get_batch_loss_metrics` returns; the graph keeps the
   log_softmax result (its backward formula) and the gathered index.
2. `compute_reference_log_probs`: under `torch.no_grad()` the same `concatenated_forward` on the reference: for LoRA
   and QLoRA (`create_ref_model` returns None) the policy inside peft's `disable_adapter()` (each LoRA layer runs its
   base layer alone, tuners/lora/layer.py `Linear.forward`), otherwise a frozen copy of the model loaded with
   `is_trainable=False` in the compute dtype. It runs while the policy's graph and fp32 logits are alive.
3. The loss on (batch,) tensors: TRL's `dpo_loss` (sigmoid), or LLaMA-Factory's `odds_ratio_loss` / `simpo_loss`,
   plus `pref_ftx` times the chosen sequences' SFT loss; the metrics' small reductions.

`stage: kto` is `CustomKTOTrainer` (train/kto/trainer.py), a subclass of TRL's KTOTrainer whose
`get_batch_loss_metrics` it overrides; the batch is KTODataCollatorWithPadding's (data/collator.py): batch_size
target rows (each sample's prompt with its desirable or undesirable completion; `kto_tags` says which) beside
batch_size KL rows (the prompt with another sample's completion, data/processor/feedback.py), each padded apart, and
`attention_mask`, `kl_attention_mask`, `kl_labels`. One step runs four forwards of batch_size rows:

1. `concatenated_forward(model, batch)`: `forward(model, batch)` on the target rows with grad, then under
   `torch.no_grad()` `forward(model, batch, prefix="kl_")` on the KL rows (the policy, adapters on). Each `forward`
   clones the whole batch (`nested_detach(batch, clone=True)`, the KL keys included), hands the model input_ids (or
   kl_input_ids), the attention mask and the image keys, takes `.logits.to(torch.float32)` and `get_batch_logps`,
   and returns the logits, the summed log-probs and their average over the valid length (`logps / valid_length`).
   The KL forward's logits go when its result is unpacked; the target logits are split by `kto_tags` with boolean
   indexing (`target_logits[kto_tags]`, `target_logits[~kto_tags]`: copies of the chosen and the rejected rows, fp32,
   while the target logits live) and then freed; the chosen and rejected copies stay referenced until
   `get_batch_loss_metrics` returns (the metrics' `.nansum()`), through both reference forwards.
2. `compute_reference_log_probs`: the same `concatenated_forward` under `torch.no_grad()` on the reference (the
   policy inside `disable_adapter()` for LoRA, otherwise the frozen copy): two more forwards, the reference's target
   logits alive during its KL forward and split into chosen and rejected copies before they go.
3. TRL's `kto_loss` (trl 0.18-0.24 trainer/kto_trainer.py, loss_type "kto"): the KL estimate `(policy_KL_logps -
   reference_KL_logps).mean().detach()` (gathered over processes, `.mean().clamp(min=0)`), `1 - sigmoid(beta *
   (logratios - kl))` for the chosen rows and `1 - sigmoid(beta * (kl - logratios))` for the rejected ones, each
   scaled by `kto_chosen_weight` / `kto_rejected_weight` and concatenated; `losses.nanmean()`, plus `pref_ftx` times
   the chosen rows' average-log-prob loss; the metrics (`.nansum().item()` of small and of the chosen / rejected
   logits).

The memory does not depend on how many rows are desirable: the chosen and the rejected copies hold batch_size rows
together. The simulation takes the first ceil(batch_size / 2) rows as desirable (`kto_chosen_rows`), as the tracer's
batch does.

The tracer runs the same methods written out in torch (profiler/preference.py); tests/test_accuracy_preference.py
holds this simulation to it per phase.
"""

from __future__ import annotations

from .sim import Engine, Node, T
from .ops import cast


def logits_output(e: Engine, logits: T) -> T:
    """`model(**batch).logits.to(torch.float32)`: the fp32 logits the DPO trainer works on (accelerate's
    convert_outputs_to_fp32 copy under AMP, `.to(torch.float32)` otherwise; the same tensor when already fp32). The
    copy is differentiable (ToCopyBackward)."""
    return cast(e, logits, "fp32", name="logits:fp32_output")


def get_batch_logps(e: Engine, logits32: T, rows: int, seq: int, vocab: int) -> tuple[T, T]:
    """LLaMA-Factory's `get_batch_logps` (ld_alpha None) on `rows` sequences of `seq` tokens; returns the summed
    log-probs (rows,) and the valid lengths (rows,)."""
    shifted = rows * (seq - 1)
    labels = e.new(shifted, "int64", name="dpo_labels")  # labels[:, 1:].clone()
    view = logits32.view(shifted * vocab, name="logits[:, :-1]")  # logits[:, :-1, :]
    e.record(Node("slice", [logits32] if logits32.rg else [], [], []), view)
    loss_mask = e.new(shifted, "bool", name="loss_mask")  # labels != IGNORE_INDEX
    ignored = e.new(shifted, "bool", name="labels_eq_ignore")  # labels[labels == IGNORE_INDEX] = 0 (in place)
    del ignored
    # host_softmax: input_.contiguous(), a copy unless the slice is contiguous already (one row: KTO at batch 1)
    contiguous = e.new(shifted * vocab, "fp32", name="log_softmax_input") if rows > 1 else None
    logp = e.new(shifted * vocab, "fp32", name="log_softmax")
    del contiguous
    e.record(Node("log_softmax", [view] if view.rg else [], [logp], []), logp)
    del view
    per_token = e.new(shifted, "fp32", name="per_token_logps")  # gather (saves the index), squeeze(2)
    e.record(Node("gather", [logp] if logp.rg else [], [labels], []), per_token)
    del logp, labels
    valid_length = e.new(rows, "int64", name="valid_length")  # loss_mask.sum(-1)
    masked = e.new(shifted, "fp32", name="per_token_logps*mask")  # saves loss_mask for the gradient
    e.record(Node("mul", [per_token] if per_token.rg else [], [loss_mask], []), masked)
    del per_token, loss_mask
    logps = e.new(rows, "fp32", name="logps")  # .sum(-1): its backward expands the gradient (a view)
    node = Node("sum", [masked] if masked.rg else [], [], [])
    node.grad_dtype[0] = "passthrough"
    e.record(node, logps)
    del masked
    return logps, valid_length


def _small(e: Engine, name: str, *inputs: T, numel: int = 1, saved: tuple = ()) -> T:
    """An elementwise op on (batch,) tensors: one block each."""
    out = e.new(numel, "fp32", name=name)
    e.record(Node(name, [t for t in inputs if t.rg], list(saved), []), out)
    return out


def concatenated_forward(e: Engine, setup, model, inputs: dict[str, T]) -> dict:
    """CustomDPOTrainer.concatenated_forward on `model` (policy or reference; grad mode as the caller set it)."""
    rows, batch = setup.rows_per_micro_batch, setup.batch_size
    if setup.uses_reference:  # nested_detach(batch, clone=True)
        batch_inputs = {k: e.new(t.numel, t.dtype, name=f"{t.name}:clone") for k, t in inputs.items()}
    else:
        batch_inputs = dict(inputs)
    labels = batch_inputs.pop("labels")  # the locals `batch` and `labels` live until the method returns
    if setup.uses_reference and e.grad_enabled:  # cloned inputs the graph saves live until backward
        e.kept_until_backward_end += [batch_inputs[k] for k in model.graph_held_inputs(e) if k in batch_inputs]
    logits32 = model.forward(e, batch_inputs)
    t = setup.model.text
    logps, valid_length = get_batch_logps(e, logits32, rows, setup.seq_len, t.vocab_size)
    if setup.pref_loss in ("orpo", "simpo"):  # all_logps / valid_length (saves the divisor)
        logps = _small(e, "div", logps, numel=rows, saved=(valid_length,))
        chosen_avg = logps.view(batch)
    else:  # chosen_logps / chosen_length
        chosen_avg = _small(e, "div", logps, numel=batch, saved=(valid_length,))
    del valid_length, batch_inputs, labels
    return {"logps": logps, "logits": logits32, "chosen_avg": chosen_avg}


def preference_loss(e: Engine, setup, model, reference, inputs: dict[str, T]) -> T:
    """get_batch_loss_metrics, then TRL's compute_loss (`loss.to(device)`): the loss tensor the step backpropagates.
    `reference`: the frozen copy's model (full / freeze), or None (LoRA: the policy with adapters disabled)."""
    if setup.stage == "kto":
        return kto_batch_loss(e, setup, model, reference, inputs)
    policy = concatenated_forward(e, setup, model, inputs)
    ref_logps = None
    if setup.uses_reference:
        was = e.grad_enabled
        e.grad_enabled = False
        e.adapters_disabled = reference is None
        try:
            ref = concatenated_forward(e, setup, reference or model, inputs)
        finally:
            e.grad_enabled, e.adapters_disabled = was, False
        ref_logps = ref["logps"]
        del ref
    batch = setup.batch_size
    logps = policy["logps"]  # chosen and rejected: views of one (rows,) tensor
    if setup.pref_loss == "sigmoid":  # TRL dpo_loss
        logratios = _small(e, "sub", logps, numel=batch)
        ref_logratios = _small(e, "sub", ref_logps, numel=batch)
        logits = _small(e, "sub", logratios, ref_logratios, numel=batch)
        del logratios, ref_logratios
        scaled = _small(e, "mul_scalar", logits, numel=batch)
        logsig = _small(e, "logsigmoid", scaled, numel=batch, saved=(scaled,))
        losses = _small(e, "neg", logsig, numel=batch)
        del logits, scaled, logsig
        rewards = [e.new(batch, "fp32", name="reward") for _ in range(4)]  # beta * (chosen - ref_chosen), rejected
        del rewards[0::2]
    elif setup.pref_loss == "orpo":  # odds_ratio_loss
        diff = _small(e, "sub", logps, numel=batch)
        exps = [_small(e, "exp", logps, numel=batch, saved=()) for _ in range(2)]
        log1ps = [_small(e, "log1p", x, numel=batch, saved=(x,)) for x in (_small(e, "neg", x, numel=batch)
                                                                            for x in exps)]
        del exps
        log1p_diff = _small(e, "sub", *log1ps, numel=batch)
        del log1ps
        log_odds = _small(e, "sub", diff, log1p_diff, numel=batch)
        del diff, log1p_diff
        sft = _small(e, "neg", logps, numel=batch)
        logsig = _small(e, "logsigmoid", log_odds, numel=batch, saved=(log_odds,))
        del log_odds
        neg = _small(e, "neg", logsig, numel=batch)
        del logsig
        scaled = _small(e, "mul_scalar", neg, numel=batch)
        del neg
        losses = _small(e, "add", sft, scaled, numel=batch)
        del sft, scaled
        rewards = [e.new(batch, "fp32", name="reward") for _ in range(2)]
    else:  # simpo_loss
        pi = _small(e, "sub", logps, numel=batch)
        logits = _small(e, "sub_scalar", pi, numel=batch)
        del pi
        scaled = _small(e, "mul_scalar", logits, numel=batch)
        del logits
        logsig = _small(e, "logsigmoid", scaled, numel=batch, saved=(scaled,))
        del scaled
        losses = _small(e, "neg", logsig, numel=batch)
        del logsig
        rewards = [e.new(batch, "fp32", name="reward") for _ in range(2)]
    sft_loss = _small(e, "neg", policy["chosen_avg"], numel=batch)  # -policy_chosen_logps_avg
    if setup.pref_ftx > 1e-6:  # losses += ftx_gamma * sft_loss (in place)
        scaled = _small(e, "mul_scalar", sft_loss, numel=batch)
        total = _small(e, "add", losses, scaled, numel=batch)
        del scaled, losses
        losses = total
    metrics = [e.new(1, "fp32", name="metric") for _ in range(8)]  # the metrics' reductions, dropped by .item()
    del metrics, rewards, sft_loss, ref_logps, logps, policy
    return _small(e, "mean", losses)


# KTO ----------------------------------------------------------------------------------------------------------------
# Batch keys CustomKTOTrainer.forward does not hand the model: the labels, the collator's masks (all ones without
# padding; transformers drops such a mask for sdpa, masking_utils._ignore_causal_mask_sdpa), the KL keys and the tags
KTO_BATCH_ONLY = ("labels", "attention_mask", "kl_input_ids", "kl_attention_mask", "kl_labels", "kto_tags")


def kto_chosen_rows(batch_size: int) -> int:
    """Desirable rows per micro-batch as the simulation and the tracer lay them out (the memory is the same for any
    split: the chosen and the rejected copies hold batch_size rows together)."""
    return (batch_size + 1) // 2


def add_kto_inputs(e: Engine, setup, inputs: dict[str, T]) -> None:
    """KTODataCollatorWithPadding's keys beside the target batch: the attention masks and the KL rows' input ids
    and labels (int64, batch_size x seq_len each, padded like the target rows), and `kto_tags` (bool, one per row)."""
    tokens = setup.batch_size * setup.seq_len
    for key in ("attention_mask", "kl_input_ids", "kl_attention_mask", "kl_labels"):
        inputs[key] = e.new(tokens, "int64", name=key, category="inputs/batch")
    inputs["kto_tags"] = e.new(setup.batch_size, "bool", name="kto_tags", category="inputs/batch")


def kto_forward(e: Engine, setup, model, inputs: dict[str, T], prefix: str = "") -> tuple[T, T, T]:
    """CustomKTOTrainer.forward: (fp32 logits, summed log-probs, log-probs / valid length) of the target rows
    (prefix "") or the KL rows (prefix "kl_"); grad mode as the caller set it."""
    rows = setup.batch_size
    batch = {k: e.new(t.numel, t.dtype, name=f"{t.name}:clone") for k, t in inputs.items()}  # nested_detach(clone)
    model_inputs = {k: t for k, t in batch.items() if k not in KTO_BATCH_ONLY}
    model_inputs["input_ids"] = batch[f"{prefix}input_ids"]
    if e.grad_enabled:  # cloned inputs the graph saves live until backward
        e.kept_until_backward_end += [model_inputs[k] for k in model.graph_held_inputs(e) if k in model_inputs]
    logits32 = model.forward(e, model_inputs)
    del model_inputs
    logps, valid_length = get_batch_logps(e, logits32, rows, setup.seq_len, setup.model.text.vocab_size)
    average = _small(e, "div", logps, numel=rows, saved=(valid_length,))  # logps / valid_length
    del valid_length, batch
    return logits32, logps, average


def _rows(e: Engine, x: T, mask: T, rows: int, per_row: int, name: str) -> T:
    """`x[mask]` with a boolean mask over the rows: CUDA's index turns the mask into indices first (`nonzero`: an
    int64 (rows, 1) tensor for the kernel's duration, ATen TensorAdvancedIndexing `expandTensors`), then copies the
    rows; IndexBackward0 saves the mask."""
    index = e.new(rows, "int64", name="nonzero")
    out = e.new(rows * per_row, x.dtype, name=name)
    del index
    e.record(Node("index", [x] if x.rg else [], [mask], []), out)
    return out


def kto_concatenated_forward(e: Engine, setup, model, inputs: dict[str, T]) -> dict:
    """CustomKTOTrainer.concatenated_forward: the target forward (grad as the caller set it), the KL forward under
    no_grad, and the split of the target rows by `kto_tags`."""
    chosen = kto_chosen_rows(setup.batch_size)
    rejected = setup.batch_size - chosen
    per_row = setup.seq_len * setup.model.text.vocab_size
    target_logits, target_logps, target_average = kto_forward(e, setup, model, inputs)
    was = e.grad_enabled
    e.grad_enabled = False
    try:  # `_, kl_logps, _ = self.forward(model, batch, prefix="kl_")`: the last `_` keeps the average
        kl_logits, kl_logps, kl_average = kto_forward(e, setup, model, inputs, prefix="kl_")
        del kl_logits
    finally:
        e.grad_enabled = was
    tags = inputs["kto_tags"]
    out = {"chosen_logits": _rows(e, target_logits, tags, chosen, per_row, "chosen_logits"),
           "chosen_logps": _rows(e, target_logps, tags, chosen, 1, "chosen_logps")}
    for key, source, per in (("rejected_logits", target_logits, per_row), ("rejected_logps", target_logps, 1)):
        not_tags = e.new(setup.batch_size, "bool", name="~kto_tags")  # a fresh `~batch["kto_tags"]` each time
        out[key] = _rows(e, source, not_tags, rejected, per, key)
        del not_tags
    out["kl_logps"] = kl_logps
    out["chosen_logps_avg"] = _rows(e, target_average, tags, chosen, 1, "chosen_logps_avg")
    del target_logits, target_logps, target_average, kl_average, kl_logps
    return out


def _nanmean(e: Engine, x: T) -> T:
    """`x.nanmean()` (ATen ReduceOps.cpp, composite): `isnan(x).logical_not_().sum()` (a bool temporary, an int64
    count) and `nansum(x).div(count)`; NansumBackward0 saves x, DivBackward0 the count."""
    flags = e.new(x.numel, "bool", name="isnan")
    count = e.new(1, "int64", name="count")
    del flags
    total = _small(e, "nansum", x, saved=(x,))
    out = _small(e, "div", total, saved=(count,))
    del total, count
    return out


def _kto_half(e: Engine, policy_logps: T, reference_logps: T, kl: T, rows: int) -> tuple[T, T, T]:
    """TRL kto_loss for the chosen or the rejected rows: (logratios, losses, rewards); empty tensors when there are
    none (`torch.Tensor([]).to(device)`: no storage)."""
    if rows == 0:
        return tuple(e.new(0, "fp32", name="empty") for _ in range(3))
    logratios = _small(e, "sub", policy_logps, reference_logps, numel=rows)
    shifted = _small(e, "sub", logratios, kl, numel=rows)  # logratios - kl, or kl - logratios
    scaled = _small(e, "mul_scalar", shifted, numel=rows)  # beta * (...)
    del shifted
    sigmoid = e.new(rows, "fp32", name="sigmoid")
    e.record(Node("sigmoid", [scaled] if scaled.rg else [], [sigmoid], []), sigmoid)  # saves its result
    del scaled
    losses = _small(e, "rsub", sigmoid, numel=rows)  # 1 - sigmoid (RsubBackward0 saves nothing)
    del sigmoid
    rewards = e.new(rows, "fp32", name="rewards")  # beta * logratios.detach()
    return logratios, losses, rewards


def kto_batch_loss(e: Engine, setup, model, reference, inputs: dict[str, T]) -> T:
    """CustomKTOTrainer.get_batch_loss_metrics, then TRL's compute_loss (`loss.to(device)`)."""
    batch = setup.batch_size
    chosen = kto_chosen_rows(batch)
    policy = kto_concatenated_forward(e, setup, model, inputs)
    was = e.grad_enabled
    e.grad_enabled = False
    e.adapters_disabled = reference is None  # compute_reference_log_probs
    try:
        ref = kto_concatenated_forward(e, setup, reference or model, inputs)
    finally:
        e.grad_enabled, e.adapters_disabled = was, False
    ref = {k: ref[k] for k in ("chosen_logps", "rejected_logps", "kl_logps")}  # the unpacking drops the rest
    # kto_loss: the KL estimate `(policy_KL_logps - reference_KL_logps).mean().detach()`, gathered over the
    # data-parallel ranks (accelerate gather_for_metrics: the tensor itself on one process, an all_gather into a
    # (world_size,) tensor otherwise), then `.mean().clamp(min=0)`
    difference = e.new(batch, "fp32", name="kl_difference")
    kl = e.new(1, "fp32", name="kl")
    del difference
    gathered = kl
    if setup.world_size > 1:  # accelerate `_gpu_gather_one`: `tensor.clone()[None]`, all_gather_into_tensor
        clone = e.new(1, "fp32", name="kl_clone")
        gathered = e.new(setup.world_size, "fp32", name="kl_gathered")
        del clone
    mean = e.new(1, "fp32", name="kl_mean")
    clamped = e.new(1, "fp32", name="kl_clamped")
    del mean, gathered
    kl = clamped
    del clamped
    chosen_ratios, chosen_losses, chosen_rewards = _kto_half(e, policy["chosen_logps"], ref["chosen_logps"], kl,
                                                             chosen)
    rejected_ratios, rejected_losses, rejected_rewards = _kto_half(e, policy["rejected_logps"],
                                                                   ref["rejected_logps"], kl, batch - chosen)
    # torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    weighted = [_small(e, "mul_scalar", x, numel=x.numel) for x in (chosen_losses, rejected_losses)]
    losses = _small(e, "cat", *weighted, numel=batch)
    del weighted, chosen_losses, rejected_losses, chosen_ratios, rejected_ratios  # kto_loss returns
    losses = _nanmean(e, losses)
    if setup.pref_ftx > 1e-6 and chosen > 0:  # losses += ftx * sft_loss.nanmean() / len(chosen) * len(labels)
        sft_loss = _small(e, "neg", policy["chosen_logps_avg"], numel=chosen)
        term = _nanmean(e, sft_loss)
        del sft_loss
        for op in ("mul_scalar", "div_scalar", "mul_scalar"):
            term = _small(e, op, term)
        total = losses.view(name="losses+=")  # in place: no allocation, AddBackward0 takes the node
        e.record(Node("add", [t for t in (losses, term) if t.rg], [], []), total)
        del term, losses
        losses = total
    for x in (chosen_rewards, policy["chosen_logps"], policy["chosen_logits"])[:3 if chosen else 0] \
            + (rejected_rewards, policy["rejected_logps"], policy["rejected_logits"])[:3 if batch - chosen else 0]:
        metric = e.new(1, "fp32", name="metric")  # .nansum().item(): dropped at once
        del metric
    del kl, chosen_rewards, rejected_rewards, policy, ref
    return losses
