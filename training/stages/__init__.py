"""The stages (pretrain, SFT, DPO, KTO): each a dataset and a pure loss, registered by name; the losses' table,
the reference model of the preference stages, and reward functions."""
