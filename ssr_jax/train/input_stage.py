"""How batches reach the train loop: the InputStage interface and its default implementation.

The loop runs, in its own thread and in the same order on every host:

    data_state = stage.get_state()      # position of the batch that start_next() returns
    next_pending = stage.start_next()   # dispatch work for batch t+1 (e.g. a teacher model)
    state = train_step(state, batch_t)  # async
    batch_t1 = next_pending.result()

so a stage that runs jax computations (online SSR teacher generation) dispatches them from
the loop thread in a fixed order, which multi-host collectives need (docs: DESIGN.md).
A checkpoint stores `get_state()` taken just before the unconsumed batch was started, so a
restart replays exactly the batches not yet trained on.
"""
import dataclasses
import importlib
import queue
import threading
from typing import Any, Dict, Mapping, Optional, Protocol, Tuple

import jax
import numpy as np

from ssr_jax.errors import UserError
from ssr_jax.partitioning import DataLayout, Partitioner

GlobalBatch = Dict[str, jax.Array]


class Pending(Protocol):
    def result(self) -> GlobalBatch:
        """The global batch (blocks until it is ready)."""


class InputStage(Protocol):
    def start_next(self) -> Pending:
        """Dispatches the work for the next batch and returns a handle to it."""

    def get_state(self) -> Any:
        """JSON-able position: restoring it makes the next start_next() return the batch it
        would return now."""

    def set_state(self, state: Any) -> None:
        """Restores a position from get_state()."""

    def close(self) -> None:
        """Stops background work."""


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """Which examples, how many, in what order. batch_size is GLOBAL (over all hosts)."""

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    split: str = "train"
    batch_size: int = 32
    shuffle: bool = True
    seed: Optional[int] = 0
    pack: bool = True
    use_cached: bool = False
    module: Optional[str] = "tasks"  # imported first: it registers the tasks


def import_task_module(module: Optional[str]):
    if module:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UserError(f"MIXTURE_OR_TASK_MODULE={module!r} cannot be imported ({e}).") from e


def make_pipeline(cfg: DatasetConfig, layout: DataLayout, repeat: bool = True):
    """The host-local InputPipeline for cfg and this host's slice of the batch."""
    import_task_module(cfg.module)
    from ssr_jax.data.pipeline import InputPipeline  # pylint: disable=import-outside-toplevel
    kwargs = dict(split=cfg.split, task_feature_lengths=dict(cfg.task_feature_lengths),
                  batch_size=layout.per_host_batch_size, shard_info=layout.shard_info,
                  seed=cfg.seed, shuffle=cfg.shuffle, pack=cfg.pack, repeat=repeat)
    if cfg.use_cached:
        kwargs["use_cached"] = True
    return InputPipeline(cfg.mixture_or_task_name, **kwargs)


class _Ready:
    def __init__(self, batch: GlobalBatch):
        self._batch = batch

    def result(self) -> GlobalBatch:
        return self._batch


class _FromQueue:
    """Takes the next host batch when result() is called, so the train step is dispatched
    before the loop waits for data."""

    def __init__(self, stage: "PipelineInputStage"):
        self._stage = stage
        self._batch: Optional[GlobalBatch] = None

    def result(self) -> GlobalBatch:
        if self._batch is None:
            self._batch = self._stage._take()  # pylint: disable=protected-access
        return self._batch


