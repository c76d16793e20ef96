"""`plinth config validate` refuses (exit 2) exactly the configs `plinth pretrain` refuses.

Both commands run in-process through the CLI on the same tiny config plus one bad setting each;
validate exits 2 iff pretrain exits 2, and a refused pretrain has written nothing."""

from __future__ import annotations

import pytest

from plinth.cli import main
from plinth.errors import EXIT_USAGE

BAD = {
    "tokens-unit": ["optim.batch_unit=tokens", "optim.global_batch=100"],  # seq len 32
    "vocab-too-small": ["model.vocab_size=100"],
    "tokenizer-file-bigger": ["data.tokenizer.path={data}/tokenizer.json", "model.vocab_size=300"],
    "tokenizer-file-missing": ["data.tokenizer.path={tmp}/nope.json"],
    "run-name-escapes": ["tracking.run_name=../escape"],
    "output-dir-is-file": ["tracking.output_dir={tmp}/afile"],
    "unsupported": ["compress.pruning=magnitude"],
    "source-without-path": ["data.sources=[{kind: text}]"],
    "no-sources": ["data.sources=[]"],
    "negative-seed": ["seed=-1"],
    "bool-micro-batch": ["optim.micro_batch=true"],
    "beta-one": ["optim.betas=[0.9, 1.0]"],
    "missing-decontam-set": ["data.decontaminate=[{tmp}/none.jsonl]"],
    "base-in-pretrain": ["finetune.base=ref-smollm2"],
}


def _run(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, " ".join(err.split())


@pytest.mark.parametrize("name", sorted(BAD))
def test_validate_refuses_iff_pretrain_refuses(name, tiny_overrides, tiny_data_dir, tmp_path,
                                               capsys, write_yaml):
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    bad = [
        o.replace("{data}", str(tiny_data_dir)).replace("{tmp}", str(tmp_path)) for o in BAD[name]
    ]
    cfg = write_yaml("pretrain:\n  max_steps: 1\n", "cfg.yaml")
    args = [str(cfg), *tiny_overrides, *bad]
    rc_validate, err_validate = _run(capsys, "config", "validate", *args)
    rc_pretrain, err_pretrain = _run(capsys, "pretrain", *args, "--quiet")
    assert rc_validate == EXIT_USAGE, err_validate
    assert rc_pretrain == EXIT_USAGE, err_pretrain
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    assert (tmp_path / "afile").read_text(encoding="utf-8") == "x"


def test_a_good_config_passes_both(tiny_overrides, tmp_path, capsys, write_yaml):
    cfg = write_yaml("pretrain:\n  max_steps: 1\n", "cfg.yaml")
    args = [str(cfg), *tiny_overrides, "tracking.run_name=good", "tracking.sample_prompts=[]",
            "tracking.eval_batches=1"]
    assert _run(capsys, "config", "validate", *args)[0] == 0
    assert _run(capsys, "pretrain", *args, "--quiet")[0] == 0
    assert (tmp_path / "runs" / "good" / "config.yaml").is_file()


@pytest.mark.parametrize(
    ("bad", "expect"),
    [
        (["finetune.max_length=4"], "finetune.max_length"),
        (["compress.quantization=int8"], "cannot honour"),
        (["finetune.task=classification"], "labels"),
    ],
)
def test_validate_makes_the_finetune_start_checks(bad, expect, capsys):
    rc, err = _run(capsys, "config", "validate", "sft-smollm2-lora", *bad)
    assert rc == EXIT_USAGE and expect in err, err
