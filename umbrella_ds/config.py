"""The run config: one YAML file plus ``--set key=value`` overrides -> typed, validated dataclasses.

Each concern (data, model, train, checkpoint, eval, log) owns a small dataclass; components receive
their own section, never the whole tree. Loading is strict: an unknown key or a value of the wrong
type is an error naming the dotted key, because a typo in a multi-day job's config must fail in the
first second, not silently fall back to a default.

Relative paths (``output_dir``, ``data.shards``, ``data.train``, ``data.eval``, ``model.path``) are
taken relative to the *current working directory* of the process that loads the config (not the
YAML's folder), so ``--set data.shards=runs/x`` and the YAML mean the same thing; they are made
absolute when the config is loaded, so every rank and the saved checkpoint agree on them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from umbrella_ds import modality
from umbrella_ds.errors import UserError

DS_STAGES = ("zero1", "zero2", "zero3", "zero3_offload")


class ConfigError(UserError, ValueError):
    """A config value that cannot be used; the message names the dotted key (exit status 2)."""


@dataclass
class ModalityConfig:
    size: list[int]
    patch: list[int]

    def check(self, key: str) -> None:
        """The size/patch rules of ``umbrella_ds.modality.grid_problems``, worded with the key."""
        problems = modality.grid_problems(self.size, self.patch)
        if "length" in problems:
            raise ConfigError(f"{key}: size {self.size} and patch {self.patch} differ in length")
        if "ndim" in problems:
            kinds = " or ".join(
                f"{n} ({', '.join(m.name for m in modality.all() if m.ndim == n)})"
                for n in (modality.VOLUME, modality.SERIES)
            )
            raise ConfigError(f"{key}.size: expected {kinds} numbers, got {self.size}")
        if problems & {"nonpositive", "too_big"}:
            raise ConfigError(
                f"{key}: patch {self.patch} must be positive and no larger than size {self.size}"
            )
        # A patch that does not divide the size is accepted (the predecessor's 10^3 on 96^3): the
        # patch embedding floors, as Conv3d does, and warns how many voxels per axis go unseen.


@dataclass
class TowerCheckpointing:
    """Activation checkpointing per tower: it costs ~40% throughput, so only where memory needs it."""

    vision: bool = False
    language: bool = False


@dataclass
class DataConfig:
    shards: str = ""
    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)
    missing_subjects: Literal["error", "skip"] = "error"
    max_length: int = 1024
    overflow: Literal["reject", "truncate"] = "reject"
    windows: Literal["random", "non_overlapping", "first"] = "random"
    window_stride: int = 1
    flip: bool = True
    num_workers: int = 0
    prefetch_factor: int = 2
    allow_overlap: bool = False  # let a subject be in both data.train and data.eval (leakage guard)
    # A node-local folder (NVMe) the shards are copied to at start, one copier per node, and read
    # from (umbrella_ds/data/staging.py; docs/OPERATIONS.md says when it pays). "" = read data.shards.
    stage_dir: str = ""


@dataclass
class ModelConfig:
    preset: str | None = "tiny"
    path: str | None = None
    init: Literal["random", "pretrained"] | None = None
    modalities: dict[str, ModalityConfig] = field(
        default_factory=lambda: {modality.T1.name: ModalityConfig([32, 32, 32], [8, 8, 8])}
    )
    checkpointing: TowerCheckpointing = field(default_factory=TowerCheckpointing)
    # A patch embedding trained by UMBRELLA/BrainVLM (HF checkpoint folder or state dict) to start
    # from instead of a random one (umbrella_ds/model/patch_embed_init.py).
    patch_embed_init: str | None = None

    @property
    def source(self) -> str:
        """What build_model loads: a local directory wins over a preset name."""
        return self.path if self.path else str(self.preset)

    @property
    def init_kind(self) -> str:
        """The init build_model uses: as set, else pretrained for a directory, random for a preset."""
        return self.init or ("pretrained" if self.path else "random")


@dataclass
class TrainConfig:
    max_steps: int = 100
    seed: int = 0
    global_batch: int = 16
    micro_batch: int = 8
    lr: float = 3e-3
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_steps: int | None = None  # cosine length; None = max_steps (pin it to extend a run)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # AdamW's eps. None: the DeepSpeed JSON's optimizer.params.eps, else 1e-8 (HF's adam_epsilon).
    adam_eps: float | None = None
    clip: float = 1.0
    deepspeed: str = "zero2"  # zero1 | zero2 | zero3 | zero3_offload | path to a JSON file
    bf16: bool = True
    compile: Literal["none", "blocks"] = "none"
    max_bad_steps: int = 3
    collective_timeout_s: int = 1800
    # Where to train. auto: CUDA where GPUs are allocated or visible, the CPU where there are none.
    # A run-config key, not an environment variable, so CPU training cannot be inherited by accident.
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # Deterministic kernels and the math SDPA backend (umbrella_ds/train/determinism.py): the
    # same function at another rounding, slower; out of the fingerprint, so a run can be resumed
    # with it switched on to chase a divergence.
    deterministic: bool = False

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank, so the global batch survives a new world size."""
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ConfigError(
                f"train.global_batch={self.global_batch} is not divisible by "
                f"train.micro_batch={self.micro_batch} x world size {world_size}; "
                + self._dividing_micro_batches(world_size)
            )
        return self.global_batch // per_step

    def _dividing_micro_batches(self, world_size: int) -> str:
        """What would divide at this world size, so the error says what to set instead."""
        if self.global_batch % world_size:
            return f"no micro-batch divides: make train.global_batch a multiple of {world_size}"
        per_rank = self.global_batch // world_size
        fits = [m for m in range(1, per_rank + 1) if per_rank % m == 0]
        shown = fits if len(fits) <= 12 else [*fits[:6], "...", *fits[-6:]]
        return f"micro-batches that divide: {', '.join(map(str, shown))}"


