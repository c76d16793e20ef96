"""`plinth data ...` commands: plain functions the CLI table points at.

    plinth data prepare quickstart data.dir=data/qs
    plinth data inspect data/qs --samples 2
    plinth data tokenizer train quickstart --output tok.json model.vocab_size=4096

Imports stay inside the functions so `plinth --help` never loads torch or numpy.
"""

from __future__ import annotations

from collections import Counter


def prepare(config: str, overrides: list[str] = (), *, force: bool = False) -> int:
    """Prepare a dataset: read, clean, deduplicate, tokenize and shard the sources of CONFIG.

    The result (shards, tokenizer.json, manifest.json) goes to data.dir. A directory that
    already holds a dataset prepared from the same data config is reused.

    Args:
      config: YAML config file or the name of a shipped recipe (e.g. quickstart)
      overrides: config overrides, e.g. data.dir=data/mine data.max_bytes=2000000
      force: rebuild even when data.dir already holds an up-to-date dataset
    """
    from plinth.config.load import load_config
    from plinth.data.prepare import prepare_dataset

    cfg = load_config(files=[config], overrides=list(overrides)).config
    path = prepare_dataset(cfg, progress=True, force=force)
    _print_overview(path, samples=0)
    return 0


def inspect(dir: str, *, samples: int = 3, verify: bool = False) -> int:
    """Show a prepared dataset: splits, sources, drop reasons, dedup, length histogram, samples.

    Args:
      dir: dataset directory written by `plinth data prepare` (its data.dir)
      samples: number of training documents to print (decoded from the shards)
      verify: also check every shard against the sha256 recorded in the manifest
    """
    _print_overview(dir, samples=samples, verify=verify)
    return 0


def tokenizer_train(
    config: str, overrides: list[str] = (), *, output: str = "tokenizer.json"
) -> int:
    """Train a tokenizer on the cleaned documents of CONFIG's sources and save it to OUTPUT.

    Uses data.tokenizer (kind, special tokens, sentinels, min_frequency, train_max_bytes),
    model.vocab_size, data.filters and the data.max_docs / data.max_bytes caps. No shards are
    written; use the result with data.tokenizer.path=OUTPUT.

    Args:
      config: YAML config file or the name of a shipped recipe (e.g. quickstart)
      overrides: config overrides, e.g. model.vocab_size=4096 data.tokenizer.kind=unigram
      output: where to write the tokenizer.json
    """
    import os
    import time
    from pathlib import Path

    from rich.console import Console

    from plinth.config.load import load_config
    from plinth.data import filters as flt
    from plinth.data import sources as srcs
    from plinth.data import tokenizer as tkz
    from plinth.errors import UsageError
    from plinth.track.progress import TaskProgress

    cfg = load_config(files=[config], overrides=list(overrides)).config
    data, tc = cfg.data, cfg.data.tokenizer
    if tc.path:
        raise UsageError(
            "data.tokenizer.path is set, so there is nothing to train; unset it "
            "(data.tokenizer.path=null) to train a new tokenizer"
        )
    for i, s in enumerate(data.sources):
        srcs.check_source_config(s, f"data.sources[{i}]")
    settings = flt.FilterSettings.from_config(data.filters)
    budget, note = tkz.train_budget(tc)
    used = {"docs": 0, "bytes": 0}
    skipped: Counter = Counter()
    held_out: list[str] = []

    def texts():
        for src in data.sources:
            n = nbytes = 0
            for raw in srcs.open_source(src, data.max_doc_bytes):
                doc = srcs.apply_transform(raw)
                if doc.text is None:
                    skipped[doc.reason] += 1
                    continue
                n, nbytes = n + 1, nbytes + doc.nbytes
                text, reason, _ = flt.clean_document(doc.text, settings)
                if reason:
                    skipped[reason] += 1
                elif len(held_out) < 50 and n % 10 == 0:  # measure compression on unseen docs
                    held_out.append(text)
                else:
                    used["docs"] += 1
                    used["bytes"] += len(text.encode())
                    yield text
                if budget and used["bytes"] >= budget:
                    return
                if (data.max_docs and n >= data.max_docs) or (
                    data.max_bytes and nbytes >= data.max_bytes
                ):
                    break

    t0 = time.perf_counter()
    with TaskProgress(True) as prog:
        task = prog.task(f"train {tc.kind} tokenizer", total=budget)
        tok = tkz.train_for_config(tkz.fed_with_progress(texts(), prog, task), cfg)
        fed = max(1, used["bytes"])
        vocab = tok.get_vocab_size()
        prog.update(task, total=fed, completed=fed, info=f"{fed / 1e6:.1f} MB; vocab {vocab}")
    seconds = time.perf_counter() - t0
    if used["docs"] == 0:
        raise UsageError(
            f"no document to train on after reading and filtering ({dict(skipped)}); check "
            "data.sources and data.filters"
        )
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tok.save(str(tmp))
    os.replace(tmp, out)
    roles = tkz.role_ids(tok, tc.special_tokens)
    line = f"saved {out}: {tc.kind}, vocab {tok.get_vocab_size()}, trained on {used['docs']} docs "
    line += f"({used['bytes'] / 1e6:.1f} MB) in {seconds:.0f}s, {len(roles['sentinel_ids'])} "
    line += "sentinels"
    if held_out:
        tok.encode_special_tokens = True
        n_tok = sum(len(e.ids) for e in tok.encode_batch(held_out, add_special_tokens=False))
        line += f"; {sum(len(t.encode()) for t in held_out) / max(1, n_tok):.2f} bytes/token on "
        line += f"{len(held_out)} held-out docs"
    Console().print(line, markup=False, highlight=False)
    if skipped:
        Console().print(f"skipped: {dict(skipped.most_common())}", markup=False, highlight=False)
    if note and budget and used["bytes"] >= budget:
        Console(stderr=True).print(f"note: {note}", markup=False, highlight=False)
    return 0


