"""dist.backend=deepspeed: the model and optimizer wrapped by a DeepSpeed engine (ZeRO stage 0-3, optional CPU
offload), checkpoints through the engine's own save and load in our layout, and their conversion to a plain
fp32 state dict for `generate`, export and `init_from`.

Batch sizes, accumulation, clipping and precision come from our config only: a template in configs/deepspeed/
that sets any of them is refused, so a value is never given twice.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import sys

import torch

from preprocess.errors import UserError

from . import distributed as D

OURS = {  # DeepSpeed key → the config key that sets it
    "train_batch_size": "train.micro_batch_size x train.grad_accum x processes",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "optimizer": "train.lr, train.weight_decay, train.beta1/beta2",
    "scheduler": "train.schedule",
}


def prepare_environment(device: torch.device) -> None:
    """Before deepspeed is imported: its accelerator, and a per-environment cache for the C++ ops it compiles
    on first use (minutes, once)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def build_config(cfg, env: D.DistEnv, precision: str) -> dict:
    dist = cfg.dist
    if dist.deepspeed_config:
        try:
            with open(dist.deepspeed_config) as f:
                ds = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"dist.deepspeed_config: {dist.deepspeed_config}: {e}") from None
        for key, ours in OURS.items():
            if key in ds:
                raise UserError(f"{dist.deepspeed_config}: {key!r} is set from our config ({ours}); remove it there")
    else:
        ds = {}
    zero = ds.setdefault("zero_optimization", {})
    if "stage" in zero and zero["stage"] != dist.zero_stage:
        raise UserError(f"{dist.deepspeed_config}: zero_optimization.stage={zero['stage']} but dist.zero_stage="
                        f"{dist.zero_stage}; set it in one place (dist.zero_stage)")
    zero["stage"] = dist.zero_stage
    if dist.offload_optimizer:
        if dist.zero_stage < 1:
            raise UserError("dist.offload_optimizer needs dist.zero_stage 1, 2 or 3")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": env.device.type == "cuda"}
    if dist.offload_params:
        if dist.zero_stage != 3:
            raise UserError("dist.offload_params needs dist.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": env.device.type == "cuda"}
    t = cfg.train
    ds.update({
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * env.world_size,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "zero_force_ds_cpu_optimizer": False,  # our AdamW, also when offloaded
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    })
    return ds


def initialize(model: torch.nn.Module, optimizer, cfg, env: D.DistEnv, precision: str):
    prepare_environment(env.device)
    import deepspeed

    if env.device.type == "cpu":
        skip_shared_memory_op(deepspeed)

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=build_config(cfg, env, precision),
                                           dist_init_required=False)
    if engine.optimizer is optimizer:  # no ZeRO or bf16 wrapper: nothing else would skip a non-finite step
        behave_as_deepspeed_optimizers(engine, optimizer, cfg.train.grad_clip)
    return engine


def behave_as_deepspeed_optimizers(engine, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """ZeRO stage 0 in fp32 hands our optimizer the all-reduced gradients (the same on every rank) and steps it
    whatever they hold; DeepSpeed's own optimizers skip a step whose gradients are not finite and say so in
    `overflow`, which the engine reads (was_step_applied). Give ours the same behaviour. Nor does the engine keep
    the gradient norm on this path (get_global_grad_norm() is None): the norm before clipping goes into
    `_global_grad_norm`, where the engine reads it after the step."""
    step = optimizer.step
    optimizer.overflow = False

    def with_grads():
        return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]

    def clip():  # called by the engine before the step when clipping is on
        optimizer._global_grad_norm = torch.nn.utils.clip_grad_norm_(with_grads(), max_norm).item()

    def step_if_finite(*args, **kwargs):
        if max_norm <= 0:  # no clipping: the norm is measured here
            optimizer._global_grad_norm = torch.nn.utils.get_total_norm([p.grad for p in with_grads()]).item()
        optimizer.overflow = not math.isfinite(optimizer._global_grad_norm)
        return None if optimizer.overflow else step(*args, **kwargs)

    engine.clip_fp32_gradients = clip
    optimizer.step = step_if_finite


def skip_shared_memory_op(deepspeed) -> None:
    """On CPU, DeepSpeed compiles and starts a shared-memory all-reduce that only its inference (tensor-parallel)
    path uses: it costs minutes of compilation on first use, and every run leaves a 66 MB segment per rank in
    /dev/shm, named after MASTER_ADDR and MASTER_PORT, that a later run on the same port reopens with stale
    contents. Training never calls it, so it is marked unavailable; deepspeed.comm then skips it."""
    compatible = deepspeed.ops.__compatible_ops__
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def is_engine(model) -> bool:
    return hasattr(model, "is_gradient_accumulation_boundary") and hasattr(model, "save_checkpoint")


def save(engine, env: D.DistEnv, root: str, tmp_name: str) -> None:
    """The engine's own files (model, optimizer partitions, ZeRO layout) into root/tmp_name."""
    try:
        engine.save_checkpoint(root, tag=tmp_name, save_latest=False)
    except RuntimeError as e:  # torch.save reports a failed write (a full disk) only as a RuntimeError
        if "write" not in str(e) and "unexpected pos" not in str(e):
            raise
        full = shutil.disk_usage(root).free < 64 * 2**20
        raise OSError(errno.ENOSPC if full else errno.EIO, "No space left on device" if full else
                      f"DeepSpeed could not write its checkpoint ({str(e).splitlines()[0][:120]})",
                      os.path.join(root, tmp_name)) from None


def load(engine, ckpt_dir: str) -> None:
    root, tag = os.path.split(ckpt_dir.rstrip("/"))
    path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise UserError(f"{ckpt_dir}: DeepSpeed could not load this checkpoint")


def is_deepspeed_checkpoint(ckpt_dir: str) -> bool:
    return any(name.endswith("mp_rank_00_model_states.pt") for name in os.listdir(ckpt_dir))


def consolidated_state_dict(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """A plain fp32 state dict from a DeepSpeed checkpoint of any ZeRO stage (the fp32 master weights where the
    optimizer holds them). DeepSpeed's own files need its full unpickler; they are files this program wrote."""
    prepare_environment(torch.device("cpu"))
    root, tag = os.path.split(ckpt_dir.rstrip("/"))
    if any("zero_pp_rank_" in name and name.endswith("optim_states.pt") for name in os.listdir(ckpt_dir)):
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout; keep it for the program's output
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    else:  # stage 0: the module's weights are whole in the model file
        state = torch.load(os.path.join(ckpt_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                           weights_only=True)["module"]
    return {k: v.float().contiguous() for k, v in state.items()}
