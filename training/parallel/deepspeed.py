"""dist.backend=deepspeed: the model and optimizer wrapped by a DeepSpeed engine (ZeRO stage 0-3, optional CPU
offload), checkpoints through the engine's own save and load in our layout, their conversion to a plain fp32
state dict for `generate`, export and `init_from`, and — to resume on another number of processes — to
DeepSpeed's universal checkpoint (deepspeed.checkpoint.ds_to_universal), loaded with `load_universal`.

Batch sizes, accumulation, clipping and precision come from our config only: a template in configs/deepspeed/
that sets any of them is refused, so a value is never given twice.

deepspeed is optional (the deepspeed extra): it is imported where an engine is made or a checkpoint consolidated,
after prepare_environment (its accelerator is fixed when it is first imported).
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import subprocess
import sys

import torch

from preprocess.errors import UserError

from ..checkpoint.store import checksum_problems, seal, write_failure
from ..config import Config
from ..data.order import BatchPlan
from . import env as D
from .base import Backend

UNIVERSAL = ".universal"  # step-N.universal/: the world-size-free conversion of step-N, made on demand

OURS = {  # DeepSpeed key → the config key that sets it
    "train_batch_size": "train.micro_batch_size x train.grad_accum x processes",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "optimizer": "train.lr, train.weight_decay, train.beta1/beta2",
    "scheduler": "train.schedule",
    # checkpoints are ours: written synchronously by DeepSpeed's own writer, fsynced and checksummed before the
    # rename; an asynchronous or node-local writer would leave files unflushed or half-written when we hash them
    "checkpoint": "train.ckpt_every (resumes on another number of processes convert by themselves)",
    "nebula": "train.ckpt_every",
}


def prepare_environment(device: torch.device) -> None:
    """Before deepspeed is imported: its accelerator, and a per-environment cache for the C++ ops it compiles
    on first use (minutes, once)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def build_config(cfg, plan: BatchPlan, precision: str, device_type: str = "cpu", load_universal: bool = False) -> dict:
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
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if dist.offload_params:
        if dist.zero_stage != 3:
            raise UserError("dist.offload_params needs dist.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    ds.update({
        "train_micro_batch_size_per_gpu": plan.micro_batch, "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.global_batch,
        "gradient_clipping": cfg.train.grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "zero_force_ds_cpu_optimizer": False,  # our AdamW, also when offloaded
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    })
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    return ds


def deepspeed_on(env: D.DistEnv):
    """The deepspeed module, its accelerator set and its communication on our process group."""
    prepare_environment(env.device)
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))  # DeepSpeed asks for it, whatever the launcher
    import deepspeed  # optional: the deepspeed extra

    if env.device.type == "cpu":
        skip_shared_memory_op(deepspeed)
    deepspeed.init_distributed(dist_init_required=False)  # on the process group that exists: nothing is made
    return deepspeed


def initialize(model: torch.nn.Module, optimizer, cfg, env: D.DistEnv, plan: BatchPlan, precision: str,
               load_universal: bool = False):
    deepspeed = deepspeed_on(env)
    config = build_config(cfg, plan, precision, env.device.type, load_universal)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
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


def save_engine(engine, root: str, tmp_name: str) -> None:
    """The engine's own files (model, optimizer partitions, ZeRO layout) into root/tmp_name.

    A write that fails (a full disk) is held back until this rank has passed save_checkpoint's closing barrier
    (DeepSpeed 0.19): raised at once, it would leave the ranks whose writes succeeded in that barrier while this
    one waits for them in the store's next collective. The writes after it are skipped. (An NVMe-offloaded
    optimizer's swap files are copied outside these writes: a failure there is not held.)"""
    failures = []

    def held(write):
        def call(*args, **kwargs):
            if not failures:
                try:
                    return write(*args, **kwargs)
                except Exception as e:
                    failures.append(e)
            return None
        return call

    checkpoint_engine = engine.checkpoint_engine
    checkpoint_engine.save = held(checkpoint_engine.save)  # instance attributes over the methods, removed below
    engine._copy_recovery_script = held(engine._copy_recovery_script)
    try:
        engine.save_checkpoint(root, tag=tmp_name, save_latest=False)
    finally:
        del checkpoint_engine.save, engine._copy_recovery_script
    if not failures:
        return
    e = failures[0]
    raise write_failure(e, os.path.join(root, tmp_name), 64 * 2**20) or e


