"""Processes and backends: the process group and its collectives (env), and the Backend interface with its
implementations (DDP, DeepSpeed), which own the wrapped model, the backward, the optimizer step and their
checkpoint files."""
