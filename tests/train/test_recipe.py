"""The ModelRecipe (issue 26 §1): one record of a trained model, saved alike in meta.json and
export.json; records written before it are read by one reader (`trained.recipe_from_old`).

The meta-record == export-record check and the loader taking a run, a step and an export need a
trained run: tests/cli/test_eval_infer.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from umbrella_ds.config import config_from_dict
from umbrella_ds.errors import UserError
from umbrella_ds.model.recipe import RECIPE_KEY, ModelRecipe
from umbrella_ds.train import trained

GOLDEN = Path(__file__).parent / "golden" / "meta_e28e210.json"


def _golden() -> dict:
    return json.loads(GOLDEN.read_text())


def _old_export(meta: dict) -> dict:
    """An export.json of format 2 (before the recipe) of the golden checkpoint, as written then:
    base, init, seed and modalities at top level and again inside run_config."""
    cfg = config_from_dict(meta["config"])
    return {
        "format": 2,
        "base": {"preset": cfg.model.preset, "path": None, **meta["base"]},
        "init": meta["config"]["model"].get("init"),
        "seed": cfg.train.seed,
        "modalities": {
            m: {"size": list(s.size), "patch": list(s.patch)}
            for m, s in cfg.model.modalities.items()
        },
        "step": meta["step"],
        "run_config": meta["config"],
    }


def test_an_old_meta_and_its_old_export_read_to_one_recipe():
    meta = _golden()
    from_meta = trained.recipe_of(meta)
    assert from_meta == trained.recipe_of(_old_export(meta))
    cfg = config_from_dict(meta["config"])
    assert (from_meta.preset, from_meta.path, from_meta.init) == ("tiny", None, "random")
    assert from_meta.seed == cfg.train.seed
    assert from_meta.modality_specs() == {
        m: {"size": list(s.size), "patch": list(s.patch)} for m, s in cfg.model.modalities.items()
    }
    assert from_meta.weights_sha256 == meta["base"]["weights_sha256"]
    assert (from_meta.init_path, from_meta.hash_scheme, from_meta.init_scheme) == (
        "whole",
        None,
        None,
    )
    assert from_meta.template is None  # recorded before templates were


def test_the_old_keys_have_one_reader(monkeypatch):
    """Old meta and old export go through recipe_from_old; a new record never does."""
    calls = []
    real = trained.recipe_from_old
    monkeypatch.setattr(trained, "recipe_from_old", lambda r: calls.append(1) or real(r))
    meta = _golden()
    recipe = trained.recipe_of(meta)
    trained.recipe_of(_old_export(meta))
    assert len(calls) == 2
    new = {"format": 2, RECIPE_KEY: recipe.to_dict(), "config": meta["config"]}
    assert trained.recipe_of(new) == recipe and len(calls) == 2


def test_old_records_without_an_init_path_take_the_one_their_run_implies():
    meta = _golden()
    del meta["base"]["init_path"]
    assert trained.recipe_of(meta).init_path == "whole"  # the golden run is ZeRO-2
    meta["config"]["train"]["deepspeed"] = "zero3"
    assert trained.recipe_of(meta).init_path == "zero3"
    del meta["base"]  # before the base record: nothing to check, the path still implied
    recipe = trained.recipe_of(meta)
    assert recipe.weights_sha256 is None and recipe.init_path == "zero3"
    old = _old_export(_golden())
    del old["base"]["init_path"]  # an export before seeded init without one: "whole"
    assert trained.recipe_of(old).init_path == "whole"


def test_the_saved_form_round_trips_and_is_json():
    recipe = trained.recipe_of(_golden()).with_base(template="chatml")
    d = json.loads(json.dumps(recipe.to_dict()))
    assert ModelRecipe.from_dict(d) == recipe and ModelRecipe.from_dict(d).to_dict() == d
    assert set(d) == {"base", "init", "seed", "modalities", "template"}
    assert set(d["base"]) == {
        "preset", "path", "weights_sha256", "hash_scheme", "init_scheme", "init_path",
    }  # fmt: skip


def test_a_record_from_a_newer_version_or_a_broken_one_is_refused():
    d = trained.recipe_of(_golden()).to_dict()
    newer = copy.deepcopy(d)
    newer["base"].update(init_scheme="name-seeded-v9", init_path=None)
    with pytest.raises(UserError, match="newer umbrella-ds"):
        ModelRecipe.from_dict(newer)
    both = copy.deepcopy(d)
    both["base"]["path"] = "/some/dir"
    with pytest.raises(UserError, match="exactly one of preset and path"):
        ModelRecipe.from_dict(both)


def test_a_rebuild_with_another_template_is_refused():
    from umbrella_ds.train.base_weights import BaseMismatchError

    recipe = trained.recipe_of(_golden())
    _, _, rebuilt = recipe.rebuild(what="golden-step")
    assert rebuilt.template and rebuilt.weights_sha256 == recipe.weights_sha256
    with pytest.raises(BaseMismatchError, match="chat template"):
        recipe.with_base(template="llava15").rebuild(what="golden-step")
