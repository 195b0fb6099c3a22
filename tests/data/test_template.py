"""Conversation templates: golden llava-1.5 labels (T1, T3), how a template is chosen and checked at
build time, one home for the template strings, and tiny-llava15 training and generation."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data import REPO, SUBJECT_A, t1_task, t3_task, tiny_tokenizer, write_jsonl
from helpers.training import BIN, base_sets, check, losses_by_step, run_train

from umbrella_ds.data import (
    IGNORE_INDEX,
    InstructionDataset,
    Renderer,
    collate_eval,
    load_instructions,
)
from umbrella_ds.data.template import (
    LLAVA15_SYSTEM,
    TEMPLATES,
    TemplateError,
    get_template,
    select_template,
    template_of,
)
from umbrella_ds.model import build_model, get_preset, greedy_generate, list_presets
from umbrella_ds.model.presets import PRESETS_DIR

TOK15_DIR = PRESETS_DIR / "tiny-llava15-tokenizer"
LLAVA15 = TEMPLATES["llava15"]


@pytest.fixture(scope="module")
def tok15():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOK15_DIR))


@pytest.fixture
def tasks(tmp_path):
    return load_instructions(write_jsonl(tmp_path / "x.jsonl", [t1_task(), t3_task()]))


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def vicuna_v1_prompt(turns: list[tuple[str, str]]) -> str:
    """LLaVA's conv_vicuna_v1.get_prompt (SeparatorStyle.TWO, sep " ", sep2 "</s>"), written out
    independently of the template: what llava-1.5 was fine-tuned on, after the <s>."""
    ret = LLAVA15_SYSTEM + " "
    for i, (role, message) in enumerate(turns):
        ret += role + ": " + message + (" ", "</s>")[i % 2]
    return ret


def golden(tok, turns: list[tuple[str, str]], n_image: int) -> tuple[list[int], list[int]]:
    """Expected ids and labels, turn by turn: <s>, system, then each turn tokenized on its own,
    each <image> expanded to n_image tokens; supervised = an assistant turn after its header."""
    img = tok.convert_tokens_to_ids("<image>")
    ids, labels = [tok.convert_tokens_to_ids("<s>")], [IGNORE_INDEX]
    ids += enc(tok, LLAVA15_SYSTEM)
    labels += [IGNORE_INDEX] * (len(ids) - len(labels))
    previous = "system"
    for role, text in turns:
        lead = "" if previous == "assistant" else " "
        if role == "USER":
            turn = [t for i in enc(tok, f"{lead}USER: {text}") for t in ([i] * n_image if i == img else [i])]  # fmt: skip
            ids, labels = ids + turn, labels + [IGNORE_INDEX] * len(turn)
        else:
            header = enc(tok, f"{lead}ASSISTANT:")
            turn = enc(tok, f"{lead}ASSISTANT: {text}</s>")
            assert turn[: len(header)] == header  # no merge across the header/answer boundary
            ids += turn
            labels += [IGNORE_INDEX] * len(header) + turn[len(header) :]
        previous = "assistant" if role == "ASSISTANT" else "user"
    return ids, labels


def spans(labels: np.ndarray) -> list[np.ndarray]:
    sup = np.flatnonzero(labels != IGNORE_INDEX)
    return np.split(sup, np.flatnonzero(np.diff(sup) > 1) + 1)


# -- golden labels -----------------------------------------------------------------------------


def test_llava15_t1_golden(tok15, tasks):
    r = Renderer(tok15, {"T1": 5}, max_length=512, template=LLAVA15)
    s = r.render_train(tasks[0])
    turns = [("USER", "<image>\nWhat is the sex of this subject?"), ("ASSISTANT", "female.")]
    ids, labels = golden(tok15, turns, 5)
    assert s.input_ids.tolist() == ids and s.labels.tolist() == labels
    # The text is LLaVA's training prompt, exactly, after <s>.
    assert tok15.convert_ids_to_tokens(ids[:1]) == ["<s>"]
    joined = "".join(LLAVA15.turn(*t).text for t in [
        ("system", LLAVA15_SYSTEM, None), ("user", turns[0][1], "system"), ("assistant", "female.", "user")
    ])  # fmt: skip
    assert joined == vicuna_v1_prompt(turns)
    # Supervised: exactly "female." and </s>, the last tokens; every other position is -100.
    n = len(enc(tok15, " female.</s>"))
    sup = np.flatnonzero(s.labels != IGNORE_INDEX)
    assert sup.tolist() == list(range(len(ids) - n, len(ids)))
    assert tok15.decode(s.input_ids[sup]) == "female.</s>"
    assert (s.labels[sup] == s.input_ids[sup]).all()
    assert (np.delete(s.labels, sup) == IGNORE_INDEX).all()
    img = tok15.convert_tokens_to_ids("<image>")
    assert (s.input_ids == img).sum() == 5 and not (s.labels == img).any()


def test_llava15_t3_golden(tok15, tasks):
    r = Renderer(tok15, {"T1": 3}, max_length=512, template=LLAVA15)
    s = r.render_train(tasks[1])
    turns = [
        ("USER", "<image>\nReference subject: male."),
        ("ASSISTANT", "Understood."),
        ("USER", "Now this one:\n<image>\nSame sex?"),
        ("ASSISTANT", "no."),
    ]
    ids, labels = golden(tok15, turns, 3)
    assert s.input_ids.tolist() == ids and s.labels.tolist() == labels
    # Two image blocks of 3, neither supervised; two answers, each with its </s>, nothing else.
    img = tok15.convert_tokens_to_ids("<image>")
    blocks = np.flatnonzero(s.input_ids == img)
    assert (
        blocks.size == 6 and (np.diff(blocks[:3]) == 1).all() and (np.diff(blocks[3:]) == 1).all()
    )
    assert [tok15.decode(s.input_ids[sp]) for sp in spans(s.labels)] == [
        "Understood.</s>",
        "no.</s>",
    ]
    assert not (s.labels[blocks] != IGNORE_INDEX).any()
    # The conversation reads as LLaVA's training prompt (the second USER follows </s> directly).
    prev = [None, "system", "user", "assistant", "user"]
    parts = [("system", LLAVA15_SYSTEM)] + [(r_.lower(), t) for r_, t in turns]
    joined = "".join(LLAVA15.turn(role, t, p).text for (role, t), p in zip(parts, prev))
    assert joined == vicuna_v1_prompt(turns)


def test_llava15_eval_prompt_is_the_training_prefix(tok15, tasks):
    r = Renderer(tok15, {"T1": 4}, max_length=512, template=LLAVA15)
    for task in tasks:
        ev, full = r.render_eval(task), r.render_train(task)
        p = len(ev.prompt_ids)
        assert full.input_ids[:p].tolist() == ev.prompt_ids.tolist()
        assert ev.prompt_ids[-2:].tolist() == enc(tok15, " ASSISTANT:")
        # What follows the prompt in training is exactly what generation must produce.
        assert tok15.decode(full.input_ids[p:]) == f"{ev.target_text}</s>"
        assert (full.labels[p:] == full.input_ids[p:]).all()


def test_llava15_answer_first_token(tok15):
    from umbrella_ds.eval.evaluate import answer_first_token, class_first_tokens

    assert answer_first_token(tok15, "female.", LLAVA15) == tok15.convert_tokens_to_ids("▁female")
    assert answer_first_token(tok15, "female.") == answer_first_token(tok15, "female.", LLAVA15)
    tokens = class_first_tokens(tok15, ["male.", "female."], LLAVA15)
    assert tokens == {
        "male": tok15.convert_tokens_to_ids("▁male"),
        "female": tok15.convert_tokens_to_ids("▁female"),
    }


def test_stop_ids(tok15):
    assert LLAVA15.eos_id(tok15) == tok15.convert_tokens_to_ids("</s>") == 2
    chatml, tok = TEMPLATES["chatml"], tiny_tokenizer()
    assert chatml.eos_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")


# -- choice and build-time checks ----------------------------------------------------------------


def test_presets_name_their_template():
    got = {name: get_preset(name).chat_template for name in list_presets()}
    assert got == {
        "llava-1.5-7b": "llava15",
        "llava-interleave-qwen-0.5b": "chatml",
        "llava-interleave-qwen-7b": "chatml",
        "small": "chatml",
        "tiny": "chatml",
        "tiny-clip": "chatml",
        "tiny-llava15": "llava15",
    }
    for name in ("tiny", "tiny-clip", "tiny-llava15"):
        model, _ = build_model(name, seed=0)
        assert template_of(model).name == get_preset(name).chat_template


def test_template_derived_for_a_local_directory(tok15):
    """No recorded name: ChatML's tokens -> chatml; Llama text model or <s>/</s> -> llava15."""
    llama = get_preset("llava-1.5-7b").make_config()
    qwen = get_preset("llava-interleave-qwen-0.5b").make_config()
    assert select_template(config=llama).name == "llava15"
    assert select_template(config=qwen).name == "chatml"
    assert select_template(tokenizer=tok15).name == "llava15"
    # tiny-clip: Llama text model, ChatML tokenizer -> the tokenizer decides.
    assert select_template(config=get_preset("tiny-clip").make_config(), tokenizer=tiny_tokenizer()).name == "chatml"  # fmt: skip
    llama.umbrella_chat_template = "chatml"  # a recorded name wins
    assert select_template(config=llama).name == "chatml"


def test_unknown_template_is_a_clear_error_at_build_time(tmp_path, monkeypatch):
    with pytest.raises(
        TemplateError, match=r"chat_template: unknown conversation template 'vicuna'"
    ):
        get_template("vicuna")
    raw = json.loads((PRESETS_DIR / "tiny-llava15.json").read_text())
    raw["chat_template"] = "vicuna"
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    monkeypatch.setattr("umbrella_ds.model.presets.PRESETS_DIR", tmp_path)
    with pytest.raises(
        TemplateError, match=r"bad\.json: chat_template: unknown .*'vicuna'.*llava15"
    ):
        build_model("bad")
    monkeypatch.undo()
    # A local directory whose config records an unknown name.
    d = _local_dir(tmp_path / "dir", umbrella_chat_template="vicuna")
    with pytest.raises(TemplateError, match=r"umbrella_chat_template: unknown .*'vicuna'"):
        build_model(str(d), init="random")


def _local_dir(d: Path, **config_overrides) -> Path:
    """A model directory (config + the tiny-llava15 tokenizer, no weights: random init)."""
    cfg = get_preset("tiny-llava15").make_config()
    for k, v in config_overrides.items():
        setattr(cfg, k, v)
    cfg.save_pretrained(str(d))
    for f in TOK15_DIR.iterdir():
        shutil.copy(f, d / f.name)
    return d