def load_engine(engine, ckpt_dir: str, universal: bool = False) -> None:
    """The engine's state from ckpt_dir (a checkpoint of this run, or its universal conversion)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # our AdamW, inside ZeRO's wrapper
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
    root, tag = os.path.split(ckpt_dir.rstrip("/"))
    path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise UserError(f"{ckpt_dir}: DeepSpeed could not load this checkpoint")
    if universal:  # two slips of DeepSpeed 0.19.8's ZeRO-3 universal load, each measurable in the loss curve:
        # it gives every parameter group the hyperparameters of the first (weight decay on the norm gains) ...
        for group, kept in zip(inner.param_groups, groups, strict=True):
            group.update(kept)
        # ... and one shared `step` tensor to every group's state, which AdamW then advances once per group
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def files_written_by(ckpt_dir: str, rank: int) -> list[str]:
    """The files of a DeepSpeed checkpoint that this rank wrote: its ZeRO partitions (…zero_pp_rank_R_…), and on
    rank 0 the rest of DeepSpeed's (the model states of stages 0-2); not our rng-rank*.pt."""
    mine = []
    for name in os.listdir(ckpt_dir):
        partition = name.split("zero_pp_rank_")[1].split("_")[0] if "zero_pp_rank_" in name else None
        if partition == str(rank) or (rank == 0 and partition is None and not name.startswith("rng-rank")):
            mine.append(os.path.join(ckpt_dir, name))
    return mine


def is_partitioned(ckpt_dir: str) -> bool:
    """Whether the optimizer state is split over the ranks that wrote it (ZeRO 1-3, or bf16 at stage 0): such a
    checkpoint loads only on as many ranks, unless converted."""
    return bool(glob.glob(os.path.join(glob.escape(ckpt_dir), "*zero_pp_rank_*optim_states.pt")))


def universal_checkpoint(ckpt_dir: str, env: D.DistEnv) -> str:
    """ckpt_dir converted to DeepSpeed's universal format, once, cached beside it as step-N.universal/: written
    to a temporary name by rank 0 (in a process of its own), fsynced, checksummed and renamed when complete; a
    cached one whose files do not have their recorded sizes is converted again. A failure is one line on every
    rank."""
    out = ckpt_dir.rstrip("/") + UNIVERSAL

    def convert() -> None:
        if os.path.isdir(out) and not checksum_problems(out, sizes_only=True):
            return
        tmp = out + ".tmp"
        for stale in (out, tmp):
            shutil.rmtree(stale, ignore_errors=True)
        print(f"deepspeed: converting {ckpt_dir} to a universal checkpoint to resume on {env.world_size} "
              f"process{'es' if env.world_size > 1 else ''} (once; kept as {os.path.basename(out)})", flush=True)
        # a process of its own: DeepSpeed's tool forks workers, which a process holding CUDA and NCCL state must not
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               ckpt_dir, "--output_folder", tmp, "--inject_missing_state"],
                              env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True)
        with contextlib.suppress(FileNotFoundError):  # DeepSpeed's pointer to its output (the temporary name)
            os.unlink(os.path.join(os.path.dirname(out), "latest_universal"))
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1][:300]
            raise UserError(f"{ckpt_dir}: DeepSpeed could not convert this checkpoint to resume it on another "
                            f"number of processes ({last}); resume on as many processes as wrote it")
        seal(tmp)
        os.replace(tmp, out)

    D.from_rank0(env, convert)  # the others wait without dist.timeout_s: a conversion can take long
    return out


def is_deepspeed_checkpoint(ckpt_dir: str) -> bool:
    return any(name.endswith("mp_rank_00_model_states.pt") for name in os.listdir(ckpt_dir))


