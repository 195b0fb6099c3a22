"""Preset registry: named model architectures shipped as `presets/<name>.json` package data.

A preset holds the LlavaConfig values (vision + text tower), the default MRI modalities, the
base model's conversation template (`chat_template`: chatml | llava15, see data/template.py), its
tokenizer, and the published total parameter count that a test checks the config against.

The tokenizer is either a folder shipped beside it (`"tokenizer": "tiny-tokenizer"`, the `tiny*`
and `small` presets) or, for the real architectures built randomly for benchmarks and memory
planning, a stand-in of the model's vocabulary size (`"stand_in_tokenizer"`): a small shipped
tokenizer whose special tokens move to the ids the real model uses and whose vocabulary is padded
with never-produced filler tokens up to `vocab_size`. Why: training needs a tokenizer, and those
presets' real tokenizers ship with their weights; a stand-in trains with the real embedding and
output sizes, which is what throughput and memory depend on. (Real weights come from a local
directory with their own tokenizer.)
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, LlavaConfig, PreTrainedTokenizerBase

from umbrella_ds.data.template import get_template
from umbrella_ds.model.patch_embed import ModalitySpec, parse_modalities

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
TINY_TOKENIZER_DIR = PRESETS_DIR / "tiny-tokenizer"
_KEYS = {
    "description",
    "tokenizer",
    "chat_template",
    "published_parameters",
    "published_source",
    "modalities",
    "llava_config",
    "stand_in_tokenizer",
}


@dataclass(frozen=True)
class StandIn:
    """A stand-in tokenizer: `base` (a shipped folder) with `special_ids` moved, padded to `vocab_size`."""

    base: Path
    special_ids: dict[str, int]
    vocab_size: int


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    llava_config: dict[str, Any]
    modalities: dict[str, ModalitySpec]
    tokenizer_dir: Path | None
    published_parameters: int | None
    chat_template: str = "chatml"
    published_source: str = ""
    path: Path = field(default=PRESETS_DIR)
    stand_in: StandIn | None = None

    def make_config(self) -> LlavaConfig:
        """A fresh LlavaConfig (callers may mutate it)."""
        return LlavaConfig(**json.loads(json.dumps(self.llava_config)))

    def load_tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The shipped tokenizer, or the stand-in (module docstring), or None."""
        if self.tokenizer_dir is not None:
            return AutoTokenizer.from_pretrained(str(self.tokenizer_dir), local_files_only=True)
        if self.stand_in is not None:
            return stand_in_tokenizer(self.stand_in)
        return None


def stand_in_tokenizer(spec: StandIn) -> PreTrainedTokenizerBase:
    """`spec.base` with its special tokens at `spec.special_ids` and filler tokens
    `<|stand_in_N|>` at every other id its vocabulary does not use, up to `spec.vocab_size`."""
    tok = json.loads((spec.base / "tokenizer.json").read_text())
    cfg = json.loads((spec.base / "tokenizer_config.json").read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    moved = {t: spec.special_ids[t] for t in spec.special_ids}
    unknown = set(moved) - {a["content"] for a in tok["added_tokens"]}
    if unknown:
        raise ValueError(
            f"stand_in_tokenizer: {sorted(unknown)} are not special tokens of {spec.base}"
        )
    kept = {t: i for t, i in vocab.items() if t not in moved}
    clash = {t for t, i in kept.items() if i in moved.values()}
    if clash or max(moved.values()) >= spec.vocab_size:
        raise ValueError(
            f"stand_in_tokenizer: special ids {moved} clash with {spec.base} or exceed {spec.vocab_size}"
        )
    used = set(kept.values()) | set(moved.values())
    vocab = {**kept, **moved}
    vocab.update({f"<|stand_in_{i}|>": i for i in range(spec.vocab_size) if i not in used})
    tok["model"]["vocab"] = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    for added in tok["added_tokens"]:
        added["id"] = moved.get(added["content"], added["id"])
    cfg["added_tokens_decoder"] = {
        str(moved.get(a["content"], int(i))): a for i, a in cfg["added_tokens_decoder"].items()
    }
    with tempfile.TemporaryDirectory(prefix="umbrella-stand-in-") as tmp:
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(tok))
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(cfg))
        tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    if len(tokenizer) != spec.vocab_size:
        raise ValueError(f"stand_in_tokenizer: {len(tokenizer)} tokens, not {spec.vocab_size}")
    return tokenizer


def _special_token(chat: Any, key: str) -> str:
    """A stand-in's special token: ``template.ATTR`` names one by the chat template's attribute
    (``template.turn_start``), so a template's strings stay in umbrella_ds/data/template.py."""
    if key.startswith("template."):
        return str(getattr(chat, key.removeprefix("template.")))
    return key


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def get_preset(name: str) -> Preset:
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        raise KeyError(
            f"unknown model preset {name!r} (known: {list_presets()}; looked in {PRESETS_DIR})"
        )
    raw = json.loads(path.read_text())
    unknown = set(raw) - _KEYS
    missing = {"llava_config", "modalities", "chat_template"} - set(raw)
    if unknown or missing:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    chat = get_template(raw["chat_template"], f"{path}: chat_template")
    template = chat.name
    tok = raw.get("tokenizer")
    tok_dir = PRESETS_DIR / tok if tok else None
    if tok_dir is not None and not (tok_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: tokenizer folder {tok_dir} has no tokenizer.json")
    stand_in = None
    if si := raw.get("stand_in_tokenizer"):
        stand_in = StandIn(
            base=PRESETS_DIR / si["base"],
            special_ids={_special_token(chat, t): int(i) for t, i in si["special_ids"].items()},
            vocab_size=int(raw["llava_config"]["text_config"]["vocab_size"]),
        )
    return Preset(
        name=name,
        description=raw.get("description", ""),
        llava_config=raw["llava_config"],
        modalities=parse_modalities(raw["modalities"]),
        tokenizer_dir=tok_dir,
        published_parameters=raw.get("published_parameters"),
        published_source=raw.get("published_source", ""),
        chat_template=template,
        path=path,
        stand_in=stand_in,
    )
