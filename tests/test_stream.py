"""Layer streaming (binllm.engine.stream): a checkpoint saved in several shards, binarized with
its decoder layers read one at a time, gives the codes and the directory of the in-memory
path; a damaged checkpoint is refused in one line with nothing complete-looking written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import binllm
from binllm import QuantizeConfig
from binllm.cli import main
from binllm.engine.binarize import binarize_model
from binllm.engine.journal import LayerJournal, run_identity
from binllm.engine.stream import (BadCheckpoint, SafetensorsCheckpoint, binarize_streaming,
                                  open_streaming)
from binllm.packed.checkpoint import save_binarized
from binllm.packed.layers import BinaryLinear
from conftest import random_windows, tiny_causal_lm

VOCAB = 256
WINDOWS = random_windows(3, 32, vocab=VOCAB)  # calibration windows (read only)




def _save_sharded(model, path: Path) -> Path:
    model.save_pretrained(path, max_shard_size="60KB")
    assert len(list(path.glob("model-*.safetensors"))) >= 3, "the fixture must be sharded"
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A 3-layer bf16 LLaMA with an untied lm_head, saved in several shards."""
    model = tiny_causal_lm("llama", num_hidden_layers=3, tie_word_embeddings=False)
    return _save_sharded(model.to(torch.bfloat16), tmp_path_factory.mktemp("ckpt") / "llama")


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def _in_memory(ckpt: Path, method: str, out: Path):
    """(saved dir, the dense fake-quantized model) of the in-memory path."""
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    report = binarize_model(model, QuantizeConfig(method), WINDOWS)
    return save_binarized(model, report, None, out, max_shard_bytes=40_000), model


@pytest.mark.parametrize("method", ["billm", "gptq", "rtn-sign", "arb-llm-x"])
def test_streamed_equals_in_memory(sharded, tmp_path, method):
    memory, dense = _in_memory(sharded, method, tmp_path / "memory")
    model, ckpt = open_streaming(sharded)
    assert model.model.layers[1].mlp.up_proj.weight.is_meta  # the skeleton holds no layer
    streamed = tmp_path / "streamed"
    binarize_streaming(model, ckpt, QuantizeConfig(method), WINDOWS, out=streamed,
                       max_shard_bytes=40_000)
    a, b = _tensors(memory), _tensors(streamed)
    assert a.keys() == b.keys() and len(list(streamed.glob("model-*"))) > 1
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    qa, qb = (json.loads((d / "config.json").read_text())["quantization_config"]
              for d in (memory, streamed))
    assert qa == qb  # layouts, and every shard's bytes and sha256: the files are identical
    assert torch.equal(_logits(binllm.load(streamed)), _logits(binllm.load(memory)))
    exact = _logits(binllm.load(streamed, kernels=False))
    assert torch.equal(exact, _logits(dense))   # the in-memory path's fake-quantized model
    assert torch.equal(exact, _logits(model))   # the packed layers streaming kept in memory


def test_only_one_layer_is_read_at_a_time_and_dense_weights_are_dropped(sharded, monkeypatch):
    model, ckpt = open_streaming(sharded)
    reads = []
    real = SafetensorsCheckpoint.read
    monkeypatch.setattr(SafetensorsCheckpoint, "read",
                        lambda self, keys: reads.append(list(keys)) or real(self, keys))
    binarize_streaming(model, ckpt, QuantizeConfig("rtn-sign"), WINDOWS, keep_packed=False)
    assert [{k.split(".")[2] for k in keys} for keys in reads] == [{"0"}, {"1"}, {"2"}]
    assert all(p.is_meta for p in model.model.layers.parameters())
    assert all(b.is_meta for b in model.model.layers.buffers())
    # the embeddings, final norm and lm_head were dropped once layer 0's inputs existed, and
    # nobody asked for them back (no writer, keep_packed=False): nothing else was read
    assert all(p.is_meta for p in model.parameters())


