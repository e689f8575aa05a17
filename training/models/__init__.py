"""The model (one Transformer with switches; no torch.distributed), LoRA adapters, the optimizers and schedule,
decoding, and the transformers families it imports from and exports to."""
