"""Regenerate the `tiny-llava15` preset's tokenizer: a small Llama-style (SentencePiece-like) BPE.

Why its own tokenizer and not `tiny-tokenizer`: llava-1.5's Vicuna tokenizer differs from Qwen2's
byte-level BPE in exactly the ways the renderer must get right, so the tiny preset reproduces
them: words start with ``▁`` (Metaspace, a prefix space only at the start of each encode call),
unknown bytes fall back to ``<0x..>`` tokens (``\\n`` is ``<0x0A>``), ``<unk>``/``<s>``/``</s>``
are ids 0/1/2, and ``<image>`` and ``<pad>`` come after the base vocabulary as llava-hf appends
them (32000/32001 there, 510/511 here). The structure is what transformers' LlamaTokenizer builds
(BPE with byte_fallback, Metaspace(prepend_scheme="first", split=False), decoder
Replace/ByteFallback/Fuse/Strip), loaded through that class. No chat template: the conversation
format lives in ``umbrella_ds/data/template.py`` (llava-hf ships its template on the processor).

    python umbrella_ds/model/presets/make_tiny_llava15_tokenizer.py [OUT_DIR]

Training is offline and deterministic on the corpus of `make_tiny_tokenizer.py` plus the
llava-1.5 role words; the script rewrites the committed files byte for byte (tested).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_tokenizer import CORPUS as TINY_CORPUS

VOCAB_SIZE = 512
BASE = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Llama
APPENDED = ["<image>", "<pad>"]  # ids VOCAB_SIZE - 2, VOCAB_SIZE - 1, as llava-hf appends them
BYTES = [f"<0x{b:02X}>" for b in range(256)]
CORPUS = [
    *TINY_CORPUS,
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: ASSISTANT: USER: ASSISTANT:",
]


def _learned_pieces() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a word-bounded BPE (no merge crosses a ``▁`` or punctuation) to fill what the bytes
    leave; at run time (split=False) no merge can then join two words, as in Llama's vocabulary."""
    room = VOCAB_SIZE - len(BASE) - len(BYTES) - len(APPENDED)
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # As SentencePiece splits Llama's pieces: at word starts, around punctuation, digit by digit.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=room + len(BASE),
        min_frequency=1,
        special_tokens=BASE,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer, length=len(CORPUS) * 4)
    raw = json.loads(tok.to_str())["model"]
    pieces = [p for p, _ in sorted(raw["vocab"].items(), key=lambda kv: kv[1]) if p not in BASE]
    if len(pieces) != room:
        raise SystemExit(f"corpus gave {len(pieces)} pieces, need {room}: extend CORPUS")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in raw["merges"]]
    return {p: i for i, p in enumerate(pieces)}, merges  # type: ignore[return-value]


def build() -> Tokenizer:
    pieces, merges = _learned_pieces()
    vocab = {t: i for i, t in enumerate(BASE + BYTES)}
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    for t in APPENDED:
        vocab[t] = len(vocab)
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens(BASE + APPENDED)
    return tok


def write(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build()
    tok.save(str(out_dir / "tokenizer.json"), pretty=False)
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in BASE + APPENDED
    }
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "added_tokens_decoder": added,
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "additional_special_tokens": ["<image>"],
        "legacy": False,
        "model_max_length": 4096,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "additional_special_tokens": ["<image>"],
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else Path(__file__).resolve().parent / "tiny-llava15-tokenizer"
    write(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
