"""2 ranks, ZeRO-3, CPU: the `small` preset is built partitioned and one step changes only the
patch embedding. Rank 0's batch has no rsfMRI image (the configured branch must still run,
or the ranks would hang gathering different parameters); activation checkpointing is on.

A pretrained directory (a saved, unpatched LLaVA, as users have them) is loaded straight into
the partitions under `ds_setup.zero3_pretrained_loading`, the engine's path: every parameter is
partitioned once build_model returns (before, it was loaded whole on every rank), and the
gathered weights are the saved ones.

The file is both the pytest test and, run under torchrun, the per-rank worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MODALITIES = ("T1", "rsfMRI")
T1_ONLY = {"T1": {"size": [32, 32, 32], "patch": [8, 8, 8]}}


def _start_rank() -> tuple[int, dict]:
    """gloo process group (DeepSpeed's shm segment released) and the ZeRO-3 config both workers use."""
    import deepspeed
    import torch

    from umbrella_ds.train.env import release_deepspeed_shm

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    release_deepspeed_shm(rank)
    return rank, {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
    }


def _pretrained_worker(out_dir: Path, source: Path) -> None:
    import deepspeed
    import torch
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from umbrella_ds.model import build_model
    from umbrella_ds.train import ds_setup
    from umbrella_ds.train.factory import gathered_for_init

    rank, ds_config = _start_rank()
    with ds_setup.zero3_pretrained_loading(ds_config):
        assert is_deepspeed_zero3_enabled()
        model, _ = build_model(
            str(source),
            init="pretrained",
            modalities=T1_ONLY,
            zero3_init=lambda: deepspeed.zero.Init(config_dict_or_path=ds_config),
            zero3_access=gathered_for_init,
        )
    params = dict(model.named_parameters())
    plain = sorted(n for n, p in params.items() if not hasattr(p, "ds_numel"))
    whole = sum(p.ds_numel for p in params.values() if hasattr(p, "ds_numel"))
    local = sum(p.ds_tensor.numel() for p in params.values() if hasattr(p, "ds_numel"))
    # the reference: the same directory loaded whole, without ZeRO (HF's ordinary path, which
    # also maps the hub's key layout onto transformers 5.x names)
    reference, _ = build_model(str(source), init="pretrained", modalities=T1_ONLY)
    expected = {n: p.detach() for n, p in reference.named_parameters()}
    compared, differ = 0, []
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, param in params.items():
            if param.requires_grad:
                continue  # the MRI patch embedding: new, random, not in the directory
            compared += 1
            if not torch.equal(param.detach(), expected[name]):
                differ.append(name)
    if rank == 0:
        (out_dir / "result.json").write_text(
            json.dumps(
                {
                    "plain": plain, "whole": whole, "local": local, "compared": compared,
                    "params": len(params), "differ": differ,
                    "zero3_after": is_deepspeed_zero3_enabled(),
                }
            )
        )  # fmt: skip
    torch.distributed.barrier()


def _worker(out_dir: Path) -> None:
    import deepspeed
    import torch

    from umbrella_ds.model import (
        build_model,
        find_patch_embed,
        image_token_id,
        model_forward_loss,
        num_image_tokens,
    )
    from umbrella_ds.train.base_weights import base_hash
    from umbrella_ds.train.factory import gathered_for_init

    rank, ds_config = _start_rank()
    model, _ = build_model(
        "small",
        seed=0,
        zero3_init=lambda: deepspeed.zero.Init(config_dict_or_path=ds_config),
        zero3_access=gathered_for_init,
        activation_checkpointing=(True, True),
    )
    base = base_hash(model)  # every rank together; rank 0 hashes
    params = list(model.named_parameters())
    plain = [n for n, p in params if not hasattr(p, "ds_numel")]
    assert not plain, f"not partitioned: {plain}"
    whole = sum(p.ds_numel for _, p in params)
    local = sum(p.ds_tensor.numel() for _, p in params)
    patch_names = {n for n, p in params if p.requires_grad}

    def snapshot() -> dict[str, torch.Tensor]:
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().clone() for n, p in params}

    before = snapshot()
    patch_before = {n: before[n].tolist() for n in patch_names}
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-2), config=ds_config
    )
    engine.train()

    img = image_token_id(model)
    l_t1, l_rs = num_image_tokens(model, "T1"), num_image_tokens(model, "rsfMRI")
    g = torch.Generator().manual_seed(rank)
    seq = [5, 6, *[img] * l_t1, 7]
    images = {"T1": torch.randn(1, 32, 32, 32, generator=g)}
    positions = {"T1": torch.arange(2, 2 + l_t1)}
    if rank == 1:
        start = len(seq)
        seq += [*[img] * l_rs, 8]
        images["rsfMRI"] = torch.randn(1, 32, 32, 32, 8, generator=g)
        positions["rsfMRI"] = torch.arange(start, start + l_rs)
    seq += [9, 10, 11]
    batch = {
        "input_ids": torch.tensor([seq]),
        "attention_mask": torch.ones(1, len(seq), dtype=torch.long),
        "images": images,
        "image_positions": positions,
        "loss_positions": torch.tensor([len(seq) - 3, len(seq) - 2]),
        "loss_targets": torch.tensor([10, 11]),
    }
    loss, _ = model_forward_loss(engine.module, batch, 2.0, all_modalities=MODALITIES)
    engine.backward(loss)
    engine.step()

    after = snapshot()
    changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
    if rank == 0:
        (out_dir / "result.json").write_text(
            json.dumps(
                {
                    "whole": whole,
                    "local": local,
                    "changed": changed,
                    "patch": sorted(patch_names),
                    "patch_is_module": sorted(
                        n for n, _ in find_patch_embed(engine.module).named_parameters()
                    ),
                    "loss": float(loss),
                    "base": base,
                    "patch_before": patch_before,
                }
            )
        )
    torch.distributed.barrier()


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_zero3_partitioned_build_trains_only_patch_embedding(tmp_path, repo_root):
    # imported here: this file is also the rank script, which runs without tests/ on sys.path
    from helpers.net import free_port

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(repo_root / ".cache" / "torch_extensions"))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), __file__, str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=repo_root, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads((tmp_path / "result.json").read_text())
    # per-rank storage about half of the whole model
    assert 0.45 < res["local"] / res["whole"] < 0.55, res
    assert res["changed"], "nothing trained"
    assert set(res["changed"]) == set(res["patch"]), res["changed"]
    assert len(res["patch"]) == len(res["patch_is_module"]) == 6  # weight, bias, pos per modality
    assert any("rsfMRI" in n for n in res["changed"])  # rank 1's rsfMRI gradient reached everyone
    # seeded init: the partitioned 2-rank build is the one-process build, base and patch embedding
    import torch

    from umbrella_ds.model import build_model
    from umbrella_ds.train.base_weights import base_hash

    whole, _ = build_model("small", seed=0)
    assert res["base"] == base_hash(whole)
    for name, p in whole.named_parameters():
        if name in res["patch_before"]:
            assert torch.equal(p, torch.tensor(res["patch_before"][name])), name


def _save_unpatched_small(path: Path) -> None:
    """A `small` LLaVA as it comes from the hub: the original 2D patch embedding, random weights."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from umbrella_ds.model import get_preset

    torch.manual_seed(0)
    LlavaForConditionalGeneration(get_preset("small").make_config()).save_pretrained(str(path))


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_zero3_pretrained_directory_loads_into_partitions(tmp_path, repo_root):
    from helpers.net import free_port  # imported here: see above

    source = tmp_path / "small-hf"
    _save_unpatched_small(source)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), __file__, str(tmp_path), str(source),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=repo_root, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["plain"] == [], f"loaded whole, not partitioned: {res['plain'][:5]}"
    assert 0.45 < res["local"] / res["whole"] < 0.55, res
    # every parameter but the new patch embedding's 3 was loaded into the partitions with the
    # value the directory holds
    assert res["compared"] == res["params"] - 3, res
    assert res["differ"] == [], res["differ"]
    assert res["zero3_after"] is False  # the HF global is dropped with the build


if __name__ == "__main__":
    if len(sys.argv) > 2:
        _pretrained_worker(Path(sys.argv[1]), Path(sys.argv[2]))
    else:
        _worker(Path(sys.argv[1]))