@dataclass
class CheckpointConfig:
    every_steps: int = 200
    keep_last: int = 2
    keep_best: str | None = None  # METRIC (the task "all" record) or TASK/METRIC, e.g. t1_sex/auroc

    def keep_best_key(self) -> tuple[str, str] | None:
        """(task, metric) that keep_best names; task "all" for a bare metric name."""
        if not self.keep_best:
            return None
        task, _, metric = self.keep_best.rpartition("/")
        return (task or "all", metric)


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0: only at the end
    at_end: bool = True
    # "derived": per task, the longest tokenized reference answer (capped, eval/evaluate.py)
    max_new_tokens: int | Literal["derived"] = "derived"
    max_samples: int | None = None
    micro_batch: int | None = None  # None: train.micro_batch
    # task -> metadata field holding the record's label; a task not named uses subject_label
    label_field: dict[str, str] = field(default_factory=dict)

    def max_new_tokens_or(self, derived: int) -> int:
        """The configured generation length, or ``derived`` where it is "derived"."""
        return derived if self.max_new_tokens == "derived" else int(self.max_new_tokens)


# The most tokens a "derived" generation length asks for (a longer reference is warned about).
DERIVED_MAX_NEW_TOKENS_CAP = 64


@dataclass
class LogConfig:
    every_steps: int = 1
    tensorboard: bool = True
    wandb_project: str | None = None
    progress: bool = True


@dataclass
class RunConfig:
    output_dir: str = "runs/out"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, scheme: int | None = None) -> str:
        """Hash of what decides the training trajectory.

        Left out so a run can be extended or re-homed: the keys in ``NOT_FINGERPRINTED`` (the
        output folder, ``train.max_steps``, the checkpoint, evaluation and logging sections,
        loader workers, timeouts, devices, the data paths, whose content is covered by the data
        fingerprint, and the micro-batch and compile choices, which change neither the losses
        nor the data order). A key in ``FINGERPRINTED_UNLESS_DEFAULT`` counts only when set away
        from its default, so a checkpoint written before that key existed still resumes after an
        upgrade (``tests/train/test_config.py`` holds golden records of that).

        ``scheme``: the fingerprint scheme a checkpoint recorded (``FINGERPRINT_SCHEME`` when
        None, today's). A checkpoint written before schemes existed is scheme 1, which still
        hashed ``NOT_FINGERPRINTED_SINCE_SCHEME_2``; its record is compared by hashing as it did.
        """
        scheme = FINGERPRINT_SCHEME if scheme is None else int(scheme)
        if scheme not in (1, FINGERPRINT_SCHEME):
            raise ValueError(
                f"config fingerprint scheme {scheme}: this umbrella-ds knows 1-{FINGERPRINT_SCHEME}"
            )
        d = self.to_dict()
        default = RunConfig().to_dict()
        for key in NOT_FINGERPRINTED:
            if scheme == 1 and key in NOT_FINGERPRINTED_SINCE_SCHEME_2:
                continue
            _pop_dotted(d, key)
        for key in FINGERPRINTED_UNLESS_DEFAULT:
            if _get_dotted(d, key) == _get_dotted(default, key):
                _pop_dotted(d, key)
        return _hash(d)

    def model_fingerprint(self) -> str:
        """Hash of the base model's identity and the patch embedding's shapes."""
        m = self.model
        return _hash({"source": m.source, "modalities": dataclasses.asdict(m)["modalities"]})


