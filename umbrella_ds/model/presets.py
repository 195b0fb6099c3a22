"""Preset registry: named model architectures shipped as `presets/<name>.json` package data.

A preset holds the LlavaConfig values (vision + text tower), the default MRI modalities, the
base model's conversation template (`chat_template`: chatml | llava15, see data/template.py), an
optional tokenizer folder shipped beside it (only the random-init `tiny*`/`small` presets; real
architectures load their tokenizer with their weights from a local directory), and the
published total parameter count that a test checks the config against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import LlavaConfig

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
}


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

    def make_config(self) -> LlavaConfig:
        """A fresh LlavaConfig (callers may mutate it)."""
        return LlavaConfig(**json.loads(json.dumps(self.llava_config)))


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
    template = get_template(raw["chat_template"], f"{path}: chat_template").name
    tok = raw.get("tokenizer")
    tok_dir = PRESETS_DIR / tok if tok else None
    if tok_dir is not None and not (tok_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: tokenizer folder {tok_dir} has no tokenizer.json")
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
    )