# ------------------------------------------------------------------------------- overview


def _print_overview(path, samples: int = 3, verify: bool = False) -> None:
    from rich.console import Console

    from plinth.data.dataset import open_dataset

    ds = open_dataset(path, verify=verify)
    m = ds.manifest
    c = Console()
    c.print(
        f"[bold]{ds.path}[/]  fingerprint [cyan]{m['fingerprint']}[/]  config "
        f"{m['config_fingerprint']}  created {m['created']}  plinth {m['plinth_version']}"
        + ("  [green]shards verified[/]" if verify else "")
    )
    _print_splits(c, m)
    _print_sources(c, m)
    _print_drop_reasons(c, m)
    _print_dedup_tokenizer_pii(c, m)
    lengths = ds.doc_table("train").length
    if len(lengths):
        _print_length_histogram(c, lengths)
    if samples and len(lengths):
        _print_samples(c, ds, lengths, samples)
    for w in m.get("warnings", []):
        c.print(f"[yellow]warning:[/] {w}", highlight=False)


def _print_splits(c, m: dict) -> None:
    from rich.table import Table

    t = Table(title="splits", title_justify="left")
    for col in ("split", "docs", "tokens", "MB", "bytes/token", "shards", "dtype"):
        t.add_column(col, justify="right" if col != "split" else "left")
    for split, d in m["splits"].items():
        bpt = f"{d['bytes_per_token']:.3f}" if d["bytes_per_token"] else "-"
        t.add_row(
            split,
            f"{d['docs']:,}",
            f"{d['tokens']:,}",
            f"{d['bytes'] / 1e6:.2f}",
            bpt,
            str(len(d["shards"])),
            f"uint{8 * d['itemsize']}",
        )
    c.print(t)


def _print_sources(c, m: dict) -> None:
    from rich.table import Table

    t = Table(title="sources (documents)", title_justify="left")
    cols = ("source", "read", "bad input", "filtered", "dups", "kept", "train tokens", "weight")
    for col in cols:
        t.add_column(col, justify="left" if col == "source" else "right")
    for s in m["sources"]:
        t.add_row(
            s["name"] + ("*" if s["capped_by"] else ""),
            f"{s['docs_read']:,}",
            f"{sum(s['bad_input'].values()):,}",
            f"{sum(s['filtered'].values()):,}",
            f"{s['exact_duplicates'] + s['near_duplicates']:,}",
            f"{s['kept']:,}",
            f"{m['splits']['train']['sources'][s['name']]['tokens']:,}",
            f"{s['weight']:g}",
        )
    c.print(t)
    for s in m["sources"]:
        cap = f", capped by data.{s['capped_by']}" if s["capped_by"] else ""
        c.print(f"  {s['name']}: content sha256 {s['content_sha256'][:16]}{cap}", highlight=False)


