"""Process setup and what differs between training engines, through ``accelerate``.

One ``accelerate.Accelerator`` per run sets up the processes (``accelerate launch``, ``torchrun``
or a single process: it reads the same environment variables), wraps the loss module and the
optimizer (``accelerator.prepare``: DDP, FSDP or DeepSpeed ZeRO, as the accelerate config chose)
and runs the backward pass. The loop itself (:mod:`blsp.training.trainer`) keeps blsp's sampler,
batching, token-count loss normalisation and checkpoint format for every engine; this module holds
the few engine-specific parts: reading full weights to save them, the optimizer state of a
checkpoint, and DeepSpeed's own optimizer files.

Engines: ``single`` (one process), ``ddp`` (gloo on CPU, NCCL on GPU), ``fsdp`` and ``deepspeed``
(GPU only; DeepSpeed is imported only when an accelerate config chooses it).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from blsp.errors import BlspError, ConfigError
from blsp.utils.torch import resolve_device

log = logging.getLogger(__name__)

DEEPSPEED_DIR = "deepspeed"  # in a checkpoint: DeepSpeed's engine files (ZeRO-partitioned optimizer state)
_DS_TAG = "engine"


@dataclass
class Dist:
    """This process's place in the run and the engine that trains it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    engine: str = "single"  # single | ddp | fsdp | deepspeed
    zero_stage: int = 0
    accelerator: Any = None
    owns_state: bool = False  # this run created accelerate's process state (reset it at the end)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def shards_params(self) -> bool:
        """Weights are sharded across ranks (FSDP, ZeRO-3): every rank must run every forward."""
        return self.engine == "fsdp" or (self.engine == "deepspeed" and self.zero_stage == 3)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _check_engine_choice(device: torch.device) -> None:
    """Clear errors for an engine that cannot run here, before accelerate starts it."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        if importlib.util.find_spec("deepspeed") is None:
            raise BlspError(
                "the accelerate config chooses DeepSpeed (accelerate/zero2, accelerate/zero3), which is not "
                "installed: pip install deepspeed (Linux with CUDA GPUs), or launch with "
                "accelerate/fsdp / plain DDP instead"
            )
        if device.type != "cuda":
            raise BlspError("DeepSpeed ZeRO (accelerate/zero2, accelerate/zero3) runs on CUDA GPUs only")
    if _env_flag("ACCELERATE_USE_FSDP") and device.type != "cuda":
        raise BlspError("FSDP (accelerate/fsdp) runs on CUDA GPUs only; on CPU use DDP")


def init_distributed(cfg: Any) -> Dist:
    """Join the processes ``accelerate launch`` / ``torchrun`` describe in the environment."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.train.device, local)
    _check_engine_choice(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = cfg.distributed.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    owns = not AcceleratorState._shared_state
    # frozen weights and buffers are identical on every rank: DDP broadcasts none of them
    handlers: list[Any] = [
        DistributedDataParallelKwargs(broadcast_buffers=False, find_unused_parameters=False)
    ]
    if world > 1:  # a backend given to a single process would make accelerate look for a group
        timeout = datetime.timedelta(seconds=cfg.distributed.timeout_s)
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timeout))
    acc = Accelerator(
        cpu=device.type == "cpu",
        device_placement=False,  # the training setup places its modules (frozen LLM dtype, device_map)
        kwargs_handlers=handlers,
    )
    from accelerate.utils import DistributedType

    kind = acc.distributed_type
    if kind == DistributedType.NO:
        engine = "single"
    elif kind == DistributedType.FSDP:
        engine = "fsdp"
    elif kind == DistributedType.DEEPSPEED:
        engine = "deepspeed"
    elif kind in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        engine = "ddp"
    else:
        raise ConfigError(f"accelerate engine {kind} is not supported by blsp train (DDP, FSDP, DeepSpeed)")
    want = cfg.distributed.strategy
    if want != "auto" and engine != want and not (want == "ddp" and engine == "single"):
        if owns:
            _reset_accelerate_state()
        raise ConfigError(
            f"distributed.strategy is {want} but this launch runs {engine}: use "
            f'accelerate launch --config_file "$(blsp train --path accelerate/'
            f'{"zero2" if want == "deepspeed" else want})" ..., or set distributed.strategy=auto'
        )
    if engine != "single":
        device = acc.device if acc.device.type != "cpu" else torch.device("cpu")
    if world > 1 and device.type == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    stage = int(acc.state.deepspeed_plugin.zero_stage) if engine == "deepspeed" else 0
    d = Dist(
        rank=acc.process_index,
        world_size=acc.num_processes,
        local_rank=acc.local_process_index,
        device=device,
        engine=engine,
        zero_stage=stage,
        accelerator=acc,
        owns_state=owns,
    )
    if d.main and engine != "single":
        log.info("training with %s on %d processes (%s)", engine, d.world_size, device.type)
    return d


def shutdown(d: Dist) -> None:
    """Leave the process group and forget accelerate's process state when this run created it."""
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
    if d.owns_state:
        _reset_accelerate_state()


def _reset_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# --------------------------------------------------------------------------- collectives
def all_sum(values: list[float], d: Dist) -> list[float]:
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_max(value: int, d: Dist) -> int:
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_gather(obj: Any, d: Dist) -> list[Any]:
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


