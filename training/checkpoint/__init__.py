"""Checkpoints: the atomic, checksummed step-N store, RNG states, weights to start from or read, and the train
state with the run's identity."""
