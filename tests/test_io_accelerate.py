"""accelerate FSDP configs: what vlplan writes is what `accelerate launch --config_file` turns into the FSDP plugin
(accelerate's own launch parser and `FullyShardedDataParallelPlugin` are the oracle), and reading it back gives the
same setup."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from typer.testing import CliRunner

from vlplan.cli.main import app
from vlplan.planner.errors import VlplanError
from vlplan.planner.io.accelerate import accelerate_config, dump_accelerate_config, read_accelerate_config
from vlplan.planner.registry import resolve
from vlplan.planner.setup import make_setup

runner = CliRunner()
CASES = [dict(num_gpus=8), dict(num_gpus=4, fsdp="shard_grad_op"), dict(num_gpus=8, offload="all"),
         dict(num_gpus=8, num_nodes=2, fsdp="hybrid_shard"), dict(num_gpus=4, num_nodes=2, fsdp="no_shard")]


def _setup(**kw):
    return make_setup(resolve("qwen2.5-vl-7b"), method="full", sharding="fsdp", **kw)


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_round_trip(kw, tmp_path):
    setup = _setup(**kw)
    path = tmp_path / "fsdp.yaml"
    path.write_text(dump_accelerate_config(setup))
    settings, warnings = read_accelerate_config(path)
    assert not warnings
    fields = settings.setup_fields()
    assert (fields["fsdp"], fields["offload"], fields["num_gpus"], fields["num_nodes"]) == (
        setup.fsdp, setup.offload, setup.num_gpus, setup.num_nodes)
    assert settings.precision == "bf16" and settings.fsdp_version == 2


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_accelerate_launch_reads_the_written_config(kw, tmp_path, monkeypatch):
    """accelerate's launch parser and FSDP plugin see FSDP2 with the planned strategy, offload and mesh."""
    pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import CPUOffloadPolicy

    setup = _setup(**kw)
    path = tmp_path / "fsdp.yaml"
    path.write_text(dump_accelerate_config(setup))
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, _, _ = _validate_launch_command(args)
    assert args.use_fsdp and args.num_processes == setup.world_size and args.num_machines == setup.num_nodes
    env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is (setup.fsdp != "shard_grad_op")
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy) is (setup.offload == "all")
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    if setup.fsdp in ("hybrid_shard", "no_shard"):
        shard = setup.num_gpus if setup.fsdp == "hybrid_shard" else 1
        assert env["PARALLELISM_CONFIG_DP_SHARD_SIZE"] == str(shard)
        assert env["PARALLELISM_CONFIG_DP_REPLICATE_SIZE"] == str(setup.world_size // shard)


def test_fsdp1_configs_are_read_with_a_warning():
    config = {"distributed_type": "FSDP", "num_processes": 4, "mixed_precision": "fp16",
              "fsdp_config": {"fsdp_sharding_strategy": 2, "fsdp_offload_params": False}}
    settings, warnings = read_accelerate_config(config)
    assert settings.fsdp == "shard_grad_op" and settings.precision == "fp16" and settings.num_gpus == 4
    assert any("version 1" in w for w in warnings)


@pytest.mark.parametrize("config,match", [
    ({"distributed_type": "DEEPSPEED"}, "not FSDP"),
    ({"distributed_type": "FSDP", "num_processes": 3, "num_machines": 2}, "not a multiple"),
    ({"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 3}}, "fsdp_version must be 1 or 2"),
    ({"distributed_type": "FSDP", "fsdp_config": {"fsdp_sharding_strategy": "HALF"}}, "is not one of"),
    ({"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 2, "fsdp_offload_params": "maybe"}},
     "true or false"),
])
def test_bad_configs_are_refused(config, match):
    with pytest.raises(VlplanError, match=match):
        read_accelerate_config(config)


def test_a_zero_setup_has_no_accelerate_config():
    with pytest.raises(VlplanError, match="DeepSpeed"):
        accelerate_config(make_setup(resolve("qwen2.5-vl-7b"), num_gpus=2, zero=2))


def test_cli_estimate_from_an_accelerate_config(tmp_path):
    path = tmp_path / "fsdp.yaml"
    path.write_text(dump_accelerate_config(_setup(num_gpus=8, offload="all")))
    result = runner.invoke(app, ["estimate", "--model", "qwen2.5-vl-7b", "--method", "full", "--accelerate-config",
                                 str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["settings"]["sharding"] == "fsdp" and data["settings"]["offload"] == "all"
    assert data["settings"]["num_gpus"] == 8 and "offload/fsdp_parameters" in data["cpu_breakdown_bytes"]
    assert data["sources"]["accelerate"] == str(path)


def test_cli_plan_auto_exports_the_accelerate_config(tmp_path):
    out = tmp_path / "train.yaml"
    result = runner.invoke(app, ["plan", "--model", "qwen2.5-vl-7b", "--method", "full", "--num-gpus", "8",
                                 "--num-nodes", "2", "-g", "64", "--sharding", "auto", "--export-llamafactory",
                                 str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["sharding"] == "fsdp"
    assert any(r.startswith("FSDP (FSDP") for r in data["reasons"])  # why FSDP over ZeRO
    config = tmp_path / f"fsdp2_{data['fsdp']}.yaml"
    assert config.is_file() and str(config) in data["exported"]
    assert yaml.safe_load(config.read_text())["num_processes"] == 16
    assert "deepspeed" not in yaml.safe_load(out.read_text())
    assert f"accelerate launch --config_file {config} -m llamafactory.launcher {out}" in result.stderr


def test_auto_is_for_plan_only():
    result = runner.invoke(app, ["estimate", "--model", "qwen2.5-vl-7b", "--sharding", "auto"])
    assert result.exit_code == 2 and "--sharding auto lets vlplan plan choose" in result.stderr


def test_flags_win_over_the_accelerate_config(tmp_path):
    path = tmp_path / "fsdp.yaml"
    path.write_text(dump_accelerate_config(_setup(num_gpus=8)))
    result = runner.invoke(app, ["estimate", "--model", "qwen2.5-vl-7b", "--method", "full", "--accelerate-config",
                                 str(path), "--fsdp", "shard_grad_op", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["fsdp"] == "shard_grad_op"
    assert os.path.exists(path)
