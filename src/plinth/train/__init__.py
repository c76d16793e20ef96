"""Training: objectives (plain loss functions), optimizers and schedules, and the one loop."""