def consolidated_state_dict(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """A plain fp32 state dict from a DeepSpeed checkpoint of any ZeRO stage (the fp32 master weights where the
    optimizer holds them). DeepSpeed's own files need its full unpickler; they are files this program wrote."""
    # the accelerator DeepSpeed fixes when first imported: this process may go on to train on a GPU
    prepare_environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    root, tag = os.path.split(ckpt_dir.rstrip("/"))
    if is_partitioned(ckpt_dir):
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout; keep it for the program's output
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # optional

            state = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    else:  # stage 0: the module's weights are whole in the model file
        state = torch.load(os.path.join(ckpt_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                           weights_only=True)["module"]
    return {k: v.float().contiguous() for k, v in state.items()}


def stage_shown(cfg: Config) -> int:
    """The ZeRO stage describe shows: this config's, or 3 (the one that shards all) when it names another backend."""
    return cfg.dist.zero_stage if cfg.dist.backend == "deepspeed" else 3


class DeepSpeed(Backend):
    """The engine steps, clips and accumulates (it knows its accumulation boundaries); the loop keeps the rest."""
    name = "deepspeed"
    group_always = True  # DeepSpeed wants a process group even for one process
    compile_scope = "blocks"  # not the whole model: ZeRO gathers in hooks around each module (graph breaks)

    def __init__(self, cfg: Config, env: D.DistEnv, plan: BatchPlan, precision: str):
        super().__init__(cfg, env, plan, precision)
        self.engine = None
        self.universal: str | None = None  # the resumed checkpoint's conversion for this number of processes

    @staticmethod
    def check(cfg: Config) -> list[str]:
        if cfg.train.optimizer == "muon":
            return ["train.optimizer=muon: DeepSpeed's ZeRO partitions each matrix over the ranks, and Muon "
                    "orthogonalises whole matrices; use dist.backend=ddp (or train.optimizer=adamw)"]
        if cfg.train.float8:
            return ["train.float8=true: not with DeepSpeed (its engine's bf16 weights and torchao's float8 layers are "
                    "untested together); use dist.backend=ddp"]
        if cfg.train.compile and cfg.train.compile_scope == "model":
            return ["train.compile_scope=model: DeepSpeed's engine gathers and releases weights in hooks around each "
                    "module, which a whole-model graph would trace through; use train.compile_scope=blocks (or auto)"]
        return []

    def setup(self, model, make_optimizer, resume_from=None, saved=None) -> None:
        if resume_from is not None and saved.world_size != self.env.world_size and is_partitioned(resume_from):
            self.universal = universal_checkpoint(resume_from, self.env)  # before the engine: it loads differently
        self.engine = initialize(model, make_optimizer(model), self.cfg, self.env, self.plan, self.precision,
                                 load_universal=self.universal is not None)
        self.model, self.train_model, self.optimizer = model, self.engine, self.engine.optimizer

    def empty_model(self, build):
        """Under ZeRO-3, built inside deepspeed.zero.Init: each parameter is partitioned as it is made, so no rank
        ever holds the whole model (its weights are filled in by each rank's share, see storage)."""
        if self.cfg.dist.zero_stage != 3:
            return super().empty_model(build)
        config = build_config(self.cfg, self.plan, self.precision, self.env.device.type)
        with deepspeed_on(self.env).zero.Init(config_dict_or_path=config):
            model = build()
        model.reset_buffers()  # zero.Init makes every float tensor in the training dtype: the rotary tables in fp32
        return model

    @staticmethod
    def storage(param: torch.Tensor) -> tuple[torch.Tensor, int, tuple] | None:
        """A ZeRO-3 parameter's share on this rank: DeepSpeed's partition `ds_tensor` holds elements
        [rank x size, (rank + 1) x size) of the flattened parameter (the last rank's padded past its end)."""
        if not hasattr(param, "ds_tensor"):
            return None
        size = param.ds_tensor.ds_numel
        start = size * torch.distributed.get_rank(group=param.ds_process_group)
        held = max(0, min(size, param.ds_numel - start))
        return param.ds_tensor.data.view(-1)[:held], start, tuple(param.ds_shape)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # our scaling already accounts for the micro-steps
        self.engine.step()  # applies the update (and clipping) only at the last micro-step

    def step(self, max_norm: float, loss: torch.Tensor) -> tuple[float, bool]:
        """The engine stepped at the last micro-batch, after clipping; it skips non-finite gradients."""
        grad_norm = self.engine.get_global_grad_norm()
        return (float("inf") if grad_norm is None else float(grad_norm)), self.engine.was_step_applied()

    def save(self, directory: str) -> list[str]:
        """The engine's own files, each rank its partitions; DeepSpeed never fsyncs, the store does."""
        root, tag = os.path.split(directory.rstrip("/"))
        save_engine(self.engine, root, tag)
        return files_written_by(directory, self.env.rank)

    def load(self, directory: str, saved) -> None:
        load_engine(self.engine, self.universal or directory, universal=self.universal is not None)

    @staticmethod
    def label(cfg: Config) -> str:
        return f"deepspeed ZeRO-{stage_shown(cfg)}"

    @staticmethod
    def state_bytes(cfg, weights, trained, optimizer, processes, precision):
        """ZeRO's stage (this config's, or 3 when it names another backend) partitions the optimizer state (1),
        the gradients too (2), the weights too (3). Under bf16 the weights and gradients are bf16 (DeepSpeed
        accumulates in the weights' dtype unless a template's data_types says otherwise) and the optimizer keeps
        fp32 master copies of the trained ones."""
        stage, width = stage_shown(cfg), 2 if precision == "bf16" else 4
        params, grads = width * weights, width * trained
        state = optimizer + (4 * trained if precision == "bf16" else 0)
        return (params // processes if stage >= 3 else params, grads // processes if stage >= 2 else grads,
                state // processes if stage >= 1 else state)

    def identity(self) -> dict:
        return {"dist.backend": self.name, "dist.zero_stage": self.cfg.dist.zero_stage}

    def close(self) -> None:
        self.engine.destroy()

    @staticmethod
    def owns(directory: str) -> bool:
        return is_deepspeed_checkpoint(directory)

    @staticmethod
    def consolidate(directory: str) -> dict[str, torch.Tensor]:
        return consolidated_state_dict(directory)
