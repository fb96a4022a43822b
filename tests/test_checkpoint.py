"""Save → load of binarized models: identical logits, transformers loading, refusals, atomicity."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import binllm
import binllm.packed.checkpoint as ckpt
from binllm.engine.binarize import binarize_model
from binllm.packed.checkpoint import (
    CorruptCheckpoint,
    FormatVersionError,
    NotBinllmModel,
    WrongTensorShape,
    load_binarized,
    save_binarized,
)
from binllm.engine.config import QuantizeConfig
from binllm.packed.layers import BinaryLinear, set_kernels
from binllm.methods import METHODS
from binllm.packed.saved_dir import inspect_saved

REPO = Path(__file__).resolve().parents[1]


def tiny_biased_llama(seed: int = 0):
    """One LLaMA layer with odd widths (60, 76: bit streams end mid-byte) and biases."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=60, intermediate_size=76, num_hidden_layers=1,
                      num_attention_heads=6, num_key_value_heads=2, vocab_size=96,
                      max_position_embeddings=64, attention_bias=True)
    return LlamaForCausalLM(cfg).eval()


def quantize(model, method: str, vocab: int, seqlen: int = 16):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (1, seqlen), generator=g) for _ in range(2)]
    return binarize_model(model, QuantizeConfig(method=method), batches)


def logits(model, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module", params=list(METHODS))
def saved(request, tmp_path_factory):
    """(method, in-memory binarized model, report, saved dir) for every registered method."""
    model = tiny_biased_llama()
    report = quantize(model, request.param, 96)
    out = save_binarized(model, report, None, tmp_path_factory.mktemp("saved") / "model")
    return request.param, model, report, out


def test_load_reproduces_the_in_memory_logits(saved):
    _, model, _, out = saved
    loaded = load_binarized(out)  # fast kernels: the in-memory logits to fp32 round-off
    torch.testing.assert_close(logits(loaded, 96), logits(model, 96), rtol=1e-4, atol=1e-5)
    exact = load_binarized(out, kernels=False)  # the dequantize path: bit for bit
    assert torch.equal(logits(exact, 96), logits(model, 96))
    q = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q, BinaryLinear) and q.bias is not None


def test_the_model_in_memory_computes_with_the_stored_codes(saved):
    _, model, report, _ = saved
    assert report.codes
    for path, codes in report.codes.items():  # scales rounded once, after each layer's loop
        assert torch.equal(codes.dequantize(), model.get_submodule(path).weight)


def test_cached_weights_give_the_same_logits(saved):
    _, model, _, out = saved
    assert torch.equal(logits(load_binarized(out, cache_dequantized=True), 96), logits(model, 96))


def test_from_pretrained_loads_through_the_registered_quantizer(saved):
    from transformers import AutoModelForCausalLM

    _, model, _, out = saved
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(hf.model.layers[0].mlp.down_proj, BinaryLinear)
    assert hf.model.layers[0].mlp.down_proj.kernels  # the fast kernels by default
    torch.testing.assert_close(logits(hf, 96), logits(model, 96), rtol=1e-4, atol=1e-5)
    set_kernels(hf, False)
    assert torch.equal(logits(hf, 96), logits(model, 96))


def test_inspect_measures_the_codes_accounting_from_the_files(saved):
    method, _, report, out = saved
    info = inspect_saved(out)
    by_name = {r.name: r for r in report.linears}
    assert info.method == method and {lay.name for lay in info.layers} == set(by_name)
    for lay in info.layers:
        assert lay.stored_bits == lay.codes_bits == by_name[lay.name].stored_bits
        assert lay.paper_bits == pytest.approx(by_name[lay.name].paper_bits)
    assert info.file_bytes < info.fp16_bytes


def test_disk_holds_packed_codes_instead_of_weights(saved):
    _, model, report, out = saved
    stored = load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    for name in report.codes:
        assert f"{name}.weight" not in stored
        assert (f"{name}.bias" in stored) == (model.get_submodule(name).bias is not None)
        assert set(config["layers"][name]) == {"format", "shape", "params"}
    assert config["quant_method"] == "binllm" and config["format_version"] == 1
    assert "lm_head" in config["modules_to_not_convert"]


