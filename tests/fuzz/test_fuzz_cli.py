"""Fuzz the real CLI with mutated inputs: shipped configs, data files and checkpoint files.

Each case is a real `plinth` process run on a randomly mutated input. Whatever the mutation, the
process must end within its time bound with exit code 0 (the input was still fine) or 2 (bad
input, explained in one paragraph) and never print a Python traceback.

The default suite runs a fixed seed and a case count bounded to about a minute on two cores;
`PLINTH_FUZZ_SEED=N` and `PLINTH_FUZZ_CASES=K` widen the search (the seed of a failing case is in
its message, so it replays exactly).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("PLINTH_FUZZ_SEED", "16"))
CASES = int(os.environ.get("PLINTH_FUZZ_CASES", "4"))
TIMEOUT_S = 120  # a hang is a failure; generous because two cores are shared by the suite

# Values that tend to pass a parser and fail deep inside a library.
NASTY = [
    -1, 0, 1, 2**63, -(2**63), 10**30, 1e308, -1e-300, float("nan"), float("inf"), True, False,
    None, "", "x" * 5000, "../../../etc", "/dev/zero", "\x00", "nan", [], {}, [1, [2, [3]]],
    {"a": {"b": {"c": 1}}}, 0.5, -0.5, 1.5, "1e9", "true", "~",
]
# Byte strings spliced into text: YAML syntax, anchors and aliases, tags, control bytes.
JUNK = [
    ": ", "- ", "&a ", "*a", "!!python/object/apply:os.system ['true']", "{", "]", "\t", "\x00",
    "\ufeff", "'", '"', "|", ">", "? ", "%YAML 1.1\n", "---\n", "...\n", "<<: *a\n", "\\",
]


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["PLINTH_HOME"] = str(home)
    env.setdefault("OMP_NUM_THREADS", "1")
    # The decode kernel's one-time build (about a minute) is not what is fuzzed here.
    env["PLINTH_INT8_KERNEL"] = "0"
    env["COLUMNS"] = "120"
    return env


def _plinth(args: list[str], cwd: Path, home: Path) -> tuple[int, str]:
    """Run `plinth ARGS`; return (exit code, stdout+stderr). A timeout is reported as a hang."""
    try:
        p = subprocess.run(
            [sys.executable, "-m", "plinth", *args], cwd=cwd, env=_env(home),
            capture_output=True, text=True, errors="replace", timeout=TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return -999, f"HANG: no exit within {TIMEOUT_S} s"
    return p.returncode, p.stdout + p.stderr


def _check(results: list[tuple[str, int, str]], ok_codes=(0, 2)) -> None:
    bad = [
        f"--- {case}\nexit {rc}\n{out[-3000:]}"
        for case, rc, out in results
        if rc not in ok_codes or "Traceback (most recent call last)" in out
    ]
    assert not bad, f"{len(bad)} of {len(results)} fuzz cases failed (seed {SEED}):\n" + "\n".join(
        bad
    )


def _run_all(cases: list[tuple[str, list[str], Path, Path]]) -> list[tuple[str, int, str]]:
    # Two at a time: the machine has two cores and each case is mostly interpreter start-up.
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda c: _plinth(c[1], c[2], c[3]), cases))
    return [(c[0], rc, out) for c, (rc, out) in zip(cases, outs, strict=True)]


# ---- mutations -------------------------------------------------------------------------------


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))
    yield path


def _set(node, path, value):
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def mutate_yaml(text: str, rng: random.Random) -> tuple[str, str]:
    """A mutated YAML text and a short description of what was done."""
    kind = rng.choice(["value", "value", "drop", "unknown", "splice", "cut", "dup", "bomb"])
    if kind in ("value", "drop", "unknown"):
        doc = yaml.safe_load(text) or {}
        paths = [p for p in _leaves(doc) if p]
        path = rng.choice(paths)
        if kind == "value":
            value = rng.choice(NASTY)
            _set(doc, path, value)
            desc = f"{'.'.join(map(str, path))} = {str(value)[:40]!r}"
        elif kind == "drop":
            parent = doc
            for p in path[:-1]:
                parent = parent[p]
            del parent[path[-1]]
            desc = f"drop {'.'.join(map(str, path))}"
        else:
            parent = doc
            for p in path[:-1]:
                parent = parent[p]
            if isinstance(parent, dict):
                parent["bogus_" + str(rng.randint(0, 99))] = rng.choice(NASTY)
            desc = f"unknown key under {'.'.join(map(str, path[:-1])) or 'top'}"
        return yaml.safe_dump(doc, allow_unicode=True), desc
    lines = text.splitlines(keepends=True)
    if kind == "splice":
        i = rng.randrange(len(text) + 1)
        junk = rng.choice(JUNK)
        return text[:i] + junk + text[i:], f"splice {junk!r} at {i}"
    if kind == "cut":
        i = rng.randrange(len(text) + 1)
        j = min(len(text), i + rng.randint(1, 40))
        return text[:i] + text[j:], f"cut [{i}:{j}]"
    if kind == "dup":
        i = rng.randrange(len(lines))
        return "".join([*lines[: i + 1], lines[i], *lines[i + 1 :]]), f"duplicate line {i + 1}"
    # An alias bomb appended as an unknown key: must be refused, never expanded to gigabytes.
    bomb = ['bomb0: &b0 ["x","x","x","x","x","x","x","x","x"]']
    for k in range(1, 9):
        bomb.append(f"bomb{k}: &b{k} [" + ",".join([f"*b{k - 1}"] * 9) + "]")
    return text + "\n" + "\n".join(bomb) + "\n", "alias bomb"


def mutate_bytes(data: bytes, rng: random.Random, name: str) -> tuple[bytes, str]:
    """A damaged file: truncated, bit-flipped, replaced by garbage or by a foreign zip."""
    kind = rng.choice(["truncate", "flip", "garbage", "zip", "empty", "json"])
    if kind == "truncate" and data:
        n = rng.randrange(len(data))
        return data[:n], f"{name}: truncate to {n} bytes"
    if kind == "flip" and data:
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b), f"{name}: flip bits"
    if kind == "zip":
        import io

        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("archive/data.pkl", b"not a pickle")
        return buf.getvalue(), f"{name}: foreign zip"
    if kind == "json":
        return json.dumps(rng.choice(NASTY)).encode(), f"{name}: other JSON value"
    if kind == "empty":
        return b"", f"{name}: empty"
    return rng.randbytes(max(1, len(data))), f"{name}: random bytes of the same size"


# ---- cases -----------------------------------------------------------------------------------


def test_fuzz_config_validate(tmp_path):
    """Mutated shipped configs through `plinth config validate`."""
    rng = random.Random(SEED)
    shipped = sorted((REPO / "configs").glob("*.yaml"))
    cases = []
    for i in range(CASES * 2):
        src = rng.choice(shipped)
        text, desc = mutate_yaml(src.read_text(encoding="utf-8"), rng)
        f = tmp_path / f"case{i}.yaml"
        f.write_text(text, encoding="utf-8", errors="surrogatepass")
        cases.append((f"{src.name}: {desc}", ["config", "validate", str(f)], tmp_path, tmp_path))
    _check(_run_all(cases))


def _good_docs(rng: random.Random, n: int) -> list[str]:
    words = ["the", "model", "reads", "text", "and", "learns", "which", "token", "comes"]
    line = lambda: " ".join(rng.choice(words) for _ in range(12))  # noqa: E731
    return ["\n".join(line() for _ in range(6)) for _ in range(n)]


def test_fuzz_data_prepare(tmp_path):
    """Damaged text and JSONL sources through `plinth data prepare`."""
    rng = random.Random(SEED + 1)
    cases = []
    for i in range(CASES):
        case = tmp_path / f"case{i}"
        (case / "text").mkdir(parents=True)
        docs = _good_docs(rng, 12)
        for j, d in enumerate(docs[:6]):
            (case / "text" / f"d{j}.txt").write_text(d, encoding="utf-8")
        rows = [json.dumps({"text": d}) for d in docs[6:]]
        jsonl = ("\n".join(rows) + "\n").encode()
        descs = []
        target = rng.choice(["text", "jsonl", "both"])
        if target in ("text", "both"):
            f = case / "text" / "d0.txt"
            data, desc = mutate_bytes(f.read_bytes(), rng, "d0.txt")
            f.write_bytes(data)
            descs.append(desc)
        if target in ("jsonl", "both"):
            jsonl, desc = mutate_bytes(jsonl, rng, "docs.jsonl")
            descs.append(desc)
            extra = rng.choice(
                ['{"text": 5}', '{"other": "x"}', "[1, 2]", "null", '{"text": null}', "{"]
            )
            jsonl += extra.encode() + b"\n"
            descs.append(f"docs.jsonl line {extra}")
        (case / "docs.jsonl").write_bytes(jsonl)
        cfg = {
            "preset": "tiny",
            "model": {"vocab_size": 300, "max_seq_len": 32},
            "data": {
                "dir": str(case / "prepared"),
                "workers": 1,
                "sources": [
                    {"kind": "text", "path": str(case / "text")},
                    {"kind": "jsonl", "path": str(case / "docs.jsonl")},
                ],
                "filters": {"min_chars": 1},
            },
        }
        (case / "cfg.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
        cases.append(("; ".join(descs), ["data", "prepare", "cfg.yaml"], case, tmp_path))
    _check(_run_all(cases))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny pretraining run with two checkpoints (steps 2 and 4)."""
    from plinth.config.load import load_config
    from plinth.data import prepare_dataset
    from plinth.recipes.pretrain import run_pretraining

    root = tmp_path_factory.mktemp("fuzzrun")
    cfg = load_config(
        [],
        [
            "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.vocab_size=512",
            "model.max_seq_len=32", "data.max_docs=120", "optim.micro_batch=4",
            "optim.global_batch=8", "tracking.log_every=1",
            f"data.dir={root / 'data'}",
            f"tracking.output_dir={root / 'runs'}",
            "tracking.run_name=r",
            "pretrain.max_steps=4",
            "tracking.checkpoint_every=2",
            "tracking.eval_every=2",
            "tracking.sample_every=100",
        ],
    )
    prepare_dataset(cfg.config, progress=False)
    run_pretraining(cfg, run_path=None, progress=False)
    return root / "runs" / "r"


def test_fuzz_checkpoints(tiny_run, tmp_path):
    """A damaged file in the latest checkpoint through `pretrain --resume` and `generate`."""
    rng = random.Random(SEED + 2)
    ckpts = sorted(p for p in (tiny_run / "checkpoints").iterdir() if p.is_dir())
    files = sorted(p.relative_to(tiny_run) for p in ckpts[-1].rglob("*") if p.is_file())
    cases = []
    for i in range(CASES):
        run = tmp_path / f"run{i}"
        shutil.copytree(tiny_run, run)
        rel = rng.choice(files)
        data, desc = mutate_bytes((run / rel).read_bytes(), rng, str(rel))
        (run / rel).write_bytes(data)
        cases.append((f"resume, {desc}", ["pretrain", "--resume", str(run), "--quiet",
                                          "pretrain.max_steps=6"], tmp_path, tmp_path))
        gen = tmp_path / f"gen{i}"
        shutil.copytree(run, gen)
        cases.append((f"generate, {desc}", ["generate", str(gen), "--prompt", "def ",
                                            "--max-new-tokens", "4"], tmp_path, tmp_path))
    _check(_run_all(cases))
