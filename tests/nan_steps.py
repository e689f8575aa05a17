"""Run a training stage whose loss is NaN at chosen steps, to test how the loop handles numerical faults:
    python tests/nan_steps.py 3,4 training.pretrain --config ... [overrides]   (also as torchrun's script)
Steps are counted from 1, like the step numbers in metrics.jsonl."""

import dataclasses
import runpy
import sys

import training.loop as loop

BAD = {int(s) for s in sys.argv[1].split(",") if s}
stage_module = sys.argv[2]
sys.argv = [stage_module, *sys.argv[3:]]
current = {"step": 0}
real_lr_at, real_accumulate = loop.lr_at, loop.accumulate_gradients


def lr_at(step, cfg):
    current["step"] = step + 1  # lr_at(step) is asked once per step, just before its micro-batches
    return real_lr_at(step, cfg)


def accumulate_gradients(stage, model, batches, env, autocast=None):
    if current["step"] in BAD:
        real_loss = stage.loss

        def nan_loss(m, batch):
            loss, metrics = real_loss(m, batch)
            return loss * float("nan"), metrics

        stage = dataclasses.replace(stage, loss=nan_loss)
    return real_accumulate(stage, model, batches, env, autocast)


loop.lr_at, loop.accumulate_gradients = lr_at, accumulate_gradients
runpy.run_module(stage_module, run_name="__main__")
