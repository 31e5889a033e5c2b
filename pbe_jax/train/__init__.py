"""Training: config, train state (trainable/frozen split, AdamW, EMA), the sharded step, orbax checkpoints,
metrics and the loop that `train.py` runs. Imports grain and the data pipeline only when a run starts."""
