"""`vlplan run` end to end on the CPU with tiny models: training, saving and reloading, resume, interrupts,
refusals, out-of-memory retries, a 2-process gloo launch through torchrun and the dry run of a ZeRO-3 launch."""

import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_runner_data import write_dataset, write_png_header  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from vlplan.cli.main import app  # noqa: E402
from vlplan.planner.registry import resolve  # noqa: E402
from vlplan.planner.setup import make_setup  # noqa: E402
from vlplan.runner import train as train_module  # noqa: E402
from vlplan.runner.tiny import write_tiny_model  # noqa: E402
from vlplan.planner.oom import next_setup, oom_report  # noqa: E402

runner = CliRunner()
CLI = [sys.executable, "-m", "vlplan.cli.main"]
# fp32 keeps CPU steps fast and exact; one run keeps the default bf16 AMP
FAST = ["--seq-len", "256", "--precision", "fp32"]
# Seconds a subprocess of these tests may take (each is a few seconds alone; 2 busy cores make it many times that):
# past it the test fails with the output so far instead of hanging
SUBPROCESS_TIMEOUT_S = 300


@pytest.fixture(autouse=True)
def private_torch_extensions(tmp_path_factory, monkeypatch):
    """No test compiles into, or waits on a lock in, the shared ~/.cache/torch_extensions: any op DeepSpeed or torch
    would build lands in a folder of this session (and none is expected to be built)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path_factory.getbasetemp() / "torch_extensions"))


def stderr_until(process: subprocess.Popen, prefix: str, timeout_s: float = SUBPROCESS_TIMEOUT_S) -> list[str]:
    """The process's stderr lines up to the first starting with `prefix`; kills it and fails the test when that line
    does not come within `timeout_s` (a reader thread, so a silent process cannot hang the test)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr] + [lines.put(None)],
                     daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            line = None
        if line is None:
            process.kill()
            process.wait(timeout=30)
            pytest.fail(f"no stderr line starting with {prefix!r} within {timeout_s} s:\n" + "".join(seen)[-3000:])
        seen.append(line)
        if line.startswith(prefix):
            process.stderr_lines = lines  # what the reader thread reads from now on
            return seen


def finish(process: subprocess.Popen, timeout_s: float = SUBPROCESS_TIMEOUT_S) -> tuple[str, str]:
    """Wait for a process whose stderr `stderr_until` reads: its stdout and the rest of its stderr (kills it and fails
    the test past `timeout_s`)."""
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)
        pytest.fail(f"{process.args[:4]} did not finish within {timeout_s} s")
    rest = []
    while (line := process.stderr_lines.get(timeout=30)) is not None:
        rest.append(line)
    return process.stdout.read(), "".join(rest)


def run_subprocess(args: list[str], timeout_s: float = SUBPROCESS_TIMEOUT_S, **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, **kwargs)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{args[:4]} did not finish within {timeout_s} s; stderr so far: {str(err.stderr)[-2000:]}")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    for family in ("qwen2.5-vl", "llava"):
        write_tiny_model(family, root / family)
    return {"root": root, "qwen": str(root / "qwen2.5-vl"), "llava": str(root / "llava"),
            "data": write_dataset(root / "data"), "pair": write_dataset(root / "pair", count=2)}


def run_cli(*args):
    result = runner.invoke(app, ["run", *map(str, args)])
    return result


def record_of(out):
    return json.loads((out / "vlplan_run.json").read_text())


