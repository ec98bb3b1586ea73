"""The one training loop of Training/: a step-based loop over a batch stream with evaluation,
checkpoint and exact resume, best-checkpoint selection, early stopping, AMP on CUDA, TensorBoard
and seeding. Each task script keeps only its data, loss, evaluation and model card.

    seed_everything(cfg.seed)                       # before building the network
    net, opt = ..., ...
    state = run_loop(net, opt, batches, loss_fn, LoopConfig(steps=..., eval_every=...), out,
                     evaluate=..., save_best=..., resume=args.resume)

``last.pt`` (written atomically) holds ``model``, ``optimiser``, ``scheduler`` (when given),
``scaler`` (AMP), ``state`` (the counters and history below), ``numpy_rng`` / ``torch_rng`` (the
generators handed in as ``rng`` / ``gen``), ``global_rng`` (torch, numpy, random and CUDA) and any
``extra`` keys (e.g. ``config``), so ``resume=True`` continues exactly where the run stopped.
The older scripts' ``last.pt`` files (state without ``step``; no ``global_rng``) resume too.

state: ``step`` (training steps done), ``epoch`` (evaluations done), ``best`` / ``best_epoch`` /
``best_step`` (the best evaluation score), ``history`` (one entry per evaluation, or per checkpoint
without evaluation), ``losses`` ([step, mean loss] per checkpoint), ``seconds`` (training time).
"""
from __future__ import annotations

import atexit
import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from SpineKneeSegLib.core.memory import keep_freed_memory


@dataclass
class LoopConfig:
    steps: int  # the schedule's length: the loop stops there
    stop_after: int | None = None  # stop earlier with the same schedule (equal-budget comparisons)
    eval_every: int = 0  # evaluate every N steps (and at the schedule's last step); 0: never
    checkpoint_every: int | None = None  # write last.pt every N steps (default: at each evaluation)
    patience: int | None = None  # early stopping: evaluations without a better score; None: off
    device: str = "cpu"
    amp: bool = True  # mixed precision, only ever on CUDA
    grad_clip: float | None = None  # clip the gradient norm to this
    scheduler_on: str = "step"  # "step": scheduler.step() every step; "evaluation": scheduler.step(score);
    # "never": the scheduler's state is only saved and restored
    max_minutes: float | None = None  # time budget of this call (0: stop after one step); resume continues
    seed: int = 0  # what seed_everything() was given; recorded, the caller seeds before building its network
    tensorboard: bool = True  # write OUT/tensorboard when torch.utils.tensorboard imports
    round_loss: int | None = 4  # digits of the loss in history entries (None: as computed)
    extra_state: dict = field(default_factory=dict)  # initial extra counters kept in state


@dataclass
class Evaluation:
    """What an evaluation callback returns: ``score`` (higher is better: best.pt, early stopping,
    plateau schedulers), ``record`` (fields for the history entry), ``scalars`` (TensorBoard name
    -> value) and ``metrics`` (anything, handed to save_best / on_evaluation)."""
    score: float
    record: dict = field(default_factory=dict)
    scalars: dict = field(default_factory=dict)
    metrics: Any = None


def seed_everything(seed: int) -> None:
    """torch (CPU and CUDA), numpy's global generator and Python's random."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def init_distributed() -> tuple[int, int]:
    """Under ``torchrun`` (WORLD_SIZE > 1 in the environment) join the process group once (gloo
    on the CPU, nccl on CUDA) and return (rank, world size); a plain run returns (0, 1). run_loop
    then trains data-parallel: each process draws its own batches (seed them with ``rank_seed``),
    DistributedDataParallel averages the gradients, only rank 0 writes checkpoints and logs."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(_leave_process_group)  # torch asks for it: its threads can abort a later teardown
    return distributed_rank()


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def distributed_rank() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_seed(seed: int) -> int:
    """A data-parallel process's own seed for its batch stream (rank 0 keeps ``seed``). Joins
    torchrun's process group first (``init_distributed``), so a script may call it before run_loop."""
    return seed + 1009 * init_distributed()[0]


