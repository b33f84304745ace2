"""LLaMA-Factory's preference steps (`stage: dpo`, `stage: kto`) in torch, for the trace: the loss the HF Trainer's
step calls.

LLaMA-Factory's `CustomDPOTrainer` (llamafactory 0.9.5, train/dpo/trainer.py) subclasses TRL's `DPOTrainer`, and its
module imports `trl` at the top; TRL is not installed here (its pins fight ours), so the trainer cannot be imported.
This module writes out, line by line, the methods the training step runs, citing each:

- `get_batch_loss_metrics`: the policy's `concatenated_forward` first, then `compute_reference_log_probs` (the
  reference's forward under `torch.no_grad()`: for LoRA the policy itself inside `disable_adapter()`, since
  `create_ref_model` returns None for finetuning_type lora; otherwise a frozen copy), then the preference loss,
  `pref_ftx` times the chosen sequences' SFT loss, and the metrics (`.item()` of small reductions; here the
  reductions are computed and dropped, as `.item()` drops them).
- `concatenated_forward`: with a reference model the batch is cloned (`nested_detach(batch, clone=True)`), the
  labels popped, `model(**batch).logits.to(torch.float32)`, and LLaMA-Factory's `get_batch_logps`
  (train/trainer_utils.py; `ld_alpha` None, its default) on the whole 2 x batch rows.
- TRL's `DPOTrainer.dpo_loss` for `pref_loss: sigmoid` (label_smoothing 0): logratios of (batch,) tensors and
  `-F.logsigmoid(beta * logits)`; `odds_ratio_loss` and `simpo_loss` are LLaMA-Factory's own.
  TRL's `compute_loss` returns `loss.to(device)` of `get_batch_loss_metrics`' mean.

`stage: kto` is `CustomKTOTrainer` (train/kto/trainer.py; TRL's KTOTrainer supplies `kto_loss` and `compute_loss`),
written out the same way (`kto_loss`): `forward` (the batch cloned, the model given input_ids or kl_input_ids and
the image keys, fp32 logits, `get_batch_logps`, the average over the valid length), `concatenated_forward` (the
target forward, the KL forward under no_grad, the split of the target rows by `kto_tags`),
`compute_reference_log_probs`, TRL's `kto_loss` (trl 0.18-0.24, loss_type "kto", one process: `gather_for_metrics`
returns the tensor), `nanmean`, `pref_ftx` and the metrics. Two stand-ins, both named where they are used: the
boolean indexing of the rows by `kto_tags` (fake tensors cannot run `nonzero`) and the inputs the model computes on
the host in transformers releases LLaMA-Factory supports (Qwen's rope position ids: given precomputed, as for SFT).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from vlplan.planner.memory.preference import KTO_BATCH_ONLY, kto_chosen_rows

IGNORE_INDEX = -100  # llamafactory/extras/constants.py


def cuda_log_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`x.log_softmax(dim)` as CUDA runs it: `host_softmax` works on `input_.contiguous()` (aten/src/ATen/native/cuda/
    SoftMax.cu), so a non-contiguous input (get_batch_logps' `logits[:, :-1, :]`) is copied for the kernel's
    duration; the CPU kernel of the trace does not copy, so the copy is allocated here."""
    out = x.log_softmax(dim)
    if not x.is_contiguous():
        with torch.no_grad():
            copy = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            del copy
    return out


