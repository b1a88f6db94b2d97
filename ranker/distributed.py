"""One ranker run over many processes: torch.distributed, as ``torchrun`` (or ``muse ... --nproc N``,
which starts the same launcher) sets it up, DDP over the model, each rank on its own impressions, and
an evaluation merged exactly.

A process is one rank of a run when the launcher has set ``RANK`` and ``WORLD_SIZE`` (and
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) in its environment
(:func:`launched`). :func:`start` joins the process group and returns a :class:`Dist`:

- **Backend from the device**: gloo when the run's device is the CPU, NCCL on CUDA with one GPU per
  local rank (``cuda:LOCAL_RANK``).
- **Threads**: each rank sets torch's intra-op threads to the node's CPUs // the processes on the node
  (``--threads`` overrides); every rank's host, pid, thread count and device are gathered and recorded
  with the run.
- **Data**: in one epoch every training impression is read by exactly one rank (:class:`TrainPlan`,
  :func:`rank_batches`): the split is cut into blocks dealt round-robin to the ranks
  (:func:`ranker.data.impression_blocks`), and each rank reads only its blocks from the memory-mapped
  columns. ``batch_size`` is the **global** batch: every rank takes the same number of steps
  (``ceil(n / batch_size)``, as one process would) with its share of each step's rows, and each rank's
  loss is weighted by that share, so a step's gradient is the mean over the global batch. At the end of
  each epoch the ranks add up how many impressions they trained on and an order-free digest of their row
  numbers; a count or digest that differs from the split's is an error (:meth:`StepSync.end_epoch`).
- **DDP and sparse embedding gradients**: the model is wrapped in
  :class:`torch.nn.parallel.DistributedDataParallel` for every dense parameter (dense embedding tables
  included). Embedding tables with sparse gradients (SparseAdam, tables of at least
  ``sparse_min_rows`` rows) are left out of DDP and reduced by :meth:`StepSync.reduce_sparse`: each rank's
  coalesced (row, value) pairs are all-gathered (dense tensors, padded to the largest rank's) and summed
  into one sparse gradient, divided by the world size as DDP divides the dense ones. Gloo can all-reduce
  sparse tensors (DDP uses it there) but NCCL cannot, and gloo's sparse all-reduce fails when a rank's
  gradient is empty (pytorch/pytorch#87497); the all-gather works on both backends, so the CPU tests run
  the code a GPU run runs. The traffic is each rank's touched rows, never the whole table.
- **Evaluation** (:func:`evaluate_sharded`): the test split is dealt in blocks that are a multiple of the
  evaluation batch, so every rank builds exactly the batches one process would; each rank predicts its
  share into a :class:`ranker.metrics.PredictionStream` (spilled to its own disk), the records are
  gathered to rank 0 in pieces of at most ``GATHER_BYTES`` (no shared file system needed), rank 0
  computes the metrics (exact and independent of how the predictions are split, ``ranker.exact``) and
  broadcasts them. The metrics of a checkpoint are the same floats for 1 or N processes.
- **Failures**: SIGTERM (the launcher stops the other ranks when one dies) raises a
  :class:`DistributedError` in the main thread, so rank 0 marks its run failed; a collective that loses
  its peer raises in the surviving ranks. :func:`write_error_file` leaves a rank's sentence where the
  launcher reads it (``TORCHELASTIC_ERROR_FILE``). Rank 0 writes the checkpoint only after every rank
  has finished evaluating, through a temporary file.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as tdist

from muse.errors import ConfigurationError, DataError, MuseError
from ranker.data import SHUFFLE_BUFFER, impression_blocks

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Set by ``muse ... --nproc N`` for the ranks it starts: a folder where rank 0 notes the run it records,
#: so that the launcher can mark it failed when a rank dies.
LAUNCH_DIR_ENV = "MUSE_LAUNCH_DIR"
#: Every rank gets at least this many blocks of the train split (its share is within one block of the others').
BLOCKS_PER_RANK = 16
#: Fewest impressions in one rank's step (BatchNorm in Dice needs two rows).
MIN_LOCAL_BATCH = 2
#: Steps of a :class:`TrainPlan` worked out at once (bounds the plan's memory at large sizes).
_PLAN_CHUNK = 1 << 15
#: Largest piece of prediction records one rank sends to rank 0 at once.
GATHER_BYTES = 32 << 20
#: Columns of an impression batch (and ``row``: its row in the split).
BATCH_COLUMNS = ("user_id", "item_id", "label", "hist_len")
_MASK64 = (1 << 64) - 1


class DistributedError(MuseError):
    """A rank of a distributed run failed, was stopped, or lost the other ranks.

    ``secondary`` marks the consequences of another rank's failure (stopped by the launcher, a
    collective that lost its peer), so that the launcher names the rank that failed first.
    """

    def __init__(self, message: str, *, secondary: bool = False) -> None:
        super().__init__(message)
        self.secondary = secondary


def launched() -> bool:
    """Whether a launcher (torchrun, ``muse ... --nproc``) started this process as one rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def node_cpus() -> int:
    """CPUs this process may run on (its affinity mask; the CPU count where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads(local_world: int) -> int:
    """Torch threads per rank with ``local_world`` processes on this node: the CPUs // the processes (>= 1)."""
    return max(1, node_cpus() // max(1, local_world))


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise ConfigurationError(f"{name} is not set: start the command with torchrun or with --nproc N")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not an integer (set by the launcher)") from None


@dataclass
class Dist:
    """This process's place in a distributed run (see the module docstring)."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    nodes: int
    backend: str  # gloo | nccl
    device: torch.device
    threads: int
    launcher: str  # "muse --nproc" or "torchrun"
    ranks: list[dict[str, Any]] = field(default_factory=list)  # every rank's host, pid, threads, device
    launch_dir: Path | None = None
    _previous_sigterm: Any = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that records the run, writes the checkpoint and prints."""
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where collective tensors live: the GPU for NCCL, the CPU for gloo."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    # collectives ------------------------------------------------------------------------------------
    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum_int(self, values: list[int]) -> list[int]:
        """Element-wise exact sums over the ranks of integers below 2**62 / world (int64)."""
        t = torch.tensor(values, dtype=torch.int64, device=self.comm_device)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return [int(v) for v in t.cpu().tolist()]

    def all_max(self, values: list[float]) -> list[float]:
        """Element-wise maxima over the ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return t.cpu().tolist()

    def barrier(self) -> None:
        if self.backend == "nccl":
            tdist.barrier(device_ids=[self.device.index])
        else:
            tdist.barrier()

    def in_turn(self, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank: rank 0 first, then the first rank of each other node, then the rest, so
        that what ``fn`` writes once (a database row, a cached table under ``MUSE_DATA_DIR``) is written by
        one process while the others wait, and read by them after."""
        out = fn() if self.is_main else None
        self.barrier()
        if self.local_rank == 0 and not self.is_main:
            out = fn()
        self.barrier()
        if self.local_rank != 0:
            out = fn()
        return out  # type: ignore[return-value]

    # the run record ---------------------------------------------------------------------------------
    def describe(self, plan: TrainPlan | None = None) -> dict[str, Any]:
        """What a run stores of how it ran (``ranker_runs.config["distributed"]``)."""
        out: dict[str, Any] = {"world_size": self.world, "nodes": self.nodes, "procs_per_node": self.local_world,
                               "backend": self.backend, "launcher": self.launcher,
                               "threads": [r["threads"] for r in self.ranks], "ranks": list(self.ranks)}
        if plan is not None:
            out.update(plan.describe())
        return out

    def note_run(self, run_id: int | None) -> None:
        """Rank 0 tells the ``--nproc`` launcher which run it records (nothing under torchrun)."""
        if self.is_main and run_id is not None and self.launch_dir is not None:
            path = self.launch_dir / "run.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"run_id": int(run_id)}))
            os.replace(tmp, path)

    def close(self, ok: bool = False) -> None:
        """Leave the process group and put the SIGTERM handler back.

        ``ok``: this rank finished its work without an error. The ranks then meet at a barrier first, so
        that none leaves (closing its gloo connections) while another still works or destroys its group:
        a rank that finished early (rank 1 of ``compare``, while rank 0 stores the comparison) otherwise
        sometimes died of SIGABRT in gloo's teardown. After an error there is no barrier: a peer may be gone.
        """
        if tdist.is_initialized():
            if ok:
                try:
                    self.barrier()
                except Exception as e:  # a peer failed after its work: its own report says why
                    log.warning("rank %d: the closing barrier failed (%s)", self.rank, e)
            tdist.destroy_process_group()
        if self._previous_sigterm is not None:
            try:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
            except ValueError:  # not the main thread
                pass
            self._previous_sigterm = None

    def __enter__(self) -> Dist:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start(device: str | torch.device = "cpu", threads: int | None = None, timeout_s: float = 1800.0) -> Dist:
    """Join the process group the launcher described in the environment.

    Args:
        device: the run's device (``settings.resolve_device()``); CUDA selects NCCL and ``cuda:LOCAL_RANK``.
        threads: torch intra-op threads of this rank (default: the node's CPUs // its processes).
        timeout_s: how long a collective waits for the other ranks.

    Raises:
        ConfigurationError: not started by a launcher, a bad thread count, or fewer GPUs than processes.
        DistributedError: the process group could not be formed (names the address).
    """
    if not launched():
        raise ConfigurationError("this process was not started by torchrun or --nproc (RANK and WORLD_SIZE unset)")
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank, local_world = _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", world)
    nodes = _env_int("GROUP_WORLD_SIZE", max(1, world // max(1, local_world)))
    if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
        raise ConfigurationError(f"--threads {threads!r} must be a positive integer")
    dev = torch.device(device)
    if dev.type == "cuda":
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise ConfigurationError(
                f"local rank {local_rank} has no GPU: {visible} visible on this node; start at most {visible} "
                "process(es) per node on CUDA (NCCL needs one GPU per rank), or set MUSE_DEVICE=cpu for gloo")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    n_threads = int(threads) if threads is not None else default_threads(local_world)
    torch.set_num_threads(n_threads)
    try:
        tdist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s))
    except Exception as e:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise DistributedError(f"rank {rank} could not join the process group at {where} ({backend}): {e}") from e
    launch_dir = os.environ.get(LAUNCH_DIR_ENV)
    d = Dist(rank, world, local_rank, local_world, nodes, backend, dev, n_threads,
             "muse --nproc" if launch_dir else "torchrun", launch_dir=Path(launch_dir) if launch_dir else None)
    me = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "threads": n_threads, "device": str(dev)}
    infos: list[Any] = [None] * world
    tdist.all_gather_object(infos, me)
    d.ranks = sorted(infos, key=lambda r: r["rank"])
    d._previous_sigterm = _stop_on_sigterm(rank)
    log.info("rank %d of %d (local %d of %d, %d node(s)): %s on %s, %d torch thread(s)", rank, world, local_rank,
             local_world, nodes, backend, dev, n_threads)
    return d


