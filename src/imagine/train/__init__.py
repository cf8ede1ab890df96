"""Training: one readable loop with hooks, its checkpoints, and the trainers built on it."""
