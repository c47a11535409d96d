"""How batches reach the train loop: the InputStage interface and its default implementation.

The loop runs, in its own thread and in the same order on every host:

    data_state = stage.get_state()      # only before a save: position of batch t+1
    next_pending = stage.start_next()   # dispatch work for batch t+1 (e.g. a teacher model)
    state = train_step(state, batch_t)  # async
    batch_t1 = next_pending.result()

so a stage that runs jax computations (online SSR teacher generation) dispatches them from
the loop thread in a fixed order, which multi-host collectives need (DESIGN.md). The state
saved with step t+1's checkpoint is `get_state()` taken just before batch t+1 was started:
a restart replays exactly the batches not yet trained on.
"""
import base64
import dataclasses
import importlib
import queue
import threading
from typing import Any, Dict, List, Mapping, Optional, Protocol, Tuple

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
    seed: int = 0
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
    return InputPipeline(cfg.mixture_or_task_name, split=cfg.split,
                         task_feature_lengths=dict(cfg.task_feature_lengths),
                         batch_size=layout.per_host_batch_size, shard_info=layout.shard_info,
                         seed=cfg.seed, shuffle=cfg.shuffle, pack=cfg.pack, repeat=repeat,
                         use_cached=cfg.use_cached)


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

    The thread only runs the (tf.data + numpy) pipeline; global arrays are built in the loop
    thread, so no jax computation ever starts from the thread.

    `get_state()` is exact despite prefetching: it stops the thread, keeps the batches it had
    prefetched (a small backlog, served first afterwards) and returns the pipeline's own
    state after them together with the backlog itself. It costs a tf.data iterator
    checkpoint (~0.1-1 s), so the loop calls it only when it is about to save.
    """

    def __init__(self, pipeline, partitioner: Partitioner, prefetch: int = 2):
        self._pipeline = pipeline
        self._partitioner = partitioner
        self._prefetch = max(1, prefetch)
        self._backlog: List[Dict[str, np.ndarray]] = []
        self._thread: Optional[threading.Thread] = None
        self._queue: "queue.Queue" = queue.Queue(self._prefetch)
        self._stop = threading.Event()

    @classmethod
    def from_config(cls, cfg: DatasetConfig, partitioner: Partitioner,
                    num_microbatches: int = 1, repeat: bool = True) -> "PipelineInputStage":
        layout = partitioner.data_layout(cfg.batch_size, num_microbatches)
        return cls(make_pipeline(cfg, layout, repeat=repeat), partitioner)

    # InputStage ------------------------------------------------------------------------------
    def start_next(self) -> Pending:
        return _FromQueue(self)

    def get_state(self) -> Any:
        self._halt()
        return {"pipeline": self._pipeline.get_state(),
                "backlog": [_encode_batch(b) for b in self._backlog]}

    def set_state(self, state: Any) -> None:
        self._halt()
        self._pipeline.set_state(state["pipeline"])
        self._backlog = [_decode_batch(b) for b in state.get("backlog", [])]

    def close(self) -> None:
        self._halt()

    # internals -------------------------------------------------------------------------------
    def _take(self) -> GlobalBatch:
        if self._backlog:
            host_batch = self._backlog.pop(0)
        else:
            if self._thread is None:
                self._launch()
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._thread = None
                raise item
            host_batch = item
        return self._partitioner.make_global_batch(host_batch)

    def _launch(self):
        self._stop.clear()
        self._queue = queue.Queue(self._prefetch)
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop),
                                        name="input-prefetch", daemon=True)
        self._thread.start()

    def _produce(self, out: "queue.Queue", stop: threading.Event):
        try:
            while not stop.is_set():
                item: Any = {k: np.asarray(v) for k, v in next(self._pipeline).items()}
                out.put(item)  # the consumer drains the queue before it joins this thread
        except StopIteration:
            out.put(StopIteration("the input pipeline ran out of batches"))
        except BaseException as e:  # pylint: disable=broad-except
            out.put(e)

    def _halt(self):
        """Stops the prefetch thread; batches it produced join the backlog (in order)."""
        if self._thread is None:
            return
        self._stop.set()
        produced = []
        while self._thread.is_alive() or not self._queue.empty():
            try:
                produced.append(self._queue.get(timeout=0.05))
            except queue.Empty:
                pass
        self._thread.join()
        self._thread = None
        for item in produced:
            if isinstance(item, BaseException):
                break  # an exhausted/failed pipeline: raised again when the backlog runs out
            self._backlog.append(item)


def _encode_batch(batch: Mapping[str, np.ndarray]) -> Dict[str, Any]:
    return {k: {"dtype": str(v.dtype), "shape": list(v.shape),
                "data": base64.b64encode(np.ascontiguousarray(v).tobytes()).decode("ascii")}
            for k, v in batch.items()}


def _decode_batch(encoded: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    return {k: np.frombuffer(base64.b64decode(v["data"]), v["dtype"]).reshape(v["shape"]).copy()
            for k, v in encoded.items()}


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