@pytest.mark.slow
def test_lora_trains_saves_and_reloads_with_peft(env, tmp_path):
    import peft

    out = tmp_path / "out"
    result = run_cli("--model", env["qwen"], "--dataset", env["data"], "--output-dir", out, "--max-steps", 3,
                     "--batch-size", 2, "--seq-len", 256, "--json")  # bf16 AMP (the default precision)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record == record_of(out)
    assert record["status"] == "completed" and record["steps"] == 3
    assert [e["step"] for e in record["losses"]] == [1, 2, 3]
    assert all(math.isfinite(e["loss"]) for e in record["losses"])
    assert record["settings"]["batch_size"] == 2 and record["settings"]["precision"] == "bf16"
    assert record["estimate"]["peak_bytes"] > 0 and record["dataset_stats"]["kept"] == 8
    assert record["measured"] is None  # no CUDA here
    # the adapter reloads with peft onto the base model and holds the trained weights
    base = transformers.AutoModelForImageTextToText.from_pretrained(env["qwen"], dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, out)
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in saved.items())
    state = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert len(state) == sum(1 for k in saved if "lora_B" in k)
    assert (out / "checkpoint-3" / "optimizer.pt").is_file()
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"
    assert not (out / ".vlplan").exists()  # the staging area is gone once the run is complete


@pytest.mark.slow
def test_full_fine_tuning_saves_weights_that_reload(env, tmp_path):
    out = tmp_path / "out"
    result = run_cli("--model", env["llava"], "--dataset", env["data"], "--output-dir", out, "--method", "full",
                     "--train-projector", "--max-steps", 2, *FAST)
    assert result.exit_code == 0, result.output
    record = record_of(out)
    assert record["steps"] == 2 and all(math.isfinite(e["loss"]) for e in record["losses"])
    trained = transformers.AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    original = transformers.AutoModelForImageTextToText.from_pretrained(env["llava"], dtype=torch.float32)
    name = "model.multi_modal_projector.linear_1.weight"
    changed = dict(trained.named_parameters())[name]
    assert not torch.equal(changed, dict(original.named_parameters())[name])  # trained
    frozen = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(dict(trained.named_parameters())[frozen], dict(original.named_parameters())[frozen])


@pytest.mark.slow
def test_loss_goes_down_on_a_repeated_batch(env, tmp_path):
    out = tmp_path / "out"
    result = run_cli("--model", env["qwen"], "--dataset", env["pair"], "--output-dir", out, "--batch-size", 2,
                     "--max-steps", 6, "--learning-rate", 3e-3, *FAST)
    assert result.exit_code == 0, result.output
    losses = [e["loss"] for e in record_of(out)["losses"]]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5


@pytest.mark.slow
def test_resume_continues_with_the_same_data_order(env, tmp_path, monkeypatch):
    """A run interrupted after step 2 (SIGTERM, in this process) and resumed sees the batches, learning rates and
    losses of an uninterrupted run."""
    from transformers import TrainerCallback

    make_callbacks = train_module.make_callbacks

    class Interrupt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    first, whole = tmp_path / "first", tmp_path / "whole"
    args = ["--model", env["llava"], "--dataset", env["data"], *FAST, "--learning-rate", 1e-3, "--max-steps", 4]
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "make_callbacks", lambda *a: [*make_callbacks(*a), Interrupt()])
        result = run_cli(*args, "--output-dir", first)
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    assert record_of(first)["status"] == "interrupted" and record_of(first)["steps"] == 2
    result = run_cli(*args, "--output-dir", first, "--resume")
    assert result.exit_code == 0, result.output
    assert run_cli(*args, "--output-dir", whole).exit_code == 0
    resumed, straight = record_of(first), record_of(whole)
    assert resumed["resumed_from"] == str(first / "checkpoint-2") and resumed["steps"] == 4
    assert [e["step"] for e in resumed["losses"]] == [1, 2, 3, 4]
    for key in ("loss", "learning_rate"):
        assert [e[key] for e in resumed["losses"]] == pytest.approx([e[key] for e in straight["losses"]], rel=1e-5)


