"""The shape of the house: layers point down (the import-linter contract in pyproject.toml),
files and functions stay readable, and the training loop reads like a table of contents."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "plinth"
MAX_FILE_LINES = 700
MAX_FUNCTION_LINES = 120
MAX_LOOP_LINES = 80


def _functions(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_file_over_the_limit():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines (split by responsibility): {long}"


def test_no_function_over_the_limit():
    long = [f"{p.relative_to(SRC)}:{line} {name} ({n} lines)" for p in SRC.rglob("*.py")
            for name, line, n in _functions(p) if n > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_training_loop_fits_on_a_screen():
    (n,) = [n for name, _, n in _functions(SRC / "train" / "loop.py") if name == "train"]
    assert n <= MAX_LOOP_LINES, f"train() is {n} lines; delegate to named steps"


def test_the_limits_catch_a_long_function(tmp_path):
    """The checks above can fail: a 130-line function is measured as such."""
    body = "\n".join(f"    x{i} = {i}" for i in range(129))
    (tmp_path / "m.py").write_text(f"def f():\n{body}\n")
    assert [n for _, _, n in _functions(tmp_path / "m.py")] == [130]


def test_layers_contract_holds():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed (it is in the dev extra)")
    r = subprocess.run([exe, "--no-cache"], cwd=SRC.parents[1], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_model_files_are_single_device():
    """Parallelism is applied from outside (distributed.parallelize): no model file imports
    torch.distributed (import-linter cannot name a subpackage of torch)."""
    found = [str(p.relative_to(SRC)) for p in (SRC / "models").rglob("*.py")
             if "torch.distributed" in p.read_text(encoding="utf-8")]
    assert not found, found