# --------------------------------------------------------------------------- wrapping
def prepare(
    d: Dist, module: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Any, accumulation: int
) -> tuple[torch.nn.Module, Any]:
    """Wrap the loss module and optimizer for the engine; frozen weights get no gradient or state.

    DDP ignores the frozen weights and buffers (no syncing of identical values); FSDP needs
    ``use_orig_params`` (frozen and trainable weights can share a unit); DeepSpeed gets blsp's
    micro batch, accumulation and clipping so its config cannot disagree with the recipe.
    """
    acc = d.accelerator
    acc.gradient_accumulation_steps = accumulation
    if d.engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
        frozen += [n for n, _b in module.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    elif d.engine == "fsdp":
        plugin = acc.state.fsdp_plugin
        if getattr(plugin, "fsdp_version", 1) == 1 and not plugin.use_orig_params:
            raise ConfigError(
                "FSDP needs fsdp_use_orig_params: true (the frozen LLM and the trainable adapter share "
                "units); see `blsp train --path accelerate/fsdp`"
            )
    elif d.engine == "deepspeed":
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
        ds["gradient_accumulation_steps"] = accumulation
        ds["train_batch_size"] = cfg.train.micro_batch_size * accumulation * d.world_size
        ds["gradient_clipping"] = cfg.train.max_grad_norm
    return acc.prepare(module, optimizer)


def clip_grad_norm(
    d: Dist, module: torch.nn.Module, params: list[torch.nn.Parameter], max_norm: float
) -> float | None:
    """Clip the gradients of the global batch; their norm (DeepSpeed: clipped in its step, None
    when it reports no norm)."""
    acc = d.accelerator
    if d.engine == "fsdp":  # accelerate finds the FSDP root by its full parameter list
        norm = acc.clip_grad_norm_(module.parameters(), max_norm)
    else:
        norm = acc.clip_grad_norm_(params, max_norm)
    return None if norm is None else float(norm)


# --------------------------------------------------------------------------- state
@contextlib.contextmanager
def full_weights(d: Dist, module: torch.nn.Module, everything: bool) -> Iterator[None]:
    """Inside, the setup's modules hold full (unsharded) weights on rank 0, so the setup's own save
    functions write them. Collective under FSDP / ZeRO-3: every rank enters.

    ``everything``: the save reads frozen weights too (stage-1 SFT writes the whole LLM); else
    only the trainable weights are gathered (ZeRO-3; FSDP gathers all units either way)."""
    if d.engine == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(module, writeback=False, rank0_only=True, offload_to_cpu=True):
            yield
    elif d.engine == "deepspeed" and d.zero_stage == 3:
        import deepspeed

        params = [p for p in module.parameters() if everything or p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def optimizer_state(d: Dist, module: torch.nn.Module, optimizer: Any) -> dict[str, Any] | None:
    """The optimizer state for ``trainer_state.pt`` (on rank 0; collective under FSDP).

    FSDP gathers the full, unsharded state (keyed by parameter name: any world size can load it);
    DeepSpeed keeps its partitioned state in the checkpoint's ``deepspeed/`` folder instead."""
    if d.engine == "fsdp":
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(
            module,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=True, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=True),
        ):
            return FSDP.optim_state_dict(module, _raw(optimizer))
    if d.engine == "deepspeed":
        return None
    return optimizer.state_dict()


def load_optimizer_state(
    d: Dist, module: torch.nn.Module, optimizer: Any, state: dict[str, Any], ckpt: Path
) -> None:
    """Restore what :func:`optimizer_state` (and :func:`save_deepspeed`) wrote, after ``prepare``."""
    saved = state.get("engine", "single")
    if (saved == "deepspeed") != (d.engine == "deepspeed") or (saved == "fsdp") != (d.engine == "fsdp"):
        raise BlspError(
            f"--resume: {ckpt} was written by the {saved} engine and this run uses {d.engine}; the "
            "optimizer state does not carry over (DDP and single-process checkpoints do, at any world size)"
        )
    if d.engine == "fsdp":
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(  # every rank read the full state from the checkpoint
            module,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(rank0_only=False),
            FullOptimStateDictConfig(rank0_only=False),
        ):
            osd = FSDP.optim_state_dict_to_load(module, _raw(optimizer), state["optimizer"])
        optimizer.load_state_dict(osd)
    elif d.engine == "deepspeed":
        path = ckpt / DEEPSPEED_DIR
        if not path.is_dir():
            raise BlspError(f"--resume: {path} not found (a DeepSpeed checkpoint keeps its optimizer there)")
        if state.get("world_size") != d.world_size:
            raise BlspError(
                f"--resume: {ckpt} was written by {state.get('world_size')} DeepSpeed processes and this "
                f"run has {d.world_size}; ZeRO's partitioned optimizer state needs the same number"
            )
        module.load_checkpoint(
            str(path),
            tag=_DS_TAG,
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
    else:
        optimizer.load_state_dict(state["optimizer"])


def save_deepspeed(d: Dist, module: torch.nn.Module, ckpt_dir: Path, name: str) -> Path | None:
    """DeepSpeed's engine files for a checkpoint, written by every rank into a ``.tmp-`` folder
    that the checkpoint then takes in (``None`` for other engines). Collective."""
    if d.engine != "deepspeed":
        return None
    path = ckpt_dir / f".tmp-ds-{name}"
    if d.main:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    barrier(d)
    module.save_checkpoint(str(path), tag=_DS_TAG, exclude_frozen_parameters=True)
    barrier(d)
    return path


def _raw(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
