"""binllm.safetensors_io: the one safetensors reader, against hand-built malformed files.

Each malformed header is refused with the file and (where one is at fault) the tensor named;
a well-formed file reads exactly what safetensors itself reads; names from an index are
checked as names (a symlinked shard, as in a Hugging Face cache snapshot, is accepted).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from binllm import safetensors_io
from binllm.errors import BinllmError
from binllm.safetensors_io import (DTYPES, INDEX_FILE, MAX_HEADER_BYTES, SafetensorsError,
                                   check_name, dtype_code, open_checkpoint, read_header,
                                   read_tensors, torch_dtype)


def _write(path: Path, header: dict, data: bytes, length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _two(a: list[int], b: list[int], *, data: int = 32, dtype: str = "F32",
         shape_a=(4,), shape_b=(4,)) -> dict:
    return {"__metadata__": {"format": "pt"},
            "a": {"dtype": dtype, "shape": list(shape_a), "data_offsets": a},
            "b": {"dtype": "F32", "shape": list(shape_b), "data_offsets": b}}


def _refused(path: Path, *needles: str) -> str:
    with pytest.raises(SafetensorsError) as e:
        read_header(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_the_error_is_a_binllm_error():
    assert issubclass(SafetensorsError, BinllmError) and issubclass(SafetensorsError, ValueError)


def test_a_well_formed_file_reads_what_safetensors_reads(tmp_path):
    tensors = {"w": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int16),
               "h": torch.randn(2, 2).to(torch.bfloat16), "m": torch.tensor([True, False]),
               "e": torch.empty(0, 4)}
    f = tmp_path / "x.safetensors"
    save_file(tensors, str(f), metadata={"k": "v"})
    header = read_header(f)
    assert header.metadata == {"k": "v"} and header.size == f.stat().st_size
    assert set(header.tensors) == set(tensors)
    got, want = read_tensors(f, header.tensors), load_file(str(f))
    for k in tensors:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])


def test_the_dtype_table_agrees_with_torch_and_safetensors(tmp_path):
    for code, d in DTYPES.items():
        t = getattr(torch, d.torch_name, None)
        if t is None:
            continue
        assert t.itemsize == d.itemsize and dtype_code(t) == code and torch_dtype(code) == t
    stored = {str(dt): torch.zeros(2, dtype=dt) for dt in
              (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}
    f = tmp_path / "all.safetensors"
    save_file(stored, str(f))
    for key, entry in read_header(f).tensors.items():
        assert entry.dtype == dtype_code(stored[key].dtype)


def test_overlapping_offsets_are_refused_naming_the_tensor(tmp_path):
    f = _write(tmp_path / "o.safetensors", _two([0, 16], [8, 24]), bytes(24))
    _refused(f, "tensor b has an invalid offset", "overlap those of a")


def test_a_gap_between_tensors_is_refused(tmp_path):
    f = _write(tmp_path / "g.safetensors", _two([0, 16], [20, 36]), bytes(36))
    _refused(f, "tensor b has an invalid offset", "[16, 20)", "belong to no tensor")


def test_offsets_past_the_end_of_the_file_are_refused_as_truncated(tmp_path):
    f = _write(tmp_path / "t.safetensors", _two([0, 16], [16, 32]), bytes(20))
    _refused(f, "is truncated", "header needs 32", "up to the end of b")


def test_bytes_after_the_last_tensor_are_refused(tmp_path):
    f = _write(tmp_path / "l.safetensors", _two([0, 16], [16, 32]), bytes(40))
    _refused(f, "the last 8 bytes belong to no tensor")


def test_an_unknown_dtype_is_refused(tmp_path):
    f = _write(tmp_path / "d.safetensors", _two([0, 16], [16, 32], dtype="Q9"), bytes(32))
    _refused(f, "tensor a has dtype 'Q9'")


@pytest.mark.parametrize("shape", [(5,), (2, 3), ()])
def test_shape_times_dtype_size_must_be_the_byte_length(tmp_path, shape):
    f = _write(tmp_path / "s.safetensors", _two([0, 16], [16, 32], shape_a=shape), bytes(32))
    _refused(f, "tensor a is F32", "hold 16")


@pytest.mark.parametrize("entry", [{"dtype": "F32", "shape": [4]},
                                   {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]},
                                   {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]},
                                   {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
                                   "not an object"])
def test_a_damaged_entry_is_refused(tmp_path, entry):
    f = _write(tmp_path / "e.safetensors", {"a": entry}, bytes(16))
    _refused(f, "header entry of tensor a is damaged")


@pytest.mark.parametrize("length", [0, 1, 2**63, MAX_HEADER_BYTES + 1, 10**6])
def test_an_absurd_header_length_is_refused(tmp_path, length):
    f = _write(tmp_path / "n.safetensors", _two([0, 16], [16, 32]), bytes(32), length=length)
    _refused(f, "is not a safetensors file", "bad header length")


def test_a_file_shorter_than_the_length_field_is_refused(tmp_path):
    f = tmp_path / "short.safetensors"
    f.write_bytes(b"\x01\x02")
    _refused(f, "bad header length missing")


@pytest.mark.parametrize("raw", [b"not json at all!", b"[1, 2, 3]       ", b'{"a": 1, "a": 2}',
                                 b"\xff\xfe{}    "])
def test_a_header_that_is_not_a_json_object_is_refused(tmp_path, raw):
    f = tmp_path / "j.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw)
    _refused(f, "safetensors header is damaged")


def test_metadata_must_be_strings(tmp_path):
    header = {**_two([0, 16], [16, 32]), "__metadata__": {"x": 1}}
    _refused(_write(tmp_path / "m.safetensors", header, bytes(32)), "__metadata__")


# -- names ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x.safetensors", "/abs/x.safetensors", "a/../../b",
                                  "a/..", "..", "C:\\x.safetensors", "..\\x", ""])
def test_names_leaving_the_directory_are_refused(name):
    with pytest.raises(SafetensorsError, match="points outside the model directory|not a file"):
        check_name(name, "index.json")


def test_a_subdirectory_is_a_name_only_where_plain_names_are_not_required():
    assert check_name("sub/x.safetensors", "index.json") == "sub/x.safetensors"
    with pytest.raises(SafetensorsError, match="not a file directly in the model directory"):
        check_name("sub/x.safetensors", "config.json", plain=True)


def _sharded(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    save_file({"a": torch.ones(2)}, str(d / "one.safetensors"))
    save_file({"b": torch.zeros(3)}, str(d / "two.safetensors"))
    _index(d, {"a": "one.safetensors", "b": "two.safetensors"})
    return d


def _index(d: Path, weight_map: dict) -> None:
    (d / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_an_index_is_resolved_with_every_header_checked(tmp_path):
    ckpt = open_checkpoint(_sharded(tmp_path))
    assert {k: f for k, (f, _) in ckpt.entries.items()} == {"a": "one.safetensors",
                                                             "b": "two.safetensors"}
    assert ckpt.total_bytes == sum(f.stat().st_size for f in ckpt.path.glob("*.safetensors"))


@pytest.mark.parametrize("name", ["../outside/two.safetensors", "/tmp/two.safetensors",
                                  "sub/../../outside/two.safetensors"])
def test_an_index_naming_a_file_outside_is_refused_before_it_is_opened(tmp_path, name,
                                                                       monkeypatch):
    d = _sharded(tmp_path)
    (tmp_path / "outside").mkdir()
    os.replace(d / "two.safetensors", tmp_path / "outside" / "two.safetensors")
    _index(d, {"a": "one.safetensors", "b": name})
    opened = []
    monkeypatch.setattr(safetensors_io, "read_header",
                        lambda p, e=SafetensorsError: opened.append(p) or read_header(p, e))
    with pytest.raises(SafetensorsError, match="points outside the model directory"):
        open_checkpoint(d)
    assert opened == []


def test_symlinked_shards_of_a_cache_snapshot_are_read(tmp_path):
    """The Hugging Face cache: snapshots/<rev>/x.safetensors -> ../../blobs/<hash>."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snap.mkdir(parents=True)
    save_file({"a": torch.ones(2)}, str(blobs / "h1"))
    save_file({"b": torch.zeros(3)}, str(blobs / "h2"))
    (snap / "one.safetensors").symlink_to("../../blobs/h1")
    (snap / "two.safetensors").symlink_to("../../blobs/h2")
    _index(snap, {"a": "one.safetensors", "b": "two.safetensors"})
    ckpt = open_checkpoint(snap)
    header = ckpt.headers["two.safetensors"]
    assert read_tensors(header.path, header.tensors)["b"].tolist() == [0, 0, 0]


def test_a_key_in_two_shards_or_in_another_shard_than_the_index_says_is_refused(tmp_path):
    d = _sharded(tmp_path)
    _index(d, {"a": "two.safetensors", "b": "two.safetensors"})
    with pytest.raises(SafetensorsError, match="puts a in two.safetensors"):
        open_checkpoint(d)
    _index(d, {"a": "one.safetensors", "b": "two.safetensors"})
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(d / "two.safetensors"))
    with pytest.raises(SafetensorsError, match="tensor a is stored twice"):
        open_checkpoint(d)


def test_no_checkpoint_is_none(tmp_path):
    assert open_checkpoint(tmp_path) is None
