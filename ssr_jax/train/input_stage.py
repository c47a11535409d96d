"""How batches reach the train loop: the InputStage interface and its default implementation.

The loop runs, in its own thread and in the same order on every host:

    data_state = stage.get_state()      # only before a save: position of batch t+1
    next_pending = stage.start_next()   # dispatch work for batch t+1 (e.g. a teacher model)
    state = train_step(state, batch_t)  # async
    batch_t1 = next_pending.result()

so a stage that runs jax computations (online SSR teacher generation) dispatches them from
the loop thread in a fixed order, which multi-host collectives need (docs/ARCHITECTURE.md,
"lockstep"). The state
saved with step t+1's checkpoint is `get_state()` taken just before batch t+1 was started:
a restart replays exactly the batches not yet trained on.
"""
import base64
from typing import Any, Dict, List, Mapping, Optional, Protocol

import jax
import numpy as np

from ssr_jax.data.dataset import DatasetConfig, make_pipeline
from ssr_jax.data.prefetch import Prefetcher
from ssr_jax.partitioning import Partitioner

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
        self._backlog: List[Dict[str, np.ndarray]] = []
        self._prefetch = Prefetcher(self._batches, prefetch, "input-prefetch",
                                    "the input pipeline ran out of batches")

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
        host_batch = self._backlog.pop(0) if self._backlog else self._prefetch.get()
        return self._partitioner.make_global_batch(host_batch)

    def _batches(self):
        for batch in self._pipeline:
            yield {k: np.asarray(v) for k, v in batch.items()}

    def _halt(self):
        """Stops the prefetch thread; batches it produced join the backlog (in order)."""
        self._backlog.extend(self._prefetch.halt())


def _encode_batch(batch: Mapping[str, np.ndarray]) -> Dict[str, Any]:
    return {k: {"dtype": str(v.dtype), "shape": list(v.shape),
                "data": base64.b64encode(np.ascontiguousarray(v).tobytes()).decode("ascii")}
            for k, v in batch.items()}


def _decode_batch(encoded: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    return {k: np.frombuffer(base64.b64decode(v["data"]), v["dtype"]).reshape(v["shape"]).copy()
            for k, v in encoded.items()}
