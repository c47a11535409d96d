"""The per-host input pipeline: a SeqIO task or mixture -> packed numpy batches.

`InputPipeline` builds `seqio.get_mixture_or_task(name).get_dataset(...)` for this host's
shard (shard_info = (process_index, process_count)), reads its examples one by one as numpy
and packs them with the one packer (`ssr_jax.data.packing`) into the trainer's batch dict.
Everything random in the dataset (file order, preprocessing seeds, the shuffle buffer)
comes from `seed`, so the stream of batches is a function of (task, split, lengths, seed,
shard, pack).

Checkpointing the position. `get_state()` returns a JSON-able dict:
  'examples': examples read so far, 'batches': batches returned, 'packer': the packer's
  pending example, the pipeline's settings (checked on restore), and, unless
  get_state(include_iterator=False), 'tf_iterator': the tf.data iterator's own checkpoint
  (`tf.train.Checkpoint`, base64; holds the shuffle and prefetch buffers, ~1-10 MB).
`set_state(state)` on a fresh pipeline with the same settings restores the iterator from
'tf_iterator' (O(1)); without it, it rebuilds the dataset and skips 'examples' elements
(deterministic, but it re-runs the preprocessing of everything skipped: fine for small
runs, slow for long ones). Either way the next batches are exactly those that would have
come next.
"""
import base64
import os
import tempfile
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
import seqio
import tensorflow as tf

from ssr_jax.data import packing
from ssr_jax.errors import UserError

STATE_FORMAT = 1
# Scalar features carried per row in unpacked batches (the online SSR stage needs them).
PASSTHROUGH_SCALARS = ("num_spans", "masked_length")


def hide_accelerators_from_tf():
    """TensorFlow only feeds data: keep it off GPUs/TPUs so it never takes their memory."""
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):
        pass  # already initialised, or no such device type


hide_accelerators_from_tf()


