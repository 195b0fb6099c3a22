"""Conversation templates: the one place that knows role headers, turn ends, stop ids and `<image>`.

A template is chosen by the base model (a preset's ``chat_template`` field; for a local directory
its config's ``umbrella_chat_template``, else derived from its tokenizer and text model type, see
`select_template`) and recorded on the built model's config, so rendering, labels, evaluation,
generation and ``umbrella-infer`` all ask the same object (`template_of(model)`).

A template only turns one turn into text and says which characters of it are supervised; the
renderer (`data/render.py`) tokenizes each turn on its own and maps those characters to tokens
with the tokenizer's offsets. The label rule is the same for every template: the assistant's
answer and that turn's closing token are supervised, nothing else (headers, separators, system and
user turns, image tokens are -100).

Templates:

``chatml`` (llava-interleave-qwen; the ``tiny``, ``tiny-clip`` and ``small`` presets), as Qwen2's
tokenizer chat template writes it::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<image>\\n{q}<|im_end|>\\n
    <|im_start|>assistant\\n{a}<|im_end|>\\n

Supervised: ``{a}<|im_end|>``. Generation prompt ``<|im_start|>assistant\\n``, stop ``<|im_end|>``.

``llava15`` (llava-1.5-7b; the ``tiny-llava15`` preset), LLaVA's ``conv_vicuna_v1``, which
llava-1.5 was fine-tuned with (haotian-liu/LLaVA ``scripts/v1_5/finetune.sh``: ``--version v1``;
``llava/conversation.py``: system prompt below, roles ``USER``/``ASSISTANT``,
``SeparatorStyle.TWO`` with ``sep=" "``, ``sep2="</s>"``; the prompt is
``system + " " + "USER: " + q + " " + "ASSISTANT: " + a + "</s>" + "USER: " ...``, generation
prompt ``"ASSISTANT:"``) after the ``<s>`` the Llama tokenizer puts first. transformers'
LlavaProcessor chat template for llava-hf/llava-1.5-7b-hf (as quoted in transformers'
tests/models/llava/test_processing_llava.py; the prompt in modeling_llava.py's docstring is
``"USER: <image>\\nWhat's the content of the image? ASSISTANT:"``) writes the same headers
(``message['role'].upper() + ': '``, each image as ``'<image>\\n'`` before the text,
``add_generation_prompt`` -> ``'ASSISTANT:'``), without the system prompt and ``</s>`` the
model was trained with; we follow the training format::

    <s>A chat between ... user's questions. USER: <image>\\n{q} ASSISTANT: {a}</s>USER: ...

Supervised: `` {a}</s>`` (the space is SentencePiece's word-start of the first answer token,
``▁male``, which the model must generate after ``ASSISTANT:``). Stop ``</s>``. One known
difference from LLaVA's own ids: it tokenized the text between images separately, so
SentencePiece put a ``▁`` (Llama id 29871) after each image, before its ``\\n``; transformers 5's
Llama tokenizer (Metaspace, prefix only at the start of a call) does not, and we tokenize with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

IMAGE_TOKEN = "<image>"  # the tokenizer's image placeholder, one per image before expansion

# Vicuna v1 / LLaVA conv_vicuna_v1 system prompt (haotian-liu/LLaVA llava/conversation.py).
LLAVA15_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class TemplateError(ValueError):
    """An unknown template, or a tokenizer / model config that does not fit the template."""


@dataclass(frozen=True)
class TurnText:
    """One rendered turn: its text and the character span supervised when it is the assistant's.

    ``text[header_len:supervised_end]`` is the answer plus the turn end; the renderer refuses a
    token that crosses ``header_len`` (a merge of header and answer would make labels inexact).
    """

    text: str
    header_len: int
    supervised_end: int


@dataclass(frozen=True)
class ChatTemplate:
    """A conversation format. Subclasses say how a turn reads; this class holds what they share."""

    name: str
    turn_end: str  # closes an assistant turn; supervised; the generation stop token
    special_tokens: tuple[str, ...]  # each must be one token of the tokenizer
    bos_token: str | None = None  # put once before the conversation (unsupervised)
    default_system: str | None = None  # system turn used when a task has none
    image_token: str = IMAGE_TOKEN

    # -- format -----------------------------------------------------------------------------
    def turn(self, role: str, content: str, previous: str | None) -> TurnText:
        """The text of one turn; ``previous`` is the role of the turn before (None: first)."""
        raise NotImplementedError

    def generation_prompt(self, previous: str | None) -> str:
        """What follows the last user turn so the model writes the assistant's answer next."""
        raise NotImplementedError

    @property
    def stop_tokens(self) -> tuple[str, ...]:
        """Tokens that end a generated answer (greedy decoding stops on the first)."""
        return (self.turn_end,)

    # -- ids ------------------------------------------------------------------------------------
    def token_id(self, tokenizer: Any, token: str) -> int:
        """The id of one of the template's special tokens; TemplateError if it is not one token."""
        tid = tokenizer.convert_tokens_to_ids(token)
        unk = getattr(tokenizer, "unk_token_id", None)
        if tid is None or (unk is not None and tid == unk and token != tokenizer.unk_token):
            raise TemplateError(
                f"tokenizer has no {token!r} token; the {self.name!r} conversation template "
                f"needs {list(self.special_tokens)}"
            )
        ids = tokenizer.encode(token, add_special_tokens=False)
        if ids != [tid]:
            raise TemplateError(
                f"tokenizer splits {token!r} into {ids}; the {self.name!r} template needs it as "
                "one special token"
            )
        return int(tid)

    def stop_ids(self, tokenizer: Any) -> tuple[int, ...]:
        return tuple(self.token_id(tokenizer, t) for t in self.stop_tokens)

    def eos_id(self, tokenizer: Any) -> int:
        """The id greedy generation stops on (evaluation, umbrella-infer)."""
        return self.stop_ids(tokenizer)[0]

    def bos_ids(self, tokenizer: Any) -> list[int]:
        return [self.token_id(tokenizer, self.bos_token)] if self.bos_token else []

    def answer_ids(self, tokenizer: Any, answer: str) -> list[int]:
        """Token ids of ``answer`` + turn end exactly as the renderer supervises them after a user
        turn (evaluation scores the first of them)."""
        tt = self.turn("assistant", answer, "user")
        header = tokenizer.encode(tt.text[: tt.header_len], add_special_tokens=False)
        ids = tokenizer.encode(tt.text[: tt.supervised_end], add_special_tokens=False)
        if ids[: len(header)] != header or len(ids) <= len(header):
            raise TemplateError(f"cannot separate the answer {answer!r} from the assistant header")
        return [int(i) for i in ids[len(header) :]]

    # -- checks at build time ---------------------------------------------------------------
    def check_tokenizer(self, tokenizer: Any) -> None:
        """Every special token of the template is one token of ``tokenizer``."""
        for t in self.special_tokens:
            self.token_id(tokenizer, t)

    def check_model(self, config: Any, tokenizer: Any) -> None:
        """The tokenizer fits the template, and its image token is the model config's."""
        self.check_tokenizer(tokenizer)
        tok_image = self.token_id(tokenizer, self.image_token)
        cfg_image = getattr(config, "image_token_id", None)
        if cfg_image is None:
            cfg_image = getattr(config, "image_token_index", None)
        if cfg_image is not None and int(cfg_image) != tok_image:
            raise TemplateError(
                f"tokenizer's {self.image_token!r} is id {tok_image} but the model config's "
                f"image_token_id is {cfg_image}: tokenizer and model do not belong together"
            )


