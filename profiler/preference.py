"""LLaMA-Factory's preference step (`stage: dpo`) in torch, for the trace: the loss the HF Trainer's step calls.

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
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

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