# -- stories260K -----------------------------------------------------------------------------
def _stories_round_trip(stories_path, stories_tokenizer, method, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_path)
    report = quantize(model, method, 512, seqlen=32)
    out = save_binarized(model, report, stories_tokenizer, tmp_path / "stories")
    loaded = binllm.load(out)
    torch.testing.assert_close(logits(loaded, 512), logits(model, 512), rtol=1e-4, atol=1e-4)
    set_kernels(loaded, False)
    assert torch.equal(logits(loaded, 512), logits(model, 512))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied, stored once
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert (out / "tokenizer.json").is_file() and (out / "binllm_report.json").is_file()


def test_stories260k_round_trip(stories_path, stories_tokenizer, tmp_path):
    _stories_round_trip(stories_path, stories_tokenizer, "rtn-sign", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in METHODS if m != "rtn-sign"])
def test_stories260k_round_trip_every_method(stories_path, stories_tokenizer, method, tmp_path):
    _stories_round_trip(stories_path, stories_tokenizer, method, tmp_path)


# -- import hook ------------------------------------------------------------------------------
@pytest.mark.slow
def test_import_is_light_and_registers_when_transformers_loads(tmp_path):
    model = tiny_biased_llama()
    out = save_binarized(model, quantize(model, "rtn-sign", 96), None, tmp_path / "m")
    code = """
import sys
import binllm
assert "transformers" not in sys.modules and "torch" not in sys.modules
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(type(m.model.layers[0].self_attn.q_proj).__name__)
"""
    res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                         cwd=REPO, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("BinaryLinear")


def test_install_registers_at_once_when_transformers_is_already_loaded():
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    from binllm.packed.hf_hook import RegisterOnImport, install

    install()  # idempotent: registers (again) right away, adds no finder
    assert AUTO_QUANTIZER_MAPPING["binllm"].__name__ == "BinllmHfQuantizer"
    assert not any(isinstance(f, RegisterOnImport) for f in sys.meta_path)


# -- refusals ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rtn_dir(tmp_path_factory):
    model = tiny_biased_llama()
    return save_binarized(model, quantize(model, "rtn-sign", 96), None,
                          tmp_path_factory.mktemp("rtn") / "model")


@pytest.fixture
def copy_dir(rtn_dir, tmp_path):
    return Path(shutil.copytree(rtn_dir, tmp_path / "copy"))


def _edit_config(d: Path, edit) -> None:
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _rewrite_shard(d: Path, edit) -> None:
    """Rewrite model.safetensors with `edit(tensors)` and record its honest size and hash."""
    f = d / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt", "binllm_format_version": "1"})
    _edit_config(d, lambda c: c["quantization_config"]["files"].update(
        {f.name: {"bytes": f.stat().st_size, "sha256": ckpt.sha256_file(f)}}))


def test_a_directory_without_a_model_is_refused(tmp_path):
    with pytest.raises(NotBinllmModel, match="no config.json"):
        load_binarized(tmp_path)


def test_an_ordinary_model_directory_is_refused(stories_path):
    with pytest.raises(NotBinllmModel, match="not a binllm model.*binllm quantize"):
        load_binarized(stories_path)


def test_an_unknown_format_version_is_refused(copy_dir):
    _edit_config(copy_dir, lambda c: c["quantization_config"].update(format_version=99))
    with pytest.raises(FormatVersionError, match="format_version 99.*upgrade binllm"):
        load_binarized(copy_dir)


def test_a_truncated_shard_is_refused(copy_dir):
    f = copy_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        load_binarized(copy_dir)
    # even when config.json is edited to match, the safetensors header gives it away
    _edit_config(copy_dir, lambda c: c["quantization_config"]["files"]["model.safetensors"]
                 .update(bytes=f.stat().st_size))
    with pytest.raises(CorruptCheckpoint, match="header needs"):
        load_binarized(copy_dir, verify=False)


def test_corrupt_data_fails_the_checksum(copy_dir):
    f = copy_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="checksum"):
        load_binarized(copy_dir)


def test_a_damaged_header_is_refused(copy_dir):
    f = copy_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:20] = b"\x00" * 10
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="header is damaged"):
        load_binarized(copy_dir, verify=False)


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.q_proj.alpha",
                                 "model.layers.0.mlp.down_proj.signs0", "model.norm.weight"])
def test_a_tensor_of_the_wrong_shape_is_refused(copy_dir, key):
    _rewrite_shard(copy_dir, lambda t: t.update({key: torch.cat([t[key], t[key][:1]])}))
    with pytest.raises(WrongTensorShape, match=f"tensor {key} is"):
        load_binarized(copy_dir)


