"""Register binllm with transformers when transformers loads its quantizer registry.

`import binllm` must not import transformers (it is slow and optional for the library's
tensor code), yet `AutoModelForCausalLM.from_pretrained(DIR)` must know quant_method
"binllm" after `import binllm`. `install()` therefore registers at once when
`transformers.quantizers.auto` is already imported, and otherwise puts a one-shot finder on
`sys.meta_path` that wraps that module's loader and calls `binllm.packed.hf_integration.register()`
right after the module has executed. Only the standard library is imported here.
`binllm_autoload` (installed with a .pth) hands over to `RegisterOnImport` in processes that
never import binllm themselves.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys

log = logging.getLogger(__name__)

TARGET = "transformers.quantizers.auto"


def _register() -> None:
    try:
        from .hf_integration import register

        register()
    except Exception as e:  # noqa: BLE001  (never break `import transformers` for binllm)
        log.warning("binllm could not register with transformers (%s); use binllm.load(DIR)", e)


class _RegisteringLoader(importlib.abc.Loader):
    """Delegates to the real loader, then registers binllm."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name):  # get_source, get_filename, … for tracebacks and inspect
        return getattr(self._loader, name)


class RegisterOnImport(importlib.abc.MetaPathFinder):
    """One-shot finder for TARGET: removes itself, finds the real spec, wraps its loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        for f in [f for f in sys.meta_path if isinstance(f, RegisterOnImport)]:
            sys.meta_path.remove(f)  # every instance: the real spec is found below, once
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install() -> None:
    """Register now if transformers' registry is loaded, else when it gets imported."""
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, RegisterOnImport())
