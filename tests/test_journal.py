"""Resume after a crash: a journaled run interrupted after layer k, then resumed, ends with
exactly the weights, codes and reports of an uninterrupted run."""

from __future__ import annotations

import copy

import pytest
import torch

from binllm import QuantizeConfig
from binllm.engine.binarize import binarize_model
from binllm.cli import main
from binllm.engine.journal import JournalMismatch, LayerJournal, run_identity
from conftest import random_windows, tiny_llama


class Crash(RuntimeError):
    pass




def _linear_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("method", ["billm", "pbllm-10", "gptq"])
def test_resume_after_crash_equals_uninterrupted_run(tmp_path, method):
    model = tiny_llama()
    base = copy.deepcopy(model)
    config, calib = QuantizeConfig(method), random_windows(4, 32)
    reference = copy.deepcopy(base)
    full = binarize_model(reference, config, calib)  # the uninterrupted run

    journal = LayerJournal(tmp_path / "j", run_identity(base, config, calib))

    def crash_after_first(done, total):
        if done == 1:
            raise Crash

    with pytest.raises(Crash):
        binarize_model(copy.deepcopy(base), config, calib, journal=journal,
                       on_layer=crash_after_first)
    assert journal.layers_done() == 1

    resumed_model = copy.deepcopy(base)
    journal = LayerJournal(tmp_path / "j", run_identity(base, config, calib))
    resumed = binarize_model(resumed_model, config, calib, journal=journal)
    assert journal.layers_done() == 2
    got, want = _linear_weights(resumed_model), _linear_weights(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert [r.name for r in resumed.linears] == [r.name for r in full.linears]
    assert [r.loss for r in resumed.linears] == [r.loss for r in full.linears]
    for name, codes in full.codes.items():
        assert torch.equal(resumed.codes[name].dequantize(), codes.dequantize()), name


def test_journal_refuses_another_run(tmp_path):
    model, calib = tiny_llama(), random_windows(4, 32)
    LayerJournal(tmp_path / "j", run_identity(model, QuantizeConfig("billm"), calib))
    with pytest.raises(JournalMismatch, match="quantize_config"):
        LayerJournal(tmp_path / "j", run_identity(model, QuantizeConfig("arb"), calib))
    with pytest.raises(JournalMismatch, match="calibration_sha256"):
        other = random_windows(4, 32, seed=1)
        LayerJournal(tmp_path / "j", run_identity(model, QuantizeConfig("billm"), other))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(JournalMismatch, match="not empty"):
        LayerJournal(tmp_path / "other", {})


def test_damaged_layer_file_is_named(tmp_path):
    model, config, calib = tiny_llama(), QuantizeConfig("rtn-sign"), random_windows(4, 32)
    journal = LayerJournal(tmp_path / "j", run_identity(model, config, calib))
    binarize_model(copy.deepcopy(model), config, calib, journal=journal)
    f = tmp_path / "j" / "layer_00001.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(JournalMismatch, match="layer_00001.*delete that file"):
        binarize_model(copy.deepcopy(model), config, calib, journal=journal)


def test_cli_resume_dir(tmp_path, stories_path, capsys):
    args = ["-q", "quantize", str(stories_path), "--method", "rtn-sign", "--calib", "tinystories",
            "--nsamples", "2", "--seqlen", "64", "--eval", "", "--resume-dir", str(tmp_path / "j")]
    assert main(args) == 0
    n = len(list((tmp_path / "j").glob("layer_*.safetensors")))
    assert n == 5  # stories260K has 5 decoder layers
    assert main(args) == 0
    assert f"resuming: {n} layers restored" in capsys.readouterr().out
    assert main(args[:-2] + ["--nsamples", "3", "--resume-dir", str(tmp_path / "j")]) == 2
    assert "different run" in capsys.readouterr().err