def rank_stream(rng: np.random.Generator, seed: int) -> np.random.Generator:
    """The generator this process draws its batches from: ``rng`` itself in a single process and on
    rank 0 (which draw exactly as before: the same recipe gives the same model), a fresh one seeded
    with ``rank_seed(seed)`` on the other ranks, which would otherwise draw rank 0's batches."""
    return rng if init_distributed()[0] == 0 else np.random.default_rng(rank_seed(seed))


def rank_torch_stream(gen: torch.Generator, seed: int) -> torch.Generator:
    """``rank_stream`` for a torch generator (augmentations drawn on the device)."""
    return gen if init_distributed()[0] == 0 else torch.Generator(device=gen.device).manual_seed(rank_seed(seed))


def _batch_fingerprint(batch) -> float:
    """A number that differs between two different batches: the sum of the first tensor in it."""
    while isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if isinstance(batch, dict) and batch:
        return _batch_fingerprint(next(iter(batch.values())))
    return float(torch.as_tensor(batch).double().sum()) if isinstance(batch, (torch.Tensor, np.ndarray)) else 0.0


def _distinct_across_ranks(value: float, world: int) -> bool:
    import torch.distributed as dist

    gathered = [None] * world
    dist.all_gather_object(gathered, value)
    return len(set(gathered)) == world


def tensorboard_writer(out: Path):
    """TensorBoard writer under OUT/tensorboard, or None without the 'train' extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is in the 'train' extra
        return None
    return SummaryWriter(str(out / "tensorboard"))


def save_atomic(path: Path, payload: dict) -> None:
    """torch.save through a temporary file: a run killed mid-write keeps its previous file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


save_resume_state = save_atomic  # the name the scripts used


def _global_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_global_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_resume_state(path: Path, net, optimiser, scheduler=None, rng: np.random.Generator | None = None,
                      gen: torch.Generator | None = None, scaler=None) -> dict | None:
    """Restore what run_loop (or an older script) wrote to ``path`` into the given objects; returns
    the raw checkpoint dict, or None when ``path`` does not exist."""
    if not path.exists():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own file
    net.load_state_dict(ckpt["model"])
    optimiser.load_state_dict(ckpt["optimiser"])
    if scheduler is not None and "scheduler" in ckpt:
        scheduler.load_state_dict(ckpt["scheduler"])
    if rng is not None and "numpy_rng" in ckpt:
        rng.bit_generator.state = ckpt["numpy_rng"]
    if gen is not None and "torch_rng" in ckpt:
        gen.set_state(ckpt["torch_rng"])
    if scaler is not None and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    if "global_rng" in ckpt:
        _set_global_rng(ckpt["global_rng"])
    return ckpt


def _upgrade_state(state: dict, eval_every: int) -> dict:
    """Counters of the older scripts' last.pt: knee ``iteration``, levels ``epoch`` only, x-ray
    ``best_step`` without ``epoch``, level column ``step`` + ``losses``."""
    state = dict(state)
    if "step" not in state:
        state["step"] = state.pop("iteration", state.get("epoch", 0) * max(1, eval_every))
    history = state.setdefault("history", [])
    state.setdefault("epoch", len(history))
    state.setdefault("best", -math.inf)
    if "best_epoch" not in state:
        state["best_epoch"] = next((i + 1 for i, h in enumerate(history) if h.get("step") == state.get("best_step")), 0)
    state.setdefault("best_step", 0)
    state.setdefault("losses", [])
    state.setdefault("seconds", 0.0)
    return state


def _default_save_best(path: Path, net, state: dict, evaluation: Evaluation) -> None:
    save_atomic(path, {"model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                       "step": state["step"], "epoch": state["epoch"], "score": evaluation.score,
                       "record": evaluation.record})


