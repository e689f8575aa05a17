"""What a run reports: metrics.jsonl, TensorBoard, Weights & Biases (optional) and the progress bar, all written
by rank 0, with throughput timed without the pauses (evaluation, checkpoints)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from preprocess.errors import UserError
from preprocess.fileio import atomic_write

from ..config import Config
from ..models.transformer import Transformer
from ..parallel import env as D

# bf16 dense peak FLOP/s per GPU, for MFU (matched against torch.cuda.get_device_name)
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


class MetricsLog:
    """metrics.jsonl, TensorBoard, Weights & Biases (optional) and the progress bar, all on rank 0; throughput
    timed without the pauses."""

    def __init__(self, cfg: Config, env: D.DistEnv, model: Transformer, stage: str, start_step: int,
                 prepares: bool = False, sources: list[str] = ()):
        self.cfg, self.env = cfg, env
        self.prepares = prepares  # a stage with work before its losses: its steps' time split in two
        self.sources = list(sources)  # their names: with several, the realised mixture is logged (mixture/<name>)
        self.mixture = np.zeros(len(self.sources))
        self.path = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.flops_per_token = model.flops_per_token(cfg.data.seq_len)
        self.peak = gpu_peak_flops(env.device)
        self.tb = self.bar = self.wandb = None
        self.interval_tokens, self.interval_start, self.paused_time, self.data_time = 0, time.perf_counter(), 0.0, 0.0
        self.prepare_time = 0.0
        self.logged_step = start_step
        self.unwritten: list[int] = []  # steps of the records a full disk kept out of metrics.jsonl
        if env.is_main:
            if cfg.log.wandb:
                self.wandb = start_wandb(require_wandb(), cfg, stage)
            if cfg.log.tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # a start-up cost (docs/architecture.md), paid here only

                self.tb = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"), purge_step=start_step + 1)
            if cfg.log.progress:
                self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc=stage, unit="step", disable=None)

    @staticmethod
    def truncate(path: str, step: int) -> None:
        """Forget lines after `step`, which a resumed run logs again; a fresh run (step 0) forgets every line,
        its evaluation at step 0 included."""
        if not os.path.isfile(path):
            return

        def step_of(line: bytes) -> int | None:  # None: a line cut short by a full disk or a kill
            try:
                return json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):  # a cut multi-byte character among them
                return None

        with open(path, "rb") as f:
            kept = [line for line in f if step and line.endswith(b"\n") and (at := step_of(line)) is not None
                    and at <= step]
        atomic_write(path, b"".join(kept))

    def count_tokens(self, tokens: int) -> int:
        """Tokens of this step over all ranks (padding included: every position the model computes)."""
        self.interval_tokens += tokens
        return tokens

    def count_mixture(self, picks: np.ndarray) -> None:
        """Samples (examples, pairs) of each source this step read, over all ranks."""
        self.mixture += picks

    def data_wait(self):
        """Time the loop waits for its batches (reading and assembling samples): its share of the step time."""
        return self._timed("data_time")

    def preparing(self):
        """Time a stage prepares its batches (DPO and KTO's reference forwards, GRPO's sampling and scoring):
        compute, not data wait; logged as time/prepare beside time/training, the rest of the step."""
        return self._timed("prepare_time")

    def paused(self):
        """Time spent inside (evaluation, checkpoints) does not count against throughput."""
        return self._timed("paused_time")

    @contextlib.contextmanager
    def _timed(self, counter: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, counter, getattr(self, counter) + time.perf_counter() - t)

    def train_step(self, step: int, means: dict, lr: float, grad_norm: float, tokens: int, skipped: bool,
                   interval: bool = True) -> None:
        """A step's line; interval=False: a skipped step between logged ones (read back later than it ran), whose
        line leaves the throughput to the next logged step's interval."""
        record = {"step": step, **means, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}
        if interval:
            elapsed = max(time.perf_counter() - self.interval_start - self.paused_time, 1e-9)
            rate, data_share = self.interval_tokens / elapsed, self.data_time / elapsed
            # tokens_per_sec counts every position computed (padding too, as MFU must); padding_share (in means)
            # is the share of those that was padding: useful tokens/s = tokens_per_sec * (1 - padding_share)
            steps = max(step - self.logged_step, 1)
            record.update({"tokens_per_sec": rate, "data_wait_share": data_share, "time/step": elapsed / steps})
            if self.prepares:
                record.update({"time/prepare": self.prepare_time / steps,
                               "time/training": (elapsed - self.data_time - self.prepare_time) / steps})
            if self.peak:
                record["mfu"] = rate * self.flops_per_token / (self.peak * self.env.world_size)
            if len(self.sources) > 1 and self.mixture.sum():  # each source's share of what the interval read
                record.update({f"mixture/{n}": float(c / self.mixture.sum()) for n, c in zip(self.sources, self.mixture,
                                                                                          strict=True)})
                self.mixture[:] = 0
            self.interval_tokens, self.interval_start, self.paused_time, self.data_time = 0, time.perf_counter(), 0, 0
            self.prepare_time = 0.0
            self.logged_step = step
        if not self.env.is_main:
            return
        if skipped:
            record["skipped"] = True
        self._write(record)
        if not interval:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix_str(f"loss {means['loss']:.4f}, {record['tokens_per_sec']:,.0f} tok/s", refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.cfg.log.progress:  # no terminal (a log file, CI): one line per logged step instead of a bar
            extra = "".join(f", {k} {v:.3f}" for k, v in means.items() if "rewards" in k or k == "reward")
            print(f"step {step}: loss {means['loss']:.4f}{extra}, lr {lr:.2e}, {record['tokens_per_sec']:,.0f} "
                  "tokens/s", flush=True)

    def eval_step(self, step: int, values: dict[str, float], sample: str | None) -> None:
        """values: val_loss and its kin (val_loss/<source>, val_bpb), or the harness's eval/<task>/<metric>."""
        if not self.env.is_main:
            return
        record = {"step": step, **values}
        if sample is not None:
            record["sample"] = sample
            if self.tb is not None:
                try:
                    self.tb.add_text("sample", sample, step)
                except OSError as e:
                    self._drop_tensorboard(e, step)
        self._write(record)
        top = [k for k in values if "/" not in k] or list(values)  # val_loss, else (the harness's) every value
        shown = ", ".join(f"{k} {values[k]:.4f}" for k in top)
        message = f"step {step}: {shown}" + (f"\n{sample}" if sample else "")
        if self.bar is not None and not self.bar.disable:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def checkpoint(self, step: int, seconds: float) -> None:
        """How long the loop waited for the checkpoint of `step`: the whole write, or (train.async_checkpoint) the
        copy of the state and the wait for the previous checkpoint still being written."""
        if self.env.is_main:
            self._write({"step": step, "time/checkpoint": seconds})

    def _write(self, record: dict) -> None:
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        try:
            append_line(self.path, json.dumps(record, ensure_ascii=False) + "\n")
        except OSError as e:
            full_disk(e)
            if not self.unwritten:
                print(f"warning: {self.path}: {os.strerror(e.errno)} at step {record['step']}; its records are lost "
                      f"until there is space again (a resume from an earlier checkpoint writes its steps again)",
                      file=sys.stderr, flush=True)
            self.unwritten.append(record["step"])
        if self.tb is not None:
            try:
                for key, value in scalars.items():
                    self.tb.add_scalar(key, value, record["step"])
            except OSError as e:  # its writer's thread failed: every later call would fail the same way
                self._drop_tensorboard(e, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def _drop_tensorboard(self, e: OSError, step: int) -> None:
        full_disk(e)
        print(f"warning: {os.path.join(self.cfg.out_dir, 'tensorboard')}: {os.strerror(e.errno)} (noticed at step "
              f"{step}); no further TensorBoard events are written in this run", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):
            self.tb.close()
        self.tb = None

    def close(self, exit_code: int = 0) -> None:
        """Once, at the end of the run, whatever ended it (exit_code: the process's, for W&B's run state)."""
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            try:
                self.tb.close()
            except OSError as e:
                self._drop_tensorboard(e, self.logged_step)
        if self.unwritten:
            count = len(self.unwritten)
            print(f"warning: {self.path}: {count} record{'s' * (count != 1)} not written (steps {self.unwritten[0]}–"
                  f"{self.unwritten[-1]}): the disk was full", file=sys.stderr, flush=True)
        if self.wandb is not None:
            self.wandb.finish(exit_code=exit_code)
        self.bar = self.tb = self.wandb = None


def full_disk(e: OSError) -> None:
    """Rank 0's logs on a full disk (ENOSPC, EDQUOT) warn, not end the run: rank 0 would stop alone, and a
    checkpoint written in the background (train.async_checkpoint) may fill the disk until the store gives that
    space back; a checkpoint that fails to write stops every rank with its line. Any other error is raised."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise e


def append_line(path: str, line: str) -> None:
    """One line at the end of a file; a write that fails leaves the file as it was (no half line for the next to
    join). Unbuffered: a buffer would write its rest again as the file closes."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        rest = memoryview(line.encode())
        try:
            while rest:
                rest = rest[os.write(fd, rest):]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)  # shrinking needs no space
            raise
    finally:
        os.close(fd)


def require_wandb():
    try:
        import wandb  # optional: never required
    except ImportError:
        raise UserError("log.wandb=true needs the wandb package: pip install wandb (or set log.wandb=false)") from None
    return wandb


def start_wandb(wandb, cfg: Config, stage: str):
    """One W&B run per out_dir: its id is kept there, so a resumed run continues the same W&B run."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    id_file = os.path.join(cfg.out_dir, "wandb_id")
    if os.path.isfile(id_file):
        run_id = open(id_file).read().strip()
    else:
        run_id = wandb.util.generate_id()
        atomic_write(id_file, (run_id + "\n").encode())
    return wandb.init(project=cfg.log.wandb_project, id=run_id, resume="allow", dir=cfg.out_dir,
                      name=os.path.basename(os.path.abspath(cfg.out_dir)), job_type=stage,
                      config=OmegaConf.to_container(OmegaConf.structured(cfg)))


def gpu_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_FLOPS.items() if key in name), None)
