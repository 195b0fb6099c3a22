"""The device rule (umbrella_ds/train/env.py ``choose_device``): no silent CPU training where GPUs
are allocated, CPU training only when asked; and the device index per rank under GPU binding.

The rule's table runs on environments; the refusal and the asked-for CPU run go through the real
deepspeed launcher (whose CPU ranks get ``CUDA_VISIBLE_DEVICES=0``, as on a GPU node), and the
other entry points (finder, eval, export, infer) are called as their CLIs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.training import base_sets, check, env, metrics, run_train

from umbrella_ds.config import RunConfig
from umbrella_ds.train import env as denv_mod
from umbrella_ds.train.env import DeviceError, choose_device, discover, gpus_allocated

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"


# ---------------------------------------------------------------- the rule's table

CPU_TORCH = 0  # visible CUDA devices of a torch without CUDA


@pytest.mark.parametrize(
    ("requested", "environ", "cuda_devices", "expect"),
    [
        ("auto", {}, CPU_TORCH, "cpu"),  # a laptop
        ("auto", {"DS_ACCELERATOR": "cpu"}, CPU_TORCH, "cpu"),  # make demo on a laptop
        ("auto", {"CUDA_VISIBLE_DEVICES": ""}, CPU_TORCH, "cpu"),  # every device hidden
        ("auto", {"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, CPU_TORCH, "cpu"),
        ("auto", {"SLURM_GPUS_ON_NODE": "0"}, CPU_TORCH, "cpu"),
        ("auto", {}, 2, "cuda"),  # visible
        ("auto", {"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_GPUS_ON_NODE": "2"}, 2, "cuda"),
        ("cpu", {"CUDA_VISIBLE_DEVICES": "0", "SLURM_GPUS_ON_NODE": "1"}, CPU_TORCH, "cpu"),
        ("cpu", {"CUDA_VISIBLE_DEVICES": "0"}, 1, "cpu"),  # asked for, GPU or not
        ("cuda", {}, 1, "cuda"),
    ],
)
def test_choice(requested, environ, cuda_devices, expect):
    assert choose_device(requested, "train.device", environ, cuda_devices=cuda_devices) == expect


@pytest.mark.parametrize(
    ("requested", "environ", "cuda_devices", "named"),
    [
        # GPUs allocated, a torch without CUDA
        ("auto", {"CUDA_VISIBLE_DEVICES": "0"}, CPU_TORCH, ["CUDA_VISIBLE_DEVICES=0"]),
        ("auto", {"SLURM_GPUS_ON_NODE": "4"}, CPU_TORCH, ["SLURM_GPUS_ON_NODE=4"]),
        ("auto", {"SLURM_JOB_GPUS": "0,1"}, CPU_TORCH, ["SLURM_JOB_GPUS=0,1"]),
        # an inherited DS_ACCELERATOR=cpu does not count as asking for the CPU
        ("auto", {"CUDA_VISIBLE_DEVICES": "0", "DS_ACCELERATOR": "cpu"}, 1,
         ["CUDA_VISIBLE_DEVICES=0", "DS_ACCELERATOR=cpu", "1 CUDA device(s) visible"]),
        ("auto", {"DS_ACCELERATOR": "cpu"}, 2, ["2 CUDA device(s) visible", "DS_ACCELERATOR=cpu"]),
        ("cuda", {}, CPU_TORCH, ["no CUDA device"]),
        ("cuda", {"DS_ACCELERATOR": "cpu"}, 1, ["DS_ACCELERATOR=cpu"]),
    ],
)  # fmt: skip
def test_refusal_names_what_it_found(requested, environ, cuda_devices, named):
    with pytest.raises(DeviceError) as e:
        choose_device(requested, "train.device", environ, cuda_devices=cuda_devices)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"train.device={requested}: ")
    assert "torch " in msg and ("CUDA build" in msg or "CUDA " in msg), msg
    assert "train.device=cpu" in msg  # what to do
    for text in named:
        assert text in msg, msg


def test_an_unknown_device_is_refused():
    with pytest.raises(DeviceError, match="--device: 'gpu' is not one of auto, cuda, cpu"):
        choose_device("gpu", "--device", {}, cuda_devices=0)


def test_allocation_variables():
    assert gpus_allocated({"CUDA_VISIBLE_DEVICES": "-1", "SLURM_JOB_GPUS": ""}) == {}
    assert gpus_allocated({"CUDA_VISIBLE_DEVICES": "GPU-5f1c", "SLURM_JOB_GPUS": "3"}) == {
        "CUDA_VISIBLE_DEVICES": "GPU-5f1c",
        "SLURM_JOB_GPUS": "3",
    }


def test_apply_makes_deepspeed_agree(monkeypatch):
    """train.device=cpu on a GPU node: DS_ACCELERATOR=cpu is written for DeepSpeed to read."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert str(denv_mod.apply_device_rule("cpu")) == "cpu"
    import os

    assert os.environ["DS_ACCELERATOR"] == "cpu"


