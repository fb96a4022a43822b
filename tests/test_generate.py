"""Timed generation: `binllm.evaluation.generate` and `binllm generate` time the same work for a
packed model and its dense original (no kernel-form derivation or extension loading inside)."""

from __future__ import annotations

import re

import pytest
import torch
import transformers  # noqa: F401  (its log handler binds to stderr now, not to one test's capsys)
from test_checkpoint import quantize, tiny_biased_llama

import binllm
import binllm.kernels.cpu_build as cpu_build
import binllm.packed.layers as layers
from binllm.cli import main
from binllm.evaluation.generate import generate
from binllm.packed.checkpoint import save_binarized


class Chars:
    """A character tokenizer over the tiny model's 96 ids (what generate() needs of one)."""

    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text, return_tensors="pt"):
        ids = torch.tensor([[2 + ord(c) % 94 for c in text]])
        return type("Enc", (), {"input_ids": ids})()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + int(i) % 94) for i in ids)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    model = tiny_biased_llama()
    return save_binarized(model, quantize(model, "billm", 96), None,
                          tmp_path_factory.mktemp("gen") / "model")


def test_load_derives_every_form_and_loads_the_kernels_before_the_timed_run(saved_dir,
                                                                           monkeypatch):
    derived, loaded = [], []
    real_form, real_ext = layers.kernel_form, cpu_build.extension
    monkeypatch.setattr(cpu_build, "extension", lambda: loaded.append(1) or real_ext())
    monkeypatch.setattr(layers, "kernel_form", lambda c: derived.append(1) or real_form(c))
    model = binllm.load(saved_dir)
    at_load = (len(derived), len(loaded))
    assert at_load[0] == 7 and at_load[1] >= 1  # every linear's form, the kernels loaded
    res = generate(model, Chars(), "Once", max_new_tokens=5, exact_length=True)
    assert len(derived) == at_load[0]  # nothing derived while timed
    assert res.new_tokens == 5 and res.prompt_tokens == 4 and res.seconds > 0
    assert res.tokens_per_s == pytest.approx(5 / res.seconds)
    # the first token after the prompt's forward, the 4 steps after it within the whole time
    assert 0 < res.first_token_s and 0 < res.decode_s
    assert res.first_token_s + res.decode_s <= res.seconds
    assert res.decode_tokens_per_s == pytest.approx(4 / res.decode_s)


def test_generate_is_greedy_and_equals_the_models_own_generate(saved_dir):
    model = binllm.load(saved_dir)
    res = generate(model, Chars(), "Once", max_new_tokens=6, exact_length=True)
    ids = Chars()("Once").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             pad_token_id=0)
    assert res.text == Chars().decode(out[0])


