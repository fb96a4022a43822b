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
# packed.formats is packing's per-format table, packed.layout the registry on top of both.
PURE = ("binllm.packed.packing", "binllm.packed.formats", "binllm.packed.layout",
        "binllm.engine.hessian", "binllm.engine.reconstruct", "binllm.methods", "binllm.atomic",
        "binllm.errors", "binllm.safetensors_io")
# the command line: the binllm.cli package; only it and __main__ may import it
CLI = ("binllm.cli",)


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=PKG.parent, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.slow
def test_import_binllm_loads_no_heavy_package_and_no_cuda():
    out = _run(
        "import sys, binllm\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "print('torch' in sys.modules)\n"
        "import torch\n"
        "print(torch.cuda.is_initialized())\n")
    assert out.splitlines() == ["[]", "False", "False"]


@pytest.mark.slow
def test_engine_modules_load_without_transformers_and_without_cuda():
    """Touching the engine (config, methods, reconstruct, walker, binarize, data, evaluate,
    cli) still imports no transformers and initialises no CUDA."""
    out = _run(
        "import sys, torch, binllm\n"
        "binllm.QuantizeConfig, binllm.METHODS, binllm.reconstruct, binllm.binarize_model\n"
        "import binllm.engine.walker, binllm.evaluation.data, binllm.evaluation.perplexity\n"
        "import binllm.cli\n"
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


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_import_parser_resolves_relative_imports():
    names = _imports(PKG / "methods" / "__init__.py")
    assert "binllm.methods.base" in names and "torch" not in names
    assert {"binllm.engine.hessian", "binllm.methods.base"} <= _imports(
        PKG / "engine" / "reconstruct.py")


@pytest.mark.parametrize("path", [p for p in _sources() if _under(_module_name(p), PURE)],
                         ids=lambda p: str(p.relative_to(PKG)))
def test_pure_modules_import_only_torch_stdlib_and_each_other(path):
    bad = []
    for name in _imports(path):
        top = name.split(".")[0]
        if top == "binllm":
            if not _under(name, PURE) and name not in ("binllm.packed", "binllm.engine"):
                bad.append(name)
        elif top != "torch" and top not in sys.stdlib_module_names:
            bad.append(name)
    assert not bad, f"{path.relative_to(PKG)} imports {bad}; these modules may use torch only"


def _is_cli(name: str) -> bool:
    return _under(name, CLI)


def test_nothing_outside_the_command_line_imports_it():
    offenders = {str(p.relative_to(PKG)): sorted(n for n in _imports(p) if _is_cli(n))
                 for p in _sources()
                 if not _is_cli(_module_name(p)) and p.name != "__main__.py"}
    assert not {k: v for k, v in offenders.items() if v}


def _module_files() -> dict[str, Path]:
    return {_module_name(p): p for p in _sources()}


def _edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module → binllm modules it imports (module-level and lazy imports alike)."""
    edges = {}
    for name, path in modules.items():
        targets = set()
        for imp in _imports(path):
            while imp and imp not in modules:  # `from .codes import X`: X is a name in .codes
                imp = imp.rpartition(".")[0]
            if imp and imp != name:
                targets.add(imp)
        edges[name] = targets
    return edges


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
    edges = _edges(_module_files())
    assert "binllm.packed.layout" in edges["binllm.packed.layers"]  # the walk sees real edges
    cycle = _find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_subpackage_says_what_lives_there():
    for init in PKG.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc) > 80, f"{init.relative_to(PKG)} needs a docstring"


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PKG)): n for p in _sources()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"


# The package graph (docs/layout.md): which binllm packages each may import, lazy imports
# included. kernels reads the bit primitives of packed.packing only (packed computes through
# kernels); `binllm` is the top-level __init__ (its lazy names and the transformers hook).
ALLOWED = {
    "errors": set(),
    "atomic": {"errors"},
    "safetensors_io": {"errors"},
    "preflight": {"errors", "safetensors_io"},
    "methods": {"errors"},
    "kernels": {"errors", "methods", "packed.packing"},
    "packed": {"errors", "atomic", "safetensors_io", "preflight", "methods", "kernels"},
    "runtime": {"errors", "kernels"},
    "evaluation": {"errors", "atomic", "runtime"},
    "engine": {"errors", "atomic", "safetensors_io", "preflight", "methods", "packed",
               "evaluation"},
    "qat": {"errors", "atomic", "methods", "engine", "evaluation"},
    "export": {"errors", "atomic", "safetensors_io", "packed"},
    "cli": {"errors", "atomic", "safetensors_io", "preflight", "methods", "kernels", "packed",
            "evaluation", "runtime", "engine", "qat", "export", "binllm"},
    "__main__": {"cli"},
    "binllm": {"packed"},
}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "binllm"


def test_packages_import_only_what_the_layout_allows():
    bad = []
    for module, targets in _edges(_module_files()).items():
        src = _package(module)
        for t in targets:
            dst = _package(t)
            if dst == src:
                continue
            allowed = ALLOWED[src]
            if dst not in allowed and not any(t == a or t.startswith(a + ".") for a in
                                              (f"binllm.{x}" for x in allowed if "." in x)):
                bad.append(f"{module} -> {t}")
    assert not bad, "imports outside docs/layout.md's package graph: " + ", ".join(sorted(bad))


def test_no_private_name_is_imported_across_modules():
    """`from x import _name` reaches into another module's internals: make the name public."""
    bad = []
    for path in [*_sources(), *sorted((PKG.parent / "tests").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                bad += [f"{path.name}: {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad
