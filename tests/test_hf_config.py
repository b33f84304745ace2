"""config.json <-> ModelSpec: every registry family round-trips through the config files transformers itself writes
(5.23's diff-saved files, and files stripped of every class default the way 4.x hub checkpoints were saved), and a
bad, missing or unsupported config.json fails with a one-line VlplanError that says what to change."""

import json

import pytest

from vlplan.planner.errors import VlplanError
from vlplan.planner.hf_config import spec_from_hf_config, spec_to_hf_config
from vlplan.planner.modules import param_counts
from vlplan.planner.registry import all_specs, resolve
from vlplan.planner.spec import ModelSpec

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402
from hf_oracle import hf_config, model_inventory, strip_defaults, write_config  # noqa: E402

HF_SPECS = [spec for spec in all_specs() if spec.hf_class and hasattr(transformers, spec.hf_class)]
REMOTE_SPECS = [spec for spec in all_specs() if not spec.hf_class]


def architecture(spec: ModelSpec) -> tuple:
    """Everything a reader must recover (names, URLs and notes differ by design)."""
    return (spec.family, spec.hf_class, spec.vision, spec.projector, spec.text, spec.processor, spec.image_token_id,
            spec.dtype)


@pytest.mark.parametrize("spec", HF_SPECS, ids=lambda spec: spec.name)
def test_round_trip_through_transformers_diff_saved_config(spec, tmp_path):
    write_config(tmp_path, hf_config(spec), use_diff=True)  # transformers' own config.to_json_file(use_diff=True)
    assert architecture(spec_from_hf_config(tmp_path)) == architecture(spec)


@pytest.mark.parametrize("spec", HF_SPECS, ids=lambda spec: spec.name)
def test_round_trip_through_config_stripped_of_class_defaults(spec, tmp_path):
    stripped = strip_defaults(hf_config(spec))
    write_config(tmp_path, stripped)
    assert architecture(spec_from_hf_config(tmp_path / "config.json")) == architecture(spec)


@pytest.mark.parametrize("spec", REMOTE_SPECS, ids=lambda spec: spec.name)
def test_remote_code_config_round_trip(spec, tmp_path):
    write_config(tmp_path, spec_to_hf_config(spec))
    assert architecture(spec_from_hf_config(tmp_path)) == architecture(spec)


def test_hub_ids_and_aliases_resolve_to_local_configs_too(tmp_path):
    spec = resolve("OpenGVLab/InternVL3-8B-hf")
    write_config(tmp_path, hf_config(spec))
    assert architecture(resolve(str(tmp_path))) == architecture(spec)


def test_internvl_config_without_tie_key_reads_untied(tmp_path):
    """The -hf configs carry no tie key; transformers 5.23 would tie (InternVLConfig default True), the checkpoint
    is untied."""
    config = spec_to_hf_config(resolve("internvl3-8b"))
    config.pop("tie_word_embeddings")
    config["text_config"].pop("tie_word_embeddings")
    write_config(tmp_path, config)
    assert spec_from_hf_config(tmp_path).text.tie_word_embeddings is False


def test_qwen3_vl_moe_without_tie_key_reads_untied(tmp_path):
    """Qwen3VLMoeConfig decides (default False); the text config class default (True) must not leak in."""
    config = spec_to_hf_config(resolve("qwen3-vl-30b-a3b"))
    config.pop("tie_word_embeddings")
    config["text_config"].pop("tie_word_embeddings")
    write_config(tmp_path, config)
    assert spec_from_hf_config(tmp_path).text.tie_word_embeddings is False


def test_qwen3_vl_moe_reads_either_expert_key(tmp_path):
    """Hub files say num_experts; transformers 5.23 saves the attribute_map name num_local_experts."""
    config = spec_to_hf_config(resolve("qwen3-vl-30b-a3b"))
    config["text_config"]["num_local_experts"] = config["text_config"].pop("num_experts")
    write_config(tmp_path, config)
    assert spec_from_hf_config(tmp_path).text.num_experts == 128


def test_preprocessor_config_overrides_processor_limits(tmp_path):
    spec = resolve("smolvlm")
    write_config(tmp_path, hf_config(spec))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Idefics3ImageProcessor", "size": {"longest_edge": 1456},
         "max_image_size": {"longest_edge": 364}}))
    processor = spec_from_hf_config(tmp_path).processor
    assert (processor.longest_edge, processor.image_size) == (1456, 364)