# Keys that never decide the trajectory: locations, cadence, operational choices.
NOT_FINGERPRINTED: tuple[str, ...] = (
    "output_dir",
    "checkpoint",
    "eval",
    "log",
    "train.max_steps",
    "train.max_bad_steps",
    "train.collective_timeout_s",
    "train.device",
    "train.deterministic",
    "data.shards",
    "data.train",
    "data.eval",
    "data.num_workers",
    "data.stage_dir",
    "data.prefetch_factor",
    "data.allow_overlap",
    "train.micro_batch",  # same losses and data order (tests/train/test_train_accumulation.py)
    "train.compile",  # same losses (tests/train/test_compile.py)
)
# The config fingerprint's scheme, recorded in every checkpoint's meta.json
# (``fingerprint_scheme``; absent = 1). Scheme 2 left these keys out; scheme 1 hashed them.
FINGERPRINT_SCHEME = 2
NOT_FINGERPRINTED_SINCE_SCHEME_2: tuple[str, ...] = ("train.micro_batch", "train.compile")
# Keys added after checkpoints were first written: hashed only away from their default, so the
# fingerprint of every older checkpoint's config is unchanged. Append each new trajectory key here.
FINGERPRINTED_UNLESS_DEFAULT: tuple[str, ...] = (
    "train.adam_eps",
    "model.patch_embed_init",
)

_MISSING = object()


