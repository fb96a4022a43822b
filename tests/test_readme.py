"""The README's Python example runs as written on a CPU machine, and its Quick start stays two
commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    return re.search(r"^## Python\n\n```python\n(.*?)^```", README.read_text(),
                     re.S | re.M).group(1)


def test_quick_start_is_two_commands():
    quick = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick, re.S)
    assert len(blocks) == 2 and all(len(b.strip().splitlines()) == 1 for b in blocks)


def test_python_example_defines_every_name_before_use():
    """path and device are set in the example itself (the cheap half of the test below)."""
    code = python_example()
    assert re.search(r"^path = ", code, re.M) and re.search(r"^device = .*is_available", code,
                                                            re.M)
    assert code.index("path = ") < code.index("from_pretrained(path)")


@pytest.mark.slow
def test_python_example_runs_as_written_on_stories260k(tmp_path, shared):
    """Verbatim, in a fresh interpreter whose working directory sits beside `shared` as the
    repository does (so `../shared/models/stories260K` and `../shared/data` resolve)."""
    (tmp_path / "shared").symlink_to(shared)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "BINLLM_DATA"}
    proc = subprocess.run([sys.executable, "-c", python_example()], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    paper, stored = map(float, proc.stdout.split())
    assert paper == pytest.approx(1.1, abs=0.1) and stored > paper
    assert (work / "out" / "billm" / "model.safetensors").is_file()
