"""binarize_model: the only place where walker, Hessians, the loop and the methods meet.

The layer loop reads as the references' loop does: capture the layer's inputs (the walker),
accumulate each linear's H, solve each linear (`reconstruct`), optionally refine the layer
(`LayerRefiner`), hand the codes on (`CodesDestination`), and let the walker run the layer
to build the next layer's inputs; optionally, once every layer is done, distil all codes'
scales against the FP model's logits (`distill_codes`). One process and torchrun take the
same path: one process is `SingleProcess()`, whose collectives return their input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..evaluation.perplexity import check_context
from ..methods import get_method
from ..methods.codes import per_weight
from .checks import (NonFiniteWeights, UnknownSkip, binarized_names, check_finite, check_skip,
                     linear_names, refuse_non_finite, skip_matches)
from .config import ConfigError, QuantizeConfig
from .destination import CodesDestination
from .distill import (DistillReport, TeacherTargets, distill_codes, distill_windows,
                      teacher_targets)
from .distributed import Distributed, report_dict
from .single_process import SingleProcess
from .journal import JournalMismatch, LayerJournal
from .outside import OutsideReport, quantize_outside
from .reconstruct import reconstruct
from .refine import LayerRefiner, LayerRefineReport
from .rotate import RotationReport, rotate_model
from .walker import UnsupportedArchitecture, collect_hessians, find_decoder_layers, find_linears, \
    walk_layers

log = logging.getLogger(__name__)

__all__ = ["binarize_model", "quantize", "QuantizeReport", "LinearReport", "peak_memory_mb",
           "NonFiniteWeights", "UnknownSkip", "binarized_names", "check_finite", "check_skip",
           "linear_names", "refuse_non_finite", "skip_matches"]


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
    distill: DistillReport | None = None  # with distill
    outside: OutsideReport | None = None  # embeddings / lm_head quantized
    notes: list[str] = field(default_factory=list)  # what the user should know about the run

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
                **({"rotation": dataclasses.asdict(self.rotation)} if self.rotation else {}),
                **({"distill": dataclasses.asdict(self.distill)} if self.distill else {}),
                **({"outside": self.outside.to_dict()} if self.outside else {}),
                **({"notes": list(self.notes)} if self.notes else {})}


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
    LM head stay as they are (with config.rotate they are rotated, the function unchanged).
    Returns the report (and, with keep_codes, every layer's codes for packing).
    `on_layer(i, n)` is called after each decoder layer (progress bars).
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
    dist = dist if dist is not None else SingleProcess()
    method = get_method(config.method, config.method_args)
    report = QuantizeReport(method=config.method,
                            method_args=dataclasses.asdict(method.args), config=config.to_dict())
    start = time.perf_counter()
    path, layers = find_decoder_layers(model)
    if not any(find_linears(layer) for layer in layers):
        raise UnsupportedArchitecture(
            f"the decoder layers at {path} of {type(model).__name__} hold no nn.Linear (GPT-2 "
            "style Conv1D projections are not supported), so there is nothing to binarize")
    check_context(model, max((w.shape[-1] for w in calibration), default=0))
    refiner = None
    if config.refine is not None:
        refiner = LayerRefiner(config.refine, device, dist)
    elif method.unrefined_note:  # codes meant to be trained, run without refinement
        report.notes.append(method.unrefined_note)
        log.warning("%s", method.unrefined_note)
    if not checked:
        with dist.guard("weight checks"):
            check_skip(model, config.skip)
            check_finite(model)
    teacher = _teacher(model, config, calibration, device, dist, source, keep_codes)
    if config.rotate is not None:
        if source is not None:
            raise ConfigError("rotate needs the whole model in memory (the embeddings and "
                              "lm_head rotate with every layer); load it whole, not streamed")
        report.rotation = rotate_model(model)
    if source is None:  # a streamed run quantizes them before writing them (binarize_streaming)
        report.outside = quantize_outside(model, config.embeddings, config.lm_head)
    per_linear = (source is not None and dist.world == 1 and journal is None and not keep_codes
                  and refiner is None)
    run = _Run(method, config, report, dist, device, refiner,
               CodesDestination(method, report, keep_codes=keep_codes, journal=journal,
                                source=source, per_linear=per_linear),
               needs_hessian=method.uses_hessian(config.feedback),
               on_layer=on_layer, n_layers=len(layers))
    walk = dist.guarded(walk_layers(model, dist.local_windows(calibration), device,
                                    source=source), "calibration forward")
    try:
        for i, path, layer, inputs in walk:
            run.dest.flush()  # the walker has run the previous layer on its calibrated weights
            _layer(run, i, path, layer, inputs)
            del inputs  # the walker alone holds them while it runs the layer
    finally:
        run.dest.flush()
    if teacher is not None:
        with _on(model, device):
            report.codes, report.distill = distill_codes(model, report.codes, *teacher,
                                                         config.distill, device)
    report.seconds = time.perf_counter() - start
    report.peak_memory_mb = dist.max_over_ranks(peak_memory_mb(device))
    return report


def _teacher(model: nn.Module, config: QuantizeConfig, calibration: list[Tensor], device,
             dist, source, keep_codes: bool) -> tuple[list[Tensor], list[TeacherTargets]] | None:
    """With config.distill: the windows distillation trains on (`distill_windows`) and the
    FP model's top-k on them, taken before anything is quantized (or rotated); the whole
    model must be in this one process."""
    if config.distill is None:
        return None
    if source is not None or dist.world > 1 or not keep_codes:
        raise ConfigError("distill trains the whole model at once: load it whole (not "
                          "streamed), in one process (not torchrun)")
    with _on(model, device):
        windows = distill_windows(model, calibration, config.distill, device=device)
        return windows, teacher_targets(model, windows, config.distill.topk, device)


@contextlib.contextmanager
def _on(model: nn.Module, device):
    """The whole model on `device` inside the block, back where it was after."""
    home = next(model.parameters()).device
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


@dataclass
class _Run:
    """What every layer of one binarize_model call shares."""

    method: Any
    config: QuantizeConfig
    report: QuantizeReport
    dist: Any                    # Distributed or SingleProcess
    device: torch.device | str
    refiner: LayerRefiner | None
    dest: CodesDestination       # holds the journal, if any
    needs_hessian: bool
    on_layer: Callable[[int, int], None] | None
    n_layers: int


def _layer(run: _Run, i: int, path: str, layer: nn.Module, inputs) -> None:
    """One decoder layer: its codes restored from the journal, or solved (and refined);
    then handed to the destination, and `on_layer` told (under the ranks' guard, so that an
    error there stops every rank). Nothing of the layer stays bound once it returns."""
    journal = run.dest.journal
    if run.refiner is not None:  # the layer is still full precision: its FP targets
        run.refiner.begin(layer, inputs)
    linears = {n: m for n, m in find_linears(layer).items()
               if not skip_matches(n, run.config.skip)}
    journaled = run.dist.decide(journal is not None and journal.done(i))
    if journaled:
        codes, reports = _restore(run, i, path, linears)
        Q = None
    else:
        codes, reports, Q = _solve(run, i, path, layer, inputs, linears)
        if run.refiner is not None:  # refined stored codes feed the next layer
            codes = _refine(run, i, linears, codes, inputs)
    with run.dist.guard(f"layer {i} codes"):
        run.report.linears.extend(reports)
        run.dest.layer(i, path, linears, codes, reports, Q=Q, journaled=journaled)
        if run.on_layer:
            run.on_layer(i + 1, run.n_layers)
    if journaled:
        log.info("layer %d restored from %s", i, journal.path if journal is not None else "rank 0")


def _solve(run: _Run, i: int, path: str, layer: nn.Module, inputs,
           linears: dict[str, nn.Module]) -> tuple[dict[str, Any], list, dict[str, Tensor]]:
    """(calibrated codes, reports, stored weights) of layer i: H accumulated, each linear
    solved by its owner and shared with every rank. Per-linear runs pack each linear at once
    and return no codes for it."""
    dist, dest = run.dist, run.dest
    owners = dist.owners({n: tuple(m.weight.shape) for n, m in linears.items()},
                         heavy=run.method.needs_gram)
    with dist.guard(f"Hessians of layer {i}"):  # one H per input tensor (q/k/v, gate/up)
        hessians = (collect_hessians(layer, inputs, dist.hessian_names(list(linears), owners),
                                     run.device) if run.needs_hessian else {})
    if hessians:
        hessians = dist.reduce_hessians(hessians, owners)
    done: dict[str, tuple[Any, LinearReport]] = {}  # name -> (calibrated codes, report)
    Q: dict[str, Tensor] = {}
    with dist.guard(f"layer {i}"):
        for name in [n for n in linears if owners[n] == dist.rank]:
            # a shared H is freed once the last linear reading it is done
            rec, rep = _quantize_linear(linears[name], f"{path}.{name}",
                                        _take_hessian(hessians, name), run.method, run.config)
            if dest.per_linear:
                dest.linear(i, name, linears[name], rec.calibrated)
            elif dest.pending is not None:  # in the weights' dtype at once: no fp32 layer held
                Q[name] = rec.Q.to(linears[name].weight.dtype)
            done[name] = (None if dest.per_linear else rec.calibrated, rep)
            del rec
    del hessians
    with dist.guard(f"layer {i} codes"):
        shared = dist.share_layer({n: (c, report_dict(r)) for n, (c, r) in done.items()},
                                  list(linears), owners)
        for name, (codes, _) in shared.items():
            if name not in done:  # another rank's linear: computed with its calibrated codes
                _set_weight(linears[name], codes.dequantize())
    codes = {n: c for n, (c, _) in shared.items() if c is not None}
    return codes, [_linear_report(r) for _, r in shared.values()], Q


def _restore(run: _Run, i: int, path: str, linears: dict[str, nn.Module]
             ) -> tuple[dict[str, Any], list]:
    """Layer i's calibrated codes and reports from the journal (rank 0 reads it and shares
    them); the linears compute with those codes' weights."""
    dist, journal = run.dist, run.dest.journal
    with dist.guard(f"restoring layer {i}"):
        codes, reports = journal.load(i) if journal is not None else ({}, [])
        if journal is not None and set(codes) != set(linears):
            raise JournalMismatch(f"layer {i} in {journal.path} holds {sorted(codes)}, the "
                                  f"model has {sorted(linears)}; choose a new --resume-dir")
    by_name = {r["name"]: r for r in reports}
    shared = dist.share_layer({n: (c, by_name[f"{path}.{n}"]) for n, c in codes.items()},
                              list(linears), {n: 0 for n in linears})
    with dist.guard(f"restoring layer {i}"):
        for name, linear in linears.items():
            Q = shared[name][0].dequantize()
            if tuple(Q.shape) != tuple(linear.weight.shape):
                raise JournalMismatch(f"{path}.{name}: journal codes are {tuple(Q.shape)}, "
                                      f"the weight is {tuple(linear.weight.shape)}; choose a "
                                      "new --resume-dir")
            _set_weight(linear, Q)
    return ({n: c for n, (c, _) in shared.items()},
            [_linear_report(r) for _, r in shared.values()])


def _refine(run: _Run, i: int, linears: dict[str, nn.Module], calibrated: dict[str, Any],
            inputs) -> dict[str, Any]:
    """Layer i's stored codes refined against the FP layer; the linears get their weights
    now (the walker runs the layer on them). Storing them again changes nothing. Under
    torchrun the ranks train in step; rank 0's codes are the ones every rank keeps."""
    stored = {n: run.method.store(c) for n, c in calibrated.items()}
    refined, rep = run.refiner.refine(i, stored, inputs)
    if run.dist.world > 1:
        own = {n: (c, {}) for n, c in refined.items() if run.dist.is_main}
        shared = run.dist.share_layer(own, list(refined), dict.fromkeys(refined, 0))
        refined = {n: c for n, (c, _) in shared.items()}
    run.report.refine.append(rep)
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


quantize = binarize_model  # `binllm.quantize(model, config, calibration)`