def _stop_on_sigterm(rank: int) -> Any:
    """SIGTERM raises a :class:`DistributedError` in the main thread (so that ``finally`` blocks run and
    rank 0 marks its run failed); returns the previous handler."""

    def stop(signum: int, frame: Any) -> None:
        raise DistributedError(f"rank {rank} was stopped by {signal.Signals(signum).name} (the launcher stops "
                               "every rank when one fails)", secondary=True)

    try:
        return signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (a test harness): leave the default
        return None


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank went away (or a stop by the launcher)."""
    if isinstance(exc, DistributedError):
        return exc.secondary
    if isinstance(exc, getattr(tdist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "gloo", "NCCL"))


def write_error_file(message: str, secondary: bool = False) -> None:
    """Leave ``message`` where the elastic launcher reads a failed rank's cause (``TORCHELASTIC_ERROR_FILE``;
    nothing when the variable is unset)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        Path(path).write_text(json.dumps({"message": message, "timestamp": int(time.time()),
                                          "muse": {"secondary": bool(secondary)}}))
    except OSError as e:  # the launcher's folder is gone: nothing left to tell
        log.warning("could not write the error file %s: %s", path, e)


# training ---------------------------------------------------------------------------------------------


def train_block(n: int, world: int) -> int:
    """Rows per block of a train split of ``n`` impressions dealt to ``world`` ranks: at most
    ``SHUFFLE_BUFFER``, and small enough that every rank gets ``BLOCKS_PER_RANK`` blocks."""
    return max(1, min(SHUFFLE_BUFFER, -(-n // (world * BLOCKS_PER_RANK))))


@dataclass(frozen=True)
class TrainPlan:
    """Which rows each rank trains on in one epoch, and how many per step.

    Every rank takes ``steps = ceil(n / global_batch)`` steps, as many as one process. Step j uses
    ``(j+1)·n // steps - j·n // steps`` rows over all ranks (never more than ``global_batch``), each
    rank's share in proportion to its rows (``j·c_r // steps`` after step j, the rows left over by the
    rounding going to the ranks with the largest remainders).
    """

    n: int  # impressions of the split used (after max_train)
    world: int
    global_batch: int
    block: int  # rows per block dealt round-robin
    counts: tuple[int, ...]  # rows of each rank
    steps: int

    def _used(self, j: np.ndarray) -> np.ndarray:
        """Rows each rank has used after steps ``j``: int64 ``[world, len(j)]``, summing to ``j·n // steps``."""
        c = np.asarray(self.counts, np.int64)[:, None]  # [W, 1]
        prod = j[None, :] * c  # [W, J]
        base, rem = prod // self.steps, prod % self.steps
        short = (j * self.n) // self.steps - base.sum(axis=0)  # [J], in [0, W): rows the floors left out
        order = np.argsort(-rem, axis=0, kind="stable")  # [W, J]: ranks by remainder, largest first
        place = np.empty_like(order)
        np.put_along_axis(place, order, np.broadcast_to(np.arange(self.world)[:, None], order.shape), axis=0)
        return base + (place < short[None, :])

    def local_sizes(self, rank: int) -> np.ndarray:
        """Rank ``rank``'s batch size at every step: int64 ``[steps]``."""
        if self.steps == 0:
            return np.zeros(0, np.int64)
        used = [self._used(np.arange(lo, min(lo + _PLAN_CHUNK, self.steps + 1), dtype=np.int64))[rank]
                for lo in range(0, self.steps + 1, _PLAN_CHUNK)]
        return np.diff(np.concatenate(used))

    def global_sizes(self) -> np.ndarray:
        """Impressions of every step over all ranks: int64 ``[steps]``."""
        return np.diff(np.arange(self.steps + 1, dtype=np.int64) * self.n // max(1, self.steps))

    def describe(self) -> dict[str, Any]:
        low, high = (0, 0)
        if self.steps:  # the smallest and largest local batch, one pass over the steps for every rank
            low, high = self.n, 0
            prev = np.zeros(self.world, np.int64)
            for lo in range(1, self.steps + 1, _PLAN_CHUNK):
                used = self._used(np.arange(lo, min(lo + _PLAN_CHUNK, self.steps + 1), dtype=np.int64))
                sizes = np.diff(np.concatenate([prev[:, None], used], axis=1), axis=1)
                low, high = min(low, int(sizes.min())), max(high, int(sizes.max()))
                prev = used[:, -1]
        return {"global_batch": self.global_batch, "steps_per_epoch": self.steps, "block": self.block,
                "impressions_per_rank": list(self.counts), "local_batch": {"min": low, "max": high}}


def plan_epoch(n: int, world: int, global_batch: int) -> TrainPlan:
    """The :class:`TrainPlan` of ``n`` impressions over ``world`` ranks with ``global_batch`` per step.

    Raises:
        ConfigurationError: some rank could get fewer than ``MIN_LOCAL_BATCH`` impressions in a step
            (says which batch size or process count would work).
    """
    if world < 1 or global_batch < 1:
        raise ConfigurationError(f"world size {world} and global batch {global_batch} must be >= 1")
    block = train_block(n, world)
    counts = tuple(sum(hi - lo for lo, hi in impression_blocks(n, world, r, block)) for r in range(world))
    steps = -(-n // global_batch) if n else 0
    if steps:
        rounding = 1 if world > 1 else 0  # a rank's share of a step is its even share, -1 or +1
        smallest = min(counts) // steps - rounding
        if smallest < MIN_LOCAL_BATCH:
            most_steps = min(counts) // (MIN_LOCAL_BATCH + rounding)  # steps that leave every rank enough rows
            fix = f"use --batch-size {-(-n // most_steps)} or more, or fewer processes" if most_steps else \
                "use fewer processes"
            raise ConfigurationError(
                f"a global batch of {global_batch} over {world} process(es) gives rank {counts.index(min(counts))} "
                f"as few as {max(0, smallest)} impression(s) per step ({min(counts)} of {n} impressions over {steps} "
                f"steps); every rank needs at least {MIN_LOCAL_BATCH} (BatchNorm): {fix}")
    return TrainPlan(n, world, global_batch, block, counts, steps)


def rank_batches(dataset: Any, split: str, plan: TrainPlan, rank: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """Rank ``rank``'s batches of one epoch: its blocks (:func:`ranker.data.impression_blocks`) in a seeded
    order, rows shuffled within groups of blocks of at most ``SHUFFLE_BUFFER`` rows, cut into the plan's
    local batch sizes. Each batch carries ``row`` (the impressions' rows in the split) beside the columns."""
    rng = np.random.default_rng([seed, rank])
    cols = dataset.impressions(split)
    blocks = impression_blocks(plan.n, plan.world, rank, plan.block)
    blocks = [blocks[i] for i in rng.permutation(len(blocks))]
    sizes = plan.local_sizes(rank)
    step, carry = 0, None
    for group in _groups(blocks, SHUFFLE_BUFFER):
        parts = [{**cols.slice(lo, hi, BATCH_COLUMNS), "row": np.arange(lo, hi, dtype=np.int64)} for lo, hi in group]
        part = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
        perm = rng.permutation(len(part["row"]))
        part = {c: a[perm] for c, a in part.items()}
        if carry is not None:
            part = {c: np.concatenate([carry[c], part[c]]) for c in part}
        pos, m = 0, len(part["row"])
        while step < len(sizes) and pos + sizes[step] <= m:
            yield {c: a[pos:pos + sizes[step]] for c, a in part.items()}
            pos += int(sizes[step])
            step += 1
        carry = {c: a[pos:] for c, a in part.items()} if pos < m else None
    assert step == len(sizes) and carry is None, "a rank's batches must use every row of its blocks"


def _groups(blocks: list[tuple[int, int]], rows: int) -> Iterator[list[tuple[int, int]]]:
    """Consecutive runs of ``blocks`` holding at most ``rows`` rows (a larger block is a run of its own)."""
    group: list[tuple[int, int]] = []
    size = 0
    for lo, hi in blocks:
        if group and size + (hi - lo) > rows:
            yield group
            group, size = [], 0
        group.append((lo, hi))
        size += hi - lo
    if group:
        yield group


def _mix64(rows: np.ndarray) -> np.ndarray:
    """A well-mixed uint64 of each row number (splitmix64's finaliser)."""
    x = rows.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def row_digest(rows: np.ndarray) -> tuple[int, int]:
    """(high, low) 32-bit halves of the mixed row numbers, each summed as an integer: an order-free digest
    of a set of rows that sums across ranks (a row missing or seen twice changes it)."""
    h = _mix64(np.asarray(rows, np.int64))
    return int((h >> np.uint64(32)).astype(np.int64).sum()), int((h & np.uint64(0xFFFFFFFF)).astype(np.int64).sum())


@functools.lru_cache(maxsize=8)
def expected_digest(n: int, chunk: int = 1 << 22) -> int:
    """The digest of rows ``0 .. n-1`` (what one epoch must add up to), as one 64-bit integer."""
    hi = lo = 0
    for start in range(0, n, chunk):
        a, b = row_digest(np.arange(start, min(n, start + chunk), dtype=np.int64))
        hi, lo = hi + a, lo + b
    return ((hi << 32) + lo) & _MASK64


class StepSync:
    """The distributed part of a training step (used by :func:`ranker.train.train_steps`): the DDP forward,
    the loss weight of this rank's share of the global batch, the sparse gradients' reduction, and the
    epoch's coverage check."""

    def __init__(self, dist: Dist, model: torch.nn.Module) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.dist = dist
        tables = model.embeddings.tables
        sparse = [name for name, t in tables.items() if t.sparse]
        self.sparse_params = [tables[name].weight for name in sparse]
        for p in self.sparse_params:  # DDP broadcasts rank 0's dense weights; these are left out of it
            tdist.broadcast(p.data, src=0)
        DDP._set_params_and_buffers_to_ignore_for_model(model, [f"embeddings.tables.{n}.weight" for n in sparse])
        on_gpu = dist.device.type == "cuda"
        self.ddp = DDP(model, device_ids=[dist.device] if on_gpu else None,
                       output_device=dist.device if on_gpu else None, find_unused_parameters=False)
        self.plan: TrainPlan | None = None
        self._global = np.zeros(0, np.int64)
        self._step = 0
        self._seen = 0
        self._digest = [0, 0]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.ddp(batch)

    def begin_epoch(self, plan: TrainPlan) -> None:
        self.plan, self._global = plan, plan.global_sizes()
        self._step, self._seen, self._digest = 0, 0, [0, 0]

    def weight(self, loss: torch.Tensor, raw: dict[str, np.ndarray]) -> torch.Tensor:
        """``loss`` (the mean over this rank's batch) weighted so that DDP's average over the ranks is the
        mean over the step's global batch; counts the rows for the coverage check."""
        n_local = len(raw["label"])
        if self._step >= len(self._global):
            raise DataError(f"rank {self.dist.rank} has more batches than the plan's {len(self._global)} steps")
        n_global = int(self._global[self._step])
        self._step += 1
        self._seen += n_local
        hi, lo = row_digest(raw["row"])
        self._digest[0] += hi
        self._digest[1] += lo
        return loss * (n_local * self.dist.world / n_global)

    def reduce_sparse(self) -> None:
        """Sum the sparse gradients of every rank (all-gathered rows and values) and divide by the world
        size, as DDP does with the dense ones."""
        if not self.sparse_params:
            return
        world = self.dist.world
        local = []
        for p in self.sparse_params:
            g = p.grad
            if g is None:
                local.append((torch.zeros(0, dtype=torch.int64, device=p.device),
                              torch.zeros(0, p.shape[1], dtype=p.dtype, device=p.device)))
            else:
                g = g.coalesce()
                local.append((g.indices()[0], g.values()))
        dev = self.sparse_params[0].device
        sizes = torch.tensor([len(i) for i, _ in local], dtype=torch.int64, device=dev)  # [n_tables]
        every = [torch.empty_like(sizes) for _ in range(world)]
        tdist.all_gather(every, sizes)
        counts = torch.stack(every).cpu()  # [world, n_tables]
        for j, (p, (idx, val)) in enumerate(zip(self.sparse_params, local, strict=True)):
            m = int(counts[:, j].max())
            if m == 0:
                p.grad = None
                continue
            idx_pad = torch.zeros(m, dtype=torch.int64, device=dev)
            val_pad = torch.zeros(m, p.shape[1], dtype=p.dtype, device=dev)
            idx_pad[: len(idx)] = idx
            val_pad[: len(idx)] = val
            all_idx = [torch.empty_like(idx_pad) for _ in range(world)]
            all_val = [torch.empty_like(val_pad) for _ in range(world)]
            tdist.all_gather(all_idx, idx_pad)
            tdist.all_gather(all_val, val_pad)
            keep = [int(c) for c in counts[:, j]]
            rows = torch.cat([a[:k] for a, k in zip(all_idx, keep, strict=True)])
            vals = torch.cat([a[:k] for a, k in zip(all_val, keep, strict=True)]) / world
            p.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), vals, p.shape, check_invariants=False).coalesce()

    def end_epoch(self) -> dict[str, Any]:
        """Check that the ranks together trained on every impression of the plan exactly once.

        Raises:
            DataError: the count or the row digest differs from the split's (a bug, never the user's data).
        """
        assert self.plan is not None
        mine = ((self._digest[0] << 32) + self._digest[1]) & _MASK64  # this rank's digest, mod 2**64
        seen, hi, lo = self.dist.all_sum_int([self._seen, mine >> 32, mine & 0xFFFFFFFF])
        digest = ((hi << 32) + lo) & _MASK64
        exact = seen == self.plan.n and digest == expected_digest(self.plan.n)
        if not exact:
            raise DataError(f"the ranks trained on {seen} impressions this epoch, not each of the {self.plan.n} "
                            "once (row digest differs)")
        return {"impressions": self.plan.n, "seen": seen, "exactly_once": exact}

    def share_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm's running statistics: DDP sends them at the start of
        each forward, and each rank's last forward updated its own), so that every rank evaluates the model
        rank 0 saves."""
        for b in self.ddp.module.buffers():
            tdist.broadcast(b.data, src=0)

    def totals(self, samples: int, seconds: float) -> tuple[int, float]:
        """Samples over every rank and the slowest rank's seconds."""
        total = self.dist.all_sum_int([int(samples)])[0]
        slowest = self.dist.all_max([float(seconds)])[0]
        return total, slowest


# evaluation -------------------------------------------------------------------------------------------


def eval_block(n: int, world: int, batch_size: int) -> int:
    """Rows per block of an evaluated split: a multiple of ``batch_size`` (every rank builds the batches
    one process would), at most ``SHUFFLE_BUFFER`` rows where the batch allows, ``BLOCKS_PER_RANK`` per rank."""
    batches = max(1, -(-n // batch_size))
    per_block = max(1, min(max(1, SHUFFLE_BUFFER // batch_size), -(-batches // (world * BLOCKS_PER_RANK))))
    return per_block * batch_size


def gather_predictions(dist: Dist, stream: Any) -> None:
    """Add every other rank's predictions to rank 0's ``stream`` (a :class:`ranker.metrics.PredictionStream`),
    sent in pieces of at most ``GATHER_BYTES`` through the process group (ranks need no shared disk)."""
    from ranker.metrics import RECORD

    size = RECORD.itemsize
    rows = max(1, GATHER_BYTES // size)
    pieces = iter(()) if dist.is_main else _rechunk(stream.records(), rows)
    dev = dist.comm_device
    while True:
        piece = next(pieces, None)
        k = 0 if piece is None else len(piece)
        count = torch.tensor([k], dtype=torch.int64, device=dev)
        counts = [torch.empty_like(count) for _ in range(dist.world)]
        tdist.all_gather(counts, count)
        ks = [int(c.item()) for c in counts]
        if sum(ks) == 0:
            return
        buf = torch.zeros(max(ks) * size, dtype=torch.uint8, device=dev)
        if k:
            buf[: k * size] = torch.from_numpy(np.ascontiguousarray(piece).view(np.uint8)).to(dev)
        bufs = [torch.empty_like(buf) for _ in range(dist.world)] if dist.is_main else None
        tdist.gather(buf, bufs, dst=0)
        if dist.is_main:
            for r, kr in enumerate(ks):
                if kr:
                    stream.add_records(np.frombuffer(bufs[r][: kr * size].cpu().numpy().tobytes(), RECORD))


def _rechunk(chunks: Iterator[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    for chunk in chunks:
        for lo in range(0, len(chunk), rows):
            yield chunk[lo:lo + rows]


def evaluate_sharded(dist: Dist, model: Any, builder: Any, dataset: Any, split: str = "test", batch_size: int = 1024,
                     limit: int | None = None, item_counts: np.ndarray | None = None) -> dict[str, Any]:
    """:func:`ranker.evaluate.evaluate` over every rank: each predicts its blocks, rank 0 merges the
    predictions and computes the metrics, every rank returns them (the same floats as one process)."""
    from ranker.evaluate import evaluate
    from ranker.metrics import PredictionStream

    n = len(dataset.impressions(split))
    n = n if limit is None else min(n, max(0, limit))
    block = eval_block(n, dist.world, batch_size)
    stream = PredictionStream(with_tail=item_counts is not None)
    try:
        evaluate(model, builder, dataset, split, batch_size, limit, item_counts, world=dist.world, rank=dist.rank,
                 stream=stream, block=block)
        gather_predictions(dist, stream)
        metrics = stream.metrics() if dist.is_main else None
    finally:
        stream.close()
    metrics = dist.broadcast(metrics)
    metrics["split"] = split
    if dist.is_main:
        log.info("%s on %s/%s over %d ranks: %s", getattr(model, "name", "model"), dataset.name, split, dist.world,
                 metrics["overall"])
    return metrics
