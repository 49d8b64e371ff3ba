"""The training loop: AdamW on trainable weights, warmup + decay, accumulation, resume.

Longer than 500 lines because the loop (_Loop: steps, accumulation, evaluation, checkpoints, logs)
is one state machine that train() sets up; the run folder is in blsp.training.run_dir, engines in
blsp.training.engines.

``train(cfg, resume=...)`` runs a recipe to the end and returns its summary. The same call under
``accelerate launch`` or ``torchrun --nproc_per_node N`` trains on N processes with the engine the
accelerate config chooses (:mod:`blsp.training.engines`): DDP (gloo on CPU, NCCL on GPU), FSDP or
DeepSpeed ZeRO (GPU). Each rank takes its share of every global batch (see
:class:`~blsp.training.data.BatchPlan`; accelerate does not shard the data) and rank 0 alone
writes checkpoints, logs and the final weights.

The loss of a step is the sum of per-token losses over the whole global batch divided by its number
of target tokens, so 1 process x k accumulation steps and k processes x 1 step give the same update.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

from blsp.errors import BlspError
from blsp.training import checkpoint as ck
from blsp.training import engines
from blsp.training.config import Config
from blsp.training.data import (
    BatchPlan,
    data_fingerprint,
    load_examples,
    shard_eval,
    shuffled_speech,
    stable_int,
    total_steps,
    worker_init,
)
from blsp.training.engines import Dist, init_distributed
from blsp.training.run_dir import (
    CONFIG_FILE,
    FINAL_DIR,
    LOG_FILE,
    SUMMARY_FILE,
    check_resume_data,
    prepare_run_dir,
)
from blsp.training.setups import TrainingSetup, build_setup

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- distributed
# Process setup and the engine-specific parts live in blsp.training.engines (accelerate).
_all_sum = engines.all_sum
_all_gather = engines.all_gather
_barrier = engines.barrier


# --------------------------------------------------------------------------- optimisation
def make_optimizer(setup: TrainingSetup, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over trainable weights only; no weight decay on biases and norms (as HF Trainer)."""
    decay, no_decay = [], []
    for _name, p in setup.trainable():
        (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise BlspError("nothing to train: no weight requires a gradient")
    t = cfg.train
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps
    )


def lr_lambda(cfg: Config, total: int):
    """Linear warmup to ``lr``, then linear / cosine decay to ``min_lr_ratio * lr`` (or constant)."""
    warm = cfg.train.warmup_steps
    kind = cfg.train.scheduler
    floor = cfg.train.min_lr_ratio

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        span = max(1, total - warm)
        progress = min(1.0, (step - warm) / span)
        if kind == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)

    return f


def _autocast(cfg: Config, device: torch.device):
    """The frozen LLM's matmuls in bf16 where that is fast; trainable weights and AdamW stay fp32."""
    from blsp.utils.torch import autocast_dtype

    dtype = autocast_dtype(cfg.train.precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- loop helpers
class _Wrapper(torch.nn.Module):
    """Holds the setup's loss module (what the engine wraps). An empty micro-batch gives a zero loss
    touching every trainable weight so DDP's gradient reduction still takes place on every rank;
    with sharded weights it runs a stand-in batch at ``weight`` 0 instead, so that every rank runs
    the same forwards (each gathers weights from all ranks)."""

    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, inputs: dict[str, Any] | None, weight: float = 1.0) -> dict[str, torch.Tensor]:
        if inputs is None:
            params = [p for p in self.loss.parameters() if p.requires_grad]
            zero = sum((p.sum() * 0.0 for p in params), torch.zeros((), device=params[0].device))
            return {"loss_sum": zero, "count": torch.zeros((), device=zero.device)}
        out = self.loss(**inputs)
        return out if weight == 1.0 else {k: v * weight for k, v in out.items()}


class _StepSampler:
    """Micro-batches of this rank from ``start`` to ``stop`` (global steps)."""

    def __init__(self, plan: BatchPlan, rank: int, start: int, stop: int) -> None:
        self.plan, self.rank, self.start, self.stop = plan, rank, start, stop

    def __iter__(self):
        for step in range(self.start, self.stop):
            epoch, k = self.plan.position(step)
            yield from self.plan.micro_batches(epoch, k, self.rank)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.plan.accumulation


def _peak_memory_mb(device: torch.device) -> dict[str, float]:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


