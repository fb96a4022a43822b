"""`import binllm` stays light, and the import directions of architecture.md §4 hold."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "binllm"
HEAVY = ("transformers", "datasets", "lm_eval", "accelerate")
# architecture.md §4: these import torch (and the standard library) and each other, only.
# packed_formats is packing's per-format table, split out of packing.py.
PURE = ("packing", "packed_formats", "hessian", "methods", "reconstruct")
# the command line: cli.py and its subcommand modules (cli_*.py); only they and __main__
# may import it
CLI = ("cli",)


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=PKG.parent, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_import_binllm_loads_no_heavy_package_and_no_cuda():
    out = _run(
        "import sys, binllm\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "print('torch' in sys.modules)\n"
        "import torch\n"
        "print(torch.cuda.is_initialized())\n")
    assert out.splitlines() == ["[]", "False", "False"]


def test_engine_modules_load_without_transformers_and_without_cuda():
    """Touching the engine (config, methods, reconstruct, walker, binarize, data, evaluate,
    cli) still imports no transformers and initialises no CUDA."""
    out = _run(
        "import sys, torch, binllm\n"
        "binllm.QuantizeConfig, binllm.METHODS, binllm.reconstruct, binllm.binarize_model\n"
        "import binllm.walker, binllm.data, binllm.evaluate, binllm.cli\n"
        "binllm.cli.build_parser()\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "print(torch.cuda.is_initialized())\n")
    assert out.splitlines() == ["[]", "False"]


def _module_name(path: Path) -> str:
    return ".".join(("binllm", *path.relative_to(PKG).with_suffix("").parts)).removesuffix(
        ".__init__")


def _imports(path: Path) -> set[str]:
    """Absolute names of every module imported anywhere in the file (lazy imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base)
                if node.module:
                    names.add(f"{prefix}.{node.module}")
                else:
                    names.update(f"{prefix}.{a.name}" for a in node.names)
            else:
                names.add(node.module)
    return names


def _sources():
    return sorted(PKG.rglob("*.py"))


def _top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if parts[0] == "binllm" and len(parts) > 1 else parts[0]


def test_import_parser_resolves_relative_imports():
    names = _imports(PKG / "methods" / "__init__.py")
    assert "binllm.methods.base" in names and "torch" not in names
    assert {"binllm.hessian", "binllm.methods.base"} <= _imports(PKG / "reconstruct.py")


@pytest.mark.parametrize("path", [p for p in _sources()
                                  if _top(_module_name(p)) in PURE],
                         ids=lambda p: str(p.relative_to(PKG)))
def test_pure_modules_import_only_torch_stdlib_and_each_other(path):
    bad = []
    for name in _imports(path):
        top = name.split(".")[0]
        if top == "binllm":
            if _top(name) not in PURE:
                bad.append(name)
        elif top != "torch" and top not in sys.stdlib_module_names:
            bad.append(name)
    assert not bad, f"{path.relative_to(PKG)} imports {bad}; these modules may use torch only"


def _is_cli(name: str) -> bool:
    top = _top(name)
    return name.startswith("binllm.") and (top in CLI or top.startswith("cli_"))


def test_nothing_outside_the_command_line_imports_it():
    offenders = {str(p.relative_to(PKG)): sorted(n for n in _imports(p) if _is_cli(n))
                 for p in _sources()
                 if not _is_cli(_module_name(p)) and p.name != "__main__.py"}
    assert not {k: v for k, v in offenders.items() if v}
