"""Lightning callbacks and the checkpoint plugin: what a run does besides the training step.

Checkpoints written whole and loaded without running code, the run's config stored in them,
per-epoch reseeding for exact resumes, the divergence guard, TensorBoard figures and the
diagnostics (host syncs, epoch times). Imports models and data, never training.
"""
