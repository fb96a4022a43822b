"""Model plumbing: find the decoder layers, capture their inputs, walk them one at a time.

Nothing here knows about binarization. The walker works on any Hugging Face decoder-only
model whose layers sit in one `nn.ModuleList` (found generically, see `find_decoder_layers`)
and whose layer-0 call can be intercepted with a forward pre-hook.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..errors import BinllmError

if TYPE_CHECKING:
    from .hessian import HessianAccumulator

log = logging.getLogger(__name__)

# Where decoder layers live, for models whose `_no_split_modules` does not say.
LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers",
               "transformer.blocks", "model.transformer.h", "transformer.layers")


class UnsupportedArchitecture(BinllmError, ValueError):
    """The walker cannot find the decoder layers of this model."""


class StopForward(Exception):
    """Raised by the layer-0 pre-hook once its inputs are captured (internal control flow)."""


@contextlib.contextmanager
def calibration_context(model: nn.Module):
    """no_grad, eval mode and use_cache=False for the duration; always restored."""
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if config is not None:
        config.use_cache = False
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
        if config is not None:
            config.use_cache = use_cache


def get_path(model: nn.Module, path: str) -> Any:
    """The attribute at dotted `path` below `model` ("model.layers"), or None where absent."""
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, layers): the ModuleList of decoder layers.

    First choice: the first ModuleList whose children are of a class named in the model's
    `_no_split_modules` (every HF decoder declares its layer class there); then a short
    table of usual paths.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 \
                and type(module[0]).__name__ in names:
            return path, module
    for path in LAYER_PATHS:
        module = get_path(model, path)
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path, module
    raise UnsupportedArchitecture(
        f"cannot find the decoder layers of {type(model).__name__}: no nn.ModuleList of "
        f"{sorted(names) or 'decoder layers'} and none at {', '.join(LAYER_PATHS)}. "
        "binllm supports decoder-only causal LMs whose layers sit in one ModuleList.")


def find_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a decoder layer, in registration order."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


@dataclass
class LayerInputs:
    """Inputs of one decoder layer for every calibration batch: hidden states + kwargs."""

    hidden: list[Tensor]              # each (batch, seqlen, d)
    kwargs: list[dict[str, Any]]      # attention mask, position embeddings, … per batch


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """`fn` applied to every tensor inside `obj` (tuples, lists, dicts: a layer's captured
    kwargs); everything else as it is."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Tensors inside `obj` on `device`."""
    return map_tensors(obj, lambda t: t.to(device))


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[Tensor],
                         device: torch.device | str) -> LayerInputs:
    """Run the model up to decoder layer 0 for each batch of token ids (batch, seqlen).

    Only the modules outside the decoder layers move to `device` (and back afterwards);
    layer 0 is never executed: its pre-hook stores (args, kwargs) and raises StopForward.
    """
    captured = LayerInputs([], [])

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        captured.kwargs.append({k: v for k, v in kwargs.items()
                                if k not in ("past_key_value", "past_key_values", "use_cache")})
        raise StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    moved = move_outside_layers(model, layers, device)
    try:
        for ids in batches:
            with contextlib.suppress(StopForward):
                model(ids.to(device), use_cache=False)
    finally:
        handle.remove()
        move_outside_layers(model, layers, "cpu", only=moved)
    return captured


def outside_modules(model: nn.Module, layers: nn.ModuleList) -> Iterator[nn.Module]:
    """The modules not inside `layers` that hold parameters or buffers of their own."""
    inside = {id(m) for m in layers.modules()}
    for m in model.modules():
        if id(m) not in inside and (any(True for _ in m.parameters(recurse=False))
                                    or any(True for _ in m.buffers(recurse=False))):
            yield m


def move_outside_layers(model: nn.Module, layers: nn.ModuleList, device, only=None) -> list:
    """Move every parameter/buffer-holding module that is not inside `layers` to device;
    returns those that were elsewhere (`only`: move just these back)."""
    if str(device) == "cpu" and only is None:
        return []
    target = torch.empty(0, device=device).device
    moved = [m for m in outside_modules(model, layers)
             if (any(m is o for o in only) if only is not None else _device_of(m) != target)]
    for m in moved:
        m.to(device)
    return moved


def _device_of(module: nn.Module) -> torch.device:
    t = next(iter([*module.parameters(recurse=False), *module.buffers(recurse=False)]))
    return t.device


