"""`plinth quickstart`: the main job in one command, on any machine, offline.

    plinth quickstart
    plinth quickstart pretrain.max_steps=100      # shorter

Prepares the built-in corpus (the Python standard library of this interpreter), trains a
tokenizer and a small Llama-style decoder on this machine (about five minutes on two CPU
cores), evaluates it, and prints samples, the validation bits per byte next to the unigram
baseline of the same tokenizer (proof that it learned more than token frequencies), and where
the run lives.
"""

from __future__ import annotations

import math


def unigram_bits_per_byte(ds) -> float:
    """Bits per byte of the best context-free model: the train split's unigram entropy, scored on
    validation tokens. A model must beat it to have learned anything beyond token frequencies."""
    import numpy as np

    train = np.concatenate([np.asarray(s.tokens) for s in ds.shards("train")])
    val = np.concatenate([np.asarray(s.tokens) for s in ds.shards("val")])
    counts = np.bincount(train, minlength=ds.vocab_size).astype(np.float64) + 0.5  # add-half
    logp = np.log2(counts / counts.sum())
    bits_per_token = -float(logp[val].mean())
    return bits_per_token / ds.bytes_per_token("val")


def quickstart(overrides: list[str] = (), *, quiet: bool = False) -> int:
    """Prepare the built-in corpus, train a small decoder on this machine, show what it learned.

    Args:
        overrides: key=value changes to the quickstart recipe, e.g. pretrain.max_steps=100
        quiet: no progress bar or per-step lines
    """
    from plinth.config.load import load_config
    from plinth.data import open_dataset
    from plinth.recipes.pretrain import run_pretraining
    from plinth.train.setup import print_train_summary

    resolved = load_config(["quickstart"], overrides)
    m = resolved.config.model
    print(
        f"plinth quickstart: {m.arch} {m.n_layers}x{m.d_model}, {m.param_count() / 1e6:.1f}M "
        f"parameters, {resolved.config.pretrain.max_steps} steps on the Python standard library"
    )
    result = run_pretraining(resolved, progress=not quiet)
    ds = open_dataset(resolved.config.data.dir)
    print_train_summary(result)
    bpb = result.val.get("val/bpb", math.nan)
    baseline = unigram_bits_per_byte(ds)
    verdict = (
        "learned structure beyond token frequencies"
        if bpb < 0.9 * baseline
        else ("did not beat the unigram baseline clearly; train longer (pretrain.max_steps)")
    )
    print(f"validation bits/byte: {bpb:.3f}  vs unigram baseline {baseline:.3f}  -> {verdict}")
    from plinth.track.run import read_jsonl

    samples = [s for s in read_jsonl(result.run_dir / "samples.jsonl") if s["step"] == result.step]
    for s in samples:
        print(f"--- sample from {s['prompt']!r}:\n{s['prompt']}{s['text']}")
    print(
        f"\nNext: plinth generate {result.run_dir} --prompt 'def '   |   "
        f"plinth config explain   |   runs live in {result.run_dir.parent}/"
    )
    return 0