def test_outside_tensors_are_not_held_while_layers_are_solved(sharded, monkeypatch):
    """Embeddings, final norm and lm_head are on meta from layer 0 on, read back at the end."""
    import binllm.engine.binarize as engine

    model, ckpt = open_streaming(sharded)
    seen = []
    real = engine._quantize_linear
    monkeypatch.setattr(engine, "_quantize_linear", lambda *a, **k: seen.append(
        [p.is_meta for p in (model.model.embed_tokens.weight, model.model.norm.weight,
                             model.lm_head.weight)]) or real(*a, **k))
    binarize_streaming(model, ckpt, QuantizeConfig("rtn-sign"), WINDOWS)
    assert seen and all(all(s) for s in seen)
    assert not any(p.is_meta for p in model.parameters())  # keep_packed: read back


def test_tail_read_only_at_the_end_gives_the_same_files_and_model(sharded, tmp_path):
    """open_streaming(tail=False) (the CLI without --compare-fp): the final norm and lm_head
    stay on meta until binarize_streaming reads them back; same files, same logits."""
    full, ckpt = open_streaming(sharded)
    binarize_streaming(full, ckpt, QuantizeConfig("rtn-sign"), WINDOWS, out=tmp_path / "a",
                       max_shard_bytes=40_000)
    lazy, ckpt = open_streaming(sharded, tail=False)
    assert lazy.lm_head.weight.is_meta and lazy.model.norm.weight.is_meta
    assert not lazy.model.embed_tokens.weight.is_meta
    binarize_streaming(lazy, ckpt, QuantizeConfig("rtn-sign"), WINDOWS, out=tmp_path / "b",
                       max_shard_bytes=40_000)
    a, b = (sorted((tmp_path / d).glob("*.safetensors")) for d in "ab")
    assert [f.name for f in a] == [f.name for f in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert torch.equal(_logits(lazy), _logits(full))


def test_a_tail_of_same_shaped_tensors_is_written_whole(tmp_path):
    """Phi's final LayerNorm (weight and bias, both (hidden,)) comes after the layers: with
    tail=False it is on meta at the start, where every tensor's storage is 0, so the tail is
    listed for the writer only once read back; the files equal those of tail=True."""
    import transformers

    cfg = transformers.PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, vocab_size=VOCAB,
                                 max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.PhiForCausalLM(cfg).save_pretrained(tmp_path / "phi")
    for tail, out in ((True, "a"), (False, "b")):
        model, ckpt = open_streaming(tmp_path / "phi", tail=tail)
        binarize_streaming(model, ckpt, QuantizeConfig("rtn-sign"), WINDOWS, out=tmp_path / out)
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert "model.final_layernorm.bias" in b and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_with_other_key_names_is_not_streamed(tmp_path):
    """GPT-NeoX stores its head as embed_out.weight, which transformers' loader renames to
    lm_head.weight: a missing parameter beside a key the model has not is another naming, not
    an incomplete checkpoint, so the model is loaded whole (NotStreamable), not refused."""
    from binllm.engine.stream import NotStreamable

    tiny_causal_lm("gpt_neox", tie_word_embeddings=False).save_pretrained(tmp_path / "neox")
    with pytest.raises(NotStreamable, match="lm_head.weight is stored under another name"):
        open_streaming(tmp_path / "neox")


def test_kept_layers_are_packed(sharded):
    model, ckpt = open_streaming(sharded)
    binarize_streaming(model, ckpt, QuantizeConfig("billm"), WINDOWS)
    mods = list(model.model.layers.modules())
    assert not any(isinstance(m, torch.nn.Linear) for m in mods)
    assert sum(isinstance(m, BinaryLinear) for m in mods) == 3 * 7
    assert not any(p.is_meta for p in model.parameters())


def test_biased_family_streams_to_the_same_tensors(tmp_path):
    """Qwen2 (q/k/v biases, tied embeddings): same stored tensors as the in-memory path."""
    model = tiny_causal_lm("qwen2", num_hidden_layers=3, tie_word_embeddings=True)
    path = _save_sharded(model, tmp_path / "qwen2")
    memory, _ = _in_memory(path, "billm", tmp_path / "memory")
    model, ckpt = open_streaming(path)
    binarize_streaming(model, ckpt, QuantizeConfig("billm"), WINDOWS, out=tmp_path / "s")
    a, b = _tensors(memory), _tensors(tmp_path / "s")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "lm_head.weight" not in b  # tied: stored once, as the embeddings
    assert torch.equal(_logits(binllm.load(tmp_path / "s")), _logits(binllm.load(memory)))


def test_resume_with_streaming_equals_an_uninterrupted_run(sharded, tmp_path):
    config, calib = QuantizeConfig("billm"), WINDOWS
    model, ckpt = open_streaming(sharded)
    binarize_streaming(model, ckpt, config, calib, out=tmp_path / "full")

    class Crash(RuntimeError):
        pass

    def crash(done, total):
        if done == 2:
            raise Crash

    model, ckpt = open_streaming(sharded)
    journal = LayerJournal(tmp_path / "j", run_identity(model, config, calib))
    with pytest.raises(Crash):
        binarize_streaming(model, ckpt, config, calib, out=tmp_path / "out", journal=journal,
                           on_layer=crash)
    assert not (tmp_path / "out").exists() and journal.layers_done() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "j"]  # no temporary left
    model, ckpt = open_streaming(sharded)
    journal = LayerJournal(tmp_path / "j", run_identity(model, config, calib))
    binarize_streaming(model, ckpt, config, calib, out=tmp_path / "out", journal=journal)
    a, b = _tensors(tmp_path / "full"), _tensors(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the command line: streaming by default, --no-stream for the old path ----------------------
def _quantize(ckpt, out, *extra) -> int:
    return main(["-q", "quantize", str(ckpt), "--method", "rtn-sign", "--calib", "tinystories",
                 "--nsamples", "2", "--seqlen", "64", "--eval", "tinystories", "--max-windows",
                 "2", "--out", str(out), *map(str, extra)])


def test_cli_streams_stories260k_like_the_in_memory_path(stories_path, tmp_path, capsys):
    assert _quantize(stories_path, tmp_path / "s", "--report", tmp_path / "s.json") == 0
    streamed_out = capsys.readouterr().out
    assert _quantize(stories_path, tmp_path / "m", "--no-stream") == 0
    memory_out = capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["streamed"] is True
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == \
        (tmp_path / "m" / "model.safetensors").read_bytes()
    table = [line for line in streamed_out.splitlines() if "tinystories" in line]
    assert table and table == [line for line in memory_out.splitlines() if "tinystories" in line]


def _copy(sharded: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(sharded, tmp_path / "ckpt"))


def _refused(ckpt: Path, tmp_path: Path, capsys, *needles: str) -> None:
    assert _quantize(ckpt, tmp_path / "out", "--eval", "") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("binllm: error:"), err
    for needle in needles:
        assert needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no out, no temporary


def test_index_naming_a_missing_shard(sharded, tmp_path, capsys):
    ckpt = _copy(sharded, tmp_path)
    victim = sorted(ckpt.glob("model-*.safetensors"))[1]
    victim.unlink()
    _refused(ckpt, tmp_path, capsys, victim.name, "copy the whole checkpoint")


def test_truncated_shard(sharded, tmp_path, capsys):
    ckpt = _copy(sharded, tmp_path)
    victim = sorted(ckpt.glob("model-*.safetensors"))[-1]
    victim.write_bytes(victim.read_bytes()[:-100])
    _refused(ckpt, tmp_path, capsys, victim.name, "truncated")


def test_layer_key_in_no_shard(sharded, tmp_path, capsys):
    ckpt = _copy(sharded, tmp_path)
    key = "model.layers.1.mlp.down_proj.weight"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = ckpt / index["weight_map"].pop(key)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(ckpt, tmp_path, capsys, key, "in no shard")
    with pytest.raises(BadCheckpoint, match="in no shard"):
        open_streaming(ckpt)
