"""Every shipped YAML recipe validates, on its own, through the same path users take."""

from __future__ import annotations

from pathlib import Path

import pytest

from plinth.cli import main
from plinth.config.load import load_config

SHIPPED = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_there_are_shipped_recipes():
    assert {p.stem for p in SHIPPED} >= {"quickstart", "ref-cpu-decoder"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipe_validates(path, capsys):
    resolved = load_config([path])
    assert resolved.config.model.param_count() > 0
    assert main(["config", "validate", str(path)]) == 0
    assert capsys.readouterr().out.startswith("ok ")