def _print_drop_reasons(c, m: dict) -> None:
    """The ten most common reasons documents were dropped, with their stage and an example."""
    from rich.table import Table

    reasons: Counter = Counter()
    stage: dict[str, str] = {}
    example: dict[str, str] = {}
    for s in m["sources"]:
        for group, counts in (("input", s["bad_input"]), ("filter", s["filtered"])):
            for r, n in counts.items():
                reasons[r] += n
                stage[r] = group
        for r, key in (
            ("exact_duplicate", "exact_duplicates"),
            ("near_duplicate", "near_duplicates"),
        ):
            if s[key]:
                reasons[r] += s[key]
                stage[r] = "dedup"
        for r, ex in s["examples"].items():
            example.setdefault(r, ex[0] if ex else "")
    if reasons:
        t = Table(title="top drop reasons", title_justify="left")
        for col in ("reason", "stage", "count", "example"):
            t.add_column(col, justify="right" if col == "count" else "left", overflow="fold")
        for r, n in reasons.most_common(10):
            t.add_row(r, stage[r], f"{n:,}", example.get(r, ""))
        c.print(t)


def _print_dedup_tokenizer_pii(c, m: dict) -> None:
    dd, tk = m["dedup"], m["tokenizer"]
    near = dd["near"]
    c.print(
        f"dedup: exact removed {dd['exact']['removed']:,} ({dd['exact']['clusters']:,} clusters); "
        f"near (threshold {near['threshold']}, {near['num_perm']} perms, {near['shingle']}-word "
        f"shingles) removed {near['removed']:,}"
        + (
            f" ({near['clusters_with_duplicates']:,} clusters, largest {near['largest_cluster']})"
            if near["enabled"]
            else " (off)"
        )
    )
    c.print(
        f"tokenizer: {tk['kind']}, vocab {tk['vocab_size']:,}, sha256 {tk['sha256'][:16]}, "
        f"specials {tk['special_tokens']}, {tk['sentinels']} sentinels"
        + (f", loaded from {tk['loaded_from']}" if tk.get("loaded_from") else "")
    )
    pii = Counter()
    for s in m["sources"]:
        pii.update(s["pii_scrubbed"])
    if pii:
        c.print(f"PII scrubbed: {dict(pii)}")


def _print_length_histogram(c, lengths) -> None:
    """Training documents per power-of-two length bucket, as a bar chart."""
    import numpy as np
    from rich.table import Table

    edges = [0] + [2**k for k in range(4, 25)]
    hist, _ = np.histogram(lengths, bins=[*edges, np.inf])
    t = Table(title="train document length (tokens)", title_justify="left")
    t.add_column("tokens", justify="right")
    t.add_column("docs", justify="right")
    t.add_column("")
    top = hist.max()
    for lo, hi, n in zip(edges, [*edges[1:], None], hist, strict=False):
        if n:
            label = f"{lo:,}-{hi - 1:,}" if hi else f">={lo:,}"
            t.add_row(label, f"{n:,}", "█" * max(1, round(40 * n / top)))
    c.print(t)
    c.print(
        f"median {int(np.median(lengths)):,} tokens, mean {lengths.mean():,.0f}, "
        f"max {lengths.max():,}"
    )


def _print_samples(c, ds, lengths, samples: int) -> None:
    """`samples` training documents chosen with a fixed seed, decoded (first 400 tokens)."""
    import numpy as np
    from rich.panel import Panel
    from rich.text import Text

    rng = np.random.default_rng(0)
    for i in sorted(rng.choice(len(lengths), size=min(samples, len(lengths)), replace=False)):
        text = ds.decode(ds.doc_tokens("train", int(i))[:400])
        src = ds.source_names[int(ds.doc_table("train").source[i])]
        c.print(
            Panel(
                Text(text[:1200]),
                title=f"train doc {i} ({src}, {lengths[i]:,} tokens)",
                title_align="left",
            )
        )
