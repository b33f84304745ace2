"""The CLI: JSON shapes, rendering, and every bad-input path exits 2 with one line and no traceback."""

import json

import pytest
from typer.testing import CliRunner

from vlplan.cli.main import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def estimate_json(*args):
    result = run("estimate", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_estimate_json_fields_and_defaults():
    data = estimate_json("--model", "qwen2.5-vl-7b", "--method", "lora")
    for key in ("model", "settings", "params", "trainable_params", "tokens", "peak_bytes", "allocated_peak_bytes",
                "peak_phase", "breakdown_bytes", "cpu_ram_bytes", "gpu", "fits"):
        assert key in data
    assert set(data["params"]) == {"vision", "projector", "language", "total"}
    s = data["settings"]
    # LLaMA-Factory defaults
    assert (s["vision"], s["projector"], s["language"]) == ("frozen", "frozen", "lora")
    assert (s["lora"]["rank"], s["lora"]["alpha"], s["lora"]["targets"]) == (8, 16, ["all"])
    assert (s["gradient_checkpointing"], s["attn"], s["precision"], s["seq_len"], s["batch_size"]) == \
        (True, "sdpa", "bf16", 2048, 1)
    assert s["images"] == ["768x768"] and data["tokens"]["vision_tokens_per_sample"] == 729
    assert data["gpu"] == {"name": "h100-80g", "memory_bytes": 81559 * 2**20}
    assert sum(data["breakdown_bytes"].values()) == data["peak_bytes"]
    assert data["peak_phase"] in ("forward", "loss", "backward", "optimizer")
    assert data["allocated_peak_bytes"] < data["peak_bytes"]
    assert data["fits"] is True


def test_estimate_hub_id_and_local_config(tmp_path):
    from vlplan.planner.hf_config import spec_to_hf_config
    from vlplan.planner.registry import resolve

    by_name = estimate_json("--model", "qwen2-vl-2b")
    by_hub = estimate_json("--model", "Qwen/Qwen2-VL-2B-Instruct")
    (tmp_path / "config.json").write_text(json.dumps(spec_to_hf_config(resolve("qwen2-vl-2b"))))
    by_dir = estimate_json("--model", str(tmp_path))
    assert by_name["peak_bytes"] == by_hub["peak_bytes"] == by_dir["peak_bytes"]


def test_estimate_renders_table_and_explain():
    result = run("estimate", "--model", "llava-1.5-7b", "--method", "full", "--explain")
    assert result.exit_code == 0, result.output
    assert "breakdown at the peak" in result.stdout and "weights/language" in result.stdout
    assert "ForCausalLMLoss" in result.stdout  # --explain gives each term's source


def test_full_trains_language_only_unless_asked():
    base = estimate_json("--model", "qwen2-vl-2b", "--method", "full")
    more = estimate_json("--model", "qwen2-vl-2b", "--method", "full", "--train-vision", "--train-projector")
    assert base["trainable_params"]["vision"] == 0 and base["trainable_params"]["projector"] == 0
    assert more["trainable_params"]["vision"] == more["params"]["vision"]
    assert more["peak_bytes"] > base["peak_bytes"]


def test_tokens_json():
    result = run("tokens", "--model", "qwen2.5-vl-7b", "--image", "1920x1080", "--image", "448x448", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [i["llm_tokens"] for i in data["images"]] == [777, 256]
    assert data["total_llm_tokens"] == 1033 and data["total_special_tokens"] == 4
    for key in ("width", "height", "resized_width", "resized_height", "vision_patches", "llm_tokens"):
        assert key in data["images"][0]


def test_models_and_gpus():
    models = json.loads(run("models", "--json").stdout)
    assert {"qwen2.5-vl-7b", "llava-1.5-7b"} <= {m["name"] for m in models}
    assert all(m["source_url"].startswith("http") for m in models)
    gpus = json.loads(run("gpus", "--json").stdout)
    ids = {g["name"] for g in gpus}
    assert {"a100-40g", "a100-80g", "h100-80g", "h100-pcie-80g", "h200-141g", "h20-96g", "l40s-48g", "l4-24g",
            "a10g-24g", "a6000-48g", "rtx3090-24g", "rtx4090-24g", "rtx5090-32g", "v100-32g", "t4-16g",
            "mi300x-192g"} <= ids
    assert run("models").exit_code == 0 and run("gpus").exit_code == 0


BAD = [
    (["--model", "qwen2.5-vl-7x"], "unknown model.*did you mean"),
    (["--model", "qwen2.5-vl-7b", "--gpu", "h1000"], "unknown GPU"),
    (["--model", "qwen2.5-vl-7b", "--seq-len", "0"], "--seq-len must be positive"),
    (["--model", "qwen2.5-vl-7b", "--batch-size", "-1"], "--batch-size must be positive"),
    (["--model", "qwen2.5-vl-7b", "--image-size", "0x100"], "positive"),
    (["--model", "qwen2.5-vl-7b", "--images", "-1"], "--images must be 0 or more"),
    # QLoRA 4-bit with ZeRO-3 is estimated (weights stored in the compute dtype); 8-bit is refused, as LLaMA-Factory
    (["--model", "qwen2.5-vl-7b", "--method", "qlora", "--quant-bits", "8", "--zero", "3", "--num-gpus", "2"],
     "needs --quant-bits 4"),
    (["--model", "qwen2.5-vl-7b", "--method", "lora", "--quant-bits", "4"], "--method qlora"),
    (["--model", "qwen2.5-vl-7b", "--precision", "pure-bf16", "--zero", "3"], "pure bf16"),
    (["--model", "qwen2.5-vl-7b", "--offload", "optimizer"], "needs DeepSpeed ZeRO"),
    (["--model", "qwen2.5-vl-7b", "--offload", "all", "--zero", "2"], "needs --zero 3"),
    (["--model", "qwen2.5-vl-7b", "--gpu", "v100-32g"], "no bf16"),
    (["--model", "qwen2.5-vl-7b", "--freeze-llm"], "nothing trains"),
    (["--model", "qwen2.5-vl-7b", "--method", "freeze", "--freeze-llm"], "freeze"),
    (["--model", "qwen2.5-vl-7b", "--lora-target", "nope_proj"], "matches no linear"),
    (["--model", "qwen2.5-vl-7b", "--dora", "--method", "full"], "--dora .*use --method lora or qlora"),
    (["--model", "qwen2.5-vl-7b", "--method", "sgd"], "--method"),
    (["--model", "qwen2.5-vl-7b", "--gpu-memory-gib", "-3"], "positive"),
    (["--model", "qwen2.5-vl-7b", "--gpu-memory-gib", "0"], "--gpu-memory-gib must be a positive number of GiB"),
    (["--model", "qwen2.5-vl-7b", "--images", "3", "--image-size", "448x448", "--image-size", "640x480"],
     "contradicts"),
    (["--model", "qwen2.5-vl-7b", "--seq-len", "512", "--image-size", "2000x2000"], "raise --seq-len to at least"),
    (["--model", "/nonexistent/config.json"], "unknown model"),
    # issue 11: crashes and unchecked values
    (["--model", "qwen2.5-vl-7b", "--gpu-memory-gib", "nan"], "--gpu-memory-gib"),
    (["--model", "qwen2.5-vl-7b", "--gpu-memory-gib", "inf"], "--gpu-memory-gib"),
    (["--model", "qwen2.5-vl-7b", "--gpu-memory-gib", "1e308"], "--gpu-memory-gib"),
    (["--model", "qwen2.5-vl-7b", "--image-max-pixels", "-1"], "--image-max-pixels must be positive"),
    (["--model", "qwen2.5-vl-7b", "--images", "9223372036854775808"], "--images .* above vlplan's bound of 4096"),
    (["--model", "qwen2.5-vl-7b", "--images", "1000000000"], "above vlplan's bound of 4096"),
    (["--model", "qwen2.5-vl-7b", "--batch-size", "1000000"], "images per micro-batch.* above vlplan's bound"),
    (["--model", "qwen2.5-vl-7b", "--seq-len", "100000000"], "--seq-len 100000000 is above vlplan's bound"),
    (["--model", "qwen2.5-vl-7b", "--num-gpus", "100000"], "--num-gpus 100000 is above"),
    (["--model", "qwen2.5-vl-7b", "--image-size", "100000000x100"], "image side .* above"),
    (["--model", "qwen2.5-vl-7b", "--method", "full", "--lora-rank", "16"], "--lora-rank .*--method lora or qlora"),
    (["--model", "qwen2.5-vl-7b", "--method", "freeze", "--lora-dropout", "0.1"], "--lora-dropout .*lora or qlora"),
    (["--model", "qwen2.5-vl-7b", "--image-min-pixels", "1000000"],
     "--image-min-pixels 1000000 is above --image-max-pixels 589824"),
    (["--model", "qwen2.5-vl-7b", "--lora-alpha", "0"], "--lora-alpha must be positive"),
    (["--model", "qwen2.5-vl-7b", "--lora-alpha", "-16"], "--lora-alpha must be positive"),
    (["--model", "qwen2.5-vl-7b", "--lora-rank", "100000"], "above full rank .* largest min\\(in, out\\) is 3584"),
    (["--model", "qwen2.5-vl-7b", "--lora-rank", "600", "--lora-target", "k_proj"], "largest min\\(in, out\\) is 512"),
    (["--model", "qwen2.5-vl-7b", "--lora-dropout", "nan"], "--lora-dropout must be in"),
    (["--model", "qwen2.5-vl-7b", "--method", "freeze", "--freeze-trainable-layers", "29"],
     "above the 28 language-model layers"),
    (["--model", "qwen2.5-vl-7b", "--attn", "fa2", "--gpu", "v100", "--precision", "fp16"], "Ampere or newer"),
    (["--model", "qwen2.5-vl-7b", "--attn", "fa2", "--gpu", "t4", "--precision", "fp16"], "Ampere or newer"),
    (["--model", "qwen2.5-vl-7b", "--seq-len", "1.5"], "Invalid value for '--seq-len'"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a[2:]) or a[1] for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(args, message):
    result = run("estimate", *args)
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in result.output
    import re

    assert re.search(message, err), err


def test_vision_tokens_over_seq_len_suggests_fix():
    result = run("estimate", "--model", "qwen2.5-vl-7b", "--seq-len", "1024", "--images", "4", "--image-size",
                 "1920x1080")
    assert result.exit_code == 2
    assert "3116 tokens" in result.stderr and "--image-max-pixels" in result.stderr


def test_bad_local_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    result = run("estimate", "--model", str(tmp_path))
    assert result.exit_code == 2 and "not valid JSON" in result.stderr
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    result = run("estimate", "--model", str(tmp_path))
    assert result.exit_code == 2 and "not supported" in result.stderr


def test_largest_values_in_bounds_still_estimate():
    """The bounds refuse typos, not real jobs: values at them are accepted and answered quickly."""
    import time

    start = time.perf_counter()
    assert estimate_json("--model", "qwen2.5-vl-7b", "--lora-rank", "3584")["settings"]["lora"]["rank"] == 3584
    assert estimate_json("--model", "qwen2.5-vl-7b", "--method", "freeze", "--freeze-trainable-layers", "28")[
        "settings"]["freeze_trainable_layers"] == 28
    assert estimate_json("--model", "qwen2.5-vl-7b", "--seq-len", str(2**24), "--images", "0")["settings"][
        "seq_len"] == 2**24
    assert estimate_json("--model", "qwen2.5-vl-7b", "--attn", "fa2", "--gpu", "a100")["settings"]["attn"] == "fa2"
    assert time.perf_counter() - start < 30


def test_tokens_refuses_an_image_that_shrinks_to_nothing():
    result = run("tokens", "--model", "qwen2.5-vl-7b", "--image", "1x10000", "--image-max-pixels", "100",
                 "--image-min-pixels", "50")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: an image of 1x10000 shrinks to 0x1000 px")
    result = run("tokens", "--model", "qwen2.5-vl-7b", "--image", "1x10000", "--image-max-pixels", "100")
    assert result.exit_code == 2 and "--image-min-pixels 1024 is above --image-max-pixels 100" in result.stderr
    for args in (["--image-max-pixels", "-1"], ["--image-min-pixels", "0"],
                 ["--image-min-pixels", "4096", "--image-max-pixels", "1024"]):
        result = run("tokens", "--model", "qwen2.5-vl-7b", "--image", "448x448", *args)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "error: " in result.stderr, args


def test_config_with_only_a_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    result = run("estimate", "--model", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert "describes no language model" in result.stderr
