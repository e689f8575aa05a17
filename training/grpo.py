"""Online reinforcement learning with rewards a program computes (GRPO, DAPO, Dr. GRPO), starting from a
fine-tuned or pretrained model: each step samples grpo.generations completions of every prompt with the live
weights, scores them, and learns from their advantages. The stage: stages/grpo.py.

    python -m preprocess shards --kind prompts --input PROMPTS.jsonl --tokenizer TOK --out SHARDS
    python -m training.grpo --config configs/grpo/tiny.yaml data.path=SHARDS init_from=RUN \
                            grpo.rewards=[recipes/tang.py:five_character_reward] [grpo.loss=dapo] [grpo.beta=0.04]
"""

import sys

from .cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("grpo"))
