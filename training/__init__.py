"""Training stages (pretraining, SFT, DPO) that read the shard directories written by `preprocess`."""