@dataclass(frozen=True)
class ChatML(ChatTemplate):
    """``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn (Qwen2's chat template)."""

    name: str = "chatml"
    turn_end: str = "<|im_end|>"
    turn_start: str = "<|im_start|>"
    special_tokens: tuple[str, ...] = ("<|im_start|>", "<|im_end|>", IMAGE_TOKEN)

    def turn(self, role: str, content: str, previous: str | None) -> TurnText:
        header = f"{self.turn_start}{role}\n"
        text = f"{header}{content}{self.turn_end}\n"
        return TurnText(text, len(header), len(header) + len(content) + len(self.turn_end))

    def generation_prompt(self, previous: str | None) -> str:
        return f"{self.turn_start}assistant\n"

    def check_chat_template(self, tokenizer: Any) -> None:
        """The tokenizer's own chat template renders exactly what we render (it is plain ChatML)."""
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("tokenizer has no chat_template (ChatML expected)")
        probe = [
            {"role": "system", "content": "s"},
            {"role": "user", "content": f"{self.image_token}\nq"},
            {"role": "assistant", "content": "a."},
        ]
        ours = "".join(self.turn(m["role"], m["content"], None).text for m in probe)
        theirs = tokenizer.apply_chat_template(probe, tokenize=False)
        if theirs != ours:
            raise TemplateError(
                f"tokenizer's chat template is not plain ChatML: renders {theirs!r}, expected {ours!r}"
            )

    def check_tokenizer(self, tokenizer: Any) -> None:
        super().check_tokenizer(tokenizer)
        self.check_chat_template(tokenizer)


