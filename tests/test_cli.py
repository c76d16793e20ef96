"""The command line: help everywhere, explain/show/validate/schema, exit codes, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from plinth.cli import COMMANDS, main
from plinth.config.load import load_config


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_console_script_and_module_entry_points_work():
    for cmd in (["plinth", "--help"], [sys.executable, "-m", "plinth", "--help"]):
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert p.returncode == 0 and "config" in p.stdout and "quickstart" in p.stdout


def test_help_does_not_import_torch():
    code = "\n".join(
        [
            "import sys",
            "from plinth.cli import main",
            "try:",
            "    main(['--help'])",
            "except SystemExit:",
            "    pass",
            "print('torch' in sys.modules)",
        ]
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip().endswith("False")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as e:
        main([*command.split(), "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: plinth {command}")


def test_explain_lists_sections(capsys):
    code, out, _ = run(capsys, "config", "explain")
    assert code == 0
    for section in (
        "model",
        "data",
        "pretrain",
        "finetune",
        "optim",
        "hardware",
        "inference",
        "compress",
        "tracking",
    ):
        assert f"\n{section} " in out


def test_explain_field_shows_doc_type_default_current_and_source(capsys):
    code, out, _ = run(capsys, "config", "explain", "optim.lr", "quickstart", "optim.lr=5e-4")
    assert code == 0
    assert "Peak learning rate" in out and "float" in out and "> 0 and <= 10" in out
    assert "default  0.001" in out and "current  0.0005   (from command line)" in out
    code, out, _ = run(capsys, "config", "explain", "optim.name")
    assert "allowed  adamw, adam, sgd, muon" in out and "(from default)" in out


def test_explain_section_lists_fields_with_current_values(capsys):
    code, out, _ = run(capsys, "config", "explain", "model", "quickstart")
    assert code == 0 and "model.n_layers" in out and "(file " in out


def test_explain_unknown_key_is_a_usage_error(capsys):
    code, _, err = run(capsys, "config", "explain", "optim.lrr")
    assert code == 2 and "Did you mean 'optim.lr'" in err and "Traceback" not in err


def test_show_prints_yaml_with_provenance_that_round_trips(capsys, repo_root):
    recipe = repo_root / "configs" / "quickstart.yaml"
    code, out, _ = run(capsys, "config", "show", str(recipe), "model.n_layers=3")
    assert code == 0
    assert "n_layers: 3  # command line" in out
    assert f"d_model: 192  # file {recipe}" in out and "arch: decoder  # preset tiny" in out
    data = yaml.safe_load(out)
    assert data["model"]["n_layers"] == 3
    expected = load_config([recipe], ["model.n_layers=3"]).config
    assert load_config([], []).config.__class__.model_validate(data) == expected


def test_validate_ok_and_bad(capsys, write_yaml):
    code, out, _ = run(capsys, "config", "validate", "quickstart")
    assert code == 0 and out.startswith("ok ")
    bad = write_yaml("model:\n  n_heads: 7\n")
    code, _, err = run(capsys, "config", "validate", str(bad))
    assert code == 2 and str(bad) in err and "must divide d_model" in err


def test_schema_is_json_schema_with_descriptions(capsys, tmp_path):
    target = tmp_path / "schema.json"
    assert main(["config", "schema", "--output", str(target)]) == 0
    schema = json.loads(target.read_text())
    optim = schema["$defs"]["OptimConfig"]["properties"]
    assert "Peak learning rate" in optim["lr"]["description"]
    assert optim["name"]["enum"] == ["adamw", "adam", "sgd", "muon"]


def test_presets_command_lists_sizes(capsys):
    code, out, _ = run(capsys, "config", "presets")
    assert code == 0 and "small" in out and "123.6M" in out


def test_usage_errors_exit_2_and_failures_exit_1(capsys):
    assert run(capsys, "config", "show", "missing.yaml")[0] == 2
    with pytest.raises(SystemExit) as e:  # argparse: unknown flag
        main(["config", "show", "--bogus"])
    assert e.value.code == 2
    assert run(capsys, "config")[0] == 2  # a group alone prints its help


def test_bad_input_from_real_process_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [1,\n")
    p = subprocess.run(
        ["plinth", "config", "validate", str(bad)], capture_output=True, text=True, check=False
    )
    assert p.returncode == 2 and "not valid YAML" in p.stderr and "Traceback" not in p.stderr


def test_environment_warnings_bf16_on_cpu_without_support():
    from plinth.config.checks import environment_warnings

    r = load_config([], ["hardware.precision=bf16", "hardware.device=cpu"])
    warnings = environment_warnings(r, cuda_available=False, native_bf16=False)
    assert any("without native bf16" in w and "precision=fp32" in w for w in warnings)
    assert environment_warnings(r, cuda_available=False, native_bf16=True) == []


def test_recipe_refuses_options_it_cannot_honour():
    from plinth.config.checks import reject_unsupported
    from plinth.errors import NotSupportedError

    r = load_config([], ["compress.quantization=int8"])
    with pytest.raises(
        NotSupportedError, match=r"compress.quantization='int8' \(from command line\)"
    ):
        reject_unsupported(
            r, {"compress.quantization": "quantisation is a separate command"}, "pretrain"
        )
    reject_unsupported(load_config(), {"compress.quantization": "x"}, "pretrain")  # defaults pass
