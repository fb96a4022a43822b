"""One error type: every exception binllm raises for its user is a BinllmError."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from binllm.errors import BinllmError

PKG = Path(__file__).resolve().parents[1] / "binllm"
# control flow inside one function or module, never seen by a user
INTERNAL = {"StopForward", "_SharingBroke", "NotStreamable", "_SignSTE"}


def _exception_classes():
    for path in sorted(PKG.rglob("*.py")):
        module = ".".join(("binllm", *path.relative_to(PKG).with_suffix("").parts))
        module = module.removesuffix(".__init__")
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and node.bases and node.name not in INTERNAL:
                yield module, node.name


@pytest.mark.parametrize("module,name", list(_exception_classes()))
def test_every_user_facing_exception_is_a_binllm_error(module, name):
    cls = getattr(importlib.import_module(module), name)
    if isinstance(cls, type) and issubclass(cls, BaseException):
        assert issubclass(cls, BinllmError), f"{module}.{name}"


def test_the_cli_reports_any_binllm_error_in_one_line(capsys, monkeypatch):
    from binllm.cli import app

    class Odd(BinllmError):
        pass

    def boom(args):
        raise Odd("something the user can fix")

    parser = app.build_parser()
    monkeypatch.setattr(app, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["methods"].set_defaults(func=boom)
    assert app.main(["methods"]) == 2
    assert capsys.readouterr().err == "binllm: error: something the user can fix\n"