def test_tokenizer_and_model_must_fit_the_template(tmp_path, tok15):
    # The template's special tokens must be tokens of the tokenizer.
    with pytest.raises(TemplateError, match=r"tokenizer has no '<s>' token.*'llava15'"):
        Renderer(tiny_tokenizer(), {"T1": 4}, max_length=64, template=LLAVA15)
    with pytest.raises(TemplateError, match=r"tokenizer has no '<\|im_start\|>' token.*'chatml'"):
        Renderer(tok15, {"T1": 4}, max_length=64, template=TEMPLATES["chatml"])
    # The tokenizer's <image> id must be the model config's image_token_id, checked at build.
    model, _ = build_model(str(_local_dir(tmp_path / "ok")), init="random")
    assert template_of(model).name == "llava15" and model.config.image_token_id == 510
    bad = _local_dir(tmp_path / "bad", image_token_id=3)
    with pytest.raises(TemplateError, match=r"'<image>' is id 510 but the model config's image_token_id is 3"):  # fmt: skip
        build_model(str(bad), init="random")
    # A ChatML tokenizer beside a model recorded as llava-1.5.
    mixed = _local_dir(tmp_path / "mixed", umbrella_chat_template="llava15")
    for f in (REPO / "umbrella_ds" / "model" / "presets" / "tiny-tokenizer").iterdir():
        shutil.copy(f, mixed / f.name)
    with pytest.raises(TemplateError, match=r"tokenizer has no '<s>' token"):
        build_model(str(mixed), init="random")


# -- one home for the template strings -------------------------------------------------------------

ALLOWED = {
    "umbrella_ds/data/template.py",
    "umbrella_ds/model/presets/make_tiny_tokenizer.py",
    "umbrella_ds/model/presets/make_tiny_llava15_tokenizer.py",
}


def test_template_strings_live_only_in_the_template_module():
    hits = []
    for top in ("umbrella_ds", "data_prep"):
        for path in sorted((REPO / top).rglob("*")):
            rel = path.relative_to(REPO).as_posix()
            if not path.is_file() or path.suffix not in (".py", ".json", ".yaml", ".txt"):
                continue
            if rel in ALLOWED or "-tokenizer/" in rel or "__pycache__" in rel:
                continue
            text = path.read_text(errors="replace")
            hits += [f"{rel}: {s}" for s in ("im_start", "im_end", "ASSISTANT:") if s in text]
    assert not hits, hits


def test_tokenizer_generator_reproduces_the_committed_files(tmp_path):
    import sys

    script = PRESETS_DIR / "make_tiny_llava15_tokenizer.py"
    subprocess.run([sys.executable, script, tmp_path], check=True, capture_output=True, timeout=120)
    for f in TOK15_DIR.iterdir():
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f.name
    assert sum(f.stat().st_size for f in TOK15_DIR.iterdir()) < 32_000  # small in the repository


# -- generation and training ---------------------------------------------------------------------


