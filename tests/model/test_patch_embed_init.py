"""``model.patch_embed_init``: a patch embedding trained by the predecessor, loaded into ours.

``OldPatchEmbed`` below re-states the predecessor's PatchEmbed (UMBRELLA/BrainVLM
``project/model/patch_embed.py``): its parameter names and its forward, including the 4D block
flattening (view into (grid, patch) pairs, permute to (B, gD, gH, gW, gT, pD, pH, pW, pT, C),
Linear, then tokens in (gD, gH, gW, gT) order). Ours must give the same tokens from its weights.

The file is also the per-rank worker of the ZeRO-3 test (run under torchrun).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

T1_SIZE, T1_PATCH = (16, 16, 16), (8, 4, 8)
RS_SIZE, RS_PATCH = (8, 8, 8, 4), (4, 2, 4, 2)  # unequal patches: an axis mix-up shows
EMBED = 12
PREFIX_4X = "vision_tower.vision_model.embeddings."
PREFIX_5X = "model.vision_tower.embeddings."


class OldPatchEmbed(nn.Module):
    """The predecessor's PatchEmbed, re-stated (names as in its UMBRELLA or UMBRELLA_gemini folder)."""

    def __init__(self, t1="T1", rs="rsfMRI", embed=EMBED, t1_patch=T1_PATCH, rs_patch=RS_PATCH):
        super().__init__()
        self.t1, self.rs, self.embed = t1, rs, embed
        self.t1_patch, self.rs_patch = t1_patch, rs_patch
        self.rs_grid = tuple(s // p for s, p in zip(RS_SIZE, rs_patch))
        n_t1 = math.prod(s // p for s, p in zip(T1_SIZE, t1_patch))
        setattr(self, f"{t1}_proj", nn.Conv3d(1, embed, kernel_size=t1_patch, stride=t1_patch))
        setattr(self, f"{t1}_positional_embeddings", nn.Parameter(torch.randn(1, n_t1, embed)))
        setattr(self, f"{rs}_proj", nn.Linear(math.prod(rs_patch), embed))
        setattr(
            self,
            f"{rs}_positional_embeddings",
            nn.Parameter(torch.randn(1, math.prod(self.rs_grid), embed)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5:  # (B, C, D, H, W)
            x = getattr(self, f"{self.t1}_proj")(x).flatten(2).transpose(1, 2)
            return x + getattr(self, f"{self.t1}_positional_embeddings")
        b, c = x.shape[:2]  # (B, C, D, H, W, T)
        gd, gh, gw, gt = self.rs_grid
        sd, sh, sw, st = self.rs_patch
        x = x.view(b, c, gd, sd, gh, sh, gw, sw, gt, st)
        x = x.permute(0, 2, 4, 6, 8, 3, 5, 7, 9, 1).contiguous().view(-1, sd * sh * sw * st * c)
        x = getattr(self, f"{self.rs}_proj")(x)
        x = x.view(b, gd, gh, gw, -1, self.embed).contiguous().permute(0, 5, 1, 2, 3, 4)
        x = x.flatten(2).transpose(1, 2)
        return x + getattr(self, f"{self.rs}_positional_embeddings")


def _ours(t1_patch=T1_PATCH, rs=True):
    from umbrella_ds.model.patch_embed import MRIPatchEmbed

    mods = {"T1": {"size": T1_SIZE, "patch": t1_patch}}
    if rs:
        mods["rsfMRI"] = {"size": RS_SIZE, "patch": RS_PATCH}
    return MRIPatchEmbed(mods, EMBED)


def _old_state(prefix: str = PREFIX_4X, **kw) -> tuple[OldPatchEmbed, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    old = OldPatchEmbed(**kw)
    state = {prefix + k: v.detach().clone() for k, v in old.state_dict().items()}
    # the rest of an HF checkpoint: frozen tensors that must be left alone
    state["language_model.model.embed_tokens.weight"] = torch.randn(7, EMBED)
    state["multi_modal_projector.linear_1.weight"] = torch.randn(EMBED, EMBED)
    return old, state


def test_loaded_weights_give_the_predecessors_tokens(tmp_path):
    from safetensors.torch import save_file

    from umbrella_ds.model.patch_embed_init import load_patch_embed

    old, state = _old_state()
    (tmp_path / "ckpt").mkdir()
    save_file(state, str(tmp_path / "ckpt" / "model.safetensors"))
    ours = _ours()
    filled = load_patch_embed(ours, tmp_path / "ckpt")
    assert len(filled) == 6
    g = torch.Generator().manual_seed(1)
    t1 = torch.randn(3, 1, *T1_SIZE, generator=g)
    rs = torch.randn(3, 1, *RS_SIZE, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours(t1, modality="T1"), old(t1), rtol=0, atol=1e-6)
        torch.testing.assert_close(ours(rs, modality="rsfMRI"), old(rs), rtol=0, atol=1e-6)
        # the check is sensitive to the block order: time-major flattening gives other tokens
        w = ours.proj["rsfMRI"].weight
        w.copy_(w.view(EMBED, 4, 2, 4, 2).permute(0, 4, 3, 2, 1).reshape(EMBED, -1))
        assert not torch.allclose(ours(rs, modality="rsfMRI"), old(rs), atol=1e-3)


def _save(state, path: Path, form: str) -> Path:
    from safetensors.torch import save_file

    if form == "bin":
        path.mkdir()
        torch.save(state, path / "pytorch_model.bin")
    elif form == "sharded":
        path.mkdir()
        keys = sorted(state)
        shards = {
            "model-00001-of-00002.safetensors": keys[:2],
            "model-00002-of-00002.safetensors": keys[2:],
        }
        for name, ks in shards.items():
            save_file({k: state[k] for k in ks}, str(path / name))
        index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    elif form == "state_dict_file":
        path = path.with_suffix(".pt")
        torch.save({"state_dict": state}, path)
    return path


@pytest.mark.parametrize(
    ("form", "prefix", "names"),
    [
        ("bin", PREFIX_5X, ("T1", "rsfMRI")),
        ("sharded", "module." + PREFIX_4X, ("sMRI", "fMRI")),
        ("state_dict_file", "", ("sMRI", "fMRI")),
    ],
)
def test_checkpoint_forms_and_key_names(tmp_path, form, prefix, names):
    from umbrella_ds.model.patch_embed_init import load_patch_embed

    old, state = _old_state(prefix, t1=names[0], rs=names[1])
    if not prefix:  # a bare patch-embedding state dict
        state = {k: v for k, v in state.items() if not k.startswith(("language", "multi"))}
    path = _save(state, tmp_path / "ckpt", form)
    ours = _ours()
    load_patch_embed(ours, path)
    assert torch.equal(ours.proj["T1"].weight, getattr(old, f"{names[0]}_proj").weight)
    assert torch.equal(
        ours.pos_embedding("rsfMRI"), getattr(old, f"{names[1]}_positional_embeddings")
    )
    assert torch.equal(ours.proj["rsfMRI"].bias, getattr(old, f"{names[1]}_proj").bias)


def test_wrong_shape_missing_modality_and_foreign_files_are_one_line_errors(tmp_path):
    from safetensors.torch import save_file

    from umbrella_ds.errors import UserError
    from umbrella_ds.model.patch_embed_init import load_patch_embed

    _, state = _old_state()
    save_file(state, str(tmp_path / "m.safetensors"))
    before = _ours(t1_patch=(8, 8, 8))
    kept = before.proj["rsfMRI"].weight.detach().clone()
    with pytest.raises(
        UserError, match=rf"tensor {PREFIX_4X}T1_proj.weight has shape .* model\.modalities\.T1"
    ):
        load_patch_embed(before, tmp_path / "m.safetensors")
    assert torch.equal(before.proj["rsfMRI"].weight, kept)  # checked before anything is written

    t1_only = {k: v for k, v in state.items() if "rsfMRI" not in k}
    save_file(t1_only, str(tmp_path / "t1.safetensors"))
    with pytest.raises(UserError, match=r"no tensor for proj\.rsfMRI\.weight .* has .*\['T1'\]"):
        load_patch_embed(_ours(), tmp_path / "t1.safetensors")

    unpatched = {PREFIX_4X + "patch_embedding.weight": torch.zeros(EMBED, 3, 4, 4)}
    save_file(unpatched, str(tmp_path / "u.safetensors"))
    with pytest.raises(UserError, match="an unpatched model"):
        load_patch_embed(_ours(), tmp_path / "u.safetensors")

    (tmp_path / "hf" / "global_step500").mkdir(parents=True)
    with pytest.raises(UserError, match=r"zero_to_fp32\.py"):
        load_patch_embed(_ours(), tmp_path / "hf")
    (tmp_path / "bad.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"bad\.bin: cannot read"):
        load_patch_embed(_ours(), tmp_path / "bad.bin")


def test_run_build_loads_it_warns_and_fingerprints_only_when_set(tmp_path, caplog):
    from safetensors.torch import save_file

    from umbrella_ds.config import load_config
    from umbrella_ds.model import find_patch_embed
    from umbrella_ds.train.factory import build_for_run

    default = load_config(None, ["model.preset=tiny"])
    embed = build_for_run(default).model
    e = find_patch_embed(embed).embed_dim
    torch.manual_seed(3)
    old = OldPatchEmbed(embed=e, t1_patch=(8, 8, 8))
    state = {PREFIX_5X + k: v for k, v in old.state_dict().items() if k.startswith("T1")}
    save_file(state, str(tmp_path / "model.safetensors"))
    cfg = load_config(
        None,
        [
            f"model.patch_embed_init={tmp_path}",
            "model.modalities={T1: {size: [16, 16, 16], patch: [8, 8, 8]}}",
        ],
    )
    with caplog.at_level(logging.WARNING, logger="umbrella_ds.model"):
        model = build_for_run(cfg).model
    pe = find_patch_embed(model)
    assert torch.equal(pe.proj["T1"].weight, old.T1_proj.weight)
    assert torch.equal(pe.pos_embedding("T1"), old.T1_positional_embeddings)
    assert any("other preprocessing" in r.getMessage() for r in caplog.records)
    unset = load_config(None, ["model.modalities={T1: {size: [16, 16, 16], patch: [8, 8, 8]}}"])
    assert unset.model.patch_embed_init is None
    assert cfg.fingerprint() != unset.fingerprint()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_umbrella_eval_scores_a_run_config_that_sets_it(tmp_path):
    """``umbrella-eval --checkpoint RUN.yaml``: the predecessor's weights scored, no training."""
    from helpers.umbrella_forms import write_umbrella_forms
    from safetensors.torch import save_file

    from data_prep.cli import main as pack_main
    from umbrella_ds.config import load_config
    from umbrella_ds.model import find_patch_embed
    from umbrella_ds.train.factory import build_for_run

    forms = write_umbrella_forms(tmp_path / "forms", subjects=8)
    t1 = [str(forms.instructions["sex_classification"][s]) for s in ("train", "test")]
    maps = [x for pm in forms.path_maps for x in ("--path-map", pm)]
    assert (
        pack_main(["manifest", "--instructions", *t1, *maps, "--out", str(tmp_path / "m.csv")]) == 0
    )
    argv = ["build", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "shards")]
    assert pack_main([*argv, "--t1-size", "16", "16", "16", "--no-progress"]) == 0
    e = find_patch_embed(build_for_run(load_config(None, [])).model).embed_dim
    old = OldPatchEmbed(embed=e, t1_patch=(8, 8, 8))
    save_file({PREFIX_4X + k: v for k, v in old.state_dict().items() if k.startswith("T1")},
              str(tmp_path / "old.safetensors"))  # fmt: skip
    modalities = {"T1": {"size": [16, 16, 16], "patch": [8, 8, 8]}}
    run = {"model": {"preset": "tiny", "modalities": modalities}, "train": {"bf16": False}}
    (tmp_path / "plain.yaml").write_text(json.dumps(run))
    run["model"]["patch_embed_init"] = str(tmp_path / "old.safetensors")
    (tmp_path / "run.yaml").write_text(json.dumps(run))
    cmd = [str(Path(sys.executable).parent / "umbrella-eval"), "--data", str(tmp_path / "shards"),
           "--instructions", t1[1], "--out", str(tmp_path / "eval")]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cmd, "--checkpoint", str(tmp_path / "run.yaml")], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["source"] == {"kind": "config", "path": str(tmp_path / "run.yaml"), "step": 0}
    preds = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == len(forms.splits["test"])
    assert "other preprocessing" in done.stderr
    plain = subprocess.run([*cmd, "--checkpoint", str(tmp_path / "plain.yaml")], env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert plain.returncode == 2 and "does not set" in plain.stderr, plain.stderr[-2000:]


# ---------------------------------------------------------------- ZeRO-3, 2 ranks


def _worker(out_dir: Path, source: Path) -> None:
    import deepspeed

    from umbrella_ds.config import load_config
    from umbrella_ds.model import find_patch_embed
    from umbrella_ds.train.env import release_deepspeed_shm
    from umbrella_ds.train.factory import build_for_run

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    release_deepspeed_shm(rank)
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": False},
    }
    cfg = load_config(
        None,
        [
            f"model.patch_embed_init={source}",
            "model.modalities={T1: {size: [16, 16, 16], patch: [8, 8, 8]}}",
        ],
    )
    pe = find_patch_embed(build_for_run(cfg, ds).model)
    params = dict(pe.named_parameters())
    partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in params.values())
    from safetensors.torch import load_file

    want = {
        k.split("embeddings.")[-1]: v
        for k, v in load_file(str(source / "model.safetensors")).items()
    }
    with deepspeed.zero.GatheredParameters(list(params.values())):
        same = torch.equal(params["proj.T1.weight"], want["T1_proj.weight"]) and torch.equal(
            params["pos_embed_T1"], want["T1_positional_embeddings"]
        )
    (out_dir / f"rank{rank}.json").write_text(
        json.dumps({"partitioned": partitioned, "same": same})
    )
    torch.distributed.barrier()


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_zero3_loads_into_the_partitions(tmp_path, repo_root):
    from helpers.net import free_port
    from safetensors.torch import save_file

    from umbrella_ds.config import load_config
    from umbrella_ds.model import find_patch_embed
    from umbrella_ds.train.factory import build_for_run

    e = find_patch_embed(build_for_run(load_config(None, [])).model).embed_dim
    torch.manual_seed(4)
    old = OldPatchEmbed(embed=e, t1_patch=(8, 8, 8))
    (tmp_path / "ckpt").mkdir()
    save_file(
        {PREFIX_4X + k: v for k, v in old.state_dict().items() if k.startswith("T1")},
        str(tmp_path / "ckpt" / "model.safetensors"),
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(repo_root / ".cache" / "torch_extensions"))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), __file__, str(tmp_path), str(tmp_path / "ckpt"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=repo_root, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res == {"partitioned": True, "same": True}, (rank, res)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
