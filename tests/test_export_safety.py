"""binllm export reads only what binllm.load accepts and writes only where it may (issue 23).

Item 6: the model's own files are never written (even with --overwrite), an existing output
needs --overwrite, the write is atomic. Item 7: a damaged or incomplete directory is refused as
the loader refuses it. Tracebacks: a folder or unwritable OUT, a garbage --tokenizer-model, a
--report that cannot be written are one-line errors (exit 2) before any work.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import binllm
from binllm.packed.checkpoint import CheckpointError, save_binarized

gguf = pytest.importorskip("gguf")
from conftest import one_line_error, run_cli  # noqa: E402
from test_gguf_export import tiny_q1_0  # noqa: E402


@pytest.fixture(scope="module")
def saved(stories_tokenizer, tmp_path_factory):
    model, report = tiny_q1_0(stories_tokenizer)
    return save_binarized(model, report, stories_tokenizer, tmp_path_factory.mktemp("s") / "q1c")


@pytest.fixture
def q1c(saved, tmp_path) -> Path:
    """A fresh copy of the saved q1_0 directory: tests may try to damage it."""
    return Path(shutil.copytree(saved, tmp_path / "q1c"))


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# -- item 6: data loss ----------------------------------------------------------------------
@pytest.mark.parametrize("target", ["model.safetensors", "config.json", "new.gguf"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_the_models_own_directory_is_never_written(q1c, capsys, target, overwrite):
    before = digest(q1c)
    code, _, err = run_cli(capsys, "export", q1c, q1c / target,
                           *(["--overwrite"] if overwrite else []))
    one_line_error(code, err, "inside the model directory", "choose a path outside it")
    assert digest(q1c) == before and not leftovers(q1c)
    binllm.load(q1c)  # still loads, sha256 checked


def test_a_link_into_the_model_directory_is_refused(q1c, tmp_path, capsys):
    link = tmp_path / "innocent.gguf"
    link.symlink_to(q1c / "model.safetensors")
    before = digest(q1c)
    code, _, err = run_cli(capsys, "export", q1c, link, "--overwrite")
    one_line_error(code, err, "inside the model directory")
    assert digest(q1c) == before and link.is_symlink()


def test_an_existing_output_needs_overwrite(q1c, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"someone's file")
    code, _, err = run_cli(capsys, "export", q1c, out)
    one_line_error(code, err, f"output {out} exists; pass --overwrite")
    assert out.read_bytes() == b"someone's file"
    code, stdout, _ = run_cli(capsys, "export", q1c, out, "--overwrite")
    assert code == 0 and "MOSTLY_Q1_0" in stdout
    assert len(gguf.GGUFReader(str(out)).tensors) == 12
    assert not leftovers(tmp_path)


def test_a_failed_write_leaves_the_previous_output(q1c, tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous export")

    def fail(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    code, _, err = run_cli(capsys, "export", q1c, out, "--overwrite")
    one_line_error(code, err, f"writing {out} failed (No space left on device)")
    assert out.read_bytes() == b"previous export" and not leftovers(tmp_path)


def test_a_config_without_the_llama_sizes_is_refused(q1c, tmp_path, capsys):
    cfg = json.loads((q1c / "config.json").read_text())
    del cfg["intermediate_size"]
    (q1c / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "export", q1c, tmp_path / "m.gguf")
    one_line_error(code, err, "config.json has no integer intermediate_size")


# -- item 7: the loader's checks ------------------------------------------------------------
def rewrite_shard(folder: Path, drop: tuple[str, ...]) -> None:
    """Store the shard again without the tensors whose names start with `drop`, and record its
    new size and sha256 in config.json: only the tensors' absence is left to find."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shard = folder / "model.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(drop)}
    save_file(tensors, str(shard), metadata=meta)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["files"]["model.safetensors"] = {
        "bytes": shard.stat().st_size, "sha256": hashlib.sha256(shard.read_bytes()).hexdigest()}
    (folder / "config.json").write_text(json.dumps(cfg))


def flip_a_byte(folder: Path) -> None:
    shard = folder / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) * 2 // 3] ^= 0x10  # inside the tensor data, not the header
    shard.write_bytes(bytes(data))


def move_into_a_subfolder(folder: Path) -> None:
    (folder / "sub").mkdir()
    (folder / "model.safetensors").rename(folder / "sub" / "model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    files = cfg["quantization_config"]["files"]
    files["sub/model.safetensors"] = files.pop("model.safetensors")
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("damage, message", [
    (flip_a_byte, "does not match the checksum"),
    (lambda f: rewrite_shard(f, ("model.norm.weight", "model.layers.0.mlp.up_proj.")),
     "miss tensors it needs"),
    (move_into_a_subfolder, "sub/model.safetensors"),
], ids=["flipped-byte", "missing-tensors", "files-key-with-a-folder"])
def test_a_directory_the_loader_refuses_is_not_exported(q1c, tmp_path, capsys, damage, message):
    damage(q1c)
    with pytest.raises(CheckpointError, match=message):
        binllm.load(q1c)
    out = tmp_path / "m.gguf"
    code, _, err = run_cli(capsys, "export", q1c, out)
    one_line_error(code, err, message)
    assert not out.exists() and not leftovers(tmp_path)


# -- one-line errors instead of tracebacks ----------------------------------------------------
def test_output_a_folder_or_an_unwritable_place(q1c, tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", q1c, tmp_path)
    one_line_error(code, err, "is a folder; name a file")
    code, _, err = run_cli(capsys, "export", q1c, "/proc/x.gguf")
    one_line_error(code, err, "cannot write in /proc")
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(capsys, "export", q1c, tmp_path / "file" / "x.gguf")
    one_line_error(code, err, "is a file, not a folder")


@pytest.mark.parametrize("content", [b"\x08\x96\x01garbage" * 50, b""], ids=["garbage", "empty"])
def test_a_tokenizer_model_that_is_not_one(q1c, tmp_path, capsys, content):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(content)
    code, _, err = run_cli(capsys, "export", q1c, tmp_path / "m.gguf", "--tokenizer-model", bad)
    one_line_error(code, err, f"{bad} is not a sentencepiece model")
    assert not (tmp_path / "m.gguf").exists()


def test_a_tokenizer_json_that_is_not_json(q1c, tmp_path, capsys):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    code, _, err = run_cli(capsys, "export", q1c, tmp_path / "m.gguf", "--tokenizer-model", bad)
    one_line_error(code, err, "is not valid JSON")


@pytest.mark.parametrize("where", ["folder", "/proc/r.json", "inside-model", "same-as-out"])
def test_a_report_that_cannot_be_written_is_refused_before_the_work(q1c, tmp_path, capsys,
                                                                   where):
    out = tmp_path / "m.gguf"
    report = {"folder": tmp_path, "/proc/r.json": "/proc/r.json",
              "inside-model": q1c / "report.json", "same-as-out": out}[where]
    before = digest(q1c)
    code, _, err = run_cli(capsys, "export", q1c, out, "--report", report)
    one_line_error(code, err, "--report")
    assert not out.exists() and digest(q1c) == before
