"""`binllm export DIR --format gguf OUT.gguf`: a binllm LLaMA directory as a llama.cpp GGUF file.

`export_gguf` checks the output first (`binllm.export.target.check_target`: never a folder,
never inside the model directory, an existing file only with overwrite), then reads the model
through the loader's checks (`binllm.packed.checkpoint.read_verified`: sha256 of every shard,
config.json against the files, the model's tensors against the stored ones), so a damaged or
incomplete directory is refused as `binllm.load` refuses it. It writes the llama
hyperparameters, the vocabulary (`gguf_vocab`: sentencepiece "llama" or byte-level BPE
"gpt2") and the tensors (`gguf_tensors`: Q1_0 where the codes allow it, the fallback type
elsewhere), atomically. `general.file_type` names the type holding most of the weights
(`gguf_tensors.file_type`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from ..packed.checkpoint import CorruptCheckpoint, read_verified
from ..packed.saved_dir import read_saved, read_tensors
from .gguf_tensors import FALLBACK_TYPES, NEEDED, export_tensors, file_type
from .gguf_tensors import q1_0_problem, qk_permutation  # noqa: F401  (re-exported)
from .gguf_vocab import Vocab, chat_template, read_vocab, special_ids
from .target import ExportError, check_target

log = logging.getLogger(__name__)

FLOAT_TYPES = ("auto", "f16", "f32")


@dataclass(frozen=True)
class ExportedTensor:
    name: str      # GGUF name
    source: str    # binllm / Hugging Face name
    type: str      # Q1_0, Q8_0, Q4_0, F16, F32
    shape: tuple[int, ...]
    note: str = ""


@dataclass
class ExportReport:
    path: str
    tensors: list[ExportedTensor] = field(default_factory=list)
    file_bytes: int = 0
    vocab_source: str = ""
    tokenizer: str = ""      # tokenizer.ggml.model (and .pre for BPE)
    file_type: str = ""      # general.file_type, a gguf.LlamaFileType name

    def count(self, kind: str) -> int:
        return sum(t.type == kind for t in self.tensors)

    def counts(self) -> str:
        """"3 Q1_0, 4 F16, 5 F32 tensors": the types present, in a fixed order."""
        kinds = ("Q1_0", "Q8_0", "Q4_0", "F16", "F32")
        return ", ".join(f"{self.count(k)} {k}" for k in kinds if self.count(k)) + " tensors"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "file_bytes": self.file_bytes, "file_type": self.file_type,
                "vocab_source": self.vocab_source, "tokenizer": self.tokenizer,
                "tensors": [asdict(t) for t in self.tensors]}


# -- llama metadata -----------------------------------------------------------------------------
def _hparams(config: dict) -> dict[str, Any]:
    if config.get("model_type") != "llama":
        raise ExportError(f"GGUF export writes llama.cpp's llama architecture; this model is "
                          f"{config.get('model_type')!r}")
    if config.get("hidden_act", "silu") != "silu":
        raise ExportError(f"hidden_act {config['hidden_act']!r}: llama.cpp's llama architecture "
                          "computes SiLU")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}  # transformers 4 / 5
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ExportError(f"rope type {kind!r} ({rope}) is not supported by the GGUF export "
                          "(default and linear only)")
    missing = [k for k in ("num_attention_heads", "hidden_size", "intermediate_size",
                           "num_hidden_layers", "vocab_size") if not isinstance(config.get(k), int)]
    if missing:
        raise ExportError(f"config.json has no integer {', '.join(missing)}; the GGUF header "
                          "needs every one of hidden_size, intermediate_size, "
                          "num_attention_heads, num_hidden_layers and vocab_size: restore "
                          "config.json or re-save the model")
    n_head = config["num_attention_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // n_head
    return {"n_embd": config["hidden_size"], "n_ff": config["intermediate_size"],
            "n_layer": config["num_hidden_layers"], "n_head": n_head,
            "n_head_kv": config.get("num_key_value_heads") or n_head, "head_dim": hd,
            "n_ctx": config.get("max_position_embeddings", 2048),
            "eps": config.get("rms_norm_eps", 1e-5),
            "theta": config.get("rope_theta") or rope.get("rope_theta", 10000.0),
            "linear_rope": rope.get("factor") if kind == "linear" else None,
            "vocab": config["vocab_size"]}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs the gguf package: pip install 'binllm[export]' "
                          "(or pip install gguf)") from None
    if not hasattr(gguf.GGMLQuantizationType, "Q1_0"):
        raise ExportError(f"gguf {getattr(gguf, '__version__', '?')} has no Q1_0 type; "
                          "pip install 'gguf>=0.19'")
    return gguf


# -- export ---------------------------------------------------------------------------------------
def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, *,
                tokenizer_model: str | os.PathLike | None = None, float_type: str = "auto",
                fallback_type: str = "f16", tokenizer_pre: str | None = None,
                overwrite: bool = False) -> ExportReport:
    """Write the binllm directory `model_dir` as the GGUF file `out` (atomically).

    float_type: "auto" (F32 for float32 sources, else F16), "f16" or "f32" for the tensors that
    are not binarized (1-D tensors are always F32, as llama.cpp's converter writes them).
    fallback_type: "f16" (exact), "q8_0" or "q4_0" for binarized linears Q1_0 cannot hold.
    tokenizer_model: a sentencepiece model or tokenizer.json to take the vocabulary from;
    tokenizer_pre: tokenizer.ggml.pre of a byte-level BPE vocabulary instead of the detected
    one. overwrite: replace an existing `out` (never a file inside `model_dir`).
    """
    if float_type not in FLOAT_TYPES:
        raise ExportError(f"float type {float_type!r}: choose {', '.join(FLOAT_TYPES)}")
    if fallback_type not in FALLBACK_TYPES:
        raise ExportError(f"fallback type {fallback_type!r}: choose "
                          f"{', '.join(FALLBACK_TYPES)}")
    out = check_target(out, model_dir, overwrite=overwrite)
    gguf = _gguf()
    saved = read_saved(model_dir)  # headers only: what the export cannot write is refused first
    hp = _hparams(saved.config)
    method = saved.quantization.get("method", "these")
    for name, layout in saved.layouts.items():
        flag = _outside_flag(name)
        if flag:  # an embedding table or lm_head stored as codes (--embeddings / --lm-head)
            raise ExportError(f"{name} is stored as {layout.format} codes ({flag} "
                              f"q{layout.params.get('bits', '?')}); the GGUF export writes "
                              f"the embeddings and the lm_head as kept tensors only: quantize "
                              f"with {flag} keep")
        why = q1_0_problem(layout, method)
        if why:
            raise ExportError(f"{name}: {why}; {NEEDED}")
    saved = read_verified(model_dir)  # then every check of binllm.load
    vocab = read_vocab(saved.path, Path(tokenizer_model) if tokenizer_model else None,
                       vocab_size=hp["vocab"], pre=tokenizer_pre)
    if len(vocab.tokens) != hp["vocab"]:
        raise ExportError(f"the tokenizer has {len(vocab.tokens)} tokens, the model "
                          f"{hp['vocab']}; pass the model's own --tokenizer-model")
    state = read_tensors(saved)
    missing = sorted(set(saved.tensors) - set(state))
    if missing:
        raise CorruptCheckpoint(f"{saved.path}: {missing[:4]} could not be read from the files "
                                "config.json lists; the directory is inconsistent")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["n_layer"])
    tokenizer = vocab.model + (f" (pre-tokenizer {vocab.pre})" if vocab.pre else "")
    report = ExportReport(str(out), vocab_source=vocab.source, tokenizer=tokenizer)

    def write(tmp: Path) -> None:
        report.tensors.clear()
        w = gguf.GGUFWriter(str(tmp), "llama")
        _write_metadata(gguf, w, saved, hp, vocab)
        for t in export_tensors(gguf, saved, state, hp, float_type, fallback_type):
            gname = names.get_name(t.source, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise ExportError(f"{t.source} has no llama.cpp name (not a LLaMA tensor)")
            if t.type in ("F16", "F32"):
                w.add_tensor(gname, t.data)
            else:
                w.add_tensor(gname, t.data,
                             raw_dtype=getattr(gguf.GGMLQuantizationType, t.type))
            report.tensors.append(ExportedTensor(gname, t.source, t.type, t.shape, t.note))
        report.file_type = file_type([(t.type, t.shape) for t in report.tensors])
        w.add_file_type(getattr(gguf.LlamaFileType, report.file_type))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.chmod(0o644)

    try:
        atomic_write(out, write)
    except OSError as e:  # disk full, filesystem turned read-only: the old OUT is untouched
        raise ExportError(f"writing {out} failed ({e.strerror or e}); nothing was written: free "
                          "space or choose another path") from None
    report.file_bytes = out.stat().st_size
    log.info("wrote %s (%s): %s", out, report.file_type, report.counts())
    return report


def _outside_flag(module: str) -> str | None:
    """The quantize flag that stored `module` as codes, if it lies outside the decoder layers."""
    leaf = module.rsplit(".", 1)[-1]
    return {"embed_tokens": "--embeddings", "lm_head": "--lm-head"}.get(leaf)


def _write_metadata(gguf, w, saved, hp: dict, vocab: Vocab) -> None:
    w.add_name(Path(saved.path).name)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(hp["n_ctx"])
    w.add_embedding_length(hp["n_embd"])
    w.add_block_count(hp["n_layer"])
    w.add_feed_forward_length(hp["n_ff"])
    w.add_head_count(hp["n_head"])
    w.add_head_count_kv(hp["n_head_kv"])
    w.add_rope_freq_base(float(hp["theta"]))
    w.add_layer_norm_rms_eps(float(hp["eps"]))
    w.add_vocab_size(hp["vocab"])
    w.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["n_embd"] // hp["n_head"]:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    if hp["linear_rope"]:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(hp["linear_rope"]))
    w.add_tokenizer_model(vocab.model)
    if vocab.pre:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    ids = special_ids(saved.path, saved.config, vocab)
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                     ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
        if key in ids:
            add(int(ids[key]))
    w.add_add_bos_token(bool(ids["add_bos"]))
    w.add_add_eos_token(bool(ids["add_eos"]))
    template = chat_template(saved.path)
    if template:
        w.add_chat_template(template)
