"""lm-eval on binarized models: a local multiple-choice task (no hub), checked against a naive
log-likelihood oracle, on stories260K before and after binarization."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

from binllm import QuantizeConfig  # noqa: E402
from binllm.engine.binarize import binarize_model  # noqa: E402
from binllm.evaluation.harness import lm_eval_tasks  # noqa: E402

pytestmark = pytest.mark.slow  # spawns processes or runs a large matrix; `-m "not slow"` skips

TASK = "binllm_next_sentence"


def _docs(shared, n=16):
    """Story beginning; its true next sentence vs the same words in a shuffled order."""
    path = next((shared / "data" / "tinystories").glob("*.txt"))
    rng = random.Random(0)
    docs = []
    for story in path.read_text().split("<|endoftext|>"):
        sents = [x.strip() for x in story.replace("\n", " ").split(". ") if x.strip()]
        if len(sents) < 3 or len(sents[2].split()) < 5:
            continue
        words = sents[2].split()
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        docs.append({"context": ". ".join(sents[:2]) + ".",
                     "choices": [" " + " ".join(words) + ".", " " + " ".join(shuffled) + "."],
                     "label": 0})
        if len(docs) == n:
            return docs
    raise AssertionError("not enough stories")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, shared):
    d = tmp_path_factory.mktemp("tasks")
    docs = _docs(shared)
    (d / "docs.jsonl").write_text("\n".join(json.dumps(x) for x in docs))
    (d / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {d / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    return d, docs


def _oracle_accuracy(model, tokenizer, docs) -> float:
    """Σ log p(choice | context) per choice, argmax, compared with the label."""
    right = 0
    for doc in docs:
        ctx = tokenizer(doc["context"])["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["context"] + choice)["input_ids"]
            cont = whole[len(ctx):]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = model(ids).logits.log_softmax(-1)[0]
            scores.append(sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont)))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return right / len(docs)


def test_lm_eval_on_fp_and_binarized_model_matches_the_oracle(stories_model, stories_tokenizer,
                                                               task_dir):
    d, docs = task_dir
    fp = lm_eval_tasks(stories_model, stories_tokenizer, [TASK], include_path=str(d))
    assert fp[TASK]["acc,none"] == pytest.approx(
        _oracle_accuracy(stories_model, stories_tokenizer, docs))
    assert fp[TASK]["acc,none"] >= 0.75  # the real model prefers the sentence in order

    model = copy.deepcopy(stories_model)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(3, 512, (1, 64), generator=g) for _ in range(4)]
    binarize_model(model, QuantizeConfig("rtn-sign"), calib)
    q = lm_eval_tasks(model, stories_tokenizer, [TASK], include_path=str(d))
    assert q[TASK]["acc,none"] == pytest.approx(_oracle_accuracy(model, stories_tokenizer, docs))


def test_unknown_task_is_a_clear_error(stories_model, stories_tokenizer, task_dir):
    with pytest.raises(ValueError, match="unknown lm-eval task.*include_path="):
        lm_eval_tasks(stories_model, stories_tokenizer, ["no_such_task_xyz"],
                      include_path=str(task_dir[0]))


def test_cli_eval_and_quantize_run_tasks_into_the_report(stories_path, task_dir, tmp_path,
                                                         capsys):
    from binllm.cli import main

    d, _ = task_dir
    common = ["--tasks", TASK, "--tasks-path", str(d), "--limit", "8"]
    assert main(["-q", "eval", str(stories_path), "--datasets", "", *common,
                 "--report", str(tmp_path / "fp.json")]) == 0
    fp = json.loads((tmp_path / "fp.json").read_text())["lm_eval"][TASK]
    assert 0 <= fp["acc,none"] <= 1
    assert main(["-q", "quantize", str(stories_path), "--method", "rtn-sign", "--calib",
                 "tinystories", "--nsamples", "2", "--seqlen", "64", "--eval", "", *common,
                 "--report", str(tmp_path / "q.json")]) == 0
    q = json.loads((tmp_path / "q.json").read_text())
    assert 0 <= q["lm_eval"][TASK]["acc,none"] <= 1
    assert f"{TASK:<24} acc,none" in capsys.readouterr().out
    assert main(["-q", "eval", str(stories_path), "--datasets", "", "--tasks", "nope_xyz"]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err
    assert main(["-q", "quantize", str(stories_path), "--method", "rtn-sign", "--calib",
                 "tinystories", "--nsamples", "2", "--seqlen", "64", "--eval", "",
                 "--tasks", "nope_xyz"]) == 2
    out = capsys.readouterr()
    assert "unknown lm-eval task" in out.err and "linears in" not in out.out  # before any work