# ---------------------------------------------------------------- device per rank


@pytest.mark.parametrize(
    ("environ", "node_local"),
    [
        ({"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "h"}, 3),
        ({"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "MASTER_ADDR": "h",
          "MASTER_PORT": "1234"}, 5),
        ({"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8",
          "OMPI_COMM_WORLD_LOCAL_RANK": "6", "MASTER_ADDR": "h"}, 6),
    ],
)  # fmt: skip
def test_device_index_survives_gpu_binding(environ, node_local):
    d = discover(environ)
    assert d.node_local_rank == node_local
    assert d.device_index(8) == node_local  # every GPU of the node visible
    assert d.device_index(1) == 0  # --gpus-per-task=1: one visible device per rank
    assert d.device_index(4) == node_local % 4  # a site --gpu-bind of 2 ranks per visible pair


def test_local_rank_is_the_device_index_and_the_node_rank_stays(monkeypatch):
    """srun --gpus-per-task=1: DeepSpeed reads LOCAL_RANK as the device (zero.Init, set_device),
    so it must be 0 in every task; the node-local rank (SLURM_LOCALID) stays on DistEnv, also
    for a second discover in the same process (which now sees RANK/LOCAL_RANK)."""
    import os

    srun = {"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
            "MASTER_ADDR": "h", "MASTER_PORT": "1234"}  # fmt: skip
    monkeypatch.setattr(os, "environ", srun)  # export writes here; restored after the test
    monkeypatch.setattr(denv_mod, "_exported_node_local_rank", None)
    d = discover()
    denv_mod.export_to_environ(d, visible_devices=1)
    assert os.environ["LOCAL_RANK"] == "0" and os.environ["RANK"] == "13"
    again = discover()
    assert again.launcher == "deepspeed/torchrun" and again.node_local_rank == 5
    # a CPU run: LOCAL_RANK is the node-local rank
    denv_mod.export_to_environ(d, visible_devices=None)
    assert os.environ["LOCAL_RANK"] == "5"


def test_mpirun_local_rank_agrees_with_local_rank(monkeypatch):
    """DeepSpeed asserts OMPI_COMM_WORLD_LOCAL_RANK == LOCAL_RANK (runtime/engine.py): both carry
    the device index once exported, and discover still knows the node-local rank."""
    import os

    mpi = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8",
           "OMPI_COMM_WORLD_LOCAL_RANK": "3", "MASTER_ADDR": "h"}  # fmt: skip
    monkeypatch.setattr(os, "environ", mpi)
    monkeypatch.setattr(denv_mod, "_exported_node_local_rank", None)
    denv_mod.export_to_environ(discover(), visible_devices=2)
    assert os.environ["LOCAL_RANK"] == os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] == "1"
    assert discover().node_local_rank == 3


# ---------------------------------------------------------------- deterministic mode


