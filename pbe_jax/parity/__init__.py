"""The PyTorch parity harness: the PyTorch side, and the comparisons of this port against it.

- `reference`: the PyTorch reference (diffusers + transformers): tiny random pipelines, loading a folder into
  PyTorch, diffusers' pipeline with each sampler, the original release's training step restated;
- `compare`: the networks and whole edits, port against reference, and the command line;
- `train`: the training step (loss, gradients, update, loss curves) against the original's.

`python -m pbe_jax.parity --help`; docs/parity.md. This package imports nothing itself, and torch, diffusers
and transformers are imported inside the functions that need them (the `[torch]` extra).
"""