def test_a_layout_that_disagrees_with_the_file_is_refused(copy_dir):
    def edit(c):
        c["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"]["params"]["block_size"] = 8

    _edit_config(copy_dir, edit)
    with pytest.raises(CorruptCheckpoint, match="quantization_config.layers differs"):
        load_binarized(copy_dir)  # the layouts digest recorded in the shard
    _rewrite_shard(copy_dir, lambda t: None)  # as saved before the digest: none recorded
    with pytest.raises(WrongTensorShape, match="up_proj.alpha"):
        load_binarized(copy_dir)


def test_only_safetensors_are_read_never_pickle(copy_dir, monkeypatch):
    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_pickle)
    torch.save({"x": torch.zeros(1)}, copy_dir / "pytorch_model.bin")
    load_binarized(copy_dir)
    (copy_dir / "model.safetensors").unlink()
    with pytest.raises(CorruptCheckpoint, match="model.safetensors is missing"):
        load_binarized(copy_dir)


# -- writing ----------------------------------------------------------------------------------
def test_sharded_save_loads_with_both_loaders(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_biased_llama()
    report = quantize(model, "rtn-sign", 96)
    out = save_binarized(model, report, None, tmp_path / "sharded", max_shard_bytes=8_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert torch.equal(logits(load_binarized(out, kernels=False), 96), logits(model, 96))
    hf = AutoModelForCausalLM.from_pretrained(out)
    set_kernels(hf, False)
    assert torch.equal(logits(hf, 96), logits(model, 96))


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, OSError])
def test_an_interrupted_save_leaves_no_complete_looking_directory(tmp_path, monkeypatch, interrupt):
    model = tiny_biased_llama()
    report = quantize(model, "rtn-sign", 96)
    real = ckpt._write_json

    def failing(path, obj):
        real(path, obj) if path.name != "config.json" else None
        raise interrupt("disk full")

    monkeypatch.setattr(ckpt, "_write_json", failing)
    with pytest.raises(interrupt):
        save_binarized(model, report, None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary directory


def test_a_failed_overwrite_keeps_the_previous_model(copy_dir, monkeypatch):
    model = tiny_biased_llama(seed=1)
    report = quantize(model, "rtn-sign", 96)
    before = sorted(os.listdir(copy_dir))
    monkeypatch.setattr(ckpt, "_write_shards", lambda *a: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        save_binarized(model, report, None, copy_dir, overwrite=True)
    assert sorted(os.listdir(copy_dir)) == before
    load_binarized(copy_dir)


def test_an_existing_directory_needs_overwrite(copy_dir):
    model = tiny_biased_llama(seed=2)
    report = quantize(model, "rtn-sign", 96)
    with pytest.raises(FileExistsError, match="not empty"):
        save_binarized(model, report, None, copy_dir)
    save_binarized(model, report, None, copy_dir, overwrite=True)
    assert torch.equal(logits(load_binarized(copy_dir, kernels=False), 96), logits(model, 96))
    assert [p.name for p in copy_dir.parent.iterdir()] == ["copy"]


def test_a_report_without_codes_is_refused(tmp_path):
    model = tiny_biased_llama()
    g = torch.Generator().manual_seed(0)
    report = binarize_model(model, QuantizeConfig(method="rtn-sign"),
                            [torch.randint(0, 96, (1, 8), generator=g)], keep_codes=False)
    with pytest.raises(ValueError, match="keep_codes=True"):
        save_binarized(model, report, None, tmp_path / "out")


def test_dtype_casts_the_unchanged_tensors_and_keeps_the_codes(rtn_dir):
    ref = load_binarized(rtn_dir)
    half = load_binarized(rtn_dir, dtype=torch.bfloat16, verify=False)
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    q, q_ref = half.model.layers[0].self_attn.q_proj, ref.model.layers[0].self_attn.q_proj
    assert q.alpha.dtype == torch.float16 and torch.equal(q.dequantize(), q_ref.dequantize())


def test_the_skeleton_never_materialises_parameters():
    from torch import nn

    original = nn.Module.register_parameter
    with ckpt.parameters_on_meta():
        layer = nn.Linear(4096, 4096)
        norm = nn.BatchNorm1d(8)
    assert layer.weight.is_meta and layer.bias.is_meta and norm.weight.is_meta
    assert not norm.running_mean.is_meta  # buffers stay real (rotary inv_freq is not saved)
    assert nn.Module.register_parameter is original