# --------------------------------------------------------------------------- train
def train(
    cfg: Config, resume: bool | str = False, model: Any = None, accept_data_change: bool = False
) -> dict[str, Any]:
    """Run the recipe ``cfg``; returns the summary (also written to ``<run>/summary.json``).

    ``resume``: True continues ``run.output_dir`` from its last checkpoint; a path names a run or
    checkpoint folder. A checkpoint whose training data (manifest contents, source settings)
    differs from the data now is refused unless ``accept_data_change``. ``model``: an already
    loaded ``BlspModel`` to train (ce/kl objectives) in place of the one ``cfg.model`` describes;
    its adapter is updated in place.
    """
    from torch.utils.data import DataLoader

    from blsp.utils.io import JsonlAppender, atomic_write_json, atomic_write_text

    d = init_distributed(cfg)
    try:
        run_dir, ckpt = prepare_run_dir(cfg, resume)
        data_fp = data_fingerprint(cfg.data.train)
        if ckpt is not None:
            check_resume_data(ckpt, data_fp, accept_data_change)
        ckpt_dir = run_dir / "checkpoints"
        if d.main:
            ck.clean_partial(ckpt_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            resolved = copy.deepcopy(cfg)
            resolved.run.output_dir = str(run_dir)
            atomic_write_text(run_dir / CONFIG_FILE, resolved.to_yaml())
        _barrier(d)

        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        setup = build_setup(cfg, d.device, model=model)
        sources = load_examples(
            cfg.data.train, cfg.data, cfg.train.seed, setup.needs_transcript, count_tokens=setup.count_tokens
        )
        plan = BatchPlan(
            sources,
            [s.weight for s in cfg.data.train],
            global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=cfg.train.micro_batch_size,
            world_size=d.world_size,
            seed=cfg.train.seed,
            group_by_length=cfg.data.group_by_length,
            megabatch_factor=cfg.data.megabatch_factor,
            epoch_size=cfg.data.epoch_size,
        )
        setup.prepare(plan.flat)
        if d.main:
            setup.check_examples(plan.flat)
        eval_examples = []
        if cfg.data.eval:
            eval_sets = load_examples(
                cfg.data.eval,
                cfg.data,
                cfg.train.seed,
                setup.needs_transcript,
                count_tokens=setup.count_tokens,
            )
            eval_examples = [e for s in eval_sets for e in s][: cfg.data.eval_max_examples]
        total = total_steps(plan, cfg.train.epochs, cfg.train.max_steps)

        optimizer = make_optimizer(setup, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))
        start = 0
        state: dict[str, Any] = {}
        if ckpt is not None:
            setup.load(ckpt / ck.WEIGHTS)  # before wrapping: FSDP / ZeRO-3 shard the loaded weights
            state = ck.load_trainer_state(ckpt)
            scheduler.load_state_dict(state["scheduler"])
            start = int(state["step"])
            rngs = state.get("rng") or []
            if len(rngs) == d.world_size:
                ck.set_rng_state(rngs[d.rank])
        if d.shards_params and getattr(setup.loss, "shared_head", False):
            # the shared-head KV pass is an extra LLM forward on some ranks only; with sharded
            # weights every rank must run the same forwards (the loss is the same either way)
            setup.loss.shared_head = False
        module, optimizer = engines.prepare(d, _Wrapper(setup.loss), optimizer, cfg, plan.accumulation)
        if ckpt is not None:
            engines.load_optimizer_state(d, module, optimizer, state, ckpt)
            if d.main:
                log.info("resumed from %s at step %d", ckpt, start)
        trainer = _Loop(
            cfg, d, setup, plan, optimizer, scheduler, run_dir, total, eval_examples, state, data_fp
        )
        trainer.module = module
        loader = DataLoader(
            _IndexDataset(plan),
            batch_sampler=_StepSampler(plan, d.rank, start, total),
            collate_fn=setup.collate,
            num_workers=cfg.data.num_workers,
            worker_init_fn=worker_init if cfg.data.num_workers else None,
            persistent_workers=False,
        )
        logger = JsonlAppender(run_dir / LOG_FILE, id_key="key") if d.main else None
        try:
            summary = trainer.run(start, iter(loader), logger)
        finally:
            if logger is not None:
                logger.close()
            trainer.close()
        if d.main:
            atomic_write_json(run_dir / SUMMARY_FILE, summary)
        _barrier(d)
        return summary
    finally:
        engines.shutdown(d)


