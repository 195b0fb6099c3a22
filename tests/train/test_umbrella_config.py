"""``umbrella-train --from-umbrella-config``: the predecessor's run YAML -> our run config."""

from __future__ import annotations

import copy

import pytest
import yaml
from helpers.umbrella_forms import FAKE_WANDB_KEY, old_yaml, write_umbrella_forms

from umbrella_ds.config import ConfigError, load_config
from umbrella_ds.data.instructions import load_instructions
from umbrella_ds.errors import UserError
from umbrella_ds.train.cli import main as train_main
from umbrella_ds.train.umbrella_config import convert


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    return write_umbrella_forms(tmp_path_factory.mktemp("forms"), subjects=16)


def _train_files(forms):
    return [
        forms.instructions[n]["train"]
        for n in ("sex_classification", "rsfmri_sex", "sex_comparison_conversations")
    ]


def test_maps_modalities_schedule_batch_and_epochs(forms):
    files = _train_files(forms)
    conv = convert(yaml.safe_load(forms.old_yaml.read_text()), world_size=4, instructions=files)
    run = conv.run
    assert run["model"]["modalities"] == {
        "T1": {"size": [24, 24, 24], "patch": [8, 8, 8]},
        "rsfMRI": {"size": [8, 8, 8, 4], "patch": [4, 4, 4, 2]},
    }
    t = run["train"]
    assert (t["micro_batch"], t["global_batch"]) == (2, 2 * 2 * 4)  # per device x accum x world
    assert (t["lr"], t["warmup_steps"], t["weight_decay"], t["seed"]) == (5e-5, 1, 0.01, 1234)
    samples = sum(len(load_instructions(f)) for f in files)
    assert t["max_steps"] == 2 * (samples // 16)  # max_epochs 2
    assert run["model"]["checkpointing"] == {"vision": True, "language": True}
    assert run["log"]["every_steps"] == 1
    assert run["data"]["train"] == [str(f.resolve()) for f in files]
    pack = conv.commands[1]
    assert "--t1-size 24 24 24" in pack and "--rsfmri-size 8 8 8" in pack
    assert "--rsfmri-norm znorm_minback" in pack


def test_both_folder_forms_give_the_same_run(forms):
    gemini = old_yaml()
    umbrella = copy.deepcopy(gemini)
    for section in ("dataset", "model"):
        s = umbrella[section]
        s["T1"], s["rsfMRI"] = s.pop("sMRI"), s.pop("fMRI")
    files = _train_files(forms)
    a = convert(gemini, instructions=files).run
    b = convert(umbrella, instructions=files).run
    assert a == b


def test_unused_block_left_out_and_listed_without_instructions():
    conv = convert(old_yaml())  # fMRI has no img_dir: the old run did not train on it
    assert list(conv.run["model"]["modalities"]) == ["T1"]
    assert any(i.startswith("dataset.fMRI: no img_dir") for i in conv.not_carried)
    assert any(
        i.startswith("trainer.max_epochs=2: train.max_steps needs") for i in conv.not_carried
    )
    assert "max_steps" not in conv.run["train"]


def test_cli_writes_config_never_the_wandb_key_and_refuses_an_unset_base(forms, tmp_path, capsys):
    out = tmp_path / "run.yaml"
    argv = ["--from-umbrella-config", str(forms.old_yaml), "--out", str(out), "--world-size", "2"]
    argv += ["--instructions", *map(str, _train_files(forms)), "--deepspeed", str(forms.ds_json)]
    assert train_main(argv) == 0
    printed = capsys.readouterr()
    text = out.read_text()
    assert FAKE_WANDB_KEY not in text and FAKE_WANDB_KEY not in printed.out + printed.err
    assert "wandb.API_KEY" in printed.err and "Rotate" in printed.err
    assert "WANDB_API_KEY" in printed.err
    assert "trainer.ckpt_dir: checkpoints go to" in printed.out
    assert "umbrella-pack build --manifest subjects.csv" in printed.out
    raw = yaml.safe_load(text)
    assert raw["model"]["path"] is None and raw["model"]["preset"] is None
    assert raw["train"]["deepspeed"] == str(forms.ds_json.resolve())
    with pytest.raises(ConfigError, match=r"^model\.path: unset"):
        load_config(out)
    assert train_main(["--config", str(out)]) == 2  # one line, no training


def test_model_path_gives_a_pretrained_base(forms, tmp_path):
    conv = convert(old_yaml(), model_path=str(tmp_path / "llava-0.5b"))
    out = tmp_path / "run.yaml"
    out.write_text(yaml.safe_dump(conv.run))
    cfg = load_config(out)
    assert cfg.model.path == str(tmp_path / "llava-0.5b") and cfg.model.preset is None
    assert cfg.model.init_kind == "pretrained"
    assert not any("hf_name" in w for w in conv.warnings)


def test_usage_errors_name_the_key(forms):
    bad = old_yaml()
    del bad["model"]["sMRI"]
    with pytest.raises(UserError, match=r"model\.sMRI\.patch_size: missing"):
        convert(bad)
    big = old_yaml()
    big["trainer"]["per_device_batch_size"] = 64
    with pytest.raises(UserError, match="fewer than one global batch"):
        convert(big, instructions=[forms.instructions["sex_classification"]["train"]])
    norm = old_yaml()
    norm["dataset"]["fMRI"]["input_scaling_method"] = "robust"
    with pytest.raises(UserError, match=r"dataset\.fMRI\.input_scaling_method"):
        convert(norm, instructions=[forms.instructions["rsfmri_sex"]["train"]])
    unknown = old_yaml()
    unknown["trainer"]["lr_scheduler_type"] = "cosine"
    assert "trainer.lr_scheduler_type: unknown key" in convert(unknown).not_carried
