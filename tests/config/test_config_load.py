"""Layered loading: precedence, provenance, coercion, and one clear paragraph for bad input."""

from __future__ import annotations

import pytest

from plinth.config.load import CLI, DEFAULT, load_config
from plinth.errors import EXIT_USAGE, ConfigError


def test_precedence_default_preset_files_cli(write_yaml):
    base = write_yaml("preset: small\noptim:\n  lr: 3.0e-4\n  warmup_steps: 10\n", "base.yaml")
    top = write_yaml("optim:\n  warmup_steps: 20\nmodel:\n  n_layers: 6\n", "top.yaml")
    r = load_config([base, top], ["model.n_layers=2", "optim.betas=[0.9, 0.99]"])
    c = r.config
    assert c.model.d_model == 768 and r.source("model.d_model") == "preset small"
    assert c.optim.lr == 3e-4 and r.source("optim.lr") == f"file {base}"
    assert c.optim.warmup_steps == 20 and r.source("optim.warmup_steps") == f"file {top}"
    assert c.model.n_layers == 2 and r.source("model.n_layers") == CLI
    assert c.optim.betas == (0.9, 0.99)
    assert c.optim.eps == 1e-8 and r.source("optim.eps") == DEFAULT
    assert r.source("preset") == f"file {base}"


def test_a_file_overrides_only_the_keys_it_sets(write_yaml):
    f = write_yaml("preset: tiny\nmodel:\n  d_model: 128\n")
    c = load_config([f]).config.model
    assert (c.d_model, c.n_layers, c.vocab_size) == (128, 4, 8192)
    assert c.ffn_dim == 384  # derived from the new width, not stale from the preset


def test_preset_from_command_line_still_loses_to_files(write_yaml):
    f = write_yaml("model:\n  n_layers: 3\n")
    c = load_config([f], ["preset=base"]).config.model
    assert c.n_layers == 3 and c.d_model == 2048 and c.n_kv_heads == 4


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("optim.lr=3e-4", "lr", 3e-4),
        ("optim.warmup_steps=7", "warmup_steps", 7),
        ("optim.grad_clip=null", "grad_clip", None),
        ("optim.grad_clip=", "grad_clip", None),
        ("optim.name=muon", "name", "muon"),
    ],
)
def test_override_values_are_coerced_to_the_field_type(override, key, expected):
    assert getattr(load_config([], [override]).config.optim, key) == expected


def test_override_lists_and_bools():
    c = load_config([], ["inference.stop=['###', END]", "model.qk_norm=true"]).config
    assert c.inference.stop == ["###", "END"] and c.model.qk_norm is True


def _error(files=(), overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(files, overrides)
    assert info.value.exit_code == EXIT_USAGE
    msg = str(info.value)
    assert "\n" not in msg.strip(), "errors are one paragraph"
    return msg


def test_unknown_key_in_file_names_file_and_suggests(write_yaml):
    f = write_yaml("optim:\n  lerning_rate: 1\n  lr: 1e-3\n")
    msg = _error([f])
    assert str(f) in msg and "optim.lerning_rate" in msg and "Valid keys in optim" in msg
    f2 = write_yaml("optim:\n  wamup_steps: 1\n", "b.yaml")
    assert "did you mean 'optim.warmup_steps'" in _error([f2]).lower()


def test_unknown_key_on_command_line_suggests():
    assert "Did you mean 'model.n_layers'" in _error(overrides=["model.nlayers=3"])
    assert "Did you mean 'optim'" in _error(overrides=["optimm.lr=3"])


def test_wrong_type_names_key_value_source_and_allowed_values(write_yaml):
    f = write_yaml("optim:\n  name: adamx\n")
    msg = _error([f])
    assert "optim.name = 'adamx'" in msg and f"from file {f}" in msg
    assert "allowed: adamw, adam, sgd, muon" in msg
    msg = _error(overrides=["model.n_layers=many"])
    assert "model.n_layers = 'many' (from command line)" in msg and "valid integer" in msg


def test_out_of_range_value_states_the_bound():
    msg = _error(overrides=["optim.lr=-1"])
    assert "optim.lr = -1" in msg and "must be > 0" in msg


def test_missing_file_suggests_shipped_recipe(tmp_path):
    msg = _error([tmp_path / "nope.yaml"])
    assert "does not exist" in msg and "quickstart" in msg
    assert "Did you mean the shipped recipe 'quickstart'" in _error(["quickstar"])


def test_shipped_recipe_resolves_by_name():
    r = load_config(["quickstart"])
    assert r.files[0].name == "quickstart.yaml" and r.config.tracking.run_name == "quickstart"


def test_malformed_yaml_reports_line_and_column(write_yaml):
    f = write_yaml("model:\n  n_layers: 4\n   d_model: 3\n")
    msg = _error([f])
    assert "not valid YAML at line 3" in msg and str(f) in msg


def test_yaml_top_level_must_be_a_mapping(write_yaml):
    assert "top level is a list" in _error([write_yaml("- a\n- b\n")])


def test_section_given_a_scalar(write_yaml):
    assert "'optim' is a section and needs a mapping" in _error([write_yaml("optim: 3\n")])


def test_override_without_equals_and_unknown_preset():
    assert "must look like key=value" in _error(overrides=["optim.lr"])
    msg = _error(overrides=["preset=smal"])
    assert "unknown preset 'smal'" in msg and "Did you mean 'small'" in msg


def test_cross_field_error_names_section_and_source():
    msg = _error(overrides=["model.n_heads=5"])
    assert "model (values from command line)" in msg and "must divide d_model" in msg


def test_unsafe_yaml_tags_are_refused(write_yaml):
    f = write_yaml("seed: !!python/object/apply:os.system ['echo pwned']\n")
    assert "not valid YAML" in _error([f])


def test_empty_file_gives_defaults(write_yaml):
    assert load_config([write_yaml("")]).config.optim.lr == 1e-3