def test_smolvlm_model_type_reads_to_the_transformers_architecture(tmp_path):
    """model_type `smolvlm` (SmolVLM2 / SmolVLM-256M-shaped; no registry entry): the reader's spec counts the
    parameters and linears that SmolVLMForConditionalGeneration builds."""
    config = transformers.SmolVLMConfig(
        text_config={"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49280},
        vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "patch_size": 16, "image_size": 512},
        scale_factor=4, image_token_id=49190)
    write_config(tmp_path, strip_defaults(config))
    spec = spec_from_hf_config(tmp_path)
    assert (spec.family, spec.hf_class) == ("smolvlm", "SmolVLMForConditionalGeneration")
    assert spec.processor.tokens_per_view == 64  # (512 / 16)**2 / 4**2
    with torch.device("meta"):
        model = transformers.SmolVLMForConditionalGeneration._from_config(config)
    assert param_counts(spec) == model_inventory(model, "smolvlm", tied_lm_head=False).params


# Errors ---------------------------------------------------------------------------------------------------------------


def _error(path) -> str:
    with pytest.raises(VlplanError) as info:
        spec_from_hf_config(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_config(tmp_path):
    assert "no config.json at" in _error(tmp_path)
    assert "no config.json at" in _error(tmp_path / "nope.json")


def test_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llava",')
    assert "is not valid JSON" in _error(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    assert "must hold a JSON object, not list" in _error(tmp_path)


def test_missing_or_unsupported_model_type(tmp_path):
    write_config(tmp_path, {"hidden_size": 4096})
    assert "has no model_type" in _error(tmp_path)
    write_config(tmp_path, {"model_type": "blip-2"})
    message = _error(tmp_path)
    assert "model_type 'blip-2' is not supported; supported:" in message and "qwen3_vl" in message


def test_unsupported_sub_model(tmp_path):
    config = spec_to_hf_config(resolve("llava-1.5-7b"))
    config["text_config"]["model_type"] = "qwen2"
    write_config(tmp_path, config)
    assert "a llava model with a 'qwen2' language model is not supported; supported: llama, mistral" in _error(tmp_path)
    config = spec_to_hf_config(resolve("paligemma2-3b"))
    config.pop("text_config")  # PaliGemmaConfig would build a Gemma (1) language model
    write_config(tmp_path, config)
    assert "a paligemma model with a 'gemma' language model is not supported; supported: gemma2" in _error(tmp_path)
    config = spec_to_hf_config(resolve("llava-v1.6-mistral-7b"))
    config["vision_config"] = {"model_type": "pixtral"}
    write_config(tmp_path, config)
    assert "with a 'pixtral' vision tower is not supported" in _error(tmp_path)


def test_truncated_or_malformed_configs(tmp_path):
    config = spec_to_hf_config(resolve("qwen3-vl-8b"))
    config["text_config"] = "qwen3"
    write_config(tmp_path, config)
    assert "text_config must be a JSON object, not str" in _error(tmp_path)
    config = spec_to_hf_config(resolve("phi-3.5-vision"))
    config["num_attention_heads"] = 0
    write_config(tmp_path, config)
    assert "cannot read a phi3_v architecture" in _error(tmp_path)
    config = spec_to_hf_config(resolve("gemma-3-4b"))
    config["text_config"]["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention"] * 2 + [
        "full_attention", "full_attention"]
    write_config(tmp_path, config)
    assert "layer_types is not periodic" in _error(tmp_path)


def test_unmodelled_options_are_refused(tmp_path):
    config = spec_to_hf_config(resolve("llava-1.5-7b"))
    config["text_config"]["attention_bias"] = True
    write_config(tmp_path, config)
    assert "attention_bias/mlp_bias is not supported" in _error(tmp_path)
    config = spec_to_hf_config(resolve("internvl3-2b"))
    config["vision_feature_layer"] = [-1, -2]
    write_config(tmp_path, config)
    assert "only a single feature layer is supported" in _error(tmp_path)
    config = spec_to_hf_config(resolve("minicpm-v-2.6"))
    config["version"] = 2.5
    write_config(tmp_path, config)
    assert "MiniCPM-V version 2.5 is not supported" in _error(tmp_path)


def test_config_without_language_model_sizes_is_refused(tmp_path):
    # {"model_type": "qwen2_5_vl"} alone used to be read with Qwen2_5_VLTextConfig's defaults: a 73 B model
    write_config(tmp_path, {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"]})
    message = _error(tmp_path)
    assert "describes no language model" in message and "hidden_size, num_hidden_layers" in message
    # a diff-saved composite config keeps a text_config (model_type only when every value is a class default): read
    write_config(tmp_path, {"model_type": "qwen2_5_vl", "text_config": {"model_type": "qwen2_5_vl_text"}})
    assert spec_from_hf_config(tmp_path).text.num_layers == 80
