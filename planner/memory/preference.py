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
    contiguous = e.new(shifted * vocab, "fp32", name="log_softmax_input")  # host_softmax: input_.contiguous()
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
