"""Shard directories → a deterministic global order → each rank's micro-batches: sources, order (permutation,
mixing, the batch plan), packing, and batches."""
