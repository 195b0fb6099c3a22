"""Golden token/label tests on predecessor-format T1 and T3 samples; overflow policies."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from helpers.data import t1_task, t3_task, tiny_tokenizer, write_jsonl

from umbrella_ds.data import (
    IGNORE_INDEX,
    InstructionDataset,
    Renderer,
    SampleTooLongError,
    load_instructions,
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def tasks(tmp_path):
    return load_instructions(write_jsonl(tmp_path / "x.jsonl", [t1_task(), t3_task()]))


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_t1_golden(tok, tasks):
    r = Renderer(tok, {"T1": 5}, max_length=512)
    s = r.render_train(tasks[0])
    img = tok.convert_tokens_to_ids("<image>")
    head = enc(tok, "<|im_start|>user\n")
    expected = (
        head
        + [img] * 5
        + enc(
            tok,
            "\nWhat is the sex of this subject?<|im_end|>\n<|im_start|>assistant\nfemale.<|im_end|>\n",
        )
    )
    assert s.input_ids.tolist() == expected
    assert s.input_ids.dtype == np.int64 and s.labels.dtype == np.int64
    # The image block stands where <image> stood: right after the user header.
    assert np.flatnonzero(s.input_ids == img).tolist() == list(range(len(head), len(head) + 5))
    # Supervised: exactly "female." and its <|im_end|>; not the header, not the final newline.
    n_sup = len(enc(tok, "female.<|im_end|>"))
    sup = np.flatnonzero(s.labels != IGNORE_INDEX)
    assert sup.tolist() == list(range(len(expected) - 1 - n_sup, len(expected) - 1))
    assert tok.decode(s.input_ids[sup]) == "female.<|im_end|>"
    assert (s.labels[sup] == s.input_ids[sup]).all()
    assert s.image_modalities == ("T1",)


def test_t3_golden(tok, tasks):
    r = Renderer(tok, {"T1": 3}, max_length=512)
    s = r.render_train(tasks[1])
    img = tok.convert_tokens_to_ids("<image>")
    blocks = np.flatnonzero(s.input_ids == img)
    assert blocks.size == 6
    first, second = blocks[:3], blocks[3:]
    assert (np.diff(first) == 1).all() and (np.diff(second) == 1).all()
    # Second image after its turn's header and "Now this one:\n".
    before = tok.decode(
        s.input_ids[second[0] - len(enc(tok, "<|im_start|>user\nNow this one:\n")) : second[0]]
    )
    assert before == "<|im_start|>user\nNow this one:\n"
    # Supervised spans: the acknowledgement and the answer, each with <|im_end|>.
    sup = s.labels != IGNORE_INDEX
    spans = np.split(np.flatnonzero(sup), np.flatnonzero(np.diff(np.flatnonzero(sup)) > 1) + 1)
    assert [tok.decode(s.input_ids[sp]) for sp in spans] == [
        "Understood.<|im_end|>",
        "no.<|im_end|>",
    ]
    assert not sup[s.input_ids == img].any()


def test_render_matches_apply_chat_template(tok, tasks):
    r = Renderer(tok, {"T1": 1}, max_length=512)
    for task in tasks:
        messages = [{"role": t.role, "content": t.text} for t in task.turns]
        text = tok.apply_chat_template(messages, tokenize=False)
        assert r.render_train(task).input_ids.tolist() == enc(tok, text)
        prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        assert r.render_eval(task).prompt_ids.tolist() == enc(tok, prompt)


def test_eval_prompt_and_target(tok, tasks):
    r = Renderer(tok, {"T1": 4}, max_length=512)
    ev = r.render_eval(tasks[1])
    full = r.render_train(tasks[1]).input_ids
    assert ev.target_text == "no."
    assert full[: len(ev.prompt_ids)].tolist() == ev.prompt_ids.tolist()
    assert (
        tok.decode(ev.prompt_ids[-len(enc(tok, "<|im_start|>assistant\n")) :])
        == "<|im_start|>assistant\n"
    )
    assert ev.image_modalities == ("T1", "T1")


def test_non_chatml_template_is_refused(tok):
    other = copy.deepcopy(tok)
    other.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="not plain ChatML"):
        Renderer(other, {"T1": 4}, max_length=64)


def long_task(tmp_path):
    answer = "female and " * 20 + "done."
    return load_instructions(write_jsonl(tmp_path / "long.jsonl", [t1_task(answer=answer)]))[0]


def test_overflow_reject(tok, tmp_path):
    task = long_task(tmp_path)
    n = len(Renderer(tok, {"T1": 8}, max_length=4096).render_train(task).input_ids)
    r = Renderer(tok, {"T1": 8}, max_length=n - 1, overflow="reject")
    with pytest.raises(
        SampleTooLongError, match=rf"{task.task_id}.*{n} tokens > max_length {n - 1}"
    ):
        r.render_train(task)
    ds = InstructionDataset([task], object(), r, train=True, seed=0, series_length=4)
    assert len(ds) == 0 and ds.num_rejected == 1 and ds.rejected_task_ids == [task.task_id]


def test_overflow_truncate_cuts_text_only(tok, tmp_path):
    task = long_task(tmp_path)
    full = Renderer(tok, {"T1": 8}, max_length=4096).render_train(task)
    limit = len(full.input_ids) - 10
    s = Renderer(tok, {"T1": 8}, max_length=limit, overflow="truncate").render_train(task)
    assert s.truncated and len(s.input_ids) == limit
    assert s.input_ids.tolist() == full.input_ids[:limit].tolist()
    assert s.labels.tolist() == full.labels[:limit].tolist()
    assert (s.labels != IGNORE_INDEX).sum() > 0
    # A cut through the image block is refused, never an image cut short.
    img_end = int(np.flatnonzero(full.input_ids == tok.convert_tokens_to_ids("<image>"))[-1])
    r_img = Renderer(tok, {"T1": 8}, max_length=img_end, overflow="truncate")
    with pytest.raises(SampleTooLongError, match="cut an image"):
        r_img.render_train(task)
    # A cut that keeps the image but leaves no supervised token is refused too.
    first_sup = int(np.flatnonzero(full.labels != IGNORE_INDEX)[0])
    r_nosup = Renderer(tok, {"T1": 8}, max_length=first_sup, overflow="truncate")
    with pytest.raises(SampleTooLongError, match="no supervised token"):
        r_nosup.render_train(task)


def test_eval_prompt_too_long_is_rejected(tok, tasks):
    r = Renderer(tok, {"T1": 64}, max_length=70, overflow="truncate")
    with pytest.raises(SampleTooLongError, match="prompt of"):
        r.render_eval(tasks[0])