@dataclass(frozen=True)
class Llava15(ChatTemplate):
    """LLaVA's conv_vicuna_v1: ``{system} USER: {q} ASSISTANT: {a}</s>USER: ...`` after ``<s>``.

    The separator ``" "`` is written at the start of the turn it precedes (``" USER: "`` after the
    system prompt, ``" ASSISTANT:"`` after a user turn; nothing after ``</s>``), so each turn,
    tokenized on its own, starts on a word boundary as it does inside the whole conversation.
    """

    name: str = "llava15"
    turn_end: str = "</s>"
    bos_token: str | None = "<s>"
    default_system: str | None = LLAVA15_SYSTEM
    special_tokens: tuple[str, ...] = ("<s>", "</s>", IMAGE_TOKEN)
    roles: tuple[tuple[str, str], ...] = (("user", "USER"), ("assistant", "ASSISTANT"))
    sep: str = " "

    def _lead(self, previous: str | None) -> str:
        return "" if previous in (None, "assistant") else self.sep

    def turn(self, role: str, content: str, previous: str | None) -> TurnText:
        lead = self._lead(previous)
        if role == "system":
            text = f"{lead}{content}"
            return TurnText(text, len(text), len(text))
        header = f"{lead}{dict(self.roles)[role]}:"
        if role == "assistant":
            text = f"{header} {content}{self.turn_end}"
            return TurnText(text, len(header), len(text))
        text = f"{header} {content}"
        return TurnText(text, len(text), len(text))

    def generation_prompt(self, previous: str | None) -> str:
        return f"{self._lead(previous)}{dict(self.roles)['assistant']}:"


TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (ChatML(), Llava15())}


def get_template(name: str, key: str = "chat_template") -> ChatTemplate:
    """The template called ``name``; TemplateError naming ``key`` (where the name was read) if none."""
    if name not in TEMPLATES:
        raise TemplateError(
            f"{key}: unknown conversation template {name!r} (known: {sorted(TEMPLATES)})"
        )
    return TEMPLATES[name]


def _vocab_has(tokenizer: Any, tokens: Iterable[str]) -> bool:
    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in tokens)


def select_template(
    name: str | None = None,
    *,
    config: Any = None,
    tokenizer: Any = None,
    key: str = "chat_template",
) -> ChatTemplate:
    """The base model's template: ``name`` if given (a preset's field), else the config's recorded
    ``umbrella_chat_template``, else derived: a tokenizer with ChatML's tokens -> chatml; a
    Llama-style text model (llava-1.5's Vicuna) or a tokenizer with ``<s>``/``</s>`` -> llava15;
    a Qwen2-style one -> chatml. TemplateError when none of these tells."""
    if name is not None:
        return get_template(name, key)
    recorded = getattr(config, "umbrella_chat_template", None) if config is not None else None
    if recorded:
        return get_template(recorded, "config.json: umbrella_chat_template")
    if tokenizer is not None and _vocab_has(tokenizer, TEMPLATES["chatml"].special_tokens[:2]):
        return TEMPLATES["chatml"]
    text_type = getattr(getattr(config, "text_config", None), "model_type", None)
    if text_type == "llama" or (
        tokenizer is not None and _vocab_has(tokenizer, TEMPLATES["llava15"].special_tokens[:2])
    ):
        return TEMPLATES["llava15"]
    if text_type == "qwen2":
        return TEMPLATES["chatml"]
    raise TemplateError(
        f"cannot tell the conversation template (text model {text_type!r}); record it as "
        f"umbrella_chat_template ({' | '.join(sorted(TEMPLATES))}) in the model's config.json"
    )


def template_of(model: Any) -> ChatTemplate:
    """The template a model was built with (build_model records it on ``model.config``); a
    DeepSpeed engine is asked through the module it wraps."""
    cfg = getattr(getattr(model, "module", model), "config", None)
    name = getattr(cfg, "umbrella_chat_template", None)
    if not name:
        raise TemplateError("model records no umbrella_chat_template (not built by build_model?)")
    return get_template(name, "model.config.umbrella_chat_template")
