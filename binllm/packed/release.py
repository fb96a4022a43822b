"""Loading a saved directory's packed layers so that each holds one representation.

`load_packed` fills a skeleton's BinaryLinears from the files one layer at a time (read, derive
the kernel form, release the packed tensors: `binllm.packed.source`); `attach_sources` does the
same for layers transformers' loader filled. `warm_kernels` loads the compiled CPU kernels at
load time and `return_freed_memory` hands the load's freed temporaries back to the OS, so the
first forward costs and the resident size after loading are those of the model itself.
"""

from __future__ import annotations

import logging

from torch import nn

from .layers import BinaryLinear
from .saved_dir import SavedModel
from .source import SavedSources

log = logging.getLogger(__name__)


def warm_kernels(model: nn.Module) -> None:
    """Load the compiled CPU kernels now (built on first use, then loaded from torch's cache:
    0.4–2 s) when a layer will use them, so the first forward, e.g. inside a timed generation,
    does not pay for it."""
    for m in model.modules():
        if isinstance(m, BinaryLinear) and m.kernels and not m.cache_dequantized \
                and m.layout_device().type == "cpu":
            from ..kernels.cpu_build import extension

            extension()
            return


def load_packed(model: nn.Module, saved: SavedModel, *, keep_packed: bool = False) -> int:
    """Fill every BinaryLinear of `model` listed in `saved` from its files, one layer at a
    time: read its packed tensors (fixing their sha256), derive what its forward computes from
    and, unless keep_packed, release the tensors (`BinaryLinear.prepare`). Returns how many."""
    sources = SavedSources(saved)
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, BinaryLinear) and name in saved.layouts:
            source, tensors = sources.first_read(name, m.layout)
            m.set_packed(tensors, None if keep_packed else source)
            if not keep_packed:
                m.prepare()
            n += 1
    return n


def attach_sources(model: nn.Module, saved: SavedModel) -> int:
    """For a model whose BinaryLinears were filled by another loader (transformers'): attach
    each layer's file where its buffers hold exactly the file's bytes, and release them
    (`BinaryLinear.prepare`); returns how many were released."""
    sources = SavedSources(saved)
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, BinaryLinear) and name in saved.layouts and not m.is_released():
            source, _ = sources.first_read(name, m.layout)
            if m.attach_source(source):
                m.prepare()
                n += 1
            else:
                log.warning("%s: the loaded packed tensors differ from %s; they stay in memory",
                            name, saved.path)
    return n


def return_freed_memory() -> None:
    """Hand the heap memory freed while loading (each layer's unpacked codes and kernel-form
    temporaries) back to the OS, so the process's resident size is what the model holds:
    glibc's malloc_trim(0); nothing where the C library has none."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass
