"""Shared fixtures. Tests run on CPU with few threads so the suite behaves the same everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def write_yaml(tmp_path):
    """Write a YAML text to tmp_path/name and return the path."""

    def _write(text: str, name: str = "cfg.yaml") -> Path:
        p = tmp_path / name
        p.write_text(text, encoding="utf-8")
        return p

    return _write