def test_a_second_run_into_the_same_directory_is_refused(env, tmp_path):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_cli("--model", env["qwen"], "--dataset", env["data"], "--output-dir", out, *FAST)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --output-dir {out} is not empty (1 entries); pass --resume to continue its last checkpoint, "
        "--overwrite to replace it, or a new directory"]
    assert (out / "notes.txt").read_text() == "mine"
    result = run_cli("--model", env["qwen"], "--dataset", env["data"], "--output-dir", out, "--resume", *FAST)
    assert result.exit_code == 2 and "holds no checkpoint-N directory" in result.stderr
    result = run_cli("--model", env["qwen"], "--dataset", env["data"], "--output-dir", out, "--resume",
                     "--overwrite", *FAST)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes(env, tmp_path):
    out = tmp_path / "out"
    args = [*CLI, "run", "--model", env["qwen"], "--dataset", env["data"], "--output-dir", str(out), *FAST,
            "--save-steps", "1000"]
    process = subprocess.Popen([*args, "--max-steps", "1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    lines = stderr_until(process, "step 2/")
    process.send_signal(signal.SIGTERM)
    stdout, rest = finish(process)
    assert process.returncode == 128 + signal.SIGTERM, "".join(lines) + rest + stdout
    record = record_of(out)
    assert record["status"] == "interrupted" and record["signal"] == "SIGTERM"
    step = record["steps"]
    checkpoint = out / f"checkpoint-{step}"
    assert record["checkpoint"] == str(checkpoint)
    for name in ("adapter_model.safetensors", "optimizer.pt", "trainer_state.json", "rng_state.pth"):
        assert (checkpoint / name).is_file(), name
    assert not list((out / ".vlplan" / "staging").glob("checkpoint-*"))  # nothing half-written left behind
    result = run_cli(*args[4:], "--max-steps", step + 1, "--resume")
    assert result.exit_code == 0, result.output
    assert record_of(out)["steps"] == step + 1


@pytest.mark.slow
def test_two_processes_through_torchrun_with_gloo(env, tmp_path):
    """`--num-gpus 2` on the CPU: torchrun starts 2 gloo ranks that train; SIGTERM to vlplan reaches the ranks, which
    agree on a step, save a checkpoint and stop; --resume continues under torchrun to the end."""
    out = tmp_path / "out"
    args = [*CLI, "run", "--model", env["llava"], "--dataset", env["data"], "--output-dir", str(out), "--num-gpus",
            "2", *FAST, "--save-steps", "1000"]
    process = subprocess.Popen([*args, "--max-steps", "1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    lines = stderr_until(process, "step 2/")
    process.send_signal(signal.SIGTERM)
    stdout, rest = finish(process)
    assert process.returncode == 128 + signal.SIGTERM, "".join(lines) + rest + stdout
    assert any("torchrun --nnodes 1 --node_rank 0 --nproc_per_node 2" in line for line in lines)
    record = record_of(out)
    assert record["status"] == "interrupted" and record["run"]["processes"] == 2
    step = record["steps"]
    assert step >= 2 and (out / f"checkpoint-{step}" / "adapter_model.safetensors").is_file()
    done = run_subprocess([*args, "--max-steps", str(step + 1), "--resume", "--json"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(done.stdout)
    assert record["status"] == "completed" and record["steps"] == step + 1 and record["settings"]["world_size"] == 2
    # each rank probed the same heaviest batch before its first step; the record holds the larger peak of the two
    assert record["probe"]["status"] == "done" and record["probe"]["ranks"] == 2
    assert record["probe"]["live_tensor_peak_bytes"] > 0
    assert [e["step"] for e in record["losses"]] == list(range(1, step + 2))
    assert all(math.isfinite(e["loss"]) for e in record["losses"])
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_dry_run_of_zero3_on_four_gpus(env, tmp_path):
    pytest.importorskip("deepspeed")  # transformers fills the config's "auto" values with DeepSpeed's config class
    out = tmp_path / "out"
    result = run_cli("--model", env["qwen"], "--dataset", env["data"], "--output-dir", out, "--num-gpus", 4,
                     "--zero", 3, "--batch-size", 2, "--gradient-accumulation-steps", 3, "--seq-len", 256,
                     "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    launch = json.loads(result.stdout)
    command = launch["command"]
    assert os.path.basename(command[0]) == "torchrun" or command[1:3] == ["-m", "torch.distributed.run"]
    assert command[command.index("--nproc_per_node") + 1] == "4" and command[-2:] == ["-m", "vlplan.runner.worker"]
    assert launch["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    job = json.loads(launch["env"]["VLPLAN_JOB"])
    assert job["settings"]["zero"] == 3 and job["options"]["output_dir"] == str(out)
    assert not out.exists()  # nothing written
    config = launch["configs"]["deepspeed"]
    assert config["train_batch_size"] == 2 * 3 * 4 and config["zero_optimization"]["stage"] == 3
    # DeepSpeed's own config class accepts it for a 4-rank data-parallel group. It asks deepspeed.comm for this
    # process's rank, which needs no process group when answered here: deepspeed.init_distributed on the CPU would
    # JIT-compile DeepSpeed's shared-memory op (deepspeed_shm_comm) first, 30-120 s
    check = ("import json, sys; from types import SimpleNamespace; import deepspeed.comm;"
             "from deepspeed.runtime.config import DeepSpeedConfig;"
             "deepspeed.comm.get_rank = lambda group=None: 0;"
             "c = DeepSpeedConfig(json.loads(sys.stdin.read()), mpu=SimpleNamespace("
             "get_data_parallel_world_size=lambda: 4));"
             "print(c.zero_optimization_stage, c.train_batch_size, c.train_micro_batch_size_per_gpu, "
             "c.gradient_accumulation_steps, c.world_size)")
    done = run_subprocess([sys.executable, "-c", check], timeout_s=120, input=json.dumps(config),
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    extensions = os.environ["TORCH_EXTENSIONS_DIR"]
    assert not os.path.isdir(extensions) or not os.listdir(extensions)  # nothing was compiled
    assert done.stdout.split()[-5:] == ["3", "24", "2", "3", "4"]
    # the DeepSpeed launcher: 4 GPUs on the node, the same worker module
    result = run_cli("--model", env["qwen"], "--dataset", env["data"], "--output-dir", out, "--num-gpus", 4,
                     "--zero", 3, "--seq-len", 256, "--dry-run", "--json", "--launcher", "deepspeed")
    command = json.loads(result.stdout)["command"]
    assert command[command.index("--num_gpus") + 1] == "4" and command[-2:] == ["--module", "vlplan.runner.worker"]
    assert "--no_local_rank" in command


def test_a_saved_plan_and_a_global_batch_set_the_batch(env, tmp_path):
    from vlplan.planner.plan import plan

    spec = resolve(env["qwen"])
    setup = make_setup(spec, method="lora", seq_len=256, image_size=(120, 80), num_gpus=2, gpu="a10g-24g")
    saved = plan(setup, global_batch_size=8)
    (tmp_path / "plan.json").write_text(json.dumps(saved.to_dict()))
    base = ["--model", env["qwen"], "--dataset", env["data"], "--output-dir", tmp_path / "out", "--seq-len", 256,
            "--num-gpus", 2, "--dry-run", "--json"]
    result = run_cli(*base, "--plan", tmp_path / "plan.json")
    assert result.exit_code == 0, result.output
    job = json.loads(json.loads(result.stdout)["env"]["VLPLAN_JOB"])
    assert job["settings"]["batch_size"] == saved.setup.batch_size
    assert job["settings"]["gradient_accumulation_steps"] == saved.setup.gradient_accumulation_steps
    assert job["options"]["plan"]["global_batch_size"] == 8
    result = run_cli(*base, "--global-batch-size", 8)
    job = json.loads(json.loads(result.stdout)["env"]["VLPLAN_JOB"])
    settings = job["settings"]
    assert settings["batch_size"] * settings["gradient_accumulation_steps"] * 2 == 8 and job["options"]["plan"]
    (tmp_path / "bad.json").write_text("{not json")
    result = run_cli(*base, "--plan", tmp_path / "bad.json")
    assert result.exit_code == 2 and result.stderr.strip().splitlines()[-1].startswith("error: --plan")


@pytest.mark.slow
def test_auto_retry_after_out_of_memory_halves_the_micro_batch(env, tmp_path, monkeypatch):
    """A CUDA OOM (raised here on the CPU at the first step of micro-batch 2) reports the phase and the next plan;
    --auto-retry continues with micro-batch 1 and accumulation 2."""
    from transformers import TrainerCallback

    make_callbacks = train_module.make_callbacks

    class OutOfMemory(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if args.per_device_train_batch_size > 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module, "make_callbacks", lambda *a: [*make_callbacks(*a), OutOfMemory()])
    out = tmp_path / "out"
    args = ["--model", env["qwen"], "--dataset", env["data"], "--output-dir", out, "--batch-size", 2, "--max-steps",
            2, *FAST]
    result = run_cli(*args)
    assert result.exit_code == 3
    report = record_of(out)["oom"]
    assert report["phase"] == "forward" and report["next_settings"]["batch_size"] == 1
    assert report["next_settings"]["gradient_accumulation_steps"] == 2
    assert "tried to allocate 2.00 GiB" in report["message"] and report["suspect_term"]
    result = run_cli(*args[:-len(FAST)], *FAST, "--auto-retry", "--overwrite")
    assert result.exit_code == 0, result.output
    record = record_of(out)
    assert record["status"] == "completed" and record["settings"]["batch_size"] == 1
    assert record["settings"]["gradient_accumulation_steps"] == 2
    assert [r["change"] for r in record["retries"]] == ["micro-batch 2 -> 1, accumulation 1 -> 2 (same global batch)"]


def test_next_setup_keeps_the_global_batch():
    setup = make_setup(resolve("qwen2.5-vl-7b"), batch_size=6, gradient_accumulation_steps=2, seq_len=1024,
                       image_size=(448, 448))
    follow, _ = next_setup(setup)
    assert (follow.batch_size, follow.gradient_accumulation_steps) == (3, 4)
    follow, _ = next_setup(follow)
    assert (follow.batch_size, follow.gradient_accumulation_steps) == (1, 12)
    follow, why = next_setup(make_setup(resolve("qwen2.5-vl-7b"), gradient_checkpointing=False))
    assert follow.gradient_checkpointing and "checkpointing" in why
    follow, why = next_setup(make_setup(resolve("qwen2.5-vl-7b")))
    assert follow is None and "vlplan plan" in why


def test_oom_report_blames_the_model_states_when_they_measure_high():
    from vlplan.planner.memory.estimate import estimate

    setup = make_setup(resolve("qwen2.5-vl-7b"), method="full", batch_size=2)
    result = estimate(setup)
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")
    weights = sum(v for k, v in result.breakdown_bytes.items() if k.startswith(("weights/", "adapters/")))
    report = oom_report(setup, result, "backward", error, measured_start_bytes=int(weights * 2))
    assert report["suspect_term"] == "weights/language"
    report = oom_report(setup, result, "backward", error, measured_start_bytes=None)
    assert not report["suspect_term"].startswith(("weights/", "cuda/"))
    assert report["next_settings"]["batch_size"] == 1 and "backward phase" in report["message"]


@pytest.mark.slow
def test_smoke_test_runs_a_tiny_model_of_the_family(env, tmp_path):
    out = tmp_path / "out"
    result = run_cli("--model", "qwen2.5-vl-7b", "--dataset", env["data"], "--output-dir", out, "--smoke-test",
                     "--seq-len", 256, "--zero", 3, "--num-gpus", 2)
    assert result.exit_code == 0, result.output
    assert "smoke test: a tiny qwen2.5-vl model" in result.stderr
    record = record_of(out)
    assert record["steps"] == 3 and record["run"]["smoke_test"] and record["model"] == str(out / "tiny-model")
    assert record["settings"]["model"] == "tiny-model" and record["settings"]["precision"] == "bf16"
    assert record["settings"]["zero"] == 0 and record["run"]["processes"] == 2  # no CUDA: DDP over gloo
    assert "no CUDA: DeepSpeed ZeRO -> plain data parallel" in result.stderr


@pytest.mark.slow
def test_random_init_builds_the_architecture_from_the_config(env, tmp_path):
    from vlplan.profiler.build import hf_config
    from vlplan.runner.job import RunOptions
    from vlplan.runner.train import load_model, load_processor_for, random_init_spec

    out = tmp_path / "out"
    result = run_cli("--model", env["llava"], "--dataset", env["data"], "--output-dir", out, "--random-init",
                     "--max-steps", 1, *FAST)
    assert result.exit_code == 0, result.output
    assert record_of(out)["run"]["random_init"] and math.isfinite(record_of(out)["losses"][0]["loss"])
    setup = make_setup(resolve(env["llava"]), seq_len=256, image_size=(64, 64), precision="fp32")
    torch.manual_seed(1)
    model = load_model(setup, RunOptions(model=env["llava"], dataset=env["data"], output_dir=str(out),
                                         random_init=True))
    loaded = transformers.AutoModelForImageTextToText.from_pretrained(env["llava"], dtype=torch.float32)
    name = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(dict(model.named_parameters())[name], dict(loaded.named_parameters())[name])
    # a registry model without a directory: its config names the image token of the family's tokenizer
    setup = make_setup(resolve("qwen2.5-vl-3b"))
    options = RunOptions(model="qwen2.5-vl-3b", dataset=env["data"], output_dir=str(out), random_init=True)
    processor = load_processor_for(setup, options)
    config = hf_config(random_init_spec(setup))
    assert processor.image_token_id == config.image_token_id
    assert processor.tokenizer.convert_tokens_to_ids("<|vision_start|>") == config.vision_start_token_id
    from vlplan.planner.errors import VlplanError

    with pytest.raises(VlplanError, match="not a local directory"):
        load_processor_for(setup, RunOptions(model="qwen2.5-vl-3b", dataset=env["data"], output_dir=str(out)))


def _json_object_dataset(tmp_path):
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    (tmp_path / "object.json").write_text(json.dumps(record, indent=2))
    return ["--dataset", tmp_path / "object.json"]


def _bomb_dataset(tmp_path):
    write_png_header(tmp_path / "bomb.png", 20000, 20000)
    record = {"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "yo"}],
              "images": ["bomb.png"]}
    (tmp_path / "bomb.json").write_text(json.dumps([record]))
    return ["--dataset", tmp_path / "bomb.json"]


def _output_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("mine")
    return ["--output-dir", tmp_path / "afile" / "sub"]


@pytest.mark.parametrize("args,message", [
    (["--zero", "2", "--num-gpus", "2"], "error: DeepSpeed ZeRO needs CUDA GPUs and this machine has none"),
    (["--launcher", "mpirun"], "error: --launcher 'mpirun' is not one of torchrun, deepspeed, accelerate"),
    (["--max-steps", "0"], "error: --max-steps must be positive, got 0"),
    (["--plan", "missing.json"], "error: cannot read --plan missing.json"),
    (["--epochs", "nan"], "error: --epochs must be a positive number, got nan"),
    (["--epochs", "-1"], "error: --epochs must be a positive number, got -1"),
    (["--lr", "nan"], "error: --learning-rate must be a positive number, got nan"),
    (["--lr", "inf"], "error: --learning-rate must be a positive number, got inf"),
    (["--warmup-ratio", "1.5"], "error: --warmup-ratio must be in [0, 1)"),
    (["--lr-scheduler-type", "cosine_annealing"], "error: --lr-scheduler-type 'cosine_annealing' is not one of"),
    (["--node-rank", "5", "--num-nodes", "2"], "error: --node-rank 5 is not a node of --num-nodes 2"),
    (["--attn", "fa2", "--precision", "bf16"], "error: --attn fa2 (FlashAttention-2) needs a CUDA GPU"),
    (_json_object_dataset, "error: {tmp}/object.json holds one JSON object, not a list of samples"),
    (_bomb_dataset, "error: sample 0: image bomb.png is 20000x20000"),
    (_output_under_a_file, "error: --output-dir {tmp}/afile/sub: {tmp}/afile is a file, not a directory"),
], ids=["zero-without-cuda", "launcher", "max-steps", "plan-file", "epochs-nan", "epochs-negative", "lr-nan",
        "lr-inf", "warmup-ratio", "scheduler", "node-rank", "fa2-without-cuda", "json-object", "image-bomb",
        "output-under-a-file"])
def test_bad_input_is_one_line(env, tmp_path, args, message):
    if callable(args):
        args = args(tmp_path)
    result = run_cli("--model", env["qwen"], "--dataset", env["data"], "--output-dir", tmp_path / "out", *FAST, *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith(message.format(tmp=tmp_path)), result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "afile" / "sub").exists()


def test_a_missing_optional_package_is_one_line(env, tmp_path):
    from importlib.util import find_spec

    if find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    result = run_cli("--model", env["qwen"], "--dataset", env["data"], "--output-dir", tmp_path / "out", *FAST,
                     "--optimizer", "adamw-8bit")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: --optimizer adamw-8bit needs the bitsandbytes package (pip install bitsandbytes); or use --optimizer "
        "adamw"]
    assert not (tmp_path / "out").exists()


def test_an_output_dir_that_cannot_be_created_is_one_line(env, tmp_path):
    # /proc refuses new folders even to root (a read-only folder does not stop root, who runs CI containers)
    result = run_cli("--model", env["qwen"], "--dataset", env["data"], "--output-dir", "/proc/vlplan-test/out",
                     *FAST)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["error: cannot create --output-dir /proc/vlplan-test/out: No such "
                                                  "file or directory"]


@pytest.mark.slow
def test_resuming_a_completed_run_trains_nothing(env, tmp_path):
    out = tmp_path / "out"
    args = ["--model", env["qwen"], "--dataset", env["pair"], "--output-dir", out, "--max-steps", 2, *FAST]
    assert run_cli(*args).exit_code == 0
    before = record_of(out)
    result = run_cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert f"the run in {out} is complete (2 steps); nothing to train" in result.stderr
    assert record_of(out) == before and not (out / "checkpoint-3").exists()
    # a larger --max-steps trains further
    result = run_cli(*args[:-len(FAST) - 2], "--max-steps", 3, *FAST, "--resume")
    assert result.exit_code == 0, result.output
    assert record_of(out)["steps"] == 3 and [e["step"] for e in record_of(out)["losses"]] == [1, 2, 3]


@pytest.mark.slow
def test_resuming_a_run_stopped_at_its_last_step_saves_its_weights(env, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    make_callbacks = train_module.make_callbacks

    class Interrupt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # finishes step 2 of 2, saves checkpoint-2, stops

    out = tmp_path / "out"
    args = ["--model", env["qwen"], "--dataset", env["pair"], "--output-dir", out, "--max-steps", 2, *FAST]
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "make_callbacks", lambda *a: [*make_callbacks(*a), Interrupt()])
        assert run_cli(*args).exit_code == 128 + signal.SIGTERM
    assert record_of(out)["status"] == "interrupted" and record_of(out)["steps"] == 2
    result = run_cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    record = record_of(out)
    assert record["status"] == "completed" and record["steps"] == 2 and [e["step"] for e in record["losses"]] == [1, 2]
    assert not (out / "checkpoint-3").exists()
    saved = load_file(out / "adapter_model.safetensors")
    checkpoint = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert saved.keys() == checkpoint.keys() and all(torch.equal(saved[k], checkpoint[k]) for k in saved)


@pytest.mark.slow
def test_resuming_with_another_model_or_method_is_refused(env, tmp_path):
    out = tmp_path / "out"
    args = ["--dataset", env["pair"], "--output-dir", out, "--max-steps", 1, *FAST]
    assert run_cli("--model", env["qwen"], *args).exit_code == 0
    adapter = (out / "adapter_model.safetensors").read_bytes()
    result = run_cli("--model", env["llava"], *args, "--resume")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --resume: {out} was trained with other settings (--model {env['qwen']} -> {env['llava']}); resume "
        "with the run's own settings, or pass a new --output-dir"]
    result = run_cli("--model", env["qwen"], *args, "--resume", "--method", "full")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --resume: {out} was trained with other settings (method lora -> full; language lora -> full); "
        "resume with the run's own settings, or pass a new --output-dir"]
    assert (out / "adapter_model.safetensors").read_bytes() == adapter


@pytest.mark.slow
def test_a_run_that_stops_before_its_first_step_says_so_and_can_run_again(env, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["--model", env["qwen"], "--dataset", env["pair"], "--output-dir", out, "--max-steps", 1, *FAST]

    def broken(*a, **k):
        raise RuntimeError("the loader broke")

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "load_model", broken)
        result = run_cli(*args)
    assert isinstance(result.exception, RuntimeError)
    record = record_of(out)
    assert record["status"] == "failed" and record["error"] == "RuntimeError: the loader broke"
    result = run_cli(*args, "--resume")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --resume: {out} holds no checkpoint-N directory to continue from: its run failed before its first "
        "checkpoint (RuntimeError: the loader broke); run again without --resume to start over"]

    def interrupted(*a, **k):
        raise train_module.Interrupted(signal.SIGINT)

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "load_model", interrupted)
        result = run_cli(*args)  # a plain re-run into the failed run's folder
    assert result.exit_code == 128 + signal.SIGINT, result.output
    assert record_of(out)["status"] == "interrupted" and record_of(out)["signal"] == "SIGINT"
    result = run_cli(*args, "--resume")
    assert result.exit_code == 2 and "was interrupted (SIGINT) before its first checkpoint" in result.stderr
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert record_of(out)["status"] == "completed"


@pytest.mark.slow
def test_a_record_left_running_is_refused_with_advice_that_matches(env, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "vlplan_run.json").write_text(json.dumps({"status": "running", "steps": 0}))  # a killed run's record
    args = ["--model", env["qwen"], "--dataset", env["pair"], "--output-dir", out, "--max-steps", 1, *FAST]
    result = run_cli(*args)
    assert result.exit_code == 2 and "pass --overwrite (there is no checkpoint to lose)" in result.stderr
    result = run_cli(*args, "--resume")
    assert result.exit_code == 2 and "pass --overwrite instead of --resume" in result.stderr
    assert run_cli(*args, "--overwrite").exit_code == 0


def test_scheduler_and_save_choices_are_transformers_own():
    from transformers.trainer_utils import SaveStrategy, SchedulerType

    from vlplan.runner.job import LR_SCHEDULERS, SAVE_STRATEGIES

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType} - {"greedy"}
    assert set(SAVE_STRATEGIES) == {s.value for s in SaveStrategy} - {"best"}


def test_smoke_test_needs_a_family_with_a_tiny_model(env, tmp_path):
    result = run_cli("--model", "internvl3-1b", "--dataset", env["data"], "--output-dir", tmp_path / "out",
                     "--smoke-test", "--seq-len", 2048)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: no tiny model for internvl3-1b")
    assert not (tmp_path / "out").exists()