class ScriptedHead:
    """A forward hook making greedy decoding emit a fixed token sequence, one per LM step."""

    def __init__(self, script: list[int]) -> None:
        self.script, self.step = script, 0

    def __call__(self, module, args, out):
        forced = torch.full_like(out, -1e4)
        forced[..., self.script[min(self.step, len(self.script) - 1)]] = 1e4
        self.step += 1
        return forced


def test_greedy_generation_stops_on_the_template_stop_id(tmp_path):
    from umbrella_ds.infer import ScanReader
    from umbrella_ds.model import image_token_id, lm_head, num_image_tokens

    model, tok = build_model("tiny-llava15", modalities={"T1": {"size": [32] * 3, "patch": [8] * 3}}, seed=0)  # fmt: skip
    model.eval()
    template = template_of(model)
    tpi = {"T1": num_image_tokens(model, "T1")}
    task = load_instructions(write_jsonl(tmp_path / "t.jsonl", [t1_task()]))[0]
    reader = ScanReader({SUBJECT_A: {"T1": np.zeros((32, 32, 32), np.float16)}})
    ds = InstructionDataset([task], reader, Renderer(tok, tpi, 512, template=template), train=False, seed=0, series_length=1)  # fmt: skip
    b = collate_eval([ds[(0, 0)]], pad_id=tok.pad_token_id, image_token_id=image_token_id(model), tokens_per_image=tpi)  # fmt: skip
    male, eos = tok.convert_tokens_to_ids("▁male"), template.eos_id(tok)
    handle = lm_head(model).register_forward_hook(ScriptedHead([male, eos, male, male]))
    try:
        ids = greedy_generate(model, b["prompt_ids"], b["attention_mask"], b["images"],
                              b["image_positions"], 4, eos, all_modalities=("T1",))  # fmt: skip
    finally:
        handle.remove()
    assert ids == [[male]]  # cut at </s>, nothing after it
    assert tok.decode(ids[0], skip_special_tokens=True).strip() == "male"


def test_tiny_llava15_inputs_use_the_template(train_data, tmp_path):
    from umbrella_ds.config import load_config
    from umbrella_ds.train.inputs import build_inputs

    sets = base_sets(train_data, tmp_path / "run", **{"model.preset": "tiny-llava15"})
    cfg = load_config(REPO / "configs" / "demo.yaml", sets)
    mods = {m: {"size": s.size, "patch": s.patch} for m, s in cfg.model.modalities.items()}
    model, tok = build_model(cfg.model.source, modalities=mods, seed=0)
    inputs = build_inputs(cfg.data, cfg.model, model, tok, 0)
    assert inputs.template is template_of(model) is LLAVA15
    assert inputs.train_set.renderer.template is LLAVA15
    assert inputs.eos_id == tok.convert_tokens_to_ids("</s>")
    item = inputs.train_set[(0, 0)]
    sup = item["labels"] != IGNORE_INDEX
    answer = inputs.train_set.tasks[0].turns[-1].text
    assert tok.decode(item["input_ids"][sup]) == f"{answer}</s>"


@pytest.mark.multiproc
@pytest.mark.timeout(420)
def test_tiny_llava15_trains_and_evaluates(train_data, tmp_path):
    """1 rank, a few steps through the real launcher, then evaluation with greedy answers."""
    out = tmp_path / "run"
    sets = base_sets(
        train_data,
        out,
        **{"model.preset": "tiny-llava15", "train.max_steps": 3, "train.bf16": "false",
           "train.global_batch": 4, "train.micro_batch": 4, "checkpoint.every_steps": 3,
           "eval.at_end": "true", "eval.max_new_tokens": 3, "eval.max_samples": 4},
    )  # fmt: skip
    check(run_train(1, sets, timeout=360))
    losses = losses_by_step(out)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and all(isinstance(p["answer"], str) for p in preds)

    # Export, then umbrella-infer on the raw scan of an evaluated subject: the same answer, so
    # infer renders and stops as evaluation does.
    from umbrella_ds.infer import infer

    export = tmp_path / "export"
    proc = subprocess.run([BIN / "umbrella-export", out, "--out", export], capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    raw = train_data / "raw"
    lines = (raw / "instructions" / "t1_sex_eval.jsonl").read_text().splitlines()
    by_id = {p["task_id"]: p["answer"] for p in preds}
    task = next(t for t in map(json.loads, lines) if t["task_id"] in by_id)
    prompt = task["conversations"][0]["content"][1]["text"]
    got = infer(export, prompt, [("T1", raw / task["images"][0]["path"])])
    assert got["answer"] == by_id[task["task_id"]]
