"""Run tracking: the run directory (config, manifest, metrics, events, samples, checkpoints)."""
