"""Evaluation on `tiny`, in process: the likelihood choice against a hand computation, the one
forward for loss and prefill against the two it replaced, labels and generation length.

The model is the random-init `tiny` preset over a fake shard reader; one gloo process group of
one rank stands in for the distributed run (evaluate_set gathers with it).
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch
import torch.distributed as dist
from helpers.data import FakeShards, tiny_tokenizer  # noqa: F401  (tokenizer: warm cache)
from helpers.net import free_port

from umbrella_ds.config import EvalConfig
from umbrella_ds.data import InstructionDataset, Renderer, collate_eval, collate_train, parse_task
from umbrella_ds.data.collate import to_device
from umbrella_ds.data.template import template_of
from umbrella_ds.eval.evaluate import evaluate_set
from umbrella_ds.eval.metrics import candidate
from umbrella_ds.model import (
    build_model,
    embed_inputs,
    greedy_generate,
    image_token_id,
    language_model,
    lm_head,
    model_forward_loss,
    num_image_tokens,
)
from umbrella_ds.train.inputs import Inputs

SUBJECTS = [f"NDARINV{i:08d}" for i in range(8)]
SIZE = [8, 8, 8]
# The predecessor's sentence answers (UMBRELLA/sample_data/sex_comparison_conversations), the
# label first or the reference named first; {y} is the record's label, {o} the other class.
SENTENCES = [
    "This scan likely belongs to a {y} subject. Unlike the reference {o} scan, this shows "
    "structural characteristics typical of {y} neuroanatomy.",
    "Based on comparison with the {o} reference scan, this appears to be a {y} subject.",
    "Classification: {Y}. Compared to the {o} reference, this scan shows distinct features.",
]


def _t3(i: int, label: str, answer: str, task: str = "sex_comparison") -> dict:
    ref, query = SUBJECTS[(i + 1) % len(SUBJECTS)], SUBJECTS[i]
    return {
        "task_id": f"t3_{i}",
        "task_type": "T3",
        "subject_ids": [ref, query],
        "modalities": ["sMRI", "sMRI"],
        "conversations": [
            {"role": "user", "content": [{"type": "image", "modality": "sMRI"},
                                         {"type": "text", "text": "Reference scan."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Understood."}]},
            {"role": "user", "content": [{"type": "image", "modality": "sMRI"},
                                         {"type": "text", "text": "Sex of this subject?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "metadata": {"subject_id": query, "subject_label": label, "task": task},
    }  # fmt: skip


def sentence_tasks(n: int = 5) -> list[dict]:
    out = []
    for i in range(n):
        y, o = ("female", "male") if i % 2 else ("male", "female")
        text = SENTENCES[i % len(SENTENCES)].format(y=y, o=o, Y=y.capitalize())
        out.append(_t3(i, y, text))
    return out


@pytest.fixture(scope="module")
def group():
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_model(
        "tiny", modalities={"T1": {"size": SIZE, "patch": [4, 4, 4]}}, seed=0
    )
    return model.eval(), tokenizer


def make_inputs(model, tokenizer, records: list[dict], num_workers: int = 0) -> Inputs:
    template = template_of(model)
    tokens = {"T1": num_image_tokens(model, "T1")}
    renderer = Renderer(tokenizer, tokens, 512, template=template)
    tasks = [parse_task(r, f"rec{i}") for i, r in enumerate(records)]
    ds = InstructionDataset(
        tasks, FakeShards(SUBJECTS, t1_shape=tuple(SIZE)), renderer, train=False, seed=0,
        series_length=1, windows="first", flip=False,
    )  # fmt: skip
    kw = {"pad_id": tokenizer.pad_token_id, "image_token_id": image_token_id(model),
          "tokens_per_image": tokens}  # fmt: skip
    return Inputs(
        train_set=ds,
        eval_set=ds,
        collate_train=functools.partial(collate_train, **kw),
        collate_eval=functools.partial(collate_eval, **kw),
        data_fingerprint="test",
        pad_id=kw["pad_id"],
        eos_id=template.eos_id(tokenizer),
        template=template,
        num_workers=num_workers,
    )


def run_eval(model, tokenizer, inputs, micro_batch=2, **cfg):
    return evaluate_set(
        model, inputs, tokenizer, EvalConfig(**cfg), micro_batch, rank=0, world_size=1,
        device=torch.device("cpu"), all_modalities=("T1",), step=0,
    )  # fmt: skip


def hand_loglik(model, item, answer_ids: list[int]) -> float:
    """Summed log-likelihood of ``answer_ids`` after the item's prompt: one unpadded forward over
    prompt + answer, log-softmax at each answer position, summed (float64)."""
    ids = torch.tensor([list(item["prompt_ids"]) + answer_ids])
    images = {"T1": torch.stack([torch.from_numpy(a.astype("float32")) for _, a in item["images"]])}
    positions = torch.nonzero(ids[0] == image_token_id(model)).reshape(-1)
    with torch.no_grad():
        embeds = embed_inputs(model, ids, images, {"T1": positions}, ("T1",))
        hidden = language_model(model)(inputs_embeds=embeds, use_cache=False).last_hidden_state
        logp = torch.log_softmax(lm_head(model)(hidden[0]).double(), dim=-1)
    p = len(item["prompt_ids"])
    return float(sum(logp[p - 1 + k, t] for k, t in enumerate(answer_ids)))


def test_likelihood_choice_equals_a_hand_computation(group, tiny):
    """Every class's score is the summed log-likelihood of the record's reference with its label
    replaced by that class, computed here by a plain forward; choice = argmax, probabilities =
    softmax over the scores."""
    model, tokenizer = tiny
    records = sentence_tasks(5)
    inputs = make_inputs(model, tokenizer, records)
    evals, preds = run_eval(model, tokenizer, inputs, micro_batch=2)
    assert len(preds) == 5
    template = inputs.template
    worst = 0.0
    for i, rec in enumerate(sorted(preds, key=lambda r: int(r["task_id"].split("_")[1]))):
        item = inputs.eval_set[(0, i)]
        y = records[i]["metadata"]["subject_label"]
        assert rec["method"] == "likelihood" and rec["label"] == y
        assert rec["label_source"] == "metadata.subject_label"
        for c in ("female", "male"):
            text = candidate(item["target_text"], y, c)
            hand = hand_loglik(model, item, template.answer_ids(tokenizer, text))
            worst = max(worst, abs(rec["scores"][c] - hand) / abs(hand))
        best = max(rec["scores"], key=rec["scores"].get)
        assert rec["choice"] == best
        z = torch.softmax(
            torch.tensor([rec["scores"]["female"], rec["scores"]["male"]], dtype=torch.float64), 0
        )
        assert rec["class_probs"]["female"] == pytest.approx(float(z[0]), rel=1e-9)
    # fp32 forwards, padded and batched vs alone: measured worst 3.4e-9 relative; 1e-5 is a
    # margin of ~3000x that still catches a wrong token or position (differences of ~1e-1).
    print(f"worst relative difference from the hand computation: {worst:.1e}")
    assert worst < 1e-5
    task = next(r for r in evals if r["task"] == "sex_comparison")
    assert task["primary"] == "likelihood" and task["method"] == "likelihood"
    assert "generation_accuracy" in task
    assert task["accuracy"] == sum(p["choice"] == p["label"] for p in preds) / 5


def test_one_forward_gives_the_loss_and_answers_of_the_two_it_replaced(group, tiny):
    """Loss from the joint forward = the training forward's; answers = greedy_generate's."""
    model, tokenizer = tiny
    records = sentence_tasks(3)
    inputs = make_inputs(model, tokenizer, records)
    evals, preds = run_eval(model, tokenizer, inputs, micro_batch=3, max_new_tokens=6)
    items = [inputs.eval_set[(0, i)] for i in range(3)]
    tb = inputs.collate_train(items)
    _, loss_sum = model_forward_loss(model, tb, 1.0, all_modalities=("T1",))
    want = float(loss_sum) / tb["num_loss_tokens"]
    got = next(r for r in evals if r["task"] == "sex_comparison")["loss"]
    assert got == pytest.approx(want, rel=1e-5)  # fp32, left vs right padding: ~1e-7 measured
    eb = to_device(inputs.collate_eval(items), torch.device("cpu"))
    ids = greedy_generate(
        model, eb["prompt_ids"], eb["attention_mask"], eb["images"], eb["image_positions"], 6,
        inputs.eos_id, all_modalities=("T1",),
    )  # fmt: skip
    answers = {
        f"t3_{i}": tokenizer.decode(x, skip_special_tokens=True).strip() for i, x in enumerate(ids)
    }
    assert {p["task_id"]: p["answer"] for p in preds} == answers


def test_generation_length_is_derived_from_the_references_and_warned(group, tiny, caplog):
    model, tokenizer = tiny
    inputs = make_inputs(model, tokenizer, sentence_tasks(2))
    longest = max(
        len(inputs.template.answer_ids(tokenizer, inputs.eval_set[(0, i)]["target_text"]))
        for i in range(2)
    )
    evals, preds = run_eval(model, tokenizer, inputs)
    task = next(r for r in evals if r["task"] == "sex_comparison")
    assert task["longest_reference_tokens"] == longest
    assert task["max_new_tokens"] == min(longest, 64)
    with caplog.at_level(logging.WARNING, logger="umbrella_ds.eval.evaluate"):
        evals, preds = run_eval(model, tokenizer, inputs, max_new_tokens=3)
        run_eval(model, tokenizer, inputs, max_new_tokens=3)
    warned = [
        r.getMessage() for r in caplog.records if "longer than the generation" in r.getMessage()
    ]
    assert len(warned) == 1, warned  # once per task
    assert f"longest {longest} tokens, generating 3" in warned[0]
    assert any(p["cut"] for p in preds)  # 3 tokens cannot finish these sentences


def test_short_answers_keep_the_first_token_method(group, tiny):
    """`female.` answers with subject_label: labels from metadata, first-token scores, primary
    accuracy from the parsed generation."""
    model, tokenizer = tiny
    records = [_t3(i, y, f"{y}.", task="t1like") for i, y in enumerate(["male", "female"] * 2)]
    inputs = make_inputs(model, tokenizer, records)
    evals, preds = run_eval(model, tokenizer, inputs)
    task = next(r for r in evals if r["task"] == "t1like")
    assert task["label_source"] == "metadata.subject_label"
    assert task["primary"] == "generation"
    assert {p["method"] for p in preds} == {"first_token"}
    assert all(set(p["class_probs"]) == {"female", "male"} for p in preds)


def test_loader_workers_give_the_same_records(group, tiny):
    model, tokenizer = tiny
    records = sentence_tasks(3)
    _, a = run_eval(model, tokenizer, make_inputs(model, tokenizer, records, num_workers=0))
    _, b = run_eval(model, tokenizer, make_inputs(model, tokenizer, records, num_workers=2))
    assert a == b


def test_eval_config_keys_and_their_defaults(tmp_path):
    """max_new_tokens: "derived" by default, a number where a config sets one; label_field per
    task; neither moves the config fingerprint (the eval section is not fingerprinted)."""
    from umbrella_ds.config import ConfigError, RunConfig, load_config

    base = RunConfig().fingerprint()
    cfg = load_config(None, ["eval.max_new_tokens=4", "eval.label_field={sex_comparison: sex}"])
    assert cfg.eval.max_new_tokens == 4 and cfg.eval.max_new_tokens_or(50) == 4
    assert cfg.eval.label_field == {"sex_comparison": "sex"}
    assert cfg.fingerprint() == base
    default = load_config(None, [])
    assert default.eval.max_new_tokens == "derived" and default.eval.max_new_tokens_or(50) == 50
    for bad in ("eval.max_new_tokens=0", "eval.max_new_tokens=long", "eval.label_field={a: ''}"):
        with pytest.raises(ConfigError, match=r"eval\."):
            load_config(None, [bad])


def test_evaluation_runs_eager_when_blocks_are_compiled(group):
    """Compiled blocks would recompile for every KV-cache length of decoding: evaluation runs
    them eager (dynamo sees no frame), and gives the records of the uncompiled model."""
    from torch._dynamo.utils import counters

    from umbrella_ds.model import transformer_blocks

    model, tokenizer = build_model(
        "tiny", modalities={"T1": {"size": SIZE, "patch": [4, 4, 4]}}, seed=0
    )
    model.eval()
    inputs = make_inputs(model, tokenizer, sentence_tasks(3))
    _, eager = run_eval(model, tokenizer, inputs, max_new_tokens=4)
    for block in transformer_blocks(model):
        block.compile(backend="eager")  # dynamo without inductor: cheap, counts frames alike
    torch._dynamo.reset()
    counters.clear()
    _, compiled = run_eval(model, tokenizer, inputs, max_new_tokens=4)
    assert counters["frames"]["total"] == 0
    assert compiled == eager
