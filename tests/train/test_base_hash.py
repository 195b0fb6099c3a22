"""One frozen base, however it is built, hashed once in one form (issue 22, sections 2 and 8).

Seeded init draws each tensor from (seed, its name), so the base does not depend on how the model
was constructed (the 2-rank ZeRO-3 build is compared in tests/model/test_model_zero3.py, ZeRO-2
against ZeRO-3 training runs in tests/equivalence). Here: the legacy bases still rebuild to the
hashes the code before recorded, the module init rules are kept, the bf16 hash is the same for
fp32 and bf16 builds, and records are checked in their own scheme.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from umbrella_ds.model import build_model
from umbrella_ds.model.recipe import ModelRecipe
from umbrella_ds.train import factory
from umbrella_ds.train.base_weights import (
    HASH_SCHEME,
    LEGACY_SCHEME,
    BaseMismatchError,
    base_hash,
    check_base,
)
from umbrella_ds.train.legacy_init import legacy_random_base
from umbrella_ds.train.trained import recipe_of

GOLDEN = Path(__file__).parent / "golden" / "meta_e28e210.json"
# The legacy ZeRO-3 replay of `tiny`, seed 0, as e28e210 computed it on one process
# (build_model("tiny", seed=0, init_path="zero3") + base_weights_sha256, run from `git archive e28e210`).
LEGACY_ZERO3_TINY_SEED0 = "2e7423167ba8e6ada503f091a372001c1761e4c714991daf6402a60689102e32"


def _rebuild(meta: dict) -> ModelRecipe:
    return recipe_of(meta).rebuild(what="golden-step")[2]


def test_legacy_whole_checkpoint_rebuilds_to_its_recorded_hash():
    meta = json.loads(GOLDEN.read_text())
    assert meta["base"]["init_path"] == "whole" and "hash_scheme" not in meta["base"]
    recipe = _rebuild(meta)  # checked in the legacy fp32 scheme, drawn the legacy way
    assert recipe.weights_sha256 == meta["base"]["weights_sha256"]
    assert (recipe.init_path, recipe.hash_scheme, recipe.init_scheme) == ("whole", None, None)


def test_legacy_zero3_record_rebuilds_by_its_replay_and_a_wrong_hash_is_refused():
    meta = json.loads(GOLDEN.read_text())
    meta["base"] = {"init_path": "zero3", "weights_sha256": LEGACY_ZERO3_TINY_SEED0}
    assert _rebuild(meta).weights_sha256 == LEGACY_ZERO3_TINY_SEED0
    meta["base"]["weights_sha256"] = "0" * 64
    with pytest.raises(BaseMismatchError, match=LEGACY_ZERO3_TINY_SEED0):
        _rebuild(meta)


def test_new_records_name_their_schemes_and_rebuild():
    meta = json.loads(GOLDEN.read_text())
    model, _ = build_model("tiny", seed=0, modalities=meta["config"]["model"]["modalities"])
    built = factory.Built(model, None, torch.float32)
    record = factory.base_record(built)
    assert record["hash_scheme"] == HASH_SCHEME and record["init_scheme"] == "name-seeded-v1"
    assert record["weights_sha256"] != meta["base"]["weights_sha256"]  # another stream
    meta["base"] = record
    rebuilt = _rebuild(meta)
    assert {k: rebuilt.base_record()[k] for k in record} == record
    meta["base"] = {**record, "init_scheme": "name-seeded-v9"}
    with pytest.raises(Exception, match="newer umbrella-ds"):
        _rebuild(meta)


def test_resuming_a_legacy_random_base_is_refused_and_a_legacy_pretrained_hash_is_checked():
    from umbrella_ds.config import config_from_dict

    meta = json.loads(GOLDEN.read_text())
    cfg = config_from_dict(meta["config"])
    model, _ = build_model("tiny", seed=0)
    built = factory.Built(model, None, torch.float32)
    base = factory.base_record(built)
    with pytest.raises(BaseMismatchError, match="drawn before seeded init"):
        factory.check_resume_base(recipe_of(meta), built, base, cfg, what="ckpt")
    # a legacy record of a base that is the same (as a pretrained one is): checked the old way
    legacy = {"weights_sha256": base_hash(model, LEGACY_SCHEME)}
    assert check_base(legacy, model, what="x", source="y", hint="z") == legacy["weights_sha256"]
    new = factory.run_recipe(cfg, built, base)
    factory.check_resume_base(new, built, base, cfg, what="ckpt")  # new record: no rehash


def test_bf16_hash_is_the_same_for_fp32_and_bf16_builds():
    fp32, _ = build_model("tiny", seed=3)
    bf16, _ = build_model("tiny", seed=3, dtype=torch.bfloat16)
    assert base_hash(fp32) == base_hash(bf16)
    assert base_hash(fp32, LEGACY_SCHEME) != base_hash(bf16, LEGACY_SCHEME)
    other, _ = build_model("tiny", seed=4)
    assert base_hash(other) != base_hash(fp32)


@pytest.mark.parametrize("preset", ["tiny", "tiny-clip", "tiny-llava15"])
def test_seeded_init_keeps_each_module_rule(preset):
    """Per tensor, the seeded base and the legacy (transformers' ordinary) one follow the same
    rule: constants equal exactly (norms 1/0, zero biases, padding rows), random tensors with the
    same scale (std within 20%: at >= 64 values the sample std's own spread is <= 9%, 1 sigma)
    and mean (within 5 standard errors)."""
    seeded, _ = build_model(preset, seed=0)
    legacy, _ = build_model(preset, seed=0, construct_base=legacy_random_base("whole"))
    old = dict(legacy.named_parameters())
    drawn = 0
    for name, p in seeded.named_parameters():
        a, b = p.detach().float(), old[name].detach().float()
        if torch.equal(a, b) and not name.startswith("model.vision_tower.embeddings."):
            assert a.numel() < 64 or a.std() < 1e-7 or a.unique().numel() <= 2, name
            continue
        drawn += 1
        assert a.numel() >= 64, name
        assert 0.8 < float(a.std() / b.std()) < 1.25, (name, float(a.std()), float(b.std()))
        assert abs(float(a.mean() - b.mean())) < 5 * float(b.std()) / math.sqrt(a.numel()), name
    assert drawn > 10
    # the patch embedding keeps its own stream: today's values exactly
    for n, p in seeded.named_parameters():
        if ".embeddings." in n and "vision_tower" in n:
            assert torch.equal(p, old[n]), n


def test_real_presets_have_a_stand_in_tokenizer_of_their_vocabulary_size():
    from umbrella_ds.data.template import select_template
    from umbrella_ds.model.build import tokenizer_problem
    from umbrella_ds.model.presets import get_preset

    for name in ("llava-interleave-qwen-0.5b", "llava-1.5-7b"):
        preset = get_preset(name)
        config = preset.make_config()
        tok = preset.load_tokenizer()
        assert len(tok) == config.text_config.vocab_size
        select_template(preset.chat_template, config=config, tokenizer=tok).check_model(config, tok)
        assert tokenizer_problem(name) is None


def test_a_directory_without_a_tokenizer_cannot_train(tmp_path):
    from umbrella_ds.model.build import tokenizer_problem

    (tmp_path / "config.json").write_text("{}")
    assert "holds no tokenizer" in tokenizer_problem(str(tmp_path))


def test_skipping_overwritten_draws_changes_no_value(monkeypatch):
    """Only the last write of each parameter is drawn (seeded_init._last_writes); running every
    write instead gives the same base."""
    from umbrella_ds.model import seeded_init

    skipped, _ = build_model("tiny", seed=0)
    monkeypatch.setattr(seeded_init, "_last_writes", lambda model: None)
    every, _ = build_model("tiny", seed=0)
    assert base_hash(skipped) == base_hash(every)


def test_legacy_export_info_rebuilds_its_base():
    """An export.json written before seeded init (top-level init_path, no schemes) still loads."""
    meta = json.loads(GOLDEN.read_text())
    info = {
        "base": {"preset": "tiny", "path": None, "weights_sha256": meta["base"]["weights_sha256"]},
        "init": None,
        "init_path": "whole",
        "seed": 0,
        "modalities": meta["config"]["model"]["modalities"],
        "run_config": meta["config"],
    }
    recipe = recipe_of(info)
    assert (recipe.preset, recipe.init, recipe.init_path) == ("tiny", "random", "whole")
    recipe.rebuild(what="old-export")
    info["base"]["weights_sha256"] = "0" * 64
    with pytest.raises(BaseMismatchError):
        recipe_of(info).rebuild(what="old-export")
