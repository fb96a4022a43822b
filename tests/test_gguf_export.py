"""binllm export --format gguf: Q1_0 tensors bit for bit, llama metadata, refusals, llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import binllm
from binllm.engine.binarize import binarize_model
from binllm.packed.checkpoint import save_binarized
from binllm.engine.config import QuantizeConfig
from binllm.packed.layers import BinaryLinear

gguf = pytest.importorskip("gguf")
from binllm.export.gguf_export import ExportError, export_gguf, q1_0_problem  # noqa: E402


def tiny_q1_0(tokenizer, method="q1_0", hidden=128, ff=256, tie=False, **method_args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ff, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                      max_position_embeddings=128, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 512, (1, 16), generator=g) for _ in range(2)]
    report = binarize_model(model, QuantizeConfig(method=method, method_args=method_args),
                            batches)
    return model, report


@pytest.fixture(scope="module")
def exported(stories_tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    model, report = tiny_q1_0(stories_tokenizer)
    out = save_binarized(model, report, stories_tokenizer, tmp / "q1")
    return out, export_gguf(out, tmp / "q1.gguf")


def decode_q1_0(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Independent Q1_0 decoder, as ggml-quants.c dequantize_row_q1_0: per 18-byte block an fp16
    d, then 16 bytes, weight j = bit j % 8 of byte j / 8, 1 → +d, 0 → −d."""
    blocks = np.asarray(data, dtype=np.uint8).reshape(rows, cols // 128, 18)
    d = blocks[:, :, :2].copy().view("<f2")[..., 0].astype(np.float32)  # (rows, nblk)
    bits = np.unpackbits(blocks[:, :, 2:], axis=2, bitorder="little")  # (rows, nblk, 128)
    return np.where(bits == 1, d[..., None], -d[..., None]).reshape(rows, cols)


def hf_permute(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute, written with torch ops."""
    rows = W.shape[0]
    return W.reshape(n_head, 2, rows // n_head // 2, *W.shape[1:]).transpose(1, 2).reshape(W.shape)


def test_every_tensor_round_trips_bit_for_bit(exported):
    out, report = exported
    model = binllm.load(out)
    reader = gguf.GGUFReader(str(report.path))
    by_name = {t.name: t for t in reader.tensors}
    assert report.count("Q1_0") == 7 and report.count("F16") == 0  # every decoder linear
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1)
    params = dict(model.named_parameters())
    checked = set()
    for name, mod in model.named_modules():
        if isinstance(mod, BinaryLinear):
            t = by_name[names.get_name(f"{name}.weight", try_suffixes=(".weight",))]
            assert t.tensor_type == gguf.GGMLQuantizationType.Q1_0
            W = torch.from_numpy(decode_q1_0(t.data, mod.out_features, mod.in_features))
            expect = mod.dequantize()
            if name.endswith("q_proj"):
                expect = hf_permute(expect, 4)
            elif name.endswith("k_proj"):
                expect = hf_permute(expect, 2)
            assert torch.equal(W, expect), name
            checked.add(t.name)
    for key, p in params.items():
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname in by_name:
            t = by_name[gname]
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            assert torch.equal(torch.from_numpy(np.array(t.data)).reshape(p.shape), p), key
            checked.add(gname)
    assert checked == set(by_name)  # nothing unchecked, nothing extra


def test_llama_metadata_and_the_sentencepiece_vocabulary(exported, stories_path):
    spm = pytest.importorskip("sentencepiece")
    _, report = exported
    reader = gguf.GGUFReader(str(report.path))

    def value(key):
        f = reader.fields[key]
        return f.contents()

    assert value("general.architecture") == "llama"
    assert value("llama.block_count") == 1 and value("llama.embedding_length") == 128
    assert value("llama.attention.head_count") == 4
    assert value("llama.attention.head_count_kv") == 2
    assert value("llama.feed_forward_length") == 256
    assert value("llama.rope.freq_base") == 10000.0  # transformers 5: in rope_parameters
    assert value("llama.context_length") == 128 and value("llama.rope.dimension_count") == 32
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_Q1_0
    sp = spm.SentencePieceProcessor(model_file=str(stories_path / "tokenizer.model"))
    # the saved directory has only tokenizer.json: its derived scores are the original's
    assert value("tokenizer.ggml.model") == "llama"
    assert value("tokenizer.ggml.tokens") == [sp.id_to_piece(i) for i in range(512)]
    assert value("tokenizer.ggml.scores") == pytest.approx([sp.get_score(i) for i in range(512)])
    types = value("tokenizer.ggml.token_type")
    assert types[0] == 2 and types[1] == types[2] == 3 and types[3] == 6 and types[300] == 1
    assert value("tokenizer.ggml.bos_token_id") == 1 and value("tokenizer.ggml.eos_token_id") == 2


def test_codes_q1_0_cannot_express_are_refused(stories_tokenizer, tmp_path):
    from packed_codes import HAND_BUILT

    from binllm.packed.layout import pack

    for kind, make in HAND_BUILT.items():
        layout, _ = pack(make())
        assert q1_0_problem(layout) is not None, kind
    model, report = tiny_q1_0(stories_tokenizer, method="billm")
    out = save_binarized(model, report, stories_tokenizer, tmp_path / "billm")
    with pytest.raises(ExportError, match="billm codes have salient columns and group bitmaps"
                       ".*Q1_0 needs .*--method q1_0"):
        export_gguf(out, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))


@pytest.mark.parametrize("change, message", [
    ({"model_type": "qwen2"}, "llama architecture; this model is 'qwen2'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}},
     "rope type 'llama3'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'")])
def test_configs_llama_cpp_would_run_differently_are_refused(exported, tmp_path, change,
                                                             message):
    import json
    import shutil

    out, _ = exported
    copy = tmp_path / "m"
    shutil.copytree(out, copy)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ExportError, match=message):
        export_gguf(copy, tmp_path / "m.gguf")


def test_cli_refuses_a_mean_with_the_layout_needed(stories_tokenizer, tmp_path, capsys):
    from binllm.cli import main

    model, report = tiny_q1_0(stories_tokenizer, method="block-sign", refine_iters=0)
    out = save_binarized(model, report, stories_tokenizer, tmp_path / "bs")
    assert main(["export", str(out), str(tmp_path / "bs.gguf")]) == 2
    err = capsys.readouterr().err
    assert "a row mean μ per block" in err and "--method q1_0" in err


def test_rows_that_are_not_whole_q1_0_blocks_go_as_exact_f16(stories_tokenizer, tmp_path):
    model, report = tiny_q1_0(stories_tokenizer, hidden=64, ff=128, tie=True, refine_iters=0)
    out = save_binarized(model, report, stories_tokenizer, tmp_path / "odd")
    rep = export_gguf(out, tmp_path / "odd.gguf")
    kinds = {t.source: (t.type, t.note) for t in rep.tensors}
    assert kinds["model.layers.0.mlp.down_proj.weight"][0] == "Q1_0"  # 128 columns
    assert kinds["model.layers.0.mlp.up_proj.weight"][0] == "F16"
    assert "not a multiple of 128" in kinds["model.layers.0.mlp.up_proj.weight"][1]
    reader = gguf.GGUFReader(str(tmp_path / "odd.gguf"))
    t = {t.name: t for t in reader.tensors}["blk.0.ffn_up.weight"]
    up = binllm.load(out).model.layers[0].mlp.up_proj
    assert torch.equal(torch.from_numpy(np.array(t.data).astype(np.float32)), up.dequantize())
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reuses embd


# -- llama.cpp itself (optional: llama-cpp-python compiles from source) -------------------------
def llama_cpp_logits(path, ids):
    """llama.cpp's logits of `ids` (and the Llama), on ggml's plain CPU kernels
    (`binllm.export.llama_runtime.llama_cpp_model`)."""
    pytest.importorskip("llama_cpp")
    from binllm.export.llama_runtime import llama_cpp_model

    llm = llama_cpp_model(path, n_ctx=128, logits_all=True, n_threads=2)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)]), llm


IDS = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 45, 99]


def test_llama_cpp_runs_the_q1_0_file_like_binllm(exported):
    out, report = exported
    got, _ = llama_cpp_logits(report.path, IDS)
    with torch.no_grad():
        ref = binllm.load(out)(torch.tensor([IDS])).logits[0].numpy()
    # ggml's Q1_0 dot quantizes activations to 8 bits (Q8_0): measured 0.8 % here
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.03
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_llama_cpp_on_stories260k_quantized_with_q1_0(stories_path, stories_tokenizer, tmp_path):
    pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_path)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 512, (1, 32), generator=g) for _ in range(2)]
    report = binarize_model(model, QuantizeConfig(method="q1_0"), batches)
    out = save_binarized(model, report, stories_tokenizer, tmp_path / "s")
    path = export_gguf(out, tmp_path / "s.gguf").path
    got, llm = llama_cpp_logits(path, IDS)
    with torch.no_grad():
        ref = binllm.load(out)(torch.tensor([IDS])).logits[0].numpy()
    # every stories260K linear is 64 or 172 wide: exact F16, which ggml multiplies in fp16
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    text = "Once upon a time, there was a little girl named Lily. She loved to play."
    assert llm.tokenize(text.encode()) == stories_tokenizer(text).input_ids