def run(capsys, *argv):
    code = main(["-q", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_generates_with_the_dense_original_the_same_way(capsys, stories_path):
    threads = torch.get_num_threads()
    code, text, _ = run(capsys, "generate", stories_path, "Once upon a time", "--original",
                        "--max-new-tokens", "5", "--exact-length", "--threads", "1")
    assert code == 0 and text.startswith("Once upon a time")
    assert re.search(r"\[5 new tokens in [\d.]+ s, [\d.]+ tokens/s; the prompt's 5 tokens "
                     r"[\d.]+ s, then [\d.]+ tokens/s, lean loop\]", text)
    assert torch.get_num_threads() == threads  # restored for in-process callers


def test_cli_generate_refuses_bad_threads_and_original_on_a_binllm_dir(capsys, saved_dir):
    code, _, err = run(capsys, "generate", saved_dir, "hi", "--threads", "-1")
    assert code == 2 and "--threads -1" in err
    code, _, err = run(capsys, "generate", saved_dir, "hi", "--original")
    assert code == 2 and "drop --original" in err


# -- the model's context and an empty prompt ---------------------------------------------------
def test_prompt_and_new_tokens_beyond_the_context_are_refused_with_the_limit(capsys,
                                                                             stories_path):
    from conftest import one_line_error

    code, _, err = run(capsys, "generate", stories_path, "Once", "--original",
                       "--max-new-tokens", "600")
    one_line_error(code, err, "the prompt (2 tokens) and --max-new-tokens 600 need 602",
                   "context of 512 tokens", "use --max-new-tokens 510 or less")
    code, _, err = run(capsys, "generate", stories_path, "Once upon a time " * 200, "--original",
                       "--max-new-tokens", "5")
    one_line_error(code, err, "the prompt is 802 tokens", "context is 512",
                   "shorten the prompt")


def test_library_generate_names_max_new_tokens(stories_model, stories_tokenizer):
    from binllm.evaluation.perplexity import ContextError

    with pytest.raises(ContextError, match=r"max_new_tokens=511 need 513 positions.*"
                                           r"use max_new_tokens=510 or less"):
        generate(stories_model, stories_tokenizer, "Once", max_new_tokens=511)
    res = generate(stories_model, stories_tokenizer, "Once", max_new_tokens=510,
                   exact_length=True)
    assert res.prompt_tokens + res.new_tokens == 512  # the whole context, and no more


def test_an_empty_prompt_starts_from_bos_and_says_so(capsys, stories_path, stories_model):
    code, text, err = run(capsys, "generate", stories_path, "", "--original",
                          "--max-new-tokens", "4", "--exact-length")
    assert code == 0, err
    assert "note: the prompt is empty: generating from the beginning-of-sequence token (id 1)" \
        in err
    assert re.search(r"\[4 new tokens in", text)

    class NoBos(Chars):  # a tokenizer that gives nothing for "" and has no BOS token
        eos_token_id = 1

    res = generate(stories_model, NoBos(), "", max_new_tokens=3, exact_length=True)
    assert res.prompt_tokens == 1 and res.new_tokens == 3 and "empty" in res.note


def test_an_empty_prompt_without_any_start_token_is_refused(stories_model):
    from binllm.evaluation.generate import EmptyPrompt

    class Bare(Chars):
        pad_token_id = eos_token_id = None

    with pytest.raises(EmptyPrompt, match="pass some text"):
        generate(stories_model, Bare(), "", max_new_tokens=3)


# -- chat and streaming -------------------------------------------------------------------------
TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


class Recorder:
    """A streamer (transformers' interface) that keeps every put and counts the ends."""

    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, ids):
        self.puts.append(ids.reshape(-1).clone())

    def end(self):
        self.ends += 1


@pytest.fixture
def chat_tokenizer(stories_tokenizer):
    import copy

    tok = copy.deepcopy(stories_tokenizer)
    tok.chat_template = TEMPLATE
    return tok


@pytest.mark.parametrize("loop", ["lean", "transformers"])
def test_chat_sends_the_templated_turns_and_returns_the_reply_alone(stories_model,
                                                                     chat_tokenizer, loop):
    res = generate(stories_model, chat_tokenizer, "Tell a story", system="Be brief",
                   chat=True, max_new_tokens=6, exact_length=True, loop=loop)
    ids = chat_tokenizer("system: Be brief\nuser: Tell a story\nassistant:",
                         add_special_tokens=False,  # a template places its own special tokens
                         return_tensors="pt").input_ids  # the template, rendered by hand
    assert res.prompt_tokens == ids.shape[1]
    with torch.no_grad():
        out = stories_model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                     pad_token_id=0)
    assert res.text == chat_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Tell a story" not in res.text


def test_chat_without_a_template_or_a_system_prompt_without_chat_is_refused(
        capsys, stories_model, stories_tokenizer, stories_path):
    from conftest import one_line_error

    from binllm.evaluation.generate import NoChatTemplate

    with pytest.raises(NoChatTemplate, match="drop chat=True"):
        generate(stories_model, stories_tokenizer, "hi", chat=True, max_new_tokens=2)
    with pytest.raises(NoChatTemplate, match="needs chat=True"):
        generate(stories_model, stories_tokenizer, "hi", system="x", max_new_tokens=2)
    code, _, err = run(capsys, "generate", stories_path, "hi", "--original", "--chat")
    one_line_error(code, err, "no chat template", "drop --chat")
    code, _, err = run(capsys, "generate", stories_path, "hi", "--original", "--system", "x")
    one_line_error(code, err, "--system needs --chat")


@pytest.mark.parametrize("loop", ["lean", "transformers"])
def test_the_streamer_gets_the_prompt_then_every_new_token_once(stories_model,
                                                                stories_tokenizer, loop):
    rec = Recorder()
    res = generate(stories_model, stories_tokenizer, "Once upon", max_new_tokens=5,
                   exact_length=True, loop=loop, streamer=rec)
    prompt = stories_tokenizer("Once upon", return_tensors="pt").input_ids[0]
    assert torch.equal(rec.puts[0], prompt) and rec.ends == 1
    new = torch.cat(rec.puts[1:])
    assert new.numel() == res.new_tokens == 5
    assert stories_tokenizer.decode(torch.cat([prompt, new]), skip_special_tokens=True) == \
        res.text


def test_cli_streams_the_same_text_it_prints_without_streaming(capsys, stories_path,
                                                               stories_tokenizer):
    """The continuation starts with a word, whose space a sentencepiece tokenizer drops when
    the new tokens are decoded without the prompt."""
    prompt = "Once upon a time, there was"
    args = ("generate", stories_path, prompt, "--original", "--max-new-tokens", "6",
            "--exact-length")
    _, plain, _ = run(capsys, *args)
    code, streamed, _ = run(capsys, *args, "--stream")
    assert code == 0
    text = plain.split("\n[6 new tokens")[0]
    assert text.startswith(prompt + " ") and text[len(prompt) + 1].isalpha()
    assert streamed.split("\n[6 new tokens")[0] == text
