"""Host-side read-ahead shared by the input stages: a daemon thread runs a generator of
host work (tf.data, numpy; never a jax computation, which must stay on the loop thread)
up to `depth` items ahead of the consumer.

The producer checks for a stop request only between items and delivers the item in hand,
so `halt()` returns every item that was produced and not consumed, in order: a stage that
tracks its position by items consumed stays exact across a halt.
"""
import queue
import threading
from typing import Any, Callable, Iterator, List, Optional


class Prefetcher:
    """Items of `make_items()` (called when the thread starts) read ahead in a thread.

    A producer ends its stream by returning (the consumer then gets StopIteration with
    `end_message`) or by raising or yielding an exception instance (raised to the consumer).
    """

    def __init__(self, make_items: Callable[[], Iterator[Any]], depth: int = 2,
                 name: str = "prefetch", end_message: str = "the input ran out"):
        self._make_items = make_items
        self._depth = max(1, depth)
        self._name = name
        self._end_message = end_message
        self._thread: Optional[threading.Thread] = None
        self._queue: "queue.Queue" = queue.Queue(self._depth)
        self._stop = threading.Event()

    def get(self) -> Any:
        """The next item (starts the thread when needed); raises what the producer ended
        with."""
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._thread.join()
            self._thread = None
            raise item
        return item

    def halt(self) -> List[Any]:
        """Stops the thread; returns the items it produced that were not consumed."""
        if self._thread is None:
            return []
        self._stop.set()
        produced = []
        while self._thread.is_alive() or not self._queue.empty():
            try:
                produced.append(self._queue.get(timeout=0.05))
            except queue.Empty:
                pass
        self._thread.join()
        self._thread = None
        out = []
        for item in produced:
            if isinstance(item, BaseException):
                break  # an ended or failed stream: raised again on the next start
            out.append(item)
        return out

    def _start(self):
        self._stop.clear()
        self._queue = queue.Queue(self._depth)
        self._thread = threading.Thread(target=self._run, args=(self._queue, self._stop),
                                        name=self._name, daemon=True)
        self._thread.start()

    def _run(self, out: "queue.Queue", stop: threading.Event):
        try:
            items = self._make_items()
            while not stop.is_set():
                try:
                    item = next(items)
                except StopIteration:
                    item = StopIteration(self._end_message)
                out.put(item)  # halt() drains the queue before it joins this thread
                if isinstance(item, BaseException):
                    return
        except BaseException as e:  # pylint: disable=broad-except
            out.put(e)
