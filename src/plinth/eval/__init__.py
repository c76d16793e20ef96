"""Evaluation: tasks from YAML + JSONL (plinth.eval.tasks), scoring by log-likelihood and
generation (plinth.eval.scoring), perplexity and bits per byte (plinth.eval.lm), metric math
(plinth.eval.metrics). The command is `plinth eval` (plinth.eval.commands)."""
