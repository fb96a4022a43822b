"""The lean decode loop (`binllm.runtime`): the model's own function, token by token.

Oracles: transformers' forward over the whole sequence (logits at every step) and its
`generate` (greedy tokens), on tiny models of each family the loop takes, a packed model
computing through the kernels, and the real stories260K."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_causal_lm
from test_checkpoint import quantize, tiny_biased_llama

import binllm
from binllm.evaluation.generate import LoopError, generate, pick_loop
from binllm.packed.checkpoint import save_binarized
import binllm.kernels.cpu as cpu
from binllm.runtime import DecodeError, LeanDecoder, lean_generate, unsupported
from binllm.runtime.decode import pick


def hf_greedy(model, ids, n: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_logits_equal_the_models_forward_at_every_step(family):
    model = tiny_causal_lm(family, vocab_size=128)
    ids = torch.randint(0, 128, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits[0]  # (11, vocab)
        dec = LeanDecoder(model, 16)
        steps = [dec(ids[:, :6]), dec(ids[:, 6:7]), dec(ids[:, 7:8]), dec(ids[:, 8:11])]
    for got, at in zip(steps, (5, 6, 7, 10)):
        torch.testing.assert_close(got, full[at], atol=1e-5, rtol=1e-5)
    assert dec.length == 11
    assert torch.equal(lean_generate(model, ids[:, :4], 10), hf_greedy(model, ids[:, :4], 10))


def test_the_fused_glue_computes_what_the_torch_ops_compute(monkeypatch):
    import binllm.runtime.decode as decode

    model = tiny_causal_lm("llama", vocab_size=128, head_dim=32)  # head_dim ≠ hidden / heads
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(decode, "decode_layers", lambda *a: None)  # the loop in Python
    fused, calls = decode.decode_attention, []
    monkeypatch.setattr(decode, "decode_attention",
                        lambda *a: calls.append(1) or fused(*a))
    got = lean_generate(model, ids, 8)
    if cpu.extension().ok:
        assert len(calls) == 7 * 2  # every new token after the first, every layer
    monkeypatch.setattr(decode, "decode_attention", lambda *a: None)
    monkeypatch.setattr(decode, "rms_norm", lambda *a: None)
    assert torch.equal(got, lean_generate(model, ids, 8))


def steps(model, ids, fuse: bool, new: int = 6) -> list[torch.Tensor]:
    """The logits after the prompt and after each of `new` greedy tokens, one at a time."""
    dec = LeanDecoder(model, ids.shape[1] + new, fuse=fuse)
    assert (dec.fused is not None) == (fuse and cpu.extension().ok)
    with torch.no_grad():
        out = [dec(ids)]
        for _ in range(new):
            out.append(dec(out[-1].float().argmax().view(1, 1)))
    return out


@pytest.mark.parametrize("case", ["llama", "qwen2-biases", "llama-bf16", "packed",
                                  "stories260K"])
def test_the_fused_layers_give_the_loops_logits_bit_for_bit(case, packed, stories_model):
    """One compiled call per token through every layer (dense nn.Linear, q/k/v biases, bf16,
    packed kernels, the real stories260K) against the same loop run module by module."""
    model = {"llama": lambda: tiny_causal_lm("llama", vocab_size=128, head_dim=32),
             "qwen2-biases": lambda: tiny_causal_lm("qwen2", vocab_size=128),
             "llama-bf16": lambda: tiny_causal_lm("llama", vocab_size=128).to(torch.bfloat16),
             "packed": lambda: packed, "stories260K": lambda: stories_model}[case]()
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    for got, want in zip(steps(model, ids, True), steps(model, ids, False), strict=True):
        assert torch.equal(got, want)


def test_the_fused_layers_are_not_built_where_a_module_is_not_theirs():
    """A linear that is neither packed nor a plain nn.Linear (its forward replaced, as
    accelerate's hooks do, or a forward hook registered), or an activation other than SiLU:
    the loop runs the modules, with their effect."""
    model = tiny_causal_lm("llama", vocab_size=128)
    ids = torch.tensor([[1, 5, 9]])
    plain = steps(model, ids, False, new=2)
    up = model.model.layers[1].mlp.up_proj
    up.forward = lambda x: torch.nn.functional.linear(x, 2 * up.weight)
    dec = LeanDecoder(model, 4)
    assert dec.fused is None
    with torch.no_grad():
        assert not torch.equal(dec(ids), plain[0])  # the replaced forward ran
    del up.forward
    handle = up.register_forward_hook(lambda m, args, out: 2 * out)
    dec = LeanDecoder(model, 4)
    assert dec.fused is None
    with torch.no_grad():
        assert not torch.equal(dec(ids), plain[0])  # the hook ran
    handle.remove()
    model.model.layers[0].mlp.act_fn = torch.nn.GELU()
    assert LeanDecoder(model, 4).fused is None
    model.model.layers[0].mlp.act_fn = torch.nn.SiLU()
    assert LeanDecoder(model, 4).fused is not None or not cpu.extension().ok


def test_greedy_tokens_equal_transformers_generate_on_the_real_stories260K(stories_model):
    ids = torch.tensor([[1, 403, 407, 261, 378]])
    assert torch.equal(lean_generate(stories_model, ids, 24), hf_greedy(stories_model, ids, 24))


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    model = tiny_biased_llama()
    path = save_binarized(model, quantize(model, "billm", 96), None,
                          tmp_path_factory.mktemp("lean") / "model")
    return binllm.load(path)


def test_a_packed_model_through_the_kernels_decodes_as_transformers_does(packed):
    ids = torch.tensor([[3, 17, 40, 2]])
    assert torch.equal(lean_generate(packed, ids, 12), hf_greedy(packed, ids, 12))


def test_a_bf16_model_keeps_the_forward_to_bf16_round_off():
    """bf16 rounds differently in the fused glue (the norm's sum order, attention's one
    rounding), so greedy tokens may part from transformers' after a near tie: the logits are
    what is compared."""
    model = tiny_causal_lm("llama", vocab_size=128).to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits[0].float()
        dec = LeanDecoder(model, 9)
        got = [dec(ids[:, :8]).float(), dec(ids[:, 8:]).float()]
    scale = full.abs().max()
    assert (got[0] - full[7]).abs().max() <= 0.02 * scale
    assert (got[1] - full[8]).abs().max() <= 0.02 * scale


def test_a_plain_head_is_offered_to_dense_gemv_and_the_module_computes_what_it_declines(
        monkeypatch):
    """Each step's logits: dense_gemv's for a plain bf16 lm_head where the extension computes
    it (within one bf16 rounding of torch's linear of the same hidden state), the module's
    where it declines (an fp32 head: exactly torch's linear)."""
    import binllm.runtime.decode as decode

    calls = []

    def spy(x, weight, bias=None):
        y = dense_gemv(x, weight, bias)
        calls.append((y, torch.nn.functional.linear(x, weight, bias)))
        return y

    dense_gemv = decode.dense_gemv
    monkeypatch.setattr(decode, "dense_gemv", spy)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    for dtype in (torch.bfloat16, torch.float32):
        calls.clear()
        model = tiny_causal_lm("llama", vocab_size=128).to(dtype)
        dec = LeanDecoder(model, 6)
        logits = [dec(ids[:, :5]), dec(ids[:, 5:])]
        assert len(calls) == 2
        for got, (y, ref) in zip(logits, calls):
            computed = dtype == torch.bfloat16 and cpu.extension().avx512
            assert (y is not None) == computed
            if computed:
                assert torch.equal(got, y[0, -1])
                assert (y.float() - ref.float()).abs().max() <= ref.float().abs().max() * 2**-7
            else:
                assert torch.equal(got, ref[0, -1])


def test_generation_stops_after_an_end_token_and_never_runs_past_max_len():
    model = tiny_causal_lm("llama", vocab_size=128)
    ids = torch.tensor([[5, 6, 7]])
    free = lean_generate(model, ids, 6)
    new = free[0, 3:].tolist()
    stop = new[2]  # the third new token ends the run (or an earlier one equal to it)
    out = lean_generate(model, ids, 6, eos={stop})
    assert torch.equal(out, free[:, :3 + new.index(stop) + 1])
    dec = LeanDecoder(model, 4)
    dec(ids)
    dec(ids[:, :1])
    with pytest.raises(DecodeError, match="exceed this decoder's max_len=4; build it with "
                                          "max_len=5 or more"):
        dec(ids[:, :1])
    banned = lean_generate(model, ids, 6, banned={stop})
    assert banned.shape[1] == 9 and stop not in banned[0, 3:].tolist()


def test_families_the_loop_does_not_take_are_named_with_the_reason():
    for family in ("qwen3", "gemma", "phi3", "opt", "gpt_neox"):
        assert "is not one of llama, mistral, qwen2" in unsupported(tiny_causal_lm(family))
    windowed = tiny_causal_lm("mistral", sliding_window=8)
    assert unsupported(windowed, 8) is None
    assert "exceed its sliding attention window (8)" in unsupported(windowed, 9)
    with pytest.raises(DecodeError, match="sliding attention window.*loop='transformers'"):
        LeanDecoder(windowed, 9)
    qwen = tiny_causal_lm("qwen2", use_sliding_window=True, sliding_window=8,
                          max_window_layers=2)  # every layer full attention
    assert unsupported(qwen, 9) is None
    dynamic = tiny_causal_lm("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                       "rope_theta": 10000.0})
    assert "(dynamic) depends on the sequence length" in unsupported(dynamic)
    partial = tiny_causal_lm("llama")  # a rotary embedding over half of each head
    partial.model.rotary_emb.inv_freq = partial.model.rotary_emb.inv_freq[:4]
    assert "partial rotary" in unsupported(partial)


def test_generate_picks_the_loop_and_refuses_lean_where_it_cannot_run(stories_tokenizer):
    llama, gemma = tiny_causal_lm("llama", vocab_size=32000), tiny_causal_lm("gemma",
                                                                           vocab_size=32000)
    assert generate(llama, stories_tokenizer, "Once", max_new_tokens=3).loop == "lean"
    res = generate(gemma, stories_tokenizer, "Once", max_new_tokens=3, exact_length=True)
    assert res.loop == "transformers" and res.new_tokens == 3
    forced = generate(llama, stories_tokenizer, "Once", max_new_tokens=3, loop="transformers")
    assert forced.loop == "transformers"
    with pytest.raises(LoopError, match="cannot run this model: model type 'gemma'.*"
                                        "use loop='transformers'"):
        pick_loop(gemma, "lean", 8)
    with pytest.raises(LoopError, match="loop='fast': use one of auto, lean, transformers"):
        pick_loop(llama, "fast", 8)
    with pytest.raises(LoopError, match=r"top_p=0: use a probability in \(0, 1\]"):
        generate(llama, stories_tokenizer, "Once", max_new_tokens=3, top_p=0)


def test_generation_settings_the_loop_does_not_apply_go_to_transformers():
    model = tiny_causal_lm("llama", vocab_size=128)
    model.generation_config.repetition_penalty = 1.5
    assert pick_loop(model, "auto", 8) == "transformers"
    with pytest.raises(LoopError, match="generation config sets repetition_penalty=1.5"):
        pick_loop(model, "lean", 8)
    model.generation_config.repetition_penalty = None
    model.generation_config.min_p = 0.1  # a sampling setting: greedy decoding ignores it
    assert pick_loop(model, "auto", 8, sampling=False) == "lean"
    assert pick_loop(model, "auto", 8, sampling=True) == "transformers"


def test_sampling_draws_only_inside_top_p_and_repeats_with_the_seed():
    logits = torch.tensor([4.0, 3.0, 0.0, -1.0, 2.5])
    g = torch.Generator().manual_seed(0)
    draws = {int(pick(logits, 1.0, 0.75, g)) for _ in range(200)}
    p = torch.softmax(logits, -1)  # 0.61, 0.22, … : the top two reach 0.75
    assert p[0] < 0.75 <= p[0] + p[1] and draws == {0, 1}
    assert int(pick(logits, 0.0, 1.0, None)) == 0  # greedy
    a = [int(pick(logits, 2.0, 1.0, torch.Generator().manual_seed(3))) for _ in range(5)]
    assert len(set(a)) == 1  # the same seed, the same draw
    full = {int(pick(logits, 5.0, 1.0, g)) for _ in range(400)}
    assert full == {0, 1, 2, 3, 4}
    top2 = {int(pick(logits, 5.0, 1.0, g, top_k=2)) for _ in range(200)}
    assert top2 == {0, 1}  # the two largest logits
    assert {int(pick(logits, 1.0, 1e-9, g)) for _ in range(20)} == {0}  # the most likely kept


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_greedy_pick_is_the_first_largest_logit_in_every_dtype(dtype):
    logits = torch.randn(49152, generator=torch.Generator().manual_seed(1)).to(dtype)
    top = logits.max()
    logits[[7, 30000, 49151]] = top + 1  # ties: the first index wins, as torch's argmax says
    assert int(pick(logits, 0.0, 1.0, None)) == 7
    logits[7] = top
    assert int(pick(logits, 0.0, 1.0, None)) == 30000
