"""Start-up hook: `AutoModelForCausalLM.from_pretrained(DIR)` of a binllm directory works in
every Python process of an environment where binllm is installed, without `import binllm`.

binllm's wheel ships `binllm_autoload.pth` next to this module in site-packages; Python runs its
one line at start-up, which calls `install()`: a finder is put on `sys.meta_path` that waits
for transformers to import its quantizer registry (`transformers.quantizers.auto`), and only
then imports binllm (standard library only until that moment, nothing else is imported at
start-up, so processes that never load transformers pay nothing) and lets
`binllm.packed.hf_hook` register binllm's quantizer right after that module has executed.
Set BINLLM_NO_AUTOLOAD=1 (or true, yes; any case) to turn it off; any other value, 0 and false
included, leaves it on. Kept outside the binllm package so that binllm itself
is imported only when needed, from the same place `import binllm` would find it.
"""

from __future__ import annotations

import os
import sys

TARGET = "transformers.quantizers.auto"
TRUE = ("1", "true", "yes")


def disabled() -> bool:
    """Whether BINLLM_NO_AUTOLOAD asks, with an explicit true value, for no hook."""
    return os.environ.get("BINLLM_NO_AUTOLOAD", "").strip().lower() in TRUE


class AutoloadBinllm:
    """One-shot meta-path finder for TARGET: removes itself and hands over to binllm's hook."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        for f in [f for f in sys.meta_path if isinstance(f, AutoloadBinllm)]:
            sys.meta_path.remove(f)
        try:
            from binllm.packed.hf_hook import RegisterOnImport
        except Exception:  # noqa: BLE001  (a broken binllm must never break transformers)
            return None
        return RegisterOnImport().find_spec(fullname, path, target)


def install() -> None:
    if disabled() or TARGET in sys.modules:
        return
    if not any(isinstance(f, AutoloadBinllm) for f in sys.meta_path):
        sys.meta_path.insert(0, AutoloadBinllm())
