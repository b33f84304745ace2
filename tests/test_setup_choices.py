"""TrainSetup's choice fields are typed (a Literal a type checker reads) and checked at construction: a value outside
the Literal is refused with one line that names the flag and every choice."""

import typing

import pytest

from vlplan.planner.errors import VlplanError
from vlplan.planner.registry import resolve
from vlplan.planner.setup import HF_OPTIM, OPTIMIZERS, TrainSetup

FLAGS = {"method": "--method", "precision": "--precision", "optimizer": "--optimizer", "attn": "--attn",
         "offload": "--offload", "stack": "--stack", "sharding": "--sharding", "fsdp": "--fsdp", "stage": "--stage",
         "pref_loss": "--pref-loss"}
HINTS = typing.get_type_hints(TrainSetup)
LITERAL_FIELDS = sorted(name for name, hint in HINTS.items() if typing.get_origin(hint) is typing.Literal)


def test_the_choice_fields_are_literals():
    assert LITERAL_FIELDS == sorted(FLAGS)


@pytest.mark.parametrize("field", LITERAL_FIELDS)
def test_a_value_outside_the_literal_is_one_line_naming_the_choices(field):
    choices = typing.get_args(HINTS[field])
    with pytest.raises(VlplanError) as err:
        TrainSetup(model=resolve("qwen2-vl-2b"), **{field: "nonsense"})
    message = str(err.value)
    assert "\n" not in message
    assert message == f"{FLAGS[field]} 'nonsense' is not one of {', '.join(choices)}"


def test_every_optimizer_has_a_transformers_name():
    assert set(HF_OPTIM) == set(OPTIMIZERS)


def test_the_transformers_names_are_transformers_own():
    transformers = pytest.importorskip("transformers")
    names = {member.value for member in transformers.training_args.OptimizerNames}
    assert set(HF_OPTIM.values()) <= names