class PipelineInputStage:
    """InputPipeline batches -> global arrays, with a host-side prefetch thread.

    The thread only runs the (numpy/tf.data) pipeline; global arrays are built in the loop
    thread, so no jax computation ever starts from the thread. Each queued batch carries the
    pipeline state after it, which is how get_state() knows the exact position.
    """

    def __init__(self, pipeline, partitioner: Partitioner, prefetch: int = 2):
        self._pipeline = pipeline
        self._partitioner = partitioner
        self._prefetch = max(1, prefetch)
        self._state = pipeline.get_state()
        self._thread: Optional[threading.Thread] = None
        self._queue: "queue.Queue" = queue.Queue(self._prefetch)
        self._stop = threading.Event()
        self._taken_since_start = 0
        self._started = 0

    @classmethod
    def from_config(cls, cfg: DatasetConfig, partitioner: Partitioner,
                    num_microbatches: int = 1, repeat: bool = True) -> "PipelineInputStage":
        layout = partitioner.data_layout(cfg.batch_size, num_microbatches)
        return cls(make_pipeline(cfg, layout, repeat=repeat), partitioner)

    # InputStage ------------------------------------------------------------------------------
    def start_next(self) -> Pending:
        self._started += 1
        return _FromQueue(self)

    def get_state(self) -> Any:
        if self._started != self._taken_since_start:
            raise RuntimeError("get_state() with a batch started but not taken is ambiguous.")
        return self._state

    def set_state(self, state: Any) -> None:
        self._halt()
        self._pipeline.set_state(state)
        self._state = self._pipeline.get_state()

    def close(self) -> None:
        self._halt()

    # internals -------------------------------------------------------------------------------
    def _take(self) -> GlobalBatch:
        if self._thread is None:
            self._launch()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._thread = None
            raise item
        host_batch, self._state = item
        self._taken_since_start += 1
        return self._partitioner.make_global_batch(host_batch)

    def _launch(self):
        self._stop.clear()
        self._queue = queue.Queue(self._prefetch)
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop),
                                        name="input-prefetch", daemon=True)
        self._thread.start()

    def _produce(self, out: "queue.Queue", stop: threading.Event):
        try:
            it = iter(self._pipeline)
            while not stop.is_set():
                batch = next(it)
                item: Any = ({k: np.asarray(v) for k, v in batch.items()},
                             self._pipeline.get_state())
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except StopIteration:
            out.put(StopIteration("the input pipeline ran out of batches"))
        except BaseException as e:  # pylint: disable=broad-except
            out.put(e)

    def _halt(self):
        """Stops the prefetch thread and drops its queued batches (the pipeline itself is
        then ahead of get_state(); set_state() re-positions it)."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread = None


def host_batches(cfg: DatasetConfig, partitioner: Partitioner, num_batches: Optional[int],
                 repeat: bool = False):
    """(host batch, global batch, number of real rows on this host) for eval/infer.

    Without repeat the pipeline ends; hosts agree on when (a tiny allgather per batch when
    multi-host) and the last, short batches are padded with all-zero rows (zero loss weight).
    """
    layout = partitioner.data_layout(cfg.batch_size)
    pipeline = make_pipeline(cfg, layout, repeat=repeat)
    it = iter(pipeline)
    template: Optional[Dict[str, np.ndarray]] = None
    count = 0
    while num_batches is None or count < num_batches:
        try:
            batch = {k: np.asarray(v) for k, v in next(it).items()}
        except StopIteration:
            batch = None
        if template is None and batch is not None:
            template = {k: np.zeros_like(v[:layout.per_host_batch_size]) for k, v in batch.items()}
        if not _any_host_has_data(batch is not None):
            return
        if batch is None:
            if template is None:
                raise UserError(f"split {cfg.split!r} of {cfg.mixture_or_task_name!r} is empty "
                                "on this host.")
            batch, rows = {k: v.copy() for k, v in template.items()}, 0
        else:
            batch, rows = _pad_rows(batch, layout.per_host_batch_size)
        count += 1
        yield batch, partitioner.make_global_batch(batch), rows


def _pad_rows(batch: Dict[str, np.ndarray], size: int) -> Tuple[Dict[str, np.ndarray], int]:
    rows = next(iter(batch.values())).shape[0]
    if rows == size:
        return batch, rows
    return {k: np.concatenate([v, np.zeros((size - rows,) + v.shape[1:], v.dtype)])
            for k, v in batch.items()}, rows


def _any_host_has_data(has: bool) -> bool:
    if jax.process_count() == 1:
        return has
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return bool(np.any(multihost_utils.process_allgather(np.array([has]))))
