"""Which settings the memory model reads, as data: a setting is modelled, refused, or warned about, never dropped.

Every field of `TrainSetup` either changes the estimate when it changes (held by tests/test_contract.py, field by
field), or is listed here with the reason:
- `NOT_MODELLED`: recorded (for the launch configs) but not yet part of the memory model; a setup that sets one to
  anything but its default gets a warning naming it, from every command that resolves a setup (estimate, plan,
  trace, profile).
- `NO_EFFECT`: read, and by design without an effect on the peak of the setups where it is listed (the test checks
  that it indeed changes nothing there), so there is nothing to warn about.
"""

from __future__ import annotations

from dataclasses import fields

from .memory import liger
from .setup import TrainSetup
from .spec import unverified_warning

NOT_MODELLED: dict[str, str] = {}

NO_EFFECT = {
    "pref_beta": "DPO's beta scales (batch,) log-ratios in the loss: a Python scalar",
    "pref_ftx": "the chosen rows' SFT term adds a few (batch,) tensors after the reference forward, below every "
                "phase's peak (planner/memory/preference.py)",
    "kto_chosen_weight": "KTO's weight of the desirable losses scales (batch,) tensors in TRL's kto_loss: a Python "
                         "scalar",
    "kto_rejected_weight": "KTO's weight of the undesirable losses scales (batch,) tensors in TRL's kto_loss: a "
                           "Python scalar",
    "oft.module_dropout": "peft builds OFT's MultiplicativeDropoutLayer but `oft.Linear.forward` never calls it (peft "
                          "0.21 tuners/oft/layer.py): the rotation and its saved tensors are the same",
    "packing": "every row is already estimated at seq_len tokens, which is what a packed row holds (LLaMA-Factory "
               "pads each to cutoff_len) under one causal mask; it changes which samples a --dataset row holds "
               "(planner/packing.py); neat_packing's block-diagonal mask is its own field",
}

# LLaMA-Factory keys that vlplan reads and checks, without an effect on memory (so nothing to warn about)
LLAMAFACTORY_NO_EFFECT = {
    "quantization_type": "fp4 and nf4 pack the same 4 bits per weight with the same absmax blocks (bitsandbytes "
                         "functional.quantize_4bit); only the code table's values differ",
}


def setup_warnings(setup: TrainSetup) -> list[str]:
    """What a user must know before trusting an estimate of `setup`: a model spec whose numbers are not all
    verified against its config.json, and one warning per `NOT_MODELLED` field set to anything but its default."""
    defaults = {f.name: f.default for f in fields(TrainSetup)}
    warnings = [w for w in (unverified_warning(setup.model),) if w]
    for name, reason in NOT_MODELLED.items():
        if getattr(setup, name) != defaults[name]:
            warnings.append(f"{name} = {getattr(setup, name)}: {reason}")
    if not liger.modelled(setup):  # modelled for some families and stacks only (planner/memory/liger.py)
        warnings.append(f"liger_kernel = True: {liger.not_modelled_reason(setup)}")
    elif liger.import_failure(setup):  # modelled, but the patch fails at load on the modelled versions
        warnings.append(f"liger_kernel = True: {liger.import_failure(setup)}")
    from .memory.packing import mask_warning

    warnings += [w for w in (mask_warning(setup),) if w]
    return warnings
