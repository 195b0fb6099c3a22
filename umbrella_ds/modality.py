"""The modality table: every MRI modality described once, asked by everything else.

A modality is a name (``T1``, ``rsfMRI``) plus what each stage needs to know about it:
the spellings instruction files use for it (the predecessor wrote ``sMRI`` and ``fMRI``), its
dimensionality (3 = one volume, 4 = a series of volumes), its normalisations, its default grid,
its packing flags and its manifest column. Config validation,
shards, packing, BIDS, the dataset, the patch embedding and ``umbrella-infer`` ask this table
instead of spelling a modality out, so a new modality is one :func:`register` call.

Most per-modality behaviour follows from ``ndim``: a volume is read as a 3D NIfTI, stored as
one HDF5 chunk per subject, embedded by a Conv3d and read whole; a series is read as a 4D NIfTI
or a SwiFT frame folder, stored as ragged frames with per-subject offsets, embedded as 4D
blocks by a Linear, and read as a window of frames. Every stage that implements one of those
choices (reading, preprocessing, shards, the patch embedding, the dataset, the collate) asks one
question, :attr:`Modality.is_series`, never a name, a shape or a spelling of its own.

Registration reaches other processes (``umbrella-pack``, the deepspeed launcher's ranks)
through ``UMBRELLA_MODALITY_PLUGINS=module[:attr],...``, read when this module is first
imported: each module is imported (its import may call :func:`register`); with ``:attr``,
that attribute is registered (a :class:`Modality`, or a list of them) or, if callable, called.
This module imports nothing heavy (no torch, no h5py): the config layer uses it.
"""

from __future__ import annotations

import builtins
import importlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PLUGINS_ENV = "UMBRELLA_MODALITY_PLUGINS"
VOLUME, SERIES = 3, 4  # the two dimensionalities the pipeline knows

# Normalisation modes (formulas: docs/FORMAT.md, code: umbrella_ds/scan/preprocess.py).
VOLUME_NORMS = ("zscore", "none")
SERIES_NORMS = ("znorm_minback", "znorm_zeroback", "minmax", "none")


