"""Entries that are not regular files (FIFOs, devices, sockets, symlink loops, broken links,
unreadable files, unlistable directories) are skipped without hanging and counted in the
manifest by reason; inputs named directly by the config get a clear exit-2 error."""

from __future__ import annotations

import json
import os
import socket

import pytest
from datahelpers import run_plinth, without_dac_override, write_config, write_text_corpus

from plinth.data.paths import scan_files
from plinth.errors import UsageError

SPECIAL = {
    "fifo": 1, "symlink_loop": 1, "broken_symlink": 1, "socket": 1, "device": 1,
    "permission_denied": 1, "unlistable_dir": 1,
}


def _special_corpus(root):
    """Six good documents plus one entry of every special kind; returns the bound socket
    (kept open while the corpus is read)."""
    write_text_corpus(root, 6, seed=3)
    os.mkfifo(root / "fifo.txt")
    (root / "loop.txt").symlink_to("loop.txt")
    (root / "broken.txt").symlink_to("nowhere.txt")
    (root / "null.txt").symlink_to("/dev/null")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.txt"))
    (root / "secret.txt").write_text("a private document " * 20)
    (root / "secret.txt").chmod(0)
    (root / "locked").mkdir()
    (root / "locked" / "inside.txt").write_text("never listed " * 20)
    (root / "locked").chmod(0)
    return sock


def test_special_entries_are_counted_and_shown_by_inspect(tmp_path):
    prefix = without_dac_override()
    if prefix is None:
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    sock = _special_corpus(tmp_path / "texts")
    try:
        cfg = write_config(
            tmp_path / "cfg.yaml", tmp_path / "ds",
            [{"kind": "text", "path": str(tmp_path / "texts"), "name": "texts"}],
        )
        r = run_plinth("data", "prepare", cfg, timeout=120, prefix=prefix)
    finally:
        sock.close()
        (tmp_path / "texts" / "locked").chmod(0o755)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    src = m["sources"][0]
    assert src["bad_input"] == SPECIAL
    assert src["docs_read"] == 6
    assert "fifo.txt: a named pipe" in src["examples"]["fifo"][0]
    assert "loops back" in src["examples"]["symlink_loop"][0]
    assert "nowhere.txt" in src["examples"]["broken_symlink"][0]
    assert str(tmp_path / "texts" / "locked") in src["examples"]["unlistable_dir"][0]
    assert "chmod" in src["examples"]["permission_denied"][0]
    shown = run_plinth("data", "inspect", tmp_path / "ds", "--samples", "0")
    assert shown.returncode == 0, shown.stderr
    for reason in SPECIAL:
        assert reason in shown.stdout


def test_symlink_loops_under_a_glob_neither_hang_nor_repeat(tmp_path):
    root = tmp_path / "d"
    write_text_corpus(root / "sub", 3, seed=4)
    for i in range(3):  # two loops under ** multiplied paths without end (2^40 with glob)
        (root / f"up{i}").symlink_to("..")
        (root / "sub" / f"self{i}").symlink_to(".")
    scan = scan_files(str(root) + "/**/*.txt", ())
    assert [f.name for f in scan.files] == ["doc0000.txt", "doc0001.txt", "doc0002.txt"]
    assert scan.skipped == []
    cfg = write_config(
        tmp_path / "cfg.yaml", tmp_path / "ds",
        [{"kind": "text", "path": str(root) + "/**/*.txt", "name": "g"}],
    )
    r = run_plinth("data", "prepare", cfg, timeout=120)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert m["sources"][0]["docs_read"] == 3 and m["sources"][0]["bad_input"] == {}


def test_glob_matches_like_glob_without_following_links(tmp_path):
    root = tmp_path / "g"
    for rel in ("a/x.txt", "a/b/y.txt", "a/.hidden/z.txt", "c/x.md", "top.txt", ".dot.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("text")
    names = lambda pat: [f.relative_to(root).as_posix() for f in scan_files(str(root / pat), ()).files]  # noqa: E731, E501
    assert names("*.txt") == ["top.txt"]
    assert names("*/*.txt") == ["a/x.txt"]
    assert names("**/*.txt") == ["a/b/y.txt", "a/x.txt", "top.txt"]
    assert names("a/**/*.txt") == ["a/b/y.txt", "a/x.txt"]
    assert names("[ac]/x.*") == ["a/x.txt", "c/x.md"]
    assert names("a/.hidden/*.txt") == ["a/.hidden/z.txt"]
    assert names("nope/*.txt") == []


@pytest.mark.parametrize("where", ["source", "blocklist", "tokenizer", "decontaminate"])
def test_a_fifo_named_by_the_config_is_refused_without_hanging(tmp_path, where):
    write_text_corpus(tmp_path / "texts", 4, seed=5)
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    texts = {"kind": "text", "path": str(tmp_path / "texts")}
    extra, key = {}, None
    if where == "source":
        sources, key = [{"kind": "text", "path": str(fifo)}], "fifo"
    else:
        sources = [texts]
        extra, key = {
            "blocklist": ({"filters": {"blocklist": str(fifo)}}, "data.filters.blocklist"),
            "tokenizer": ({"tokenizer": {"path": str(fifo)}}, "data.tokenizer.path"),
            "decontaminate": ({"decontaminate": [str(fifo)]}, "data.decontaminate"),
        }[where]
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "ds", sources, **extra)
    r = run_plinth("data", "prepare", cfg, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    msg = r.stderr
    assert str(fifo) in msg and key in msg
    assert "named pipe" in msg or "fifo" in msg
    assert not (tmp_path / "ds").exists()


@pytest.mark.timeout(300)  # torch imports slowly on a loaded machine; a FIFO hang is forever
def test_sft_data_that_is_not_a_jsonl_text_file(tmp_path):
    from plinth.data.sft import read_jsonl

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    (tmp_path / "bin.jsonl").write_bytes(b'{"prompt": "a"}\n\x00\x01\x02')
    (tmp_path / "latin.jsonl").write_bytes(b'{"prompt": "caf\xe9", "completion": "x"}\n')
    for name, needle in (
        ("pipe.jsonl", "named pipe"),
        ("bin.jsonl", "looks like a binary file"),
        ("latin.jsonl", "line 1 is not UTF-8"),
        ("missing.jsonl", "does not exist"),
    ):
        with pytest.raises(UsageError) as e:
            read_jsonl(tmp_path / name)
        assert needle in str(e.value) and name in str(e.value)


@pytest.mark.parametrize("name", [".ds.lock", "ds/manifest.json"])
def test_a_fifo_in_plinths_own_places_neither_hangs_nor_loses_data(tmp_path, name):
    write_text_corpus(tmp_path / "texts", 4, seed=6)
    (tmp_path / name).parent.mkdir(exist_ok=True)
    os.mkfifo(tmp_path / name)
    if name.startswith("ds/"):
        (tmp_path / "ds" / "notes.txt").write_text("the user's own file")
    cfg = write_config(
        tmp_path / "cfg.yaml", tmp_path / "ds", [{"kind": "text", "path": str(tmp_path / "texts")}]
    )
    r = run_plinth("data", "prepare", cfg, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    if name == ".ds.lock":
        assert "lock file" in r.stderr and "remove it" in r.stderr
    else:  # a directory whose manifest.json is not a file is not a plinth dataset
        assert "is not a plinth dataset" in r.stderr
        assert (tmp_path / "ds" / "notes.txt").read_text() == "the user's own file"
