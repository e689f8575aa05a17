"""Training: the commands at the top (pretrain sft dpo kto describe generate sample pairs report export_hf
lr_find), the rooms below (run, parallel, checkpoint, stages, data, models); docs/architecture.md maps them."""
