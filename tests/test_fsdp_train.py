"""FSDP2 trains for real: two gloo processes on the CPU shard a tiny model with `fully_shard` exactly as the FSDP
trace wraps it (accelerate's wrap policy), train, save a sharded checkpoint (torch.distributed.checkpoint), and a
fresh pair of processes resumes from it to the same loss as an uninterrupted run. And `vlplan run --dry-run` of an
FSDP setup is the accelerate launch with the plan's config."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest
from typer.testing import CliRunner

from vlplan.cli.main import app
from vlplan.runner.launch import WORKER_MODULE

WORKER = r'''
import json, os, sys
sys.path.insert(0, os.environ["VLPLAN_TESTS"])
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from tiny import tiny_spec
from vlplan.planner.setup import make_setup
from vlplan.profiler import build
from vlplan.profiler.batch import synthetic_batch
from vlplan.profiler.fsdp_trace import wrap_fsdp

rank, world, phase, folder = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{os.environ['PORT']}")
setup = make_setup(tiny_spec("qwen2-vl-2b", text_layers=2, vision_layers=1), method="full", precision="fp32",
                   sharding="fsdp", num_gpus=2, seq_len=128, image_size=(112, 112))
torch.manual_seed(0 if phase == "first" else 1)  # the resumed run starts from other weights: the load must win
model = build.prepare_model(build.create_model(setup), setup)
model = wrap_fsdp(model, setup, init_device_mesh("cpu", (world,)))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
batch = synthetic_batch(setup, model)
for tensor in batch.tensors.values():  # the same pixels in both runs (the builder draws them at random)
    if tensor.is_floating_point():
        tensor.copy_(torch.sin(torch.arange(tensor.numel(), dtype=torch.float32)).reshape(tensor.shape))

def step():
    loss = model(**batch.tensors)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()

out = {}
if phase == "first":
    out["losses"] = [step(), step()]
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)
    out["losses"].append(step())
    local = next(p for n, p in model.named_parameters() if "layers.0.mlp.down_proj" in n)
    out["sharded"] = [type(local).__name__, local.to_local().numel(), local.numel()]
else:
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    out["losses"] = [step()]
if rank == 0:
    print("RESULT " + json.dumps(out))
dist.destroy_process_group()
'''


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(phase: str, folder, tmp_path) -> dict:
    import subprocess

    env = {**os.environ, "PORT": str(_port()), "VLPLAN_TESTS": os.path.dirname(__file__), "OMP_NUM_THREADS": "1"}
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), phase, str(folder)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    line = next(line for line in outputs[0][0].splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_fsdp2_trains_saves_and_resumes_on_two_gloo_processes(tmp_path):
    pytest.importorskip("torch")
    folder = tmp_path / "checkpoint"
    first = _run_pair("first", folder, tmp_path)
    kind, local, full = first["sharded"]
    assert kind == "DTensor" and local * 2 == full  # each rank holds half of the parameter
    assert first["losses"][1] < first["losses"][0]  # it learns
    resumed = _run_pair("resume", folder, tmp_path)
    # the third step from the checkpoint equals the third step of the run that never stopped
    assert resumed["losses"][0] == pytest.approx(first["losses"][2], rel=1e-5)


def test_dry_run_launches_fsdp_through_accelerate(tmp_path):
    out = tmp_path / "out"
    data = os.path.join(os.path.dirname(__file__), "..", "examples", "data", "vlplan_demo.json")
    result = CliRunner().invoke(app, ["run", "--model", "qwen2.5-vl-7b", "--random-init", "--dataset", data,
                                      "--output-dir", str(out), "--method", "full", "--num-gpus", "4", "--sharding",
                                      "fsdp", "--fsdp", "shard_grad_op", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    launch = json.loads(result.stdout)
    command = launch["command"]
    assert launch["launcher"] == "accelerate" and command[-2:] == ["-m", WORKER_MODULE]
    assert command[command.index("--config_file") + 1] == str(out / "accelerate_fsdp2.yaml")
    config = launch["configs"]["accelerate"]
    assert config["distributed_type"] == "FSDP" and config["num_processes"] == 4
    assert config["fsdp_config"]["fsdp_version"] == 2 and config["fsdp_config"]["fsdp_reshard_after_forward"] is False
    assert json.loads(launch["env"]["VLPLAN_JOB"])["settings"]["sharding"] == "fsdp"
    assert not out.exists()  # a dry run writes nothing