def get_batch_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llamafactory/train/trainer_utils.py `get_batch_logps` (ld_alpha None)."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    loss_mask = labels != IGNORE_INDEX
    labels[labels == IGNORE_INDEX] = 0  # dummy token
    per_token_logps = torch.gather(cuda_log_softmax(logits, -1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
    valid_length = loss_mask.sum(-1)
    logps = (per_token_logps * loss_mask).sum(-1)
    return logps, valid_length


def concatenated_forward(setup, forward, batch: dict) -> dict:
    """CustomDPOTrainer.concatenated_forward."""
    if setup.uses_reference:
        batch = {k: v.detach().clone() for k, v in batch.items()}  # nested_detach(batch, clone=True)
    else:
        batch = dict(batch)
    labels = batch.pop("labels")
    all_logits = forward(**batch, return_dict=True, use_cache=False).logits.to(torch.float32)
    all_logps, valid_length = get_batch_logps(all_logits, labels)
    if setup.pref_loss in ("orpo", "simpo"):
        all_logps = all_logps / valid_length
    batch_size = batch["input_ids"].size(0) // 2
    chosen_logps, rejected_logps = all_logps.split(batch_size, dim=0)
    chosen_logits, rejected_logits = all_logits.split(batch_size, dim=0)
    chosen_length, _ = valid_length.split(batch_size, dim=0)
    chosen_logps_avg = chosen_logps if setup.pref_loss in ("orpo", "simpo") else chosen_logps / chosen_length
    return {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps, "chosen_logits": chosen_logits,
            "rejected_logits": rejected_logits, "chosen_logps_avg": chosen_logps_avg}


def _dpo_sigmoid(setup, chosen, rejected, ref_chosen, ref_rejected):
    """TRL DPOTrainer.dpo_loss, loss_type sigmoid, label_smoothing 0 (f-divergence reverse KL)."""
    logratios = chosen - rejected
    ref_logratios = ref_chosen - ref_rejected
    logits = logratios - ref_logratios
    losses = -F.logsigmoid(setup.pref_beta * logits)
    chosen_rewards = setup.pref_beta * (chosen - ref_chosen).detach()
    rejected_rewards = setup.pref_beta * (rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def _odds_ratio_loss(setup, chosen, rejected):
    """CustomDPOTrainer.odds_ratio_loss."""
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    sft_loss = -chosen
    odds_ratio_loss = -F.logsigmoid(log_odds)
    return sft_loss + setup.pref_beta * odds_ratio_loss


def _simpo_loss(setup, chosen, rejected, simpo_gamma: float = 0.5):
    """CustomDPOTrainer.simpo_loss (simpo_gamma: FinetuningArguments default 0.5)."""
    pi_logratios = chosen - rejected
    logits = pi_logratios - simpo_gamma / setup.pref_beta
    return -F.logsigmoid(setup.pref_beta * logits)


def preference_loss(setup, model, forward, ref_forward=None):
    """The callable `run_steps` calls as the Trainer's forward: returns {"loss": ...} like a model output.
    `model` is the policy (a PeftModel for LoRA), `forward` its Trainer-wrapped forward, `ref_forward` the wrapped
    forward of the frozen reference copy (None for LoRA: the policy with its adapters disabled)."""
    if setup.stage == "kto":
        return kto_loss(setup, model, forward, ref_forward)

    def step(**batch):
        policy = concatenated_forward(setup, forward, batch)
        ref_chosen = ref_rejected = None
        if setup.uses_reference:  # compute_reference_log_probs
            context = model.disable_adapter() if ref_forward is None else nullcontext()
            with torch.no_grad(), context:
                ref = concatenated_forward(setup, ref_forward or forward, batch)
                ref_chosen, ref_rejected = ref["chosen_logps"], ref["rejected_logps"]
            del ref
        chosen, rejected = policy["chosen_logps"], policy["rejected_logps"]
        if setup.pref_loss == "orpo":  # compute_preference_loss
            losses = _odds_ratio_loss(setup, chosen, rejected)
        elif setup.pref_loss == "simpo":
            losses = _simpo_loss(setup, chosen, rejected)
        else:
            losses, chosen_rewards, rejected_rewards = _dpo_sigmoid(setup, chosen, rejected, ref_chosen,
                                                                    ref_rejected)
        if setup.pref_loss in ("orpo", "simpo"):
            chosen_rewards = setup.pref_beta * chosen.detach()
            rejected_rewards = setup.pref_beta * rejected.detach()
        sft_loss = -policy["chosen_logps_avg"]
        if setup.pref_ftx > 1e-6:
            losses += setup.pref_ftx * sft_loss
        # the metrics: each `.item()` drops its reduction at once
        for value in (chosen_rewards.mean(), rejected_rewards.mean(), (chosen_rewards > rejected_rewards).float(),
                      (chosen_rewards - rejected_rewards).mean(), chosen.detach().mean(), rejected.detach().mean(),
                      policy["chosen_logits"].detach().mean(), policy["rejected_logits"].detach().mean()):
            del value
        del policy, chosen, rejected, chosen_rewards, rejected_rewards, sft_loss, ref_chosen, ref_rejected
        return {"loss": losses.mean()}

    return step


# KTO ----------------------------------------------------------------------------------------------------------------
def kto_inputs(batch: dict) -> None:
    """KTODataCollatorWithPadding's keys beside the target rows (`batch`, real tensors): the attention masks (all
    ones: unpadded rows), the KL rows' input ids and labels (the synthetic KL row has the target row's layout: the
    same prompt and images, a completion of the same length) and `kto_tags`, the first `kto_chosen_rows` desirable."""
    ids, labels = batch["input_ids"], batch["labels"]
    batch["attention_mask"] = torch.ones_like(ids)
    batch["kl_input_ids"] = ids.clone()
    batch["kl_attention_mask"] = torch.ones_like(ids)
    batch["kl_labels"] = labels.clone()
    tags = torch.zeros(ids.size(0), dtype=torch.bool)
    tags[:kto_chosen_rows(ids.size(0))] = True
    batch["kto_tags"] = tags


class _BooleanRows(torch.autograd.Function):
    """`x[mask]` for a boolean mask over the rows, as CUDA runs it: the mask becomes indices (`nonzero`, an int64
    tensor for the kernel's duration: here the `index` argument, allocated by the caller) and the rows are copied;
    IndexBackward0 saves the mask and scatters the gradient into zeros of x's shape (derivatives.yaml `index.Tensor`:
    `index_backward(grad.new_zeros(self.sizes()), indices, grad)`). Fake tensors cannot run `nonzero` (a shape that
    depends on the data), so the rows' indices come from the collator's layout."""

    @staticmethod
    def forward(ctx, x, mask, index, start):
        ctx.save_for_backward(mask)
        ctx.start, ctx.count = start, index.numel()
        return x[index]

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_zeros(ctx.saved_tensors[0].shape + grad.shape[1:])
        out[ctx.start:ctx.start + ctx.count] = grad
        return out, None, None, None


def _boolean_rows(x: torch.Tensor, mask: torch.Tensor, rows: range) -> torch.Tensor:
    index = torch.arange(rows.start, rows.stop, device=x.device)  # mask.nonzero()
    out = _BooleanRows.apply(x, mask, index, rows.start)
    del index
    return out


def _kto_forward(forward, batch: dict, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CustomKTOTrainer.forward. The model gets what LLaMA-Factory hands it (input_ids or kl_input_ids, the image
    keys) and the tracer's precomputed stand-ins (Qwen's rope position ids and vision index tensors, see
    profiler/batch.py); not the attention mask, all ones, which transformers drops for sdpa (profiler/batch.py)."""
    batch = {k: v.detach().clone() for k, v in batch.items()}  # nested_detach(batch, clone=True)
    model_inputs = {k: v for k, v in batch.items() if k not in KTO_BATCH_ONLY}
    model_inputs["input_ids"] = batch[f"{prefix}input_ids"]
    logits = forward(**model_inputs, return_dict=True, use_cache=False).logits.to(torch.float32)
    logps, valid_length = get_batch_logps(logits, batch[f"{prefix}labels"])
    return logits, logps, logps / valid_length


def _kto_concatenated_forward(forward, batch: dict):
    """CustomKTOTrainer.concatenated_forward."""
    target_logits, target_logps, target_logps_avg = _kto_forward(forward, batch)
    with torch.no_grad():
        _, kl_logps, _ = _kto_forward(forward, batch, prefix="kl_")
    rows = batch["kto_tags"].size(0)
    chosen, rejected = range(kto_chosen_rows(rows)), range(kto_chosen_rows(rows), rows)
    chosen_logits = _boolean_rows(target_logits, batch["kto_tags"], chosen)
    chosen_logps = _boolean_rows(target_logps, batch["kto_tags"], chosen)
    rejected_logits = _boolean_rows(target_logits, ~batch["kto_tags"], rejected)
    rejected_logps = _boolean_rows(target_logps, ~batch["kto_tags"], rejected)
    chosen_logps_avg = _boolean_rows(target_logps_avg, batch["kto_tags"], chosen)
    return chosen_logps, rejected_logps, chosen_logits, rejected_logits, kl_logps, chosen_logps_avg


def _kto_loss(setup, policy_chosen_logps, policy_rejected_logps, policy_kl_logps, reference_chosen_logps,
              reference_rejected_logps, reference_kl_logps):
    """TRL KTOTrainer.kto_loss (trl 0.18-0.24, loss_type "kto", calculate_KL True); `accelerator.gather_for_metrics`
    returns the tensor itself on one process; `torch.Tensor([]).to(device)` is an empty tensor."""
    kl = (policy_kl_logps - reference_kl_logps).mean().detach()
    kl = kl.mean().clamp(min=0)
    empty = policy_chosen_logps.new_empty(0)
    if policy_chosen_logps.shape[0] != 0 or reference_chosen_logps.shape[0] != 0:
        chosen_logratios = policy_chosen_logps - reference_chosen_logps
        chosen_losses = 1 - F.sigmoid(setup.pref_beta * (chosen_logratios - kl))
        chosen_rewards = setup.pref_beta * chosen_logratios.detach()
    else:
        chosen_losses, chosen_rewards = empty, empty.clone()
    if policy_rejected_logps.shape[0] != 0 or reference_rejected_logps.shape[0] != 0:
        rejected_logratios = policy_rejected_logps - reference_rejected_logps
        rejected_losses = 1 - F.sigmoid(setup.pref_beta * (kl - rejected_logratios))
        rejected_rewards = setup.pref_beta * rejected_logratios.detach()
    else:
        rejected_losses, rejected_rewards = empty.clone(), empty.clone()
    losses = torch.cat((setup.kto_chosen_weight * chosen_losses, setup.kto_rejected_weight * rejected_losses), 0)
    return losses, chosen_rewards, rejected_rewards, kl


def kto_loss(setup, model, forward, ref_forward=None):
    """CustomKTOTrainer.get_batch_loss_metrics as the Trainer's forward (returns {"loss": ...}); arguments as for
    `preference_loss`."""

    def step(**batch):
        (policy_chosen_logps, policy_rejected_logps, policy_chosen_logits, policy_rejected_logits, policy_kl_logps,
         policy_chosen_logps_avg) = _kto_concatenated_forward(forward, batch)
        context = model.disable_adapter() if ref_forward is None else nullcontext()  # compute_reference_log_probs
        with torch.no_grad(), context:
            reference_chosen_logps, reference_rejected_logps, _, _, reference_kl_logps, _ = \
                _kto_concatenated_forward(ref_forward or forward, batch)
        losses, chosen_rewards, rejected_rewards, kl = _kto_loss(
            setup, policy_chosen_logps, policy_rejected_logps, policy_kl_logps, reference_chosen_logps,
            reference_rejected_logps, reference_kl_logps)
        losses = losses.nanmean()
        if setup.pref_ftx > 1e-6 and len(policy_chosen_logps) > 0:
            sft_loss = -policy_chosen_logps_avg
            losses += setup.pref_ftx * sft_loss.nanmean() / len(policy_chosen_logps) * len(batch["labels"])
        # the metrics: each `.nansum().item()` drops its reduction at once (kl.item() allocates nothing)
        if len(chosen_rewards) > 0:
            for value in (chosen_rewards.nansum(), policy_chosen_logps.nansum(), policy_chosen_logits.nansum()):
                del value
        if len(rejected_rewards) > 0:
            for value in (rejected_rewards.nansum(), policy_rejected_logps.nansum(), policy_rejected_logits.nansum()):
                del value
        return {"loss": losses}

    return step