class _IndexDataset(torch.utils.data.Dataset):
    def __init__(self, plan: BatchPlan) -> None:
        self.flat = plan.flat

    def __len__(self) -> int:
        return len(self.flat)

    def __getitem__(self, i: int):
        return self.flat[i]


class _Loop:
    def __init__(
        self,
        cfg: Config,
        d: Dist,
        setup: TrainingSetup,
        plan: BatchPlan,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        run_dir: Path,
        total: int,
        eval_examples: list[Any],
        state: dict[str, Any],
        data_fp: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.d, self.setup, self.plan = cfg, d, setup, plan
        self.data_fp = data_fp
        self.optimizer, self.scheduler = optimizer, scheduler
        self.run_dir, self.total = run_dir, total
        self.ckpt_dir = run_dir / "checkpoints"
        self.eval_examples = eval_examples
        self.module: torch.nn.Module = setup.loss
        self._stand_in: dict[str, Any] | None = None  # a usable micro-batch (sharded weights only)
        self.params = [p for _n, p in setup.trainable()]
        self.history: dict[str, Any] = state.get("history") or {
            "first_loss": None,
            "samples": 0,
            "tokens": 0,
            "skipped": 0,
            "train_time_s": 0.0,
            "eval": [],
        }
        self.writer = None
        if d.main and cfg.run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is an optional dependency
                log.warning("tensorboard is not installed; no event files are written")
        self.bar = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()

    # ------------------------------------------------------------------ one step
    def _step(self, step: int, batches: list[dict[str, Any]]) -> dict[str, float]:
        d, cfg = self.d, self.cfg
        counts = [float(b["count"]) for b in batches]
        skipped = [s for b in batches for s in b["skipped"]]
        global_count, n_skipped, n_samples = _all_sum(
            [sum(counts), float(len(skipped)), float(sum(len(b["ids"]) for b in batches))], d
        )
        for ex_id, why in skipped:
            log.warning("step %d: skipped example %s: %s", step + 1, ex_id, why)
        if global_count == 0:
            log.warning("step %d: no usable example in the global batch; no update", step + 1)
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            return {"loss": float("nan"), "lr": lr, "samples": n_samples, "skipped": n_skipped, "tokens": 0}
        torch.manual_seed(stable_int(cfg.train.seed, "step", step, d.rank) % 2**63)
        self.setup.train_mode(True)
        acc = d.accelerator
        loss_sum, parts, bad_ids = 0.0, {}, []
        keys: list[str] = []
        totals: list[float] = []
        # accelerator.backward divides by the accumulation steps (DeepSpeed: its engine does), and
        # the engines average gradients over ranks: what remains is sum(token losses) / tokens
        scale = d.world_size * self.plan.accumulation / global_count
        for j, b in enumerate(batches):
            last = j == len(batches) - 1
            acc.sync_gradients = last  # the engines reduce gradients (DeepSpeed: steps) after the last
            with contextlib.nullcontext() if last else acc.no_sync(self.module):
                inputs, weight = self._micro_inputs(b)
                with _autocast(cfg, d.device):
                    out = self.module(inputs, weight)
                loss = out["loss_sum"]
                if not torch.isfinite(loss.detach()):
                    bad_ids += b["ids"]
                loss_sum += float(loss.detach())
                for k, v in out.items():
                    if k.endswith("_sum") and k != "loss_sum":
                        parts[k] = parts.get(k, 0.0) + float(v)
                if last:  # checked before the last backward: DeepSpeed updates the weights inside it
                    keys = sorted(parts)
                    totals = _all_sum([loss_sum, float(len(bad_ids))] + [parts[k] for k in keys], d)
                    if totals[1] > 0:
                        self._fail(step, "non-finite loss", bad_ids)
                acc.backward(loss * scale)
        grad_norm = engines.clip_grad_norm(d, self.module, self.params, cfg.train.max_grad_norm)
        if grad_norm is not None and not math.isfinite(grad_norm):
            self._fail(step, "non-finite gradient norm", [i for b in batches for i in b["ids"]])
        lr = self.scheduler.get_last_lr()[0]  # the rate this update uses
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        norm = float("nan") if grad_norm is None else grad_norm
        metrics = {"loss": totals[0] / global_count, "grad_norm": norm, "lr": lr}
        for k, v in zip(keys, totals[2:], strict=True):
            metrics[k.removesuffix("_sum")] = v / global_count
        metrics.update(samples=n_samples, skipped=n_skipped, tokens=global_count)
        return metrics

    def _micro_inputs(self, b: dict[str, Any]) -> tuple[dict[str, Any] | None, float]:
        """The loss inputs of micro-batch ``b`` and its weight (see :class:`_Wrapper`)."""
        if b["count"]:
            if self.d.shards_params and self._stand_in is None:
                self._stand_in = b
            return self.setup.inputs(b), 1.0
        if not self.d.shards_params:
            return None, 1.0
        if self._stand_in is None:  # nothing usable seen yet on this rank: find one example
            for ex in self.plan.flat:
                cand = self.setup.collate([ex])
                if cand["count"]:
                    self._stand_in = cand
                    break
            else:
                raise BlspError("no training example has a target token")
        return self.setup.inputs(self._stand_in), 0.0

    def _fail(self, step: int, what: str, ids: list[str]) -> None:
        all_ids = [i for part in _all_gather(ids, self.d) for i in part]
        last = ck.latest_checkpoint(self.ckpt_dir)
        shown = ", ".join(all_ids[:16]) + (f" (and {len(all_ids) - 16} more)" if len(all_ids) > 16 else "")
        raise BlspError(
            f"{what} at step {step + 1} (epoch {self.plan.position(step)[0]}); batch ids: {shown}; "
            f"training stopped; last good checkpoint: {last if last else 'none'}"
        )

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def _eval_loss(self, examples: list[Any]) -> float | None:
        d = self.d
        loss_sum, count = 0.0, 0.0
        shards = shard_eval(examples, d.rank, d.world_size, self.cfg.train.micro_batch_size)
        if d.shards_params:  # every rank runs as many forwards as the busiest one (stand-ins at weight 0)
            shards += [[]] * (engines.all_max(len(shards), d) - len(shards))
        for idx in shards:
            b = self.setup.collate([examples[i] for i in idx]) if idx else {"count": 0, "ids": []}
            inputs, weight = self._micro_inputs(b)
            if inputs is None:
                continue
            with _autocast(self.cfg, d.device):
                out = self.module(inputs, weight)
            loss_sum += float(out["loss_sum"])
            count += float(out["count"])
        loss_sum, count = _all_sum([loss_sum, count], d)
        return loss_sum / count if count else None

    def evaluate(self) -> dict[str, float | None]:
        """Held-out loss, and the content check: the same targets with another clip's speech.

        ``gap = shuffled - loss`` (nats a target token) is about zero for an adapter that ignores
        the speech, however low its loss: the response prior alone gives the same loss either way.
        """
        self.setup.train_mode(False)
        out: dict[str, float | None] = {"loss": self._eval_loss(self.eval_examples)}
        shuffled = shuffled_speech(self.eval_examples) if self.cfg.run.eval_shuffled else None
        if shuffled is not None and out["loss"] is not None:
            out["shuffled"] = self._eval_loss(shuffled)
            if out["shuffled"] is not None:
                out["gap"] = out["shuffled"] - out["loss"]
        return out

    def _evaluate_and_log(self, done: int, logger: Any) -> dict[str, float | None]:
        d, h = self.d, self.history
        last_eval = self.evaluate()
        h["eval"].append([done, last_eval])
        if d.main and last_eval["loss"] is not None:
            row = {
                "key": f"eval-{done}",
                "step": done,
                **{f"eval_{k}": v for k, v in last_eval.items()},
            }
            row.update(samples_seen=h["samples"], train_time_s=h["train_time_s"])
            logger.append([row])
            if self.writer is not None:
                for k, v in last_eval.items():
                    if v is not None:
                        self.writer.add_scalar(f"eval/{k}", v, done)
            if self.bar is not None:
                gap = last_eval.get("gap")
                more = f", matched/shuffled gap {gap:.3f} nats" if gap is not None else ""
                self.bar.write(f"step {done}: held-out loss {last_eval['loss']:.4f}{more}")
        return last_eval

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: int) -> None:
        """Write checkpoint ``step`` (rank 0 writes; every rank takes part in the gathering)."""
        d = self.d
        rngs = _all_gather(ck.rng_state(), d)
        optimizer = engines.optimizer_state(d, self.module, self.optimizer)
        ds_dir = engines.save_deepspeed(d, self.module, self.ckpt_dir, ck.checkpoint_name(step))
        with engines.full_weights(d, self.module, self.setup.saves_frozen):
            if not d.main:
                return
            state = {
                "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(),
                "step": step,
                "position": self.plan.position(step),
                "rng": rngs,
                "history": self.history,
                "world_size": d.world_size,
                "engine": d.engine,
            }
            meta = {
                "objective": self.cfg.train.objective,
                "name": self.cfg.name,
                "position": list(self.plan.position(step)),
                "data": self.data_fp,
                "engine": d.engine,
            }

            def save_weights(path: Path) -> None:
                self.setup.save(path)  # the trained weights only (the adapter; the LLM for stage 1)
                if ds_dir is not None:
                    os.replace(ds_dir, path.parent / engines.DEEPSPEED_DIR)

            path = ck.save_checkpoint(self.ckpt_dir, step, save_weights, state, meta, self.cfg.run.keep_last)
            log.info("checkpoint %s", path)

    # ------------------------------------------------------------------ run
    def run(self, start: int, batches: Any, logger: Any) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg, d, h = self.cfg, self.d, self.history
        if d.main and cfg.run.progress:
            self.bar = tqdm(
                total=self.total, initial=start, desc=f"train {cfg.name}", unit="step", dynamic_ncols=True
            )
        window_t, window_n = time.perf_counter(), 0.0
        last_metrics: dict[str, float] = {}
        last_eval: dict[str, float | None] = {}
        if h["eval"]:  # a run saved before the content check logged the bare loss
            prev = h["eval"][-1][1]
            last_eval = dict(prev) if isinstance(prev, dict) else {"loss": prev}
        if self.eval_examples and start == 0 and cfg.run.eval_at_start:
            last_eval = self._evaluate_and_log(0, logger)  # where the run starts from (e.g. a warm start)
            window_t = time.perf_counter()
        for step in range(start, self.total):
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(self.plan.accumulation)]
            m = self._step(step, micro)
            h["train_time_s"] += time.perf_counter() - t0
            h["samples"] += int(m["samples"])
            h["tokens"] += int(m["tokens"])
            h["skipped"] += int(m["skipped"])
            if h["first_loss"] is None and math.isfinite(m["loss"]):
                h["first_loss"] = m["loss"]
            last_metrics = m
            window_n += m["samples"]
            done = step + 1
            lr = m["lr"]
            if done % cfg.run.log_every == 0 or done == self.total:
                now = time.perf_counter()
                sps = window_n / max(now - window_t, 1e-9)
                window_t, window_n = now, 0.0
                if d.main:
                    row = {"key": f"train-{done}", "step": done, "samples_per_s": sps, **m}
                    row.update(samples_seen=h["samples"], train_time_s=h["train_time_s"])
                    logger.append([row])
                    if self.writer is not None:
                        for k in ("loss", "grad_norm", "ce", "kl", "ctc"):
                            if k in m:
                                self.writer.add_scalar(f"train/{k}", m[k], done)
                        self.writer.add_scalar("train/lr", lr, done)
                        self.writer.add_scalar("train/samples_per_s", sps, done)
                    if self.bar is not None:
                        self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{sps:.1f}")
            if self.bar is not None:
                self.bar.update(1)
            if self.eval_examples and (done % cfg.run.eval_every == 0 or done == self.total):
                last_eval = self._evaluate_and_log(done, logger)
            if done % cfg.run.save_every == 0 or done == self.total:
                self.save(done)
        final = self.run_dir / FINAL_DIR
        with engines.full_weights(d, self.module, self.setup.saves_frozen):
            if d.main:
                ck.publish_dir(self.setup.save_final, final)
        summary = {
            "name": cfg.name,
            "objective": cfg.train.objective,
            "steps": self.total,
            "world_size": d.world_size,
            "engine": d.engine,
            "global_batch_size": cfg.train.global_batch_size,
            "samples": h["samples"],
            "target_tokens": h["tokens"],
            "skipped_examples": h["skipped"],
            "first_loss": h["first_loss"],
            "final_loss": last_metrics.get("loss"),
            "eval_loss": last_eval.get("loss"),
            "eval_shuffled_loss": last_eval.get("shuffled"),
            "eval_gap": last_eval.get("gap"),
            "eval_history": h["eval"],
            "train_time_s": h["train_time_s"],
            "samples_per_s": h["samples"] / h["train_time_s"] if h["train_time_s"] else None,
            "encoder_cache": (
                {
                    "served": self.setup.cache.served,
                    "encoded": self.setup.cache.encoded,
                    "writable": self.setup.cache.writable,
                }
                if self.setup.cache
                else None
            ),
            "final_weights": str(final),
            **_peak_memory_mb(d.device),
        }
        return summary
