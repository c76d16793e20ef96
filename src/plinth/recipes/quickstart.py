"""`plinth quickstart`: the main job in one command.

    plinth quickstart

Until the training engine lands this validates the quickstart recipe and prints it, so a new
install shows the whole path from config to (soon) a trained model.
"""

from __future__ import annotations


def quickstart(overrides: list[str] = ()) -> int:
    """Prepare the built-in corpus, train a small decoder on this machine and show what it learned.

    Args:
        overrides: key=value changes to the quickstart recipe, e.g. pretrain.max_steps=100
    """
    from plinth.config.commands import render_yaml
    from plinth.config.load import load_config

    resolved = load_config(["quickstart"], overrides)
    m = resolved.config.model
    print(render_yaml(resolved))
    print(
        f"\nquickstart recipe is valid: {m.arch} {m.n_layers}x{m.d_model}, "
        f"{m.param_count() / 1e6:.1f}M parameters. Training arrives with the training engine."
    )
    return 0