def _get_dotted(d: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


def _pop_dotted(d: dict[str, Any], key: str) -> None:
    *parents, last = key.split(".")
    for part in parents:
        d = d.get(part, {})
    d.pop(last, None)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- loading and validation

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (optional), apply ``key=value`` overrides, convert, validate, absolutise paths."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        raw = loaded or {}
    defaults = RunConfig().to_dict()
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(raw, key, value, defaults)
    cfg = _convert(RunConfig, raw, "")
    _absolutise(cfg)
    validate(cfg)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig saved with ``to_dict`` (checkpoints, exports); validated the same way."""
    cfg = _convert(RunConfig, raw, "")
    validate(cfg)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` with the value parsed as a YAML scalar or list (``[1, 2]``, ``null``, ``3e-4``)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {text!r}: {e}") from e
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any, defaults: dict[str, Any]) -> None:
    """Set one dotted key; a section the YAML left out starts from its defaults, so
    ``--set model.modalities.T1.patch=[4,4,4]`` keeps the default size."""
    node, default = raw, defaults
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        default = default.get(part, {}) if isinstance(default, dict) else {}
        if part not in node:
            node[part] = json.loads(json.dumps(default)) if isinstance(default, dict) else {}
        nxt = node[part]
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = nxt
    node[parts[-1]] = value


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Convert a YAML value to ``tp``, raising ConfigError naming ``key`` on any mismatch."""
    name = key or "config"
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        known = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - known)
        if unknown:
            keys = ", ".join(f"{key}.{u}" if key else u for u in unknown)
            raise ConfigError(f"{keys}: unknown config key(s) (known: {', '.join(sorted(known))})")
        kwargs = {k: _convert(hints[k], v, f"{key}.{k}" if key else k) for k, v in value.items()}
        try:
            return tp(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{name}: {e}") from e
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name}: must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str) and item_tp is str:
            value = [value]  # a single file is a list of one
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_convert(item_tp, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return {str(k): _convert(val_tp, v, f"{name}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # PyYAML reads "3e-4" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported type {tp}")  # a bug in this module, not in the YAML


def _absolutise(cfg: RunConfig) -> None:
    def absolute(p: str) -> str:
        return str(Path(p).expanduser().resolve()) if p else p

    cfg.output_dir = absolute(cfg.output_dir)
    cfg.data.shards = absolute(cfg.data.shards)
    cfg.data.train = [absolute(p) for p in cfg.data.train]
    cfg.data.eval = [absolute(p) for p in cfg.data.eval]
    if cfg.model.path:
        cfg.model.path = absolute(cfg.model.path)
    if cfg.model.patch_embed_init:
        cfg.model.patch_embed_init = absolute(cfg.model.patch_embed_init)


def validate(cfg: RunConfig) -> None:
    """Value checks that types alone cannot express; each error names its key."""
    t = cfg.train

    def positive(key: str, value: float, allow_zero: bool = False) -> None:
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    positive("train.max_steps", t.max_steps, allow_zero=True)
    positive("train.global_batch", t.global_batch)
    positive("train.micro_batch", t.micro_batch)
    positive("train.lr", t.lr)
    positive("train.min_lr", t.min_lr, allow_zero=True)
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr={t.min_lr} is above train.lr={t.lr}")
    positive("train.warmup_steps", t.warmup_steps, allow_zero=True)
    if t.adam_eps is not None:
        positive("train.adam_eps", t.adam_eps)
    if t.decay_steps is not None:
        positive("train.decay_steps", t.decay_steps)
    positive("train.weight_decay", t.weight_decay, allow_zero=True)
    positive("train.clip", t.clip, allow_zero=True)
    positive("train.max_bad_steps", t.max_bad_steps)
    positive("train.collective_timeout_s", t.collective_timeout_s)
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"train.betas: expected two numbers in [0, 1), got {t.betas}")
    if t.global_batch % t.micro_batch:
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch={t.micro_batch}"
        )
    if t.deepspeed not in DS_STAGES and not t.deepspeed.endswith(".json"):
        raise ConfigError(
            f"train.deepspeed: expected one of {list(DS_STAGES)} or a .json path, got {t.deepspeed!r}"
        )
    if not cfg.model.path and not cfg.model.preset:
        raise ConfigError(
            "model.path: unset; set it to a local copy of the pretrained base (or model.preset "
            "to a preset name)"
        )
    if not cfg.model.modalities:
        raise ConfigError("model.modalities: at least one modality is needed")
    for name, spec in cfg.model.modalities.items():
        if not modality.is_known(name):
            known = ", ".join(modality.names())
            raise ConfigError(f"model.modalities.{name}: unknown modality ({known})")
        spec.check(f"model.modalities.{name}")
        want = modality.get(name).ndim
        if len(spec.size) != want:
            raise ConfigError(
                f"model.modalities.{name}.size: expected {want} numbers, got {spec.size}"
            )
    d = cfg.data
    positive("data.max_length", d.max_length)
    positive("data.window_stride", d.window_stride)
    positive("data.num_workers", d.num_workers, allow_zero=True)
    positive("data.prefetch_factor", d.prefetch_factor)
    c = cfg.checkpoint
    positive("checkpoint.every_steps", c.every_steps, allow_zero=True)
    positive("checkpoint.keep_last", c.keep_last)
    if c.keep_best is not None:
        parts = c.keep_best.split("/")
        if len(parts) > 2 or not all(p.strip() for p in parts):
            raise ConfigError(
                f"checkpoint.keep_best={c.keep_best!r}: expected METRIC (e.g. accuracy, the mean "
                "over tasks) or TASK/METRIC (e.g. t1_sex/auroc)"
            )
        if not cfg.data.eval:
            raise ConfigError("checkpoint.keep_best needs an evaluation set (data.eval is empty)")
    e = cfg.eval
    positive("eval.every_steps", e.every_steps, allow_zero=True)
    if e.max_new_tokens != "derived":
        positive("eval.max_new_tokens", e.max_new_tokens)
    for task, name in e.label_field.items():
        if not name.strip():
            raise ConfigError(f"eval.label_field.{task}: empty field name")
    if e.max_samples is not None:
        positive("eval.max_samples", e.max_samples)
    if e.micro_batch is not None:
        positive("eval.micro_batch", e.micro_batch)
    positive("log.every_steps", cfg.log.every_steps)
