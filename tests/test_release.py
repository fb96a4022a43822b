"""A loaded model holds one representation: the kernel form, its packed codes released and
read back exactly (digest-checked) from the shard they came from (binllm.packed.source)."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from safetensors import safe_open
from test_checkpoint import logits, quantize, tiny_biased_llama

import binllm
from binllm.packed.checkpoint import save_binarized
from binllm.packed.layers import BinaryLinear, set_cache_dequantized, set_kernels
from binllm.packed.saved_dir import read_saved
from binllm.packed.source import PackedSourceError

METHODS = ["billm", "pbllm", "gptq", "arb-llm-rc"]  # binary + groups, sparse part, uniform, β


@pytest.fixture(scope="module", params=METHODS)
def saved_dir(request, tmp_path_factory):
    model = tiny_biased_llama()
    report = quantize(model, request.param, 96)
    return save_binarized(model, report, None, tmp_path_factory.mktemp("rel") / "model")


@pytest.fixture
def own_dir(saved_dir, tmp_path):
    """A private copy (tests that damage or delete files)."""
    return shutil.copytree(saved_dir, tmp_path / "model")


def binary_linears(model) -> dict[str, BinaryLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BinaryLinear)}


def file_tensors(d) -> dict[str, torch.Tensor]:
    """Every stored tensor, read by safetensors itself (the oracle)."""
    out = {}
    for f in read_saved(d).files:
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and \
        torch.equal(a.contiguous().view(-1).view(torch.uint8),
                    b.contiguous().view(-1).view(torch.uint8))


def packed_keys(d) -> set[str]:
    return {f"{n}.{s}" for n, lay in read_saved(d).layouts.items() for s in lay.specs()}


def test_load_holds_only_the_kernel_form(saved_dir):
    model = binllm.load(saved_dir)
    for name, m in binary_linears(model).items():
        assert m.is_released(), name
        assert not any(k in m._buffers for k in m.layout.specs())
        assert m.held_bytes() == m.kernel_form().nbytes()
    kept = binllm.load(saved_dir, keep_packed=True)
    for m in binary_linears(kept).values():
        buffers = sum(t.numel() * t.element_size() for t in m.packed().values())
        form = m.kernel_form().nbytes()  # derived on first use
        assert not m.is_released() and m.held_bytes() == buffers + form


@pytest.mark.parametrize("loader", ["binllm.load", "from_pretrained"])
def test_state_dict_after_load_is_the_files_bytes(saved_dir, loader):
    if loader == "from_pretrained":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(saved_dir)
    else:
        model = binllm.load(saved_dir)
    assert all(m.is_released() for m in binary_linears(model).values())
    state, stored = model.state_dict(), file_tensors(saved_dir)
    assert packed_keys(saved_dir) <= set(state)
    for key, t in stored.items():
        assert same_bytes(state[key], t), key


def test_released_layers_compute_and_give_back_the_same_codes(saved_dir):
    released, kept = binllm.load(saved_dir), binllm.load(saved_dir, keep_packed=True)
    reference = binllm.load(saved_dir, kernels=False)
    assert torch.equal(logits(released, 96), logits(kept, 96))
    torch.testing.assert_close(logits(released, 96), logits(reference, 96), rtol=1e-4,
                               atol=1e-4)
    ka = binary_linears(kept)
    for name, m in binary_linears(released).items():
        assert torch.equal(m.dequantize(), ka[name].dequantize()), name
        assert type(m.codes()) is type(ka[name].codes())
    assert not any(m.is_released() for m in binary_linears(reference).values())


def test_save_pretrained_of_a_loaded_model_writes_the_same_tensors(saved_dir, tmp_path):
    model = binllm.load(saved_dir)
    model.save_pretrained(tmp_path / "again")
    again, stored = file_tensors(tmp_path / "again"), file_tensors(saved_dir)
    assert set(again) == set(stored)
    assert all(same_bytes(again[k], stored[k]) for k in stored)


def test_a_source_changed_in_place_is_refused_by_name(own_dir):
    model = binllm.load(own_dir)
    f = read_saved(own_dir).files[0]
    raw = bytearray(f.read_bytes())
    with open(f, "r+b") as fh:  # flip every byte after the header, in place (same inode)
        n = int.from_bytes(raw[:8], "little")
        fh.seek(8 + n)
        fh.write(bytes(b ^ 0xFF for b in raw[8 + n:]))
    with pytest.raises(PackedSourceError, match=r"released from memory.*sha256 differs"):
        model.state_dict()
    layer = next(iter(binary_linears(model).values()))
    with pytest.raises(PackedSourceError, match="keep_packed=True"):
        layer.dequantize()
    logits(model, 96)  # the form is intact: the forward still works


def test_a_truncated_source_is_refused(own_dir):
    model = binllm.load(own_dir)
    f = read_saved(own_dir).files[0]
    with open(f, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(PackedSourceError, match="truncated"):
        model.state_dict()


def test_a_deleted_directory_still_gives_the_codes_back(own_dir):
    model, stored = binllm.load(own_dir), file_tensors(own_dir)
    shutil.rmtree(own_dir)
    state = model.state_dict()
    assert all(same_bytes(state[k], stored[k]) for k in stored)


def test_reference_mode_restores_and_kernels_release_again(saved_dir):
    model = binllm.load(saved_dir)
    reference = logits(binllm.load(saved_dir, kernels=False), 96)
    set_kernels(model, False)
    assert torch.equal(logits(model, 96), reference)  # bit for bit the dequantize path
    assert not any(m.is_released() for m in binary_linears(model).values())
    set_kernels(model, True)
    logits(model, 96)
    assert all(m.is_released() for m in binary_linears(model).values())


def test_cache_dequantized_holds_the_weight_alone(saved_dir):
    model = binllm.load(saved_dir, cache_dequantized=True)
    reference = binllm.load(saved_dir, kernels=False)
    assert torch.equal(logits(model, 96), logits(reference, 96))
    for m in binary_linears(model).values():
        assert m.is_released() and m._form is None
        assert m.held_bytes() == m._cached.numel() * m._cached.element_size()
    set_cache_dequantized(model, False)
    torch.testing.assert_close(logits(model, 96), logits(reference, 96), rtol=1e-4, atol=1e-4)


def test_load_state_dict_of_other_codes_keeps_them_in_memory(saved_dir):
    model, kept = binllm.load(saved_dir), binllm.load(saved_dir, keep_packed=True)
    state = kept.state_dict()
    floats = [k for k in packed_keys(saved_dir) if state[k].is_floating_point()]
    changed = {**state, **{k: state[k] * 2 for k in floats}}  # other codes, same layout
    model.load_state_dict(changed)
    kept.load_state_dict(changed)
    assert torch.equal(logits(model, 96), logits(kept, 96))
    after = model.state_dict()
    assert all(same_bytes(after[k], changed[k]) for k in packed_keys(saved_dir))
    # their bytes are not the file's: the layers keep them (and drop the source)
    assert floats and not any(m.is_released() for m in binary_linears(model).values())


def test_moves_and_copies_keep_the_form_and_the_codes(saved_dir):
    model = binllm.load(saved_dir)
    forms = {n: m._form for n, m in binary_linears(model).items()}
    before = logits(model, 96)
    model.to(torch.float64).to("cpu").to(torch.float32)  # exact round trip of the fp32 tensors
    assert all(m._form is not None and m.is_released() for m in binary_linears(model).values())
    assert torch.equal(logits(model, 96), before)
    twin = copy.deepcopy(model)
    assert torch.equal(logits(twin, 96), before)
    stored = file_tensors(saved_dir)
    state = twin.state_dict()
    assert all(same_bytes(state[k], stored[k]) for k in packed_keys(saved_dir))
    assert forms  # every layer had a form