def run_loop(net: torch.nn.Module, optimiser: torch.optim.Optimizer,
             batches: Iterator | Callable[[int], Iterator], loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
             cfg: LoopConfig, out: Path | None, *, scheduler=None,
             evaluate: Callable[[torch.nn.Module], Evaluation] | None = None,
             save_best: Callable[[Path, torch.nn.Module, dict, Evaluation], None] | bool | None = True,
             on_evaluation: Callable[[torch.nn.Module, dict, Evaluation], None] | None = None,
             rng: np.random.Generator | None = None, gen: torch.Generator | None = None,
             lr_at: Callable[[int], float] | None = None, resume: bool = False, extra: dict | None = None,
             log: Callable[[str], None] = print, resume_message: Callable[[dict], str] | None = None) -> dict:
    """Train ``net`` until cfg.steps (or cfg.stop_after), early stopping, or the time budget.

    ``batches``: an iterator of batches, or ``step -> iterator`` (called once, with the step the run
    starts or resumes at: a stream that draws from ``rng`` / ``gen`` continues exactly on resume).
    ``loss_fn(net, batch)``: the training loss (the loop moves nothing to the device; run under
    autocast on CUDA). ``evaluate(net)`` -> Evaluation, called in eval mode. ``save_best``: True
    writes OUT/best.pt ({model, step, epoch, score, record}) on a better score, a function
    ``(path, net, state, evaluation)`` writes it in the caller's format, None/False: none.
    ``on_evaluation(net, state, evaluation)``: after each evaluation (e.g. snapshots; rank 0 only). ``lr_at(step)``:
    the learning rate set before each step (a schedule written as a formula). Returns the state."""
    keep_freed_memory()  # each step's activations reuse the last step's memory: 1.15-1.75x faster steps on CPU
    device = torch.device(cfg.device)
    rank, world = init_distributed()  # under torchrun: data-parallel; else (0, 1)
    model = net
    if world > 1:  # torchrun: gradients averaged across the processes, rank 0 writes
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        if rank != 0:
            log = lambda message: None  # noqa: E731  (rank 0 speaks for the run)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    state = _upgrade_state({"step": 0, "epoch": 0, "best": -math.inf, "best_epoch": 0, "best_step": 0,
                            "history": [], "losses": [], "seconds": 0.0, **cfg.extra_state}, cfg.eval_every)
    last = out / "last.pt" if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if resume and last is not None:  # every rank reads rank 0's file
        ckpt = load_resume_state(last, net, optimiser, scheduler, rng, gen, scaler)
        if ckpt is not None and world > 1 and "rank_rng" in ckpt:  # this rank's own batch stream
            mine = ckpt["rank_rng"][rank]
            if rng is not None and mine.get("numpy") is not None:
                rng.bit_generator.state = mine["numpy"]
            if gen is not None and mine.get("torch") is not None:
                gen.set_state(mine["torch"])
        if ckpt is not None:
            state = _upgrade_state(ckpt["state"], cfg.eval_every)
            log(resume_message(state) if resume_message else
                f"resumed at step {state['step']} (best {state['best']:.4f} at evaluation {state['best_epoch']})")
    writer = tensorboard_writer(out) if cfg.tensorboard and out is not None and rank == 0 else None
    stream = batches(state["step"]) if callable(batches) else batches
    budget = min(cfg.steps, cfg.stop_after or cfg.steps)
    checkpoint_every = cfg.checkpoint_every or cfg.eval_every or budget
    started = time.time()
    window: list[float] = []
    chunk_started = time.time()

    def checkpoint():
        rank_rng = None
        if world > 1:  # a collective: every rank takes part, rank 0 writes
            import torch.distributed as dist

            rank_rng = [None] * world
            dist.all_gather_object(rank_rng, {"numpy": rng.bit_generator.state if rng is not None else None,
                                              "torch": gen.get_state() if gen is not None else None})
        if last is None or rank != 0:
            return
        payload = {"model": net.state_dict(), "optimiser": optimiser.state_dict(), "state": state,
                   "global_rng": _global_rng(), **(extra or {})}
        if scheduler is not None:
            payload["scheduler"] = scheduler.state_dict()
        if scaler is not None:
            payload["scaler"] = scaler.state_dict()
        if rng is not None:
            payload["numpy_rng"] = rng.bit_generator.state
        if gen is not None:
            payload["torch_rng"] = gen.get_state()
        if rank_rng is not None:
            payload["rank_rng"] = rank_rng
        save_atomic(last, payload)

    def stopped_early() -> bool:
        return cfg.patience is not None and evaluate is not None and state["epoch"] - state["best_epoch"] >= cfg.patience

    net.train()
    while state["step"] < budget and not stopped_early():
        t = time.time()
        if lr_at is not None:
            for group in optimiser.param_groups:
                group["lr"] = lr_at(state["step"])
        batch = next(stream)
        if world > 1 and "ranks_drew_distinct_batches" not in state:  # once: a stream not seeded per rank
            state["ranks_drew_distinct_batches"] = _distinct_across_ranks(_batch_fingerprint(batch), world)
            if not state["ranks_drew_distinct_batches"]:
                log("warning: every process drew the same first batch, so data-parallel training is no faster "
                    "than one process; seed the batch stream with trainloop.rank_stream / rank_seed")
        optimiser.zero_grad()
        autocast = torch.autocast("cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext()
        with autocast:
            loss = loss_fn(model, batch)
        if scaler is not None:
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(optimiser)
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            scaler.step(optimiser)
            scaler.update()
        else:
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            optimiser.step()
        if scheduler is not None and cfg.scheduler_on == "step":
            scheduler.step()
        state["step"] += 1
        window.append(float(loss.detach()))  # waits for the device: the step's time includes its GPU work
        state["seconds"] += time.time() - t
        step = state["step"]
        out_of_time = cfg.max_minutes is not None and (time.time() - started) / 60 > cfg.max_minutes
        if world > 1 and cfg.max_minutes is not None:  # one decision for every rank (else a collective hangs)
            import torch.distributed as dist

            flag = torch.tensor([float(out_of_time)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        due_eval = evaluate is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps)
        due_checkpoint = step % checkpoint_every == 0 or step == budget or out_of_time or due_eval
        if not due_checkpoint:
            continue
        mean_loss = float(np.mean(window))
        if cfg.round_loss is not None:
            mean_loss = round(mean_loss, cfg.round_loss)
        lr = lr_at(step) if lr_at is not None else optimiser.param_groups[0]["lr"]
        state["losses"].append([step, round(float(np.mean(window)), 4)])
        if due_eval:
            net.eval()
            with torch.no_grad():
                evaluation = evaluate(net)
            net.train()
            if scheduler is not None and cfg.scheduler_on == "evaluation":
                scheduler.step(evaluation.score)
                lr = optimiser.param_groups[0]["lr"]
            state["epoch"] += 1
            entry = {"epoch": state["epoch"], "step": step, "loss": mean_loss, "lr": lr, **evaluation.record,
                     "seconds": round(time.time() - chunk_started, 1)}
            state["history"].append(entry)
            if writer is not None:
                writer.add_scalar("train/loss", mean_loss, step)
                for name, value in evaluation.scalars.items():
                    writer.add_scalar(name, value, step)
                writer.flush()
            if on_evaluation is not None and rank == 0:  # it writes files (snapshots): rank 0 speaks for the run
                on_evaluation(net, state, evaluation)
            if evaluation.score > state["best"]:
                state["best"], state["best_epoch"], state["best_step"] = evaluation.score, state["epoch"], step
                if save_best and out is not None and rank == 0:
                    (_default_save_best if save_best is True else save_best)(out / "best.pt", net, state, evaluation)
        else:
            entry = {"step": step, "loss": mean_loss, "lr": lr, "seconds": round(state["seconds"])}
            if evaluate is None:
                state["history"].append(entry)
            if writer is not None:
                writer.add_scalar("train/loss", mean_loss, step)
                writer.flush()
        window, chunk_started = [], time.time()
        checkpoint()
        log(json.dumps(entry))
        if out_of_time and step < budget:
            log("time budget reached; resume with --resume")
            state["stopped"] = "time"
            _leave_together(world)
            return state
    state["stopped"] = "patience" if stopped_early() and state["step"] < budget else "steps"
    if writer is not None:
        writer.close()
    _leave_together(world)
    return state


def _leave_together(world: int) -> None:
    """Data-parallel: a rank tearing its process group down while rank 0 still writes the
    checkpoint can abort the process (gloo), so every rank leaves the loop together."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
