"""ModelRecipe: the one answer to "which model is this?".

A trained patch embedding is only meaningful on the base it was trained against, built the way
the run built it. The recipe holds exactly that, and nothing about training: the base's source (a
preset or a local directory), its init, the seed, the modalities (size and patch), the chat
template, and the frozen base's fingerprint with the schemes it was drawn and hashed in.

It is saved identically, under the key ``recipe``, in a checkpoint's ``meta.json`` and in an
export's ``export.json`` (``to_dict``), so the two cannot disagree. ``rebuild`` draws the base as
recorded on one process and refuses one that does not hash to the record. Records written before
the recipe existed are turned into one by ``train/trained.py`` (``recipe_from_old``), the one
reader of the old keys.

Legacy bases (drawn before seeded init, ``init_path`` set and ``init_scheme`` None) are redrawn
by ``train/legacy_init.py``; the hash check is ``train/base_weights.py``. Both are imported when
a rebuild needs them: they hold the ZeRO-3 and hashing details, which stay out of ``model/``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch

from umbrella_ds.errors import UserError
from umbrella_ds.model.seeded_init import INIT_SCHEME

RECIPE_KEY = "recipe"  # the key in meta.json and export.json


def _frozen_modalities(
    mods: Mapping[str, Any],
) -> tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]:
    """(name, size, patch) per modality, from JSON dicts or ModalitySpec-like objects: a tuple, so
    the record is immutable and two recipes compare equal exactly when their modalities do."""
    out = []
    for name, spec in mods.items():
        size = spec["size"] if isinstance(spec, Mapping) else spec.size
        patch = spec["patch"] if isinstance(spec, Mapping) else spec.patch
        out.append((str(name), tuple(int(x) for x in size), tuple(int(x) for x in patch)))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
    """What rebuilds a trained model's frozen base and its patch embedding's shape.

    init: "random" | "pretrained" (resolved, never None).
    modalities: ((name, size, patch), ...) in the run's order (the branch order follows it).
    template: the base's conversation template name (None: recorded before templates were).
    weights_sha256: the frozen base's hash (None: recorded before hashes were; not checked).
    hash_scheme: the hash's scheme (None: the legacy fp32 one, `base_weights.LEGACY_SCHEME`).
    init_scheme: the random init's scheme (`seeded_init.INIT_SCHEME`); None for a legacy base,
        which then has an `init_path` ("whole" | "zero3") saying how it was drawn.
    """

    preset: str | None
    path: str | None
    init: str
    seed: int
    modalities: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
    template: str | None = None
    weights_sha256: str | None = None
    hash_scheme: str | None = None
    init_scheme: str | None = None
    init_path: str | None = None

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.path is None):
            raise UserError(
                f"model recipe: exactly one of preset and path, got {self.preset!r} / {self.path!r}"
            )
        if self.init not in ("random", "pretrained"):
            raise UserError(f"model recipe: init {self.init!r} (random | pretrained)")
        if self.init_path not in (None, "whole", "zero3"):
            raise UserError(
                f"model recipe: base init_path {self.init_path!r} is unknown (whole | zero3)"
            )
        if self.init_scheme not in (None, INIT_SCHEME):
            raise UserError(
                f"base init scheme {self.init_scheme!r} is unknown to this version (it knows "
                f"{INIT_SCHEME!r} and the legacy paths): the record was written by a newer umbrella-ds"
            )

    @classmethod
    def create(
        cls,
        source: str,
        *,
        is_path: bool,
        init: str | None,
        seed: int,
        modalities: Mapping[str, Any],
        **base: Any,
    ) -> ModelRecipe:
        """A recipe from a source (preset name or directory) and the rest; `init` None resolves
        as build_model does (random for a preset, pretrained for a directory)."""
        return cls(
            preset=None if is_path else source,
            path=source if is_path else None,
            init=init or ("pretrained" if is_path else "random"),
            seed=int(seed),
            modalities=_frozen_modalities(modalities),
            **base,
        )

    @property
    def source(self) -> str:
        """The preset name or the local directory the base comes from."""
        return self.path if self.path is not None else str(self.preset)

    def modality_specs(self) -> dict[str, dict[str, list[int]]]:
        """The modalities in the form build_model takes (and JSON holds)."""
        return {m: {"size": list(size), "patch": list(patch)} for m, size, patch in self.modalities}

    def base_record(self) -> dict[str, Any]:
        """The frozen base's record (what `base_weights.check_base` checks against)."""
        return {
            "preset": self.preset,
            "path": self.path,
            "weights_sha256": self.weights_sha256,
            "hash_scheme": self.hash_scheme,
            "init_scheme": self.init_scheme,
            "init_path": self.init_path,
        }

    def to_dict(self) -> dict[str, Any]:
        """The saved form (meta.json and export.json, key RECIPE_KEY)."""
        return {
            "base": self.base_record(),
            "init": self.init,
            "seed": self.seed,
            "modalities": self.modality_specs(),
            "template": self.template,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelRecipe:
        base = d["base"]
        return cls(
            preset=base.get("preset"),
            path=base.get("path"),
            init=d["init"],
            seed=int(d["seed"]),
            modalities=_frozen_modalities(d["modalities"]),
            template=d.get("template"),
            weights_sha256=base.get("weights_sha256"),
            hash_scheme=base.get("hash_scheme"),
            init_scheme=base.get("init_scheme"),
            init_path=base.get("init_path"),
        )

    def with_base(self, **base: Any) -> ModelRecipe:
        return dataclasses.replace(self, **base)

    def build(
        self,
        *,
        source: str | None = None,
        dtype: torch.dtype = torch.float32,
        zero3_init: Callable[[], AbstractContextManager] | None = None,
        zero3_access: Any = None,
        activation_checkpointing: tuple[bool, bool] = (False, False),
    ):
        """(model, tokenizer) built from this recipe, unchecked: the one call of build_model.
        `source` overrides where the base comes from (another copy of it); a legacy base is
        drawn by its recorded path, on one process."""
        from umbrella_ds.model.build import build_model

        construct = None
        if self.init == "random" and self.init_scheme is None and self.init_path is not None:
            from umbrella_ds.train.legacy_init import legacy_random_base

            if zero3_init is not None:
                raise ValueError("a legacy random base is redrawn on one process only")
            construct = legacy_random_base(self.init_path)
        return build_model(
            source or self.source,
            modalities=self.modality_specs(),
            init=self.init,  # type: ignore[arg-type]
            dtype=dtype,
            seed=self.seed,
            zero3_init=zero3_init,
            zero3_access=zero3_access,
            activation_checkpointing=activation_checkpointing,
            construct_base=construct,
        )

    def rebuild(
        self,
        base: str | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        what: str,
        verify: bool = True,
    ):
        """(model, tokenizer, recipe) rebuilt on one process and checked (unless not `verify`):
        the frozen base must hash, in the recorded scheme, to the recorded hash (BaseMismatchError
        names both), and the template must be the recorded one. The returned recipe carries the
        rebuilt hash (filled in for records from before hashes were)."""
        from umbrella_ds.data.template import template_of
        from umbrella_ds.train.base_weights import BaseMismatchError, check_base

        source = str(base) if base is not None else self.source
        model, tokenizer = self.build(source=source, dtype=dtype)
        if not verify:
            return model, tokenizer, self
        rebuilt = check_base(
            self.base_record(), model, what=f"{what} (base {self.source})", source=source,
            hint="point --base at the base the run trained with",
        )  # fmt: skip
        template = template_of(model).name
        if self.template is not None and template != self.template:
            raise BaseMismatchError(
                f"{what} was trained with chat template {self.template!r}, but {source!r} "
                f"selects {template!r}; point --base at the base the run trained with"
            )
        return model, tokenizer, self.with_base(weights_sha256=rebuilt, template=template)
