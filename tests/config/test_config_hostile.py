"""Hostile config input: every instance ends in exit code 2 and one short paragraph naming the
key/file and the fix, never a traceback, a hang, or a silent acceptance; nothing is written."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plinth.cli import main
from plinth.config.load import load_config
from plinth.config.yamlio import MAX_DEPTH, read_yaml_file, safe_load
from plinth.errors import EXIT_USAGE, ConfigError, UsageError

SRC = Path(__file__).resolve().parents[2] / "src"

BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(8)]
)  # ~600 bytes that expand to 10**9 values


def _refused(files=(), overrides=(), limit: float = 5.0) -> str:
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(files, overrides)
    assert time.monotonic() - t0 < limit, "refusing must be quick"
    msg = str(info.value)
    assert info.value.exit_code == EXIT_USAGE
    assert "\n" not in msg.strip() and len(msg) < 1200, msg[:2000]
    assert "PydanticUndefined" not in msg
    return msg


def _cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, " ".join(err.split())


# ------------------------------------------------------------------------------------- YAML


def test_alias_bomb_in_a_config_file_is_refused_quickly(write_yaml):
    f = write_yaml(BOMB)
    msg = _refused([f], limit=3)
    assert str(f) in msg and "alias" in msg and "line" in msg and len(msg) < 500


def test_alias_bomb_in_an_override_is_refused():
    value = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x, x, x]"] + ["*a"] * 5) + "]"
    # fine: few aliases; now nest them deep enough to explode
    assert isinstance(safe_load(value), list)
    msg = _refused(overrides=["inference.stop=" + BOMB.replace("\n", ", ").join("{}")])
    assert "inference.stop" in msg and "alias" in msg


def test_too_many_aliases_are_refused():
    text = "a: &a 1\nb: [" + ", ".join(["*a"] * 5000) + "]\n"
    with pytest.raises(Exception, match="aliases"):
        safe_load(text)


@pytest.mark.parametrize("style", ["flow", "block"])
def test_deep_nesting_is_a_clear_error_not_recursion(write_yaml, style):
    depth = 20_000 if style == "flow" else MAX_DEPTH + 5
    text = (
        "model: " + "[" * depth + "]" * depth
        if style == "flow"
        else "".join(f"{'  ' * i}k{i}:\n" for i in range(depth)) + "  " * depth + "v\n"
    )
    f = write_yaml(text)
    msg = _refused([f])
    assert str(f) in msg and "nesting" in msg and "line" in msg


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("seed: 1\nmodel:\n  n_layers: 2\nseed: 2\n", "'seed'", "line 4"),
        ("optim:\n  lr: 1.0e-3\n  warmup_steps: 3\n  lr: 3.0e-4\n", "'lr'", "line 4"),
        ("inference: {top_k: 5, top_k: 6}\n", "'top_k'", "line 1"),
    ],
)
def test_duplicate_keys_are_refused_with_key_file_and_line(write_yaml, text, key, line):
    f = write_yaml(text)
    msg = _refused([f])
    assert str(f) in msg and key in msg and line in msg and "duplicate key" in msg
    assert "first at line" in msg


def test_merge_keys_still_work(write_yaml):
    f = write_yaml("optim: &o {lr: 0.002, warmup_steps: 3}\ninference:\n  top_k: 4\n")
    assert load_config([f]).config.optim.lr == 0.002
    assert safe_load("base: &b {x: 1, y: 2}\nmine:\n  <<: *b\n  y: 3\n")["mine"] == {"x": 1, "y": 3}


def test_every_yaml_reader_uses_the_safe_loader(tmp_path):
    """Eval task files, decontamination task lists and run config.yaml read by the report."""
    from plinth.data.decontam import load_eval_sets
    from plinth.eval.tasks import load_task
    from plinth.report.rundata import load_run

    task = tmp_path / "task.yaml"
    task.write_text("name: t\nname: u\ntype: generate\n", encoding="utf-8")
    for reader in (load_task, lambda p: load_eval_sets([p])):
        with pytest.raises(UsageError) as info:
            reader(task)
        msg = str(info.value)
        assert str(task) in msg and "duplicate key 'name'" in msg and "\n" not in msg
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB, encoding="utf-8")
    with pytest.raises(UsageError, match="alias"):
        load_task(bomb)
    with pytest.raises(UsageError, match="alias"):
        read_yaml_file(bomb, "task file")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(BOMB, encoding="utf-8")
    (run / "metrics.jsonl").write_text("", encoding="utf-8")
    t0 = time.monotonic()
    assert load_run(run).config == {}  # the report shows the run without its config
    assert time.monotonic() - t0 < 5


# ------------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("override", "key", "fix"),
    [
        ("optim.micro_batch=true", "optim.micro_batch", "not the boolean true"),
        ("optim.lr=false", "optim.lr", "not the boolean false"),
        ("model.n_layers=yes", "model.n_layers", "not the boolean true"),
        ("optim.betas=[true, 0.9]", "optim.betas", "not the boolean true"),
        ("data.sources=[{kind: stdlib_code, weight: true}]", "data.sources.0.weight", "boolean"),
        ("seed=-1", "seed", "4294967295"),
        ("seed=4294967296", "seed", "4294967295"),
        ("inference.seed=-5", "inference.seed", ">= 0"),
        ("seed=100000000000000000000000", "seed", "64 bits"),
        ("optim.betas=[0.9, 1.0]", "optim.betas.1", "less than 1"),
        ("optim.betas=[-0.1, 0.95]", "optim.betas.0", "greater than or equal to 0"),
        ("optim.lr=.nan", "optim.lr", "finite"),
        ("model.rope_theta=.inf", "model.rope_theta", "finite"),
        ("distributed.timeout_s=99999999999", "distributed.timeout_s", "less than or equal"),
        ("tracking.run_name=../escape", "tracking.run_name", "plain directory name"),
        ("tracking.run_name=a/b", "tracking.run_name", "plain directory name"),
        ("tracking.run_name=..", "tracking.run_name", "plain directory name"),
        ("tracking.run_name=/tmp/x", "tracking.run_name", "plain directory name"),
    ],
)
def test_values_torch_or_numpy_would_reject_are_refused(override, key, fix):
    msg = _refused(overrides=[override])
    assert key in msg and fix in msg and "command line" in msg


def test_a_boolean_in_a_file_names_the_file(write_yaml):
    f = write_yaml("optim:\n  micro_batch: true\n")
    msg = _refused([f])
    assert "optim.micro_batch" in msg and str(f) in msg and "write a number" in msg


def test_booleans_still_set_boolean_fields():
    assert load_config([], ["model.qk_norm=true"]).config.model.qk_norm is True


# ----------------------------------------------------------------------------- messages


def test_missing_required_fields_never_show_pydantic_undefined(write_yaml):
    f = write_yaml("finetune:\n  tasks:\n    - task: regression\n")
    msg = _refused([f])
    assert "finetune.tasks.0.name is missing" in msg and "finetune.tasks.0.dataset" in msg
    assert str(f) in msg and "required" in msg


@pytest.mark.parametrize(
    "override", ["tracking.sinks=[bogus]", "data.sources=[{kind: bogus}]", "inference.stop=3"]
)
def test_defaults_from_factories_are_shown_as_values(override):
    msg = _refused(overrides=[override])
    assert "default" in msg and "PydanticUndefined" not in msg


@pytest.mark.parametrize(
    "text",
    [
        "optim:\n  name: '{big}'\n",
        "model: '{big}'\n",
        "optim:\n  {big}: 1\n",
        "tracking:\n  run_name: '../{big}'\n",
        "data:\n  sources:\n    - kind: text\n      path: x\n      weight: '{big}'\n",
        "'{big}': 1\n",
    ],
)
def test_huge_values_are_quoted_briefly(write_yaml, text):
    f = write_yaml(text.replace("{big}", "x" * 1_000_000))
    msg = _refused([f])
    assert len(msg) < 500 + len(str(f)), len(msg)


# ------------------------------------------------------------------- validate (the command)


def test_validate_refuses_an_output_dir_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("not a directory", encoding="utf-8")
    rc, err = _cli(capsys, "config", "validate", "quickstart", f"tracking.output_dir={blocker}")
    assert rc == EXIT_USAGE and "tracking.output_dir" in err and "is a file" in err
    rc, err = _cli(
        capsys, "config", "validate", "quickstart", f"tracking.output_dir={blocker}/sub"
    )
    assert rc == EXIT_USAGE and "which is a file" in err
    assert blocker.read_text(encoding="utf-8") == "not a directory"


@pytest.mark.parametrize(
    ("overrides", "expect"),
    [
        (["optim.batch_unit=tokens", "optim.global_batch=1000"], "sequence length"),
        (["model.vocab_size=100"], "too small for a bpe tokenizer"),
        (["compress.pruning=magnitude"], "cannot honour"),
        (["data.sources=[{kind: text}]"], "data.sources[0].path is required"),
        (["data.sources=[]"], "data.sources is empty"),
        (["data.decontaminate=[no/such/file.jsonl]"], "no/such/file.jsonl"),
        (["data.tokenizer.path=no/such/tokenizer.json"], "cannot load the tokenizer"),
    ],
)
def test_validate_runs_the_checks_pretrain_makes(capsys, overrides, expect):
    rc, err = _cli(capsys, "config", "validate", "quickstart", *overrides)
    assert rc == EXIT_USAGE and expect in err, err


def test_validate_says_how_it_would_fit_the_micro_batch(capsys):
    """A micro_batch that does not divide the global batch is lowered at start (same global
    batch): validate says so, as pretrain would, instead of refusing."""
    rc = main(["config", "validate", "quickstart", "optim.global_batch=10", "optim.micro_batch=4"])
    out = " ".join(capsys.readouterr().out.split())
    assert rc == 0 and "optim.micro_batch lowered from 4 to 2" in out, out


def test_validate_checks_finetune_data_paths(capsys, tmp_path):
    rc, err = _cli(
        capsys, "config", "validate", "sft-smollm2-lora",
        f"finetune.dataset={tmp_path / 'missing.jsonl'}",
    )
    assert rc == EXIT_USAGE and "finetune.dataset" in err and "does not exist" in err


def test_validate_is_fast_imports_no_model_and_writes_nothing(tmp_path):
    configs = sorted((SRC.parent / "configs").glob("*.yaml"))
    before = {p: p.read_bytes() for p in configs}
    home = tmp_path / "home"  # no imported reference models: validate must not import them
    code = (
        "import sys; from plinth.cli import main; rc = main(['config', 'validate', "
        + ", ".join(repr(str(p)) for p in configs)
        + "]); assert 'torch' not in sys.modules, 'validate imported torch'; sys.exit(rc)"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "PLINTH_HOME": str(home)}
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
        timeout=120,
    )
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    assert took < 20, f"validate took {took:.1f} s"
    assert "not imported yet" in out.stdout and "Traceback" not in out.stderr
    assert not home.exists() and list(tmp_path.iterdir()) == []
    assert {p: p.read_bytes() for p in configs} == before


def test_subprocess_bad_config_is_one_paragraph(write_yaml, tmp_path):
    f = write_yaml("seed: 1\nseed: 2\n")
    out = subprocess.run(
        [sys.executable, "-m", "plinth", "config", "validate", str(f)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)},
        cwd=tmp_path, timeout=60,
    )
    assert out.returncode == EXIT_USAGE and "Traceback" not in out.stderr
    assert "duplicate key 'seed'" in " ".join(out.stderr.split()) and str(f.name) in out.stderr


def test_a_fifo_as_a_yaml_file_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "cfg.yaml"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(UsageError, match="not a regular file") as e:
        read_yaml_file(fifo, "config file")
    assert str(fifo) in str(e.value) and time.monotonic() - t0 < 5