class UnknownModalityError(KeyError):
    """A modality name or alias that is not registered; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError's str() would quote the whole message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Modality:
    """One modality. Only ``name`` and ``ndim`` are required; the rest have volume/series defaults.

    ``option`` is the stem of the packing flags (``--{option}-size``, ``--{option}-norm``) and of
    their argparse destinations (``{option}_size``); ``bids`` is ``(folder, suffix)`` of its
    images in a BIDS tree (series are also filtered by the task entity).
    """

    name: str
    ndim: int
    aliases: tuple[str, ...] = ()
    norms: tuple[str, ...] = ()
    default_norm: str = ""
    default_size: tuple[int, int, int] = (96, 96, 96)
    option: str = ""
    manifest_column: str = ""
    bids: tuple[str, str] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"modality name {self.name!r} must be a Python identifier")
        if self.ndim not in (VOLUME, SERIES):
            raise ValueError(
                f"modality {self.name}: ndim must be {VOLUME} (volume) or {SERIES} (series), "
                f"got {self.ndim}"
            )
        norms = self.norms or (SERIES_NORMS if self.is_series else VOLUME_NORMS)
        set_ = object.__setattr__
        set_(self, "aliases", tuple(self.aliases))
        set_(self, "norms", tuple(norms))
        set_(self, "default_norm", self.default_norm or norms[0])
        set_(self, "default_size", tuple(int(x) for x in self.default_size))
        set_(self, "option", self.option or self.name.lower())
        set_(self, "manifest_column", self.manifest_column or self.name)
        if self.default_norm not in self.norms:
            raise ValueError(
                f"modality {self.name}: default_norm {self.default_norm!r} not in {self.norms}"
            )
        unknown = set(self.norms) - set(SERIES_NORMS if self.is_series else VOLUME_NORMS)
        if unknown:
            raise ValueError(f"modality {self.name}: no implementation of norms {sorted(unknown)}")

    # -- what follows from the dimensionality (one place for each decision) ------------------
    @property
    def is_series(self) -> bool:
        """A series of volumes (time last in the reader's layout) rather than one volume: the
        question every stage asks (read, store, embed, window), never a name or a shape."""
        return is_series_ndim(self.ndim)

    # -- packing flags -----------------------------------------------------------------------
    @property
    def size_flag(self) -> str:
        return f"--{self.option}-size"

    @property
    def norm_flag(self) -> str:
        return f"--{self.option}-norm"

    @property
    def size_dest(self) -> str:
        return f"{self.option}_size"

    @property
    def norm_dest(self) -> str:
        return f"{self.option}_norm"

    def spellings(self) -> tuple[str, ...]:
        """Aliases then the name, as error messages list them (``sMRI, T1``)."""
        return (*self.aliases, self.name)


def is_series_ndim(ndim: int) -> bool:
    """Whether a grid of ``ndim`` dims (a size tuple's length) is a series: what
    `Modality.is_series` and the patch embedding's `ModalitySpec.is_series` both ask."""
    return ndim == SERIES


# -- the registry ------------------------------------------------------------------------------
_REGISTRY: dict[str, Modality] = {}  # insertion order is the table's order
_LOOKUP: dict[str, str] = {}  # lower-cased name or alias -> name


def register(modality: Modality) -> Modality:
    """Add a modality at the end of the table; a name or alias already taken is an error.

    Registering an equal modality again is a no-op (a plugin imported twice)."""
    if _REGISTRY.get(modality.name) == modality:
        return modality
    keys = [s.lower() for s in modality.spellings()]
    taken = sorted({_LOOKUP[k] for k in keys if k in _LOOKUP})
    if taken or len(set(keys)) != len(keys):
        raise ValueError(
            f"modality {modality.name}: name or alias {list(modality.spellings())} clashes with "
            f"registered {taken or [modality.name]}"
        )
    _REGISTRY[modality.name] = modality
    for k in keys:
        _LOOKUP[k] = modality.name
    return modality


def unregister(name: str) -> None:
    """Drop a modality (tests that register their own)."""
    m = _REGISTRY.pop(name)
    for k in m.spellings():
        _LOOKUP.pop(k.lower(), None)


def get(name: str) -> Modality:
    """The modality for a name or alias (case-insensitive); UnknownModalityError lists the known."""
    key = _LOOKUP.get(str(name).strip().lower())
    if key is None:
        raise UnknownModalityError(f"unknown modality {name!r}; known: {', '.join(spellings())}")
    return _REGISTRY[key]


def all() -> tuple[Modality, ...]:  # shadows the builtin inside this module only
    """Every registered modality, in registration order (T1, rsfMRI, then plugins)."""
    return tuple(_REGISTRY.values())


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def spellings() -> tuple[str, ...]:
    """Every accepted spelling, each modality's aliases then its name."""
    return tuple(s for m in _REGISTRY.values() for s in m.spellings())


def is_known(name: str) -> bool:
    """An exact registered name (not an alias): config keys, shard modalities, manifest columns."""
    return name in _REGISTRY


def ordered(subset: Iterable[str]) -> list[str]:
    """``subset`` in the table's order (unknown names last, as given)."""
    subset = builtins.list(subset)
    return [n for n in _REGISTRY if n in subset] + [n for n in subset if n not in _REGISTRY]


def series_names() -> tuple[str, ...]:
    return tuple(m.name for m in _REGISTRY.values() if m.is_series)


def window_length(sizes: Mapping[str, Any], default: int = 1) -> int:
    """Frames per training window: the time size of the first configured series modality.

    ``sizes`` maps modality -> an object with ``size`` (ModalityConfig, ModalitySpec) or a dict
    with ``"size"``; no series configured -> ``default``."""
    for name, spec in sizes.items():
        if is_known(name) and _REGISTRY[name].is_series:
            size = spec["size"] if isinstance(spec, Mapping) else spec.size
            return int(size[3])
    return default


# -- size and patch rules (config, config.validate and ModalitySpec all ask these) ---------------
def grid_problems(size: Sequence[int], patch: Sequence[int]) -> set[str]:
    """The size/patch rules a (size, patch) pair breaks: ``length`` (differ in length), ``ndim``
    (not 3 or 4 dims), ``nonpositive``, ``too_big`` (a patch larger than its size). Callers raise
    in their own order with their own wording. A patch that does not divide the size is allowed
    (the patch embedding floors, as Conv3d does)."""
    out = set()
    if len(size) != len(patch):
        out.add("length")
    if len(size) not in (VOLUME, SERIES):
        out.add("ndim")
    if any(int(s) <= 0 for s in size) or any(int(p) <= 0 for p in patch):
        out.add("nonpositive")
    if any(int(p) > int(s) for s, p in zip(size, patch)):
        out.add("too_big")
    return out


# -- the built-in modalities -------------------------------------------------------------------
T1 = register(
    Modality(
        name="T1",
        ndim=VOLUME,
        aliases=("sMRI",),
        norms=VOLUME_NORMS,
        default_norm="zscore",
        option="t1",
        bids=("anat", "T1w"),
        description="structural T1-weighted volume",
    )
)
RSFMRI = register(
    Modality(
        name="rsfMRI",
        ndim=SERIES,
        aliases=("fMRI",),
        norms=SERIES_NORMS,
        default_norm="znorm_minback",
        option="rsfmri",
        bids=("func", "bold"),
        description="resting-state BOLD series",
    )
)


def load_plugins(spec: str | None = None) -> list[Modality]:
    """Import ``module[:attr],...`` (default: $UMBRELLA_MODALITY_PLUGINS) and register what they name.

    Returns the modalities registered by this call."""
    spec = os.environ.get(PLUGINS_ENV, "") if spec is None else spec
    before = set(_REGISTRY)
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        module_name, _, attr = item.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ImportError(f"{PLUGINS_ENV}: cannot import {module_name!r} ({exc})") from exc
        if not attr:
            continue
        obj = getattr(module, attr)
        if callable(obj) and not isinstance(obj, Modality):
            obj = obj()
        for m in [obj] if isinstance(obj, Modality) else builtins.list(obj or ()):
            register(m)
    return [m for name, m in _REGISTRY.items() if name not in before]


load_plugins()