class InputPipeline:
    """Batches for one host. Iterate it (or call `next()`); see the module docstring.

    Args:
      task_or_mixture_name: a registered SeqIO task or mixture.
      split: e.g. 'train', 'validation'.
      task_feature_lengths: {'inputs': L_in, 'targets': L_tgt}.
      batch_size: rows per batch on this host.
      shard_info: (index, num_shards) of this host, e.g. (jax.process_index(),
        jax.process_count()).
      seed: everything random derives from it.
      shuffle, repeat: as seqio (repeat=False gives one pass, the last batch partial).
      pack: pack several examples per row (True for training).
      use_cached: read seqio's offline cache of the task.
    """

    def __init__(self, task_or_mixture_name: str, split: str,
                 task_feature_lengths: Mapping[str, int], batch_size: int,
                 shard_info: Tuple[int, int] = (0, 1), seed: int = 0, shuffle: bool = True,
                 pack: bool = True, repeat: bool = True, use_cached: bool = False):
        if "inputs" not in task_feature_lengths or "targets" not in task_feature_lengths:
            raise UserError(f"TASK_FEATURE_LENGTHS={dict(task_feature_lengths)} needs "
                            "'inputs' and 'targets'.")
        index, num_shards = (int(x) for x in shard_info)
        if not 0 <= index < num_shards:
            raise ValueError(f"bad shard_info {shard_info}")
        try:
            self.provider = seqio.get_mixture_or_task(task_or_mixture_name)
        except ValueError as e:
            raise UserError(f"unknown task or mixture {task_or_mixture_name!r}; registered: "
                            f"{sorted(seqio.TaskRegistry.names())[:20]}... (is its module "
                            "imported?)") from e
        if split not in self.provider.splits:
            raise UserError(f"task {task_or_mixture_name!r} has no split {split!r}; it has "
                            f"{list(self.provider.splits)}.")
        self.name, self.split = task_or_mixture_name, split
        self.lengths = {"inputs": int(task_feature_lengths["inputs"]),
                        "targets": int(task_feature_lengths["targets"])}
        self.batch_size, self.shard, self.seed = int(batch_size), (index, num_shards), int(seed)
        self.shuffle, self.pack, self.repeat, self.use_cached = shuffle, pack, repeat, use_cached
        self._dataset = self._build()
        spec = self._dataset.element_spec
        self.passthrough = tuple(k for k in PASSTHROUGH_SCALARS if k in spec) if not pack else ()
        self._packer = packing.StreamingPacker(self.batch_size, self.lengths["inputs"],
                                               self.lengths["targets"], pack,
                                               self.passthrough)
        self._iterator = iter(self._dataset)
        self._examples = 0
        self._batches = 0

    # ---- dataset ---------------------------------------------------------------------

    def _build(self) -> tf.data.Dataset:
        kwargs = dict(sequence_length=self.lengths, split=self.split,
                      use_cached=self.use_cached, shuffle=self.shuffle, seed=self.seed,
                      shard_info=seqio.ShardInfo(*self.shard),
                      num_epochs=None if self.repeat else 1, trim_output_features=True,
                      # An in-memory cache of the source would be saved in every iterator
                      # checkpoint (MBs); reading the TFRecords again is cheap.
                      try_in_mem_cache=False)
        if self.shard[1] == 1:
            kwargs["shard_info"] = None
        ds = self.provider.get_dataset(**kwargs)
        keep = ("inputs", "targets") + PASSTHROUGH_SCALARS
        missing = [k for k in ("inputs", "targets") if k not in ds.element_spec]
        if missing:
            raise UserError(f"task {self.name!r} gives no {missing} feature; the trainer "
                            "needs tokenized 'inputs' and 'targets'.")
        return ds.map(lambda ex: {k: tf.cast(ex[k], tf.int32) for k in keep if k in ex})

    def _next_example(self) -> Dict[str, np.ndarray]:
        ex = next(self._iterator)  # StopIteration ends a finite pass
        self._examples += 1
        return {k: v.numpy() for k, v in ex.items()}

    def _example_stream(self):
        while True:
            try:
                yield self._next_example()
            except StopIteration:
                return

    # ---- batches ---------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        batch = self._packer.next_batch(self._example_stream())
        self._batches += 1
        return batch

    next = __next__

    def next_examples(self, n: int) -> List[Dict[str, np.ndarray]]:
        """Up to n unpacked examples ({'inputs', 'targets', ...} int32), for stages that
        transform examples before packing (e.g. the online SSR rewrite)."""
        out = []
        if self._packer.pending is not None and n > 0:
            out.append(dict(self._packer.pending))
            self._packer.pending = None
        while len(out) < n:
            try:
                out.append(self._next_example())
            except StopIteration:
                break
        return out

    # ---- state -----------------------------------------------------------------------

    def _settings(self) -> Dict:
        return {"task": self.name, "split": self.split, "lengths": self.lengths,
                "batch_size": self.batch_size, "shard": list(self.shard), "seed": self.seed,
                "shuffle": self.shuffle, "pack": self.pack, "repeat": self.repeat,
                "use_cached": self.use_cached}

    def get_state(self, include_iterator: bool = True) -> Dict:
        state = {"format": STATE_FORMAT, "settings": self._settings(),
                 "examples": self._examples, "batches": self._batches,
                 "packer": self._packer.get_state()}
        if include_iterator:
            state["tf_iterator"] = _save_iterator(self._iterator)
        return state

    def set_state(self, state: Mapping):
        if state.get("format") != STATE_FORMAT:
            raise UserError(f"input pipeline state has format {state.get('format')!r}; "
                            f"this version reads {STATE_FORMAT}.")
        if state["settings"] != self._settings():
            diff = {k: (v, state["settings"].get(k)) for k, v in self._settings().items()
                    if state["settings"].get(k) != v}
            raise UserError("input pipeline state was saved with other settings "
                            f"(now, saved): {diff}; restore with the same task, lengths, "
                            "batch size, shard, seed and packing.")
        # A fresh dataset: a tf.data dataset's random ops (shuffle) draw new seeds for each
        # iterator made from the same object, so only its first iterator matches the saved one.
        self._dataset = self._build()
        if state.get("tf_iterator"):
            self._iterator = iter(self._dataset)
            _restore_iterator(self._iterator, state["tf_iterator"])
        else:
            self._iterator = iter(self._dataset.skip(int(state["examples"])))
        self._examples, self._batches = int(state["examples"]), int(state["batches"])
        self._packer.set_state(state["packer"])


def _save_iterator(iterator) -> Dict[str, str]:
    """tf.data iterator checkpoint as {file suffix: base64 bytes}."""
    with tempfile.TemporaryDirectory() as d:
        prefix = tf.train.Checkpoint(iterator=iterator).write(os.path.join(d, "it"))
        out = {}
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                out[name[len("it"):]] = base64.b64encode(f.read()).decode("ascii")
        assert os.path.basename(prefix) == "it"
        return out


def _restore_iterator(iterator, files: Mapping[str, str]):
    with tempfile.TemporaryDirectory() as d:
        for suffix, data in files.items():
            with open(os.path.join(d, "it" + suffix), "wb") as f:
                f.write(base64.b64decode(data))
        tf.train.Checkpoint(iterator=iterator).read(os.path.join(d, "it")).assert_consumed()


def pack_examples(examples: Sequence[Mapping[str, np.ndarray]], batch_size: int,
                  task_feature_lengths: Mapping[str, int], pack: bool = True
                  ) -> Tuple[Dict[str, np.ndarray], List[Mapping[str, np.ndarray]]]:
    """Unpacked {'inputs', 'targets'} examples -> (trainer batch, examples left over).

    The same packer as InputPipeline's, for the online SSR stage after its rewrite.
    """
    return packing.pack_examples(examples, batch_size, task_feature_lengths["inputs"],
                                 task_feature_lengths["targets"], pack)
