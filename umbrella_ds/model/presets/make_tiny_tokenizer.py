"""Regenerate the `tiny` preset's tokenizer (byte-level BPE, ChatML tokens, `<image>`).

Why a real trained tokenizer instead of a character table: the data pipeline renders prompts
with `tokenizer.apply_chat_template` and counts tokens exactly as it will for Qwen2, so the
tiny preset must behave like a real fast tokenizer (merges, special tokens, chat template)
while staying a few tens of KB in the repository. Training is offline and deterministic on
the small corpus below.

    python umbrella_ds/model/presets/make_tiny_tokenizer.py [OUT_DIR]

(A script path, not `-m`: `presets/` is a data folder beside the `presets.py` module.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"

# ChatML as Qwen2 writes it; list-valued content (HF multimodal messages) renders image parts
# as one `<image>` placeholder each, which the renderer expands to one token per patch.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = [
    "You are a neurologist now. You are going to look at a brain MRI scan of a subject.",
    "Estimate the biological sex of this subject from the T1-weighted MRI scan.",
    "Based on the brain MRI, is this subject male or female? Answer with one word.",
    "The subject is male. The subject is female. male female male female",
    "What is the age of the subject in years? The subject is 10 years old.",
    "Estimate the BMI of the subject. The BMI is 18.5. The BMI is 24.3.",
    "Compare the two brain scans. The first subject is older than the second subject.",
    "resting state functional MRI rsfMRI fMRI T1 sMRI scan image brain volume",
    "Here is the brain MRI of subject one. Here is the brain MRI of subject two.",
    "Is the first scan from a male or a female? Is the second scan from a male or a female?",
    "Answer: male. Answer: female. Answer: yes. Answer: no. healthy control diagnosis",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 30 40 50 60 70 80 90",
    "0.0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 1.0 2.5 12.7 19.9 21.4 100",
    "Please describe the scan. The image shows the brain of a child. The scan is clear.",
    "The quick brown fox jumps over the lazy dog. A subject, a scan, a brain, an answer.",
    "user assistant system You are a helpful assistant.",
    "left right larger smaller older younger higher lower weight height sex age",
]


def train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so frequent domain words merge into whole tokens.
    tok.train_from_iterator(CORPUS * 4, trainer=trainer, length=len(CORPUS) * 4)
    return tok


def write(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
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
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>"],
        "model_max_length": 4096,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>"],
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else Path(__file__).resolve().parent / "tiny-tokenizer"
    write(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