def test_deterministic_mode_switches():
    code = (
        "import os, torch\n"
        "from umbrella_ds.train.determinism import enable_deterministic\n"
        "enable_deterministic()\n"
        "b = torch.backends\n"
        "print(torch.are_deterministic_algorithms_enabled(), b.cudnn.deterministic,\n"
        "      b.cudnn.benchmark, b.cuda.flash_sdp_enabled(), b.cuda.mem_efficient_sdp_enabled(),\n"
        "      b.cuda.math_sdp_enabled(), os.environ['CUBLAS_WORKSPACE_CONFIG'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env(), check=True).stdout.split()  # fmt: skip
    assert out == ["True", "True", "False", "False", "False", "True", ":4096:8"]


def test_deterministic_is_out_of_the_fingerprint():
    cfg = RunConfig()
    cfg.train.deterministic = True
    assert cfg.fingerprint() == RunConfig().fingerprint()


# ---------------------------------------------------------------- every entry point


def _gpu_node(monkeypatch) -> None:
    """What a GPU node with a CPU torch looks like, with our inherited DS_ACCELERATOR=cpu."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "1")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


def _refused(err: str, key: str) -> bool:
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    return (
        len(lines) == 1
        and lines[0].startswith(f"error: {key}=auto: GPUs allocated")
        and ("CUDA_VISIBLE_DEVICES=0" in lines[0] and "SLURM_GPUS_ON_NODE=1" in lines[0])
    )


def _fake_checkpoint(root: Path, device: str) -> Path:
    cfg = RunConfig()
    cfg.train.device = device  # type: ignore[assignment]
    step = root / "checkpoints" / "step-0000001"
    step.mkdir(parents=True)
    meta = {"format": 1, "step": 1, "world_size": 1, "config": cfg.to_dict()}
    (step / "meta.json").write_text(json.dumps(meta))
    return step


def test_finder_follows_the_rule(monkeypatch, capsys):
    from umbrella_ds.train.cli import main

    _gpu_node(monkeypatch)
    rc = main(["--config", str(DEMO), "--set", "train.device=auto", "--find-micro-batch"])
    assert rc == 2 and _refused(capsys.readouterr().err, "train.device")


@pytest.mark.parametrize("tool", ["eval", "export"])
def test_eval_and_export_follow_the_run_config(tool, tmp_path, monkeypatch, capsys):
    """The checkpoint's train.device decides: auto is refused on the GPU node, cpu gets past the
    rule to the next check (the missing data)."""
    from umbrella_ds.eval import eval_cli
    from umbrella_ds.train import export

    _gpu_node(monkeypatch)
    for device in ("auto", "cpu"):
        step = _fake_checkpoint(tmp_path / device, device)
        gone = str(tmp_path / "no-data")
        if tool == "eval":
            argv = ["--checkpoint", str(step), "--data", gone, "--instructions", gone]
            rc = eval_cli.main(argv)
        else:
            rc = export.main([str(step), "--out", str(tmp_path / "x"), "--shards", gone])
        err = capsys.readouterr().err
        key = "train.device (of the evaluated run)" if tool == "eval" else (
            "train.device (of the exported run)")  # fmt: skip
        assert rc == 2, err
        if device == "auto":
            assert _refused(err, key) and "--device cpu" in err, err
            # --device cpu overrides the recorded auto: past the rule to the missing data
            rc = eval_cli.main([*argv, "--device", "cpu"]) if tool == "eval" else export.main(
                [str(step), "--out", str(tmp_path / "x"), "--shards", gone, "--device", "cpu"])  # fmt: skip
            err = capsys.readouterr().err
            assert rc == 2 and "GPUs allocated" not in err and "no-data" in err, err
        else:
            assert "GPUs allocated" not in err and "no-data" in err, err


def test_infer_follows_the_rule(tmp_path, monkeypatch, capsys):
    from umbrella_ds.infer import main

    _gpu_node(monkeypatch)
    argv = ["--model", str(tmp_path / "none"), "--prompt", "sex?", "--scan", "T1=x.nii.gz"]
    assert main(argv) == 2 and _refused(capsys.readouterr().err, "--device")
    assert main([*argv, "--device", "cpu"]) == 2  # past the rule: no export there
    err = capsys.readouterr().err
    assert "GPUs allocated" not in err and "not an umbrella-export directory" in err, err


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_training_refused_then_trains_on_the_cpu_when_asked(train_data, tmp_path):
    """Through the real launcher: its CPU rank gets CUDA_VISIBLE_DEVICES=0; with SLURM's variable
    too, auto refuses in one line (exit 2) before the model is built; train.device=cpu trains,
    here with train.deterministic on (its switches must not break a CPU run)."""
    node = env(SLURM_GPUS_ON_NODE="1")
    out = tmp_path / "run"
    sets = base_sets(train_data, out, **{"train.max_steps": 2, "train.global_batch": 4,
                                         "train.micro_batch": 4, "checkpoint.every_steps": 0})  # fmt: skip
    refused = run_train(1, [*sets, "train.device=auto"], environ=node, timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    both = refused.stdout + refused.stderr
    assert _refused(both, "train.device"), both[-3000:]
    assert "DS_ACCELERATOR=cpu" in both and "Traceback" not in both
    assert not (out / "metrics.jsonl").exists()  # stopped before anything ran

    ok = run_train(1, [*sets, "train.device=cpu", "train.deterministic=true"], environ=node,
                   timeout=400)  # fmt: skip
    check(ok)
    losses = [r["loss"] for r in metrics(out)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert "train.deterministic: deterministic algorithms" in ok.stdout + ok.stderr
