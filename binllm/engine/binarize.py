"""binarize_model: the only place where walker, Hessians, the loop and the methods meet."""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .config import ConfigError, QuantizeConfig
from .distributed import Distributed, guard, report_dict
from .journal import JournalMismatch, LayerJournal
from ..methods import get_method
from ..methods.codes import per_weight
from .reconstruct import reconstruct
from .refine import LayerRefiner, LayerRefineReport
from .rotate import RotationReport, rotate_model
from .walker import (
    UnsupportedArchitecture,
    collect_hessians,
    find_decoder_layers,
    find_linears,
    walk_layers,
)

log = logging.getLogger(__name__)


class NonFiniteWeights(ValueError):
    """A weight matrix holds NaN or Inf before quantization."""


class UnknownSkip(ValueError):
    """A `skip` name matches no linear of the decoder layers."""


FINITE_CHUNK = 1 << 24  # elements checked at a time (bounded temporary memory)


def check_finite(model: nn.Module) -> None:
    """Raise NonFiniteWeights naming the first parameter or buffer that holds NaN or Inf.

    Every tensor (embeddings, norms, LM head, every linear) is checked, in chunks, before
    any layer is touched.
    """
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not t.is_meta:  # meta: a streamed layer, checked when read
            refuse_non_finite(name, t)


def refuse_non_finite(name: str, t: Tensor) -> None:
    """Raise NonFiniteWeights naming `name` if `t` holds NaN or Inf (checked in chunks)."""
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), FINITE_CHUNK):
        if not torch.isfinite(flat[start:start + FINITE_CHUNK]).all():
            nan, inf = int(torch.isnan(flat).sum()), int(torch.isinf(flat).sum())
            raise NonFiniteWeights(
                f"{name} holds {nan} NaN and {inf} Inf values (of {flat.numel()}); the "
                "checkpoint is corrupt or was saved after a diverged run: use another one")


def linear_names(model: nn.Module) -> list[str]:
    """Names of the linears inside the decoder layers, relative to a layer, in order."""
    _, layers = find_decoder_layers(model)
    names: dict[str, None] = {}
    for layer in layers:
        names.update(dict.fromkeys(find_linears(layer)))
    return list(names)