def run_layer(layer: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
    """One decoder layer call with its captured kwargs; tuple outputs reduce to hidden states."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def walk_layers(model: nn.Module, batches: list[Tensor], device: torch.device | str = "cpu",
                offload: bool = True, source: Any = None
                ) -> Iterator[tuple[int, str, nn.Module, LayerInputs]]:
    """Yield (index, path, layer, inputs) one layer at a time, in order.

    The consumer may change the layer in place (quantize its linears); after it resumes,
    the walker runs the (changed) layer on every batch to build the next layer's inputs,
    then moves the layer back to the CPU when `offload` is set.
    source: layers whose weights are not in memory (`binllm.engine.stream.LayerStream`):
    `source.load(i, path, layer)` fills layer i before it is used and
    `source.release(i, path, layer)` drops it once the next layer's inputs exist;
    `source.captured(model)` is told when layer 0's inputs exist (the source may then drop
    the tensors outside the layers).
    """
    path, layers = find_decoder_layers(model)
    with calibration_context(model):
        inputs = capture_layer_inputs(model, layers, batches, device)
        if source is not None:
            source.captured(model)  # only decoder layers run from here on
        for i, layer in enumerate(layers):
            if source is not None:
                source.load(i, f"{path}.{i}", layer)
            original_device = next(layer.parameters()).device
            layer.to(device)
            yield i, f"{path}.{i}", layer, inputs
            nxt = [run_layer(layer, h.to(device), to_device(kw, device))
                   for h, kw in zip(inputs.hidden, inputs.kwargs)]
            inputs = LayerInputs(nxt, inputs.kwargs)
            if offload:
                layer.to(original_device)
            if source is not None:
                source.release(i, f"{path}.{i}", layer)


class _SharingBroke(Exception):
    """Linears that read one tensor in an earlier batch read different ones now (internal)."""


def collect_hessians(layer: nn.Module, inputs: LayerInputs, names: list[str],
                     device: torch.device | str = "cpu", share: bool = True
                     ) -> dict[str, "HessianAccumulator"]:
    """Run the layer on every batch with forward hooks accumulating each linear's XᵀX.

    share: linears called on the very same input tensor (q/k/v on the normed hidden states,
    gate/up in a LLaMA MLP; found through the hooks by tensor identity, not by names) get one
    accumulator: the first of them adds XᵀX, the others map to the same object. Should the
    grouping seen in an earlier batch not hold in a later one, the Hessians are collected
    again without sharing. The sums are the same bits either way.
    """
    if share:
        try:
            return _collect(layer, inputs, names, device, share=True)
        except _SharingBroke:
            log.info("linears of one input diverged between batches: Hessians not shared")
    return _collect(layer, inputs, names, device, share=False)


def _collect(layer: nn.Module, inputs: LayerInputs, names: list[str], device, share: bool
             ) -> dict[str, "HessianAccumulator"]:
    from .hessian import HessianAccumulator

    linears = find_linears(layer)
    accs: dict[str, HessianAccumulator] = {}
    leader: dict[str, str] = {}  # name -> the linear whose accumulator it shares
    calls: dict[str, list[weakref.ref]] = {}  # this batch's inputs per linear (weak refs)
    since: dict[str, int] = {}  # name -> the batch it was first called in
    batch = [0]

    def hook(name: str, mod, args, out) -> None:
        x = args[0]
        mine = calls.setdefault(name, [])
        if name in leader:  # a follower: its k-th input must be its leader's k-th input
            theirs = calls.get(leader[name], [])
            if len(mine) >= len(theirs) or theirs[len(mine)]() is not x:
                raise _SharingBroke
        elif name in accs:
            accs[name].add_batch(x.detach())
        else:
            since[name] = batch[0]
            # share only with a linear first called in this batch (the same sums so far)
            match = next((n for n, refs in calls.items() if n not in leader and n != name
                          and since[n] == batch[0] and len(refs) == 1 and refs[0]() is x),
                         None) if share and not mine else None
            if match is None:
                accs[name] = HessianAccumulator(linears[name].in_features, device)
                accs[name].add_batch(x.detach())
            else:
                leader[name], accs[name] = match, accs[match]
        mine.append(weakref.ref(x))

    handles = [linears[n].register_forward_hook(functools.partial(hook, n)) for n in names]
    try:
        with torch.no_grad():
            for batch[0], (h, kw) in enumerate(zip(inputs.hidden, inputs.kwargs)):
                calls.clear()
                run_layer(layer, h.to(device), to_device(kw, device))
                if any(len(calls.get(f, [])) != len(calls.get(lead, []))
                       for f, lead in leader.items()):
                    raise _SharingBroke  # a follower missed inputs its leader summed
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in accs]  # never called: an empty accumulator
    for n in missing:
        accs[n] = HessianAccumulator(linears[n].in_features, device)
    return {n: accs[n] for n in names}
