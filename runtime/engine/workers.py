"""Tensor-parallel ranks: one process per rank, this (the engine's) process being rank 0.

    rank 0 (engine)                          ranks 1..N-1 (spawned workers)
    ------------------------------------     ------------------------------------
    spawn workers, serve the rendezvous      connect
    load its slices       \\                  load its slices
    size the KV cache      > all at once     size the KV cache
    agree: min(num_blocks) /                 agree: min(num_blocks), report to rank 0
    each step: schedule, broadcast inputs -> receive inputs
               forward (all-reduces) <------> forward (all-reduces)
               gather logits, sample          (send logits to rank 0)
    shutdown: broadcast "stop", join         exit

Only rank 0 schedules, samples and streams; every rank runs the same forward on its shard,
so the others need just the step's flat inputs (model_runner.StepInputs): two broadcasts of
int64 tensors per step. torch.distributed with NCCL on CUDA, gloo on CPU.

A worker that dies breaks the next collective on rank 0 at once (its sockets close); rank 0
then names the dead rank (WorkerDiedError) and stops the others. Workers are daemonic, and
each also exits when its parent process is gone, so no rank outlives the engine.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import socket
import threading
import time
import weakref
from dataclasses import dataclass

import torch

from brim.runtime.config import EngineConfig
from brim.runtime.engine.errors import WorkerDiedError
from brim.runtime.engine.model_runner import ModelRunner, StepInputs
from brim.runtime.models.parallel import TensorParallelGroup

logger = logging.getLogger(__name__)

# The rendezvous (workers importing torch and connecting) may take this long.
STARTUP_TIMEOUT_S = 300.0
# Collectives wait this long: a worker idles in its broadcast for as long as the engine has
# no request, and a dead peer is noticed at once (closed sockets), not by a timeout.
COLLECTIVE_TIMEOUT_S = 365 * 24 * 3600.0
# After a collective fails: how long the dead worker's process may take to be reaped.
DEATH_GRACE_S = 2.0
STOP_JOIN_TIMEOUT_S = 5.0

_HEADER_LEN = 5  # [command, num_tokens, num_seqs, max_blocks, num_logits_rows]
_STEP, _STOP = 1, 0


@dataclass(frozen=True, slots=True)
class RankReport:
    """What a rank measured at start-up (bytes are that rank's)."""

    rank: int
    weights_bytes: int  # parameters and packed copies (loader.model_weights_bytes)
    num_bytes_read: int  # checkpoint bytes it read (parallel.LoadStats)
    num_gpu_blocks: int  # what it measured before the agreement
    kv_cache_bytes: int  # its paged KV cache as allocated (the agreed blocks, its KV heads)


def backend_for(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def num_threads_per_rank(tensor_parallel_size: int) -> int:
    """CPU ranks share the machine's cores rather than each taking all of them."""
    return max(1, (os.cpu_count() or 1) // tensor_parallel_size)


class TensorParallelWorkers:
    """The worker processes of ranks 1..N-1 and rank 0's end of the group.

    group: rank 0's TensorParallelGroup (for load_model and the KV-cache agreement).
    reports: each rank's RankReport (rank 0's included) once `collect_reports` ran.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.world_size = config.parallel.tensor_parallel_size
        self.processes: list[multiprocessing.Process] = []
        self.pipes = []
        self.reports: list[RankReport] = []
        self.is_closed = False
        backend = backend_for(config.device)
        self._num_threads = torch.get_num_threads()  # this process's, restored at shutdown
        if config.device == "cpu":
            torch.set_num_threads(num_threads_per_rank(self.world_size))
        port = _free_port()
        ctx = multiprocessing.get_context("spawn")
        for rank in range(1, self.world_size):
            parent_end, child_end = ctx.Pipe(duplex=False)
            process = ctx.Process(target=run_worker, name=f"brim-tp-rank{rank}", daemon=True,
                                  args=(config, rank, port, os.getpid(), child_end))
            process.start()
            child_end.close()
            self.processes.append(process)
            self.pipes.append(parent_end)
        _live.add(self)
        self.group = self._connect(port, backend)

    def _connect(self, port: int, backend: str) -> TensorParallelGroup:
        """Rank 0 joins the group (serving the rendezvous), watching that no worker dies
        before every rank has joined."""
        result: dict = {}

        def connect() -> None:
            try:
                result["group"] = TensorParallelGroup.connect(
                    0, self.world_size, port, backend, COLLECTIVE_TIMEOUT_S)
            except Exception as exc:
                result["error"] = exc

        thread = threading.Thread(target=connect, name="brim-tp-connect", daemon=True)
        thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while thread.is_alive():
            thread.join(0.1)
            self._raise_if_dead("start-up")
            if time.monotonic() > deadline:
                self.shutdown()
                raise TimeoutError(f"the {self.world_size - 1} tensor-parallel workers did not "
                                   f"join within {STARTUP_TIMEOUT_S:.0f} s")
        if "error" in result:
            self.shutdown()
            raise result["error"]
        return result["group"]

    # -- while the engine runs --------------------------------------------------------------

    @contextlib.contextmanager
    def guard(self, during: str):
        """Turn a failed collective into a WorkerDiedError naming the rank that died."""
        try:
            yield
        except Exception as exc:
            # A broken collective waits for the dead worker to be reaped; another error
            # (this rank's own) is only checked against a death already seen.
            is_collective = any(word in str(exc).lower()
                                for word in ("gloo", "nccl", "connection", "peer"))
            deadline = time.monotonic() + (DEATH_GRACE_S if is_collective else 0)
            while True:
                self._raise_if_dead(during)
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def _raise_if_dead(self, during: str) -> None:
        dead = [(rank, p) for rank, p in enumerate(self.processes, start=1)
                if p.exitcode is not None]
        if not dead or self.is_closed:
            return
        # A worker killed by a signal is the cause; the others exited on its broken sockets.
        rank, process = min(dead, key=lambda rp: (rp[1].exitcode >= 0, rp[0]))
        error = WorkerDiedError(rank, process.pid, process.exitcode, during)
        logger.error("%s", error)
        self.shutdown()
        raise error

    def agree(self, num_blocks: int) -> int:
        """The KV-cache blocks every rank uses: the fewest any rank measured."""
        with self.guard("start-up (KV-cache sizing)"):
            return self.group.min(num_blocks)

    def collect_reports(self, own: RankReport) -> list[RankReport]:
        """Every rank's start-up report, rank 0's first (workers send theirs once agreed)."""
        reports = [own]
        for rank, pipe in enumerate(self.pipes, start=1):
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not pipe.poll(0.1):
                self._raise_if_dead("start-up")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"tensor-parallel worker rank {rank} sent no report")
            reports.append(pipe.recv())
        self.reports = reports
        return reports

    def send(self, step: StepInputs) -> None:
        """Broadcast one step's inputs to ranks 1..N-1."""
        header, payload = encode_step(step)
        device = self.group._device
        self.group.broadcast(header.to(device))
        self.group.broadcast(payload.to(device))

    def runner(self, config: EngineConfig, model, num_blocks: int) -> "DriverModelRunner":
        return DriverModelRunner(config, model, num_blocks, self)

    # -- the end ------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop every worker (idempotent): ask nicely, then kill what is left."""
        if self.is_closed:
            return
        self.is_closed = True
        _live.discard(self)
        group = getattr(self, "group", None)
        if group is not None and all(p.exitcode is None for p in self.processes):
            try:
                header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
                header[0] = _STOP
                group.broadcast(header.to(group._device))
            except Exception:  # a broken group: the workers exit on it, or are killed below
                logger.debug("could not send stop to the workers", exc_info=True)
        deadline = time.monotonic() + STOP_JOIN_TIMEOUT_S
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.exitcode is None:
                process.kill()
                process.join(5)
        for pipe in self.pipes:
            pipe.close()
        torch.set_num_threads(self._num_threads)


class DriverModelRunner(ModelRunner):
    """Rank 0's runner: sends each step to the other ranks, then runs its own share."""

    def __init__(self, config: EngineConfig, model, num_blocks: int,
                 workers: TensorParallelWorkers) -> None:
        super().__init__(config, model, num_blocks)
        self.workers = workers

    def forward(self, step: StepInputs) -> torch.Tensor | None:
        with self.workers.guard("a forward pass"):
            self.workers.send(step)
            return super().forward(step)


# -- the wire format of a step --------------------------------------------------------------


def encode_step(step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(header [5], payload [...]) int64 tensors carrying one step's inputs."""
    num_seqs = len(step.seq_lens)
    max_blocks = len(step.block_tables[0])
    header = torch.tensor([_STEP, len(step.input_ids), num_seqs, max_blocks,
                           len(step.logits_rows)], dtype=torch.int64)
    flat_tables = [b for table in step.block_tables for b in table]
    payload = torch.tensor(step.input_ids + step.positions + step.slot_mapping + flat_tables
                           + step.query_start_loc + step.seq_lens + step.logits_rows,
                           dtype=torch.int64)
    return header, payload


def decode_step(header: list[int], payload: list[int]) -> StepInputs:
    _, num_tokens, num_seqs, max_blocks, num_rows = header
    sizes = [num_tokens, num_tokens, num_tokens, num_seqs * max_blocks, num_seqs + 1, num_seqs,
             num_rows]
    parts, at = [], 0
    for size in sizes:
        parts.append(payload[at:at + size])
        at += size
    tables = [parts[3][i * max_blocks:(i + 1) * max_blocks] for i in range(num_seqs)]
    return StepInputs(parts[0], parts[1], parts[2], tables, parts[4], parts[5], parts[6])


def payload_length(header: list[int]) -> int:
    _, num_tokens, num_seqs, max_blocks, num_rows = header
    return 3 * num_tokens + num_seqs * max_blocks + 2 * num_seqs + 1 + num_rows


# -- a worker process ---------------------------------------------------------------------


def run_worker(config: EngineConfig, rank: int, port: int, parent_pid: int, pipe) -> None:
    """The life of rank `rank`: join, load its slices, size and agree, then run each step
    rank 0 sends until it says stop."""
    from brim.runtime.engine.cache_sizing import size_kv_cache
    from brim.runtime.models.loader import load_model, model_weights_bytes

    _exit_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s tp-rank{rank} %(name)s: %(message)s")
    world_size = config.parallel.tensor_parallel_size
    if config.device == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(num_threads_per_rank(world_size))
    group = TensorParallelGroup.connect(rank, world_size, port, backend_for(config.device),
                                        COLLECTIVE_TIMEOUT_S)
    model_config = config.model
    model = load_model(model_config.path, model_config.facts, model_config.dtype, config.device,
                       group=group)
    weights = model_weights_bytes(model)
    measured: list[int] = []

    def agree(num_blocks: int) -> int:
        measured.append(num_blocks)
        return group.min(num_blocks)

    report = size_kv_cache(config, model, weights, agree=agree)
    runner = ModelRunner(config, model, report.num_gpu_blocks)
    pipe.send(RankReport(rank, weights, model.load_stats.num_bytes_read, measured[0],
                         kv_cache_bytes(runner)))
    device = group._device
    while True:
        header = group.broadcast(torch.zeros(_HEADER_LEN, dtype=torch.int64, device=device))
        header = header.tolist()
        if header[0] == _STOP:
            return
        payload = torch.zeros(payload_length(header), dtype=torch.int64, device=device)
        step = decode_step(header, group.broadcast(payload).tolist())
        try:
            runner.forward(step)
        except Exception:  # rank 0 hits the same; a broken group fails the next broadcast
            logger.exception("tensor-parallel rank %d: the step failed", rank)


def kv_cache_bytes(runner: ModelRunner) -> int:
    """Bytes of a runner's paged KV cache (every layer's K and V)."""
    return sum(t.numel() * t.element_size() for kv in runner.kv_caches for t in kv)


def _exit_with_parent(parent_pid: int) -> None:
    """End this process when the engine's process is gone (even killed with SIGKILL)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="brim-tp-parent-watch", daemon=True).start()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Workers still running at interpreter exit are stopped (daemonic ones would be killed by
# multiprocessing anyway; this asks them to stop first).
_live: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for workers in list(_live):
        workers.shutdown()
