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

Truncation. Tasks built by `ssr_jax.data.factories` with the seq2seq objective carry each
example's untrimmed token counts; the pipeline drops those features, counts the examples whose
inputs (or targets) were longer than the feature length, and after the first
TRUNCATION_SAMPLE examples (or the end of a shorter pass) warns once per task and split:
"task X split Y: N of the first M examples had inputs longer than 512 tokens and were
truncated". Counting here, when reading, is exact and costs one scalar per example; a
mixture keeps only its output features, so its examples are not counted.
"""
import base64
import difflib
import logging
import os
import tempfile
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import seqio
import tensorflow as tf

from ssr_jax.data import packing
from ssr_jax.data.factories import UNTRIMMED_LENGTH_KEYS, UNTRIMMED_SUFFIX
from ssr_jax.errors import UserError

STATE_FORMAT = 1
# Scalar features carried per row in unpacked batches (the online SSR stage needs them).
PASSTHROUGH_SCALARS = ("num_spans", "masked_length")
TRUNCATION_SAMPLE = 1000  # examples counted before the one truncation warning
_TRUNCATION_CHECKED = set()  # (task, split) already counted in this process


def unknown_task_message(name: str, module: Optional[str] = None) -> str:
    """The error for a task or mixture name nothing registered: close matches, and how a
    task of one's own gets registered."""
    names = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    known = (f"did you mean {' or '.join(map(repr, close))}?" if close else
             f"{len(names)} registered, e.g. {names[:8]}.")
    where = (f" MIXTURE_OR_TASK_MODULE={module!r} was imported but registers no such name."
             if module else "")
    return (f"unknown task or mixture {name!r}: {known}{where} A task of your own is "
            "registered by importing its module: pass --gin.MIXTURE_OR_TASK_MODULE="
            "\"'my_tasks'\" with my_tasks.py's directory on PYTHONPATH.")


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
      module: the task module imported before (only named in the unknown-task error).
    """

    def __init__(self, task_or_mixture_name: str, split: str,
                 task_feature_lengths: Mapping[str, int], batch_size: int,
                 shard_info: Tuple[int, int] = (0, 1), seed: int = 0, shuffle: bool = True,
                 pack: bool = True, repeat: bool = True, use_cached: bool = False,
                 module: Optional[str] = None):
        if "inputs" not in task_feature_lengths or "targets" not in task_feature_lengths:
            raise UserError(f"TASK_FEATURE_LENGTHS={dict(task_feature_lengths)} needs "
                            "'inputs' and 'targets'.")
        index, num_shards = (int(x) for x in shard_info)
        if not 0 <= index < num_shards:
            raise ValueError(f"bad shard_info {shard_info}")
        try:
            self.provider = seqio.get_mixture_or_task(task_or_mixture_name)
        except ValueError as e:
            raise UserError(unknown_task_message(task_or_mixture_name, module)) from e
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
        counted = (self.name, self.split) in _TRUNCATION_CHECKED
        self._truncation: Optional[Dict[str, int]] = None if counted else {
            "seen": 0, "inputs": 0, "targets": 0}

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
        keep = ("inputs", "targets") + PASSTHROUGH_SCALARS + UNTRIMMED_LENGTH_KEYS
        missing = [k for k in ("inputs", "targets") if k not in ds.element_spec]
        if missing:
            raise UserError(f"task {self.name!r} gives no {missing} feature; the trainer "
                            "needs tokenized 'inputs' and 'targets'.")
        return ds.map(lambda ex: {k: tf.cast(ex[k], tf.int32) for k in keep if k in ex})

    def _next_example(self) -> Dict[str, np.ndarray]:
        try:
            ex = next(self._iterator)  # StopIteration ends a finite pass
        except StopIteration:
            self._warn_truncation()
            raise
        self._examples += 1
        ex = {k: v.numpy() for k, v in ex.items()}
        untrimmed = {k[:-len(UNTRIMMED_SUFFIX)]: int(ex.pop(k)) for k in UNTRIMMED_LENGTH_KEYS
                     if k in ex}
        if untrimmed and self._truncation is not None:
            self._truncation["seen"] += 1
            for key, length in untrimmed.items():
                self._truncation[key] += int(length > self.lengths[key])
            if self._truncation["seen"] >= TRUNCATION_SAMPLE:
                self._warn_truncation()
        return ex

    def _warn_truncation(self):
        """The one warning per (task, split) and process; nothing when none was cut."""
        counts, self._truncation = self._truncation, None
        if not counts or not counts["seen"] or (self.name, self.split) in _TRUNCATION_CHECKED:
            return
        _TRUNCATION_CHECKED.add((self.name, self.split))
        for key in ("inputs", "targets"):
            if counts[key]:
                logging.warning("task %s split %s: %d of the first %d examples had %s longer "
                                "than %d tokens and were truncated", self.name, self.split,
                                counts[key], counts["seen"], key, self.lengths[key])

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