def skip_matches(name: str, skip: tuple[str, ...] | list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def binarized_names(model: nn.Module, skip: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Full names of the linears binarize_model will quantize (decoder linears minus skip)."""
    path, layers = find_decoder_layers(model)
    return [f"{path}.{i}.{n}" for i, layer in enumerate(layers) for n in find_linears(layer)
            if not skip_matches(n, skip)]


def check_skip(model: nn.Module, skip: tuple[str, ...] | list[str]) -> None:
    """Raise UnknownSkip when a skip name matches no linear of the decoder layers, and
    ConfigError when the names skip every linear (nothing would be binarized)."""
    names = linear_names(model)
    unknown = [s for s in skip if not any(skip_matches(n, [s]) for n in names)]
    if unknown:
        short = names[-1].rpartition(".")[2] if names else ""
        raise UnknownSkip(f"--skip {','.join(unknown)} matches no linear of "
                          f"{type(model).__name__}'s decoder layers; they are "
                          f"{', '.join(names)} (a name or its last part, e.g. {short})")
    if skip and names and all(skip_matches(n, list(skip)) for n in names):
        raise ConfigError(f"--skip {','.join(skip)} leaves no linear to binarize (the decoder "
                          f"layers hold {len(names)}); drop names from --skip")


@dataclass(frozen=True)
class LinearReport:
    name: str
    shape: tuple[int, int]      # (out_features, in_features)
    loss: float                 # GPTQ proxy loss Σ (w − q)²/U_jj²/2 of the stored weights
    percdamp: float | None
    paper_bits: float           # bits per weight as the papers count them
    stored_bits: float          # bits per weight of everything the codes need
    seconds: float
    # the same loss of the loop's weights before their scales were rounded for storage (the
    # references' printed loss; equals `loss` with scale_rounding=in_loop or scale_dtype=float32)
    calibration_loss: float | None = None


@dataclass
class QuantizeReport:
    method: str
    method_args: dict[str, Any]
    config: dict[str, Any]
    linears: list[LinearReport] = field(default_factory=list)
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    codes: dict[str, Any] = field(default_factory=dict, repr=False)  # name -> layer codes
    refine: list[LayerRefineReport] = field(default_factory=list)  # per layer, with refine
    rotation: RotationReport | None = None  # with rotate

    @property
    def paper_bits(self) -> float:
        return per_weight(self.linears, "paper_bits")

    @property
    def stored_bits(self) -> float:
        return per_weight(self.linears, "stored_bits")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "method_args": self.method_args, "config": self.config,
                "paper_bits": self.paper_bits, "stored_bits": self.stored_bits,
                "seconds": self.seconds, "peak_memory_mb": self.peak_memory_mb,
                "linears": [dataclasses.asdict(r) for r in self.linears],
                **({"refine": [dataclasses.asdict(r) for r in self.refine]}
                   if self.refine else {}),
                **({"rotation": dataclasses.asdict(self.rotation)} if self.rotation else {})}


def peak_memory_mb(device: torch.device | str = "cpu") -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def binarize_model(model: nn.Module, config: QuantizeConfig, calibration: list[Tensor], *,
                   device: torch.device | str = "cpu", keep_codes: bool = True,
                   on_layer: Callable[[int, int], None] | None = None,
                   journal: LayerJournal | None = None,
                   dist: "Distributed | None" = None, source: Any = None,
                   checked: bool = False) -> QuantizeReport:
    """Quantize every nn.Linear inside the decoder layers of `model`, in place.

    calibration: batches of token ids (batch, seqlen). Embeddings, norms, biases and the
    LM head stay as they are. Returns the report (and, with keep_codes, every layer's codes
    for packing). `on_layer(i, n)` is called after each decoder layer (progress bars).
    journal: finished layers are stored there, and layers it already holds are restored
    from it instead of quantized again (resume after a crash; `binllm.engine.journal`).
    dist: this process's rank in a torchrun group (`binllm.engine.distributed`); every rank
    passes the same model, config and calibration, and ends with the same weights and
    report; only rank 0's journal is read and written. None: one process.
    source: decoder layers streamed from a checkpoint (`binllm.engine.stream.LayerStream`):
    each layer is loaded before its turn, receives its stored codes (`source.set_codes(i,
    codes)`) and is released once the walker has run it; with `dist` every rank streams
    its own copy of each layer from the same checkpoint.
    checked: the caller has run check_skip(model, config.skip) and check_finite(model) on
    this model already (the CLI does, before it loads calibration data); not run again.
    """
    method = get_method(config.method, config.method_args)
    report = QuantizeReport(method=config.method,
                            method_args=dataclasses.asdict(method.args), config=config.to_dict())
    start = time.perf_counter()
    path, layers = find_decoder_layers(model)
    if not any(find_linears(layer) for layer in layers):
        raise UnsupportedArchitecture(
            f"the decoder layers at {path} of {type(model).__name__} hold no nn.Linear (GPT-2 "
            "style Conv1D projections are not supported), so there is nothing to binarize")
    if config.rotate is not None:
        if source is not None:
            raise ConfigError("rotate needs the whole model in memory (the embeddings and "
                              "lm_head rotate with every layer); load it whole, not streamed")
        report.rotation = rotate_model(model)
    if not checked:
        with guard(dist, "weight checks"):
            check_skip(model, config.skip)
            check_finite(model)
    n_layers = len(layers)
    refiner = None
    if config.refine is not None:
        if dist is not None:
            raise ConfigError("refine runs in one process (its training windows and gradients "
                              "are not shared between torchrun ranks); run without torchrun")
        refiner = LayerRefiner(config.refine, device)
    needs_h = method.needs_hessian or (config.feedback or method.feedback) != "none"
    walk = walk_layers(model, calibration if dist is None else dist.local_windows(calibration),
                       device, source=source)
    if dist is not None:
        walk = dist.guarded(walk, "calibration forward")
    # A finished layer first feeds the next one through its calibrated weights (fp32 scales,
    # as the references); once the walker has run it, it gets its stored weights (`pending`).
    # A streamed layer is replaced by BinaryLinears of its stored codes instead (the source's
    # release): nothing pends, and no second copy of the layer is kept meanwhile.
    pending: list[tuple[nn.Module, Tensor]] | None = [] if source is None else None
    try:
        _walk(report, method, config, journal, dist, walk, keep_codes, on_layer, n_layers,
              needs_h, device, pending, source, refiner)
    finally:
        _set_stored(pending)
    report.seconds = time.perf_counter() - start
    report.peak_memory_mb = peak_memory_mb(device)
    if dist is not None:
        report.peak_memory_mb = dist.max_over_ranks(report.peak_memory_mb)
    return report


def _set_stored(pending: list[tuple[nn.Module, Tensor]] | None) -> None:
    """Give the linears in `pending` their stored weights (on the device they are on now)."""
    if pending is None:
        return
    for linear, Q in pending:
        linear.weight.data = Q.to(device=linear.weight.device)
    pending.clear()


def _store(linear: nn.Module, calibrated, method, pending: list | None,
           Q: Tensor | None = None):
    """The stored codes of `calibrated` (scales rounded once); their weights join `pending`
    (Q: those weights when the caller already has them; pending None: nobody needs them)."""
    stored = method.store(calibrated)
    if stored is not calibrated and pending is not None:
        W = linear.weight.data
        Q = stored.dequantize() if Q is None else Q
        pending.append((linear, Q.to(device=W.device, dtype=W.dtype)))
    return stored


def _walk(report: QuantizeReport, method, config: QuantizeConfig, journal, dist, walk,
          keep_codes: bool, on_layer, n_layers: int, needs_h: bool, device, pending: list,
          source=None, refiner: LayerRefiner | None = None):
    """binarize_model's layer loop: calibrated weights feed the walker, stored ones pend
    (with a refiner, the refined stored weights feed the walker)."""
    for i, path, layer, inputs in walk:
        _set_stored(pending)  # the walker has run the previous layer on its calibrated weights
        if refiner is not None:  # the layer is still full precision: its FP targets
            refiner.begin(layer, inputs)
        linears = {n: m for n, m in find_linears(layer).items()
                   if not skip_matches(n, config.skip)}
        restore = journal is not None and journal.done(i)
        if restore if dist is None else dist.decide(restore):
            restored = _restore_layer(report, journal, i, path, linears, keep_codes, dist,
                                      method, pending)
            if source is not None:
                source.set_codes(i, restored)
            if on_layer:
                on_layer(i + 1, n_layers)
            continue
        owners = {n: 0 for n in linears} if dist is None else dist.owners(
            {n: tuple(m.weight.shape) for n, m in linears.items()},
            heavy=getattr(method, "needs_gram", False))
        mine = [n for n in linears if dist is None or owners[n] == dist.rank]
        with guard(dist, f"Hessians of layer {i}"):  # one H per input tensor (q/k/v, gate/up)
            hessians = (collect_hessians(layer, inputs, list(linears) if dist is None
                                         else dist.hessian_names(list(linears), owners), device)
                        if needs_h else {})
        if dist is not None and hessians:
            hessians = dist.reduce_hessians(hessians, owners)
        done: dict[str, tuple[Any, LinearReport]] = {}  # name -> (calibrated codes, report)
        stored_Q: dict[str, Tensor] = {}
        # streamed in one process, nobody else needs a linear's codes: the source packs each
        # one as soon as it is solved (a bit per weight, not the codes' bytes per weight)
        early = (source is not None and dist is None and journal is None and not keep_codes
                 and refiner is None)
        with guard(dist, f"layer {i}"):
            for name in mine:  # a shared H is freed once the last linear reading it is done
                rec, rep = _quantize_linear(linears[name], f"{path}.{name}",
                                            _take_hessian(hessians, name), method, config)
                done[name] = (None if early else rec.calibrated, rep)
                if early:
                    source.add_codes(i, name, _store(linears[name], rec.calibrated, method,
                                                     None), linears[name].bias)
                elif pending is not None:  # in the weights' dtype at once: no fp32 layer held
                    stored_Q[name] = rec.Q.to(linears[name].weight.dtype)
                del rec
        del hessians
        with guard(dist, f"layer {i} codes"):
            if dist is not None:
                shared = dist.share_layer({n: (c, report_dict(r)) for n, (c, r) in done.items()},
                                          list(linears), owners)
                for name, (codes, rep) in shared.items():
                    if name not in done:
                        _set_weight(linears[name], codes.dequantize())
                        done[name] = (codes, _linear_report(rep))
                done = {n: done[n] for n in linears}  # registration order
                shared = codes = None  # no other reference to the unpacked codes
            report.linears.extend(r for _, r in done.values())
            calibrated = stored = None
            if not early:
                calibrated = {n: c for n, (c, _) in done.items()}
                if refiner is not None:  # stored and refined codes: what feeds the next layer
                    calibrated = _refine_layer(report, refiner, i, linears, calibrated,
                                               method, inputs)
                if journal is not None:  # calibrated codes: a resumed run feeds the next alike
                    journal.save(i, calibrated, [r for _, r in done.values()])
                if source is not None and not keep_codes:
                    # streamed under torchrun or with a journal: each linear's stored codes are
                    # packed at once and its unpacked codes (bytes per weight) dropped
                    done = None
                    for n in list(calibrated):
                        source.add_codes(i, n, _store(linears[n], calibrated.pop(n), method,
                                                      pending), linears[n].bias)
                else:
                    stored = {n: _store(linears[n], c, method, pending, stored_Q.get(n))
                              for n, c in calibrated.items()}
                    if keep_codes:
                        report.codes.update({f"{path}.{n}": c for n, c in stored.items()})
                    if source is not None:  # the stored codes: what the saved directory holds
                        source.set_codes(i, stored)
            if on_layer:
                on_layer(i + 1, n_layers)
        # nothing of layer i stays bound while the walker runs it and loads layer i + 1 (the
        # source, `pending` and the report hold what is still needed): its linears, their
        # codes and its inputs would otherwise live until the next layer's solves are done
        del linears, done, stored_Q, calibrated, stored, inputs


def _refine_layer(report: QuantizeReport, refiner: LayerRefiner, i: int,
                  linears: dict[str, nn.Module], calibrated: dict[str, Any], method,
                  inputs) -> dict[str, Any]:
    """Layer i's stored codes refined against the FP layer; the linears get their weights
    now (the walker runs the layer on them). Storing them again changes nothing."""
    stored = {n: method.store(c) for n, c in calibrated.items()}
    refined, rep = refiner.refine(i, stored, inputs)
    report.refine.append(rep)
    for n, c in refined.items():
        _set_weight(linears[n], c.dequantize())
    return refined


def _take_hessian(hessians: dict[str, Any], name: str) -> Tensor | None:
    """H of `name`, dropped from `hessians`: the accumulator turns into H in place, and
    linears sharing it (one input tensor) get that same tensor."""
    acc = hessians.pop(name, None)
    return acc.finalize() if acc is not None else None


def _quantize_linear(linear: nn.Module, full: str, H: Tensor | None, method,
                     config: QuantizeConfig):
    """(Reconstruction, LinearReport) of one linear; its weight becomes the calibrated one
    (the stored one, `Reconstruction.Q`, once the walker has fed the next layer)."""
    W = linear.weight.data
    refuse_non_finite(f"{full}.weight", W)  # a streamed layer's weights arrive only now
    t0 = time.perf_counter()
    rec = reconstruct(W, H, method, block_size=config.block_size,
                      percdamp=config.percdamp, feedback=config.feedback, name=full)
    linear.weight.data = rec.calibrated_Q.to(W.dtype)
    numel = W.numel()
    rep = LinearReport(
        name=full, shape=tuple(W.shape), loss=rec.loss, percdamp=rec.percdamp,
        paper_bits=rec.codes.paper_bits(), stored_bits=rec.codes.stored_bits() / numel,
        seconds=time.perf_counter() - t0, calibration_loss=rec.calibration_loss)
    log.info("%s: loss %.4g, %.3f paper bits", full, rec.loss, rep.paper_bits)
    return rec, rep


def _linear_report(d: dict[str, Any]) -> LinearReport:
    return LinearReport(**{**d, "shape": tuple(d["shape"])})


def _set_weight(linear: nn.Module, Q: Tensor) -> None:
    W = linear.weight.data
    linear.weight.data = Q.to(device=W.device, dtype=W.dtype)


def _restore_layer(report: QuantizeReport, journal: LayerJournal | None, i: int, path: str,
                   linears: dict[str, nn.Module], keep_codes: bool,
                   dist: "Distributed | None", method, pending: list) -> dict[str, Any]:
    """Set layer i's linears to the journal's calibrated codes (their stored form pending)
    and copy its reports (rank 0 reads the journal and shares the codes with the others);
    return the stored codes."""
    stored_codes: dict[str, Any] = {}
    with guard(dist, f"restoring layer {i}"):
        codes, reports = journal.load(i) if journal is not None else ({}, [])
        if journal is not None and set(codes) != set(linears):
            raise JournalMismatch(f"layer {i} in {journal.path} holds {sorted(codes)}, the "
                                  f"model has {sorted(linears)}; choose a new --resume-dir")
    if dist is not None:
        by_name = {r["name"]: r for r in reports}
        shared = dist.share_layer({n: (c, by_name[f"{path}.{n}"]) for n, c in codes.items()},
                                  list(linears), {n: 0 for n in linears})
        codes = {n: c for n, (c, _) in shared.items()}
        reports = [r for _, r in shared.values()]
    with guard(dist, f"restoring layer {i}"):
        for name, linear in linears.items():
            W = linear.weight.data
            Q = codes[name].dequantize()
            if tuple(Q.shape) != tuple(W.shape):
                raise JournalMismatch(f"{path}.{name}: journal codes are {tuple(Q.shape)}, "
                                      f"the weight is {tuple(W.shape)}; choose a new "
                                      "--resume-dir")
            _set_weight(linear, Q)
            stored = stored_codes[name] = _store(linear, codes[name], method, pending)
            if keep_codes:
                report.codes[f"{path}.{name}"] = stored
        for r in reports:
            report.linears.append(_linear_report(r))
    log.info("layer %d restored from %s", i, journal.path if journal else "rank 0")
    return stored_codes


quantize = binarize_model  # `binllm.quantize(model, config, calibration)`
