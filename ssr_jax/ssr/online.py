"""The online SSR input stage: masked examples -> teacher (on the mesh) -> rewrite -> pack.

Lockstep without coordination (docs: DESIGN.md, the multi-host hazard). Every step, every
host runs the teacher exactly once, from the training loop's thread, on a FIXED number of
masked examples, so all hosts launch the same sharded computations in the same order and no
host ever has to ask another what to do:

  * The student's rows have length L (inputs) / T (targets); `examples_per_row` = m. Masked
    examples are made for a SLOT of L/m / T/m tokens, and the rewrite caps every student
    input to the slot, so next-fit packing of m x rows examples (each <= one slot) into rows
    always fits: a row is only closed when the next example does not fit, i.e. when it holds
    more than (m-1)/m of its length, i.e. at least m examples. No example is ever left over.
  * Per step: n = m x rows - k masked examples go through the teacher, and k span-corruption
    examples (same slot lengths; the SSR + span-corruption mixture) are packed with them.
  * The data position is the number of examples consumed from each pipeline.

Overlap. `start_next()` (called by the loop for step t+1 before it dispatches student step t)
takes the next host-local masked examples, builds global arrays and dispatches the teacher
asynchronously; `result()` pulls this host's rows of the teacher output, rewrites and packs
them (numpy) and builds the global student batch; by then the devices are busy with step t.

The same `SSRStage` with no teacher reads already rewritten examples (offline SSR,
ssr_jax.ssr.offline), with the same packing, so online and offline give the same batches.

Metrics (`pop_metrics()`, this host's examples since the last call): spans filled validly,
fallbacks, truncations, exact copies of the original span, mean fill vs original length,
the teacher's share of the step time (measured every `probe_every` steps by draining the
devices, timing the teacher alone, and comparing with the mean step time) and the share of
the loop's time spent blocked on the teacher.
"""
import dataclasses
import os
import queue
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from ssr_jax.data import packing
from ssr_jax.data.ssr_preprocessors import RewriteStats, rewrite_batch, teacher_decode_lengths
from ssr_jax.errors import UserError
from ssr_jax.ssr import teacher as teacher_lib
from ssr_jax.ssr.curriculum import SpanCurriculum, take

Example = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class SsrStageConfig:
    """How a student batch is made from SSR examples.

    examples_per_row: m; slot lengths = student lengths / m (1 = one example per row).
    span_corruption_examples: k span-corruption examples per step (global), packed with the
      SSR ones (T5 training continues alongside SSR); 0 = SSR only.
    span_corruption_task: the task giving them (slot lengths, same split and seed).
    snapshot_every: steps between full pipeline snapshots in the data state (a restore
      replays at most this many steps of examples, without the teacher).
    probe_every: steps between teacher timing probes (0 = never); each costs one bubble.
    prefetch: host batches of examples read ahead by a background thread.
    curriculum: optional span-length curriculum for the SSR examples (curriculum.py).
    """

    examples_per_row: int = 2
    span_corruption_examples: int = 0
    span_corruption_task: Optional[str] = None
    snapshot_every: int = 100
    probe_every: int = 50
    prefetch: int = 2
    curriculum: Optional[SpanCurriculum] = None

    def __post_init__(self):
        if self.examples_per_row < 1:
            raise UserError(f"SSR examples_per_row={self.examples_per_row} must be >= 1.")
        if self.span_corruption_examples < 0:
            raise UserError("SSR span_corruption_examples must be >= 0.")
        if self.span_corruption_examples and not self.span_corruption_task:
            raise UserError("SSR span_corruption_examples > 0 needs span_corruption_task "
                            "(e.g. 'ssr_default_span_corruption').")


@dataclasses.dataclass(frozen=True)
class SlotPlan:
    """Sizes of one step, global and on this host."""

    student_lengths: Tuple[int, int]  # (inputs, targets) of a student row
    slot_lengths: Tuple[int, int]  # of one masked / span-corruption example
    rows: int  # student rows per step (global)
    ssr_examples: int  # teacher batch (global)
    sc_examples: int  # span-corruption examples (global)
    host_rows: int
    host_ssr: int
    host_sc: int
    ssr_shard: Tuple[int, int]  # (index, count) of this host's slice of the teacher batch
    sc_shard: Tuple[int, int]

    @property
    def slot_feature_lengths(self) -> Dict[str, int]:
        return {"inputs": self.slot_lengths[0], "targets": self.slot_lengths[1]}


def plan_slots(task_feature_lengths: Mapping[str, int], batch_size: int,
               config: SsrStageConfig, partitioner, num_microbatches: int = 1) -> SlotPlan:
    """Validates the SSR step sizes against the student's lengths, batch and mesh."""
    m = config.examples_per_row
    length_in = int(task_feature_lengths["inputs"])
    length_tgt = int(task_feature_lengths["targets"])
    if length_in % m or length_tgt % m:
        raise UserError(f"TASK_FEATURE_LENGTHS {dict(task_feature_lengths)} are not divisible by "
                        f"SSR examples_per_row={m}: the masked examples' slot lengths are the "
                        f"student lengths / {m}; pick lengths that are multiples of {m}.")
    student = partitioner.data_layout(batch_size, num_microbatches)
    total = m * batch_size
    k = config.span_corruption_examples
    n = total - k
    if n <= 0:
        raise UserError(f"SSR span_corruption_examples={k} leaves no SSR example among the "
                        f"{total} = examples_per_row x BATCH_SIZE examples of a step.")
    shards = partitioner.num_batch_shards
    if n % shards or k % shards:
        raise UserError(f"SSR step of {n} masked + {k} span-corruption examples: both must be "
                        f"multiples of the {shards} batch shards of the mesh; change "
                        "span_corruption_examples.")
    ssr = partitioner.data_layout(n)
    sc = partitioner.data_layout(k) if k else None
    host_sc = sc.per_host_batch_size if sc else 0
    if ssr.per_host_batch_size + host_sc != m * student.per_host_batch_size:
        raise AssertionError("per-host SSR step sizes do not add up")  # same shards for all
    return SlotPlan((length_in, length_tgt), (length_in // m, length_tgt // m), batch_size, n, k,
                    student.per_host_batch_size, ssr.per_host_batch_size, host_sc,
                    ssr.shard_info, sc.shard_info if sc else (0, 1))


# --- host <-> global arrays -------------------------------------------------------------------
def pad_rows(seqs: Sequence[np.ndarray], length: int) -> np.ndarray:
    out = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        s = np.asarray(s, np.int32).reshape(-1)
        if s.shape[0] > length:
            raise ValueError(f"example of {s.shape[0]} tokens does not fit {length}")
        out[i, :s.shape[0]] = s
    return out


def strip_pad(row: np.ndarray) -> np.ndarray:
    """A 0-padded row -> its tokens (pad 0 never occurs inside an example)."""
    row = np.asarray(row, np.int32)
    nz = np.flatnonzero(row)
    return row[:nz[-1] + 1] if nz.size else row[:0]


def local_rows(x: jax.Array) -> np.ndarray:
    """This host's rows of a batch-sharded global array, in order, without a collective."""
    blocks: Dict[int, Any] = {}
    for shard in x.addressable_shards:
        blocks.setdefault(shard.index[0].start or 0, shard.data)
    return np.concatenate([np.asarray(blocks[s]) for s in sorted(blocks)], axis=0)


class TeacherCall:
    """One dispatched teacher batch: host inputs + the (async) global output."""

    def __init__(self, teacher: teacher_lib.Teacher, partitioner, examples: Sequence[Example],
                 slot_lengths: Tuple[int, int], vocabulary, seed: int, fill_ratio: float):
        self.vocabulary = vocabulary
        self.slot_lengths = slot_lengths
        self.inputs = pad_rows([ex["inputs"] for ex in examples], slot_lengths[0])
        self.targets = pad_rows([ex["targets"] for ex in examples], slot_lengths[1])
        vsize, extra = vocabulary.vocab_size, vocabulary.extra_ids
        num_spans, masked = teacher_lib.span_counts(self.inputs, self.targets, vsize, extra,
                                                    vocabulary.eos_id)
        lengths = teacher_decode_lengths(np.count_nonzero(self.inputs, axis=1), num_spans,
                                         masked, slot_lengths[0], fill_ratio)
        host = {"inputs": self.inputs,
                "keys": teacher_lib.example_keys(self.inputs, seed),
                "stops": teacher_lib.stop_tokens(num_spans, vsize),
                "lens": np.clip(lengths, 1, teacher.decode.max_decode_length).astype(np.int32)}
        g = partitioner.make_global_batch(host)
        self.output = teacher.generate(g["inputs"], g["keys"], g["stops"], g["lens"])

    def rewrite(self) -> Tuple[List[Dict[str, np.ndarray]], RewriteStats, float]:
        """(student examples, stats, seconds blocked on the teacher)."""
        t0 = time.perf_counter()
        outputs = local_rows(self.output)
        waited = time.perf_counter() - t0
        v = self.vocabulary
        rows, stats = rewrite_batch(self.inputs, outputs, v.vocab_size, v.extra_ids, v.eos_id,
                                    targets=self.targets, max_length=self.slot_lengths[0])
        examples = [{"inputs": r, "targets": strip_pad(t)} for r, t in zip(rows, self.targets)]
        return examples, stats, waited


def drain_devices():
    """Blocks until every live array is computed, i.e. all dispatched work has finished."""
    jax.block_until_ready(jax.live_arrays())


# --- the stage --------------------------------------------------------------------------------
class _Pending:
    def __init__(self, stage: "SSRStage", call: Optional[TeacherCall], ssr: List[Example],
                 sc: List[Example]):
        self._stage, self._call, self._ssr, self._sc = stage, call, ssr, sc
        self._batch = None

    def result(self):
        if self._batch is None:
            stage = self._stage
            self._batch = stage._finish(self._call, self._ssr, self._sc)  # pylint: disable=W0212
            self._call = self._ssr = self._sc = None
        return self._batch


class _Metrics:
    def __init__(self):
        self.stats = RewriteStats()
        self.steps = 0
        self.waited = 0.0
        self.host_seconds = 0.0
        self.first_result: Optional[float] = None
        self.last_result: Optional[float] = None
        self.teacher_seconds: Optional[float] = None


class SSRStage:
    """InputStage of SSR student batches (see the module docstring).

    ssr_pipeline yields masked examples (online: teacher given) or rewritten examples
    (offline: teacher None); sc_pipeline yields span-corruption examples (or None).
    Pipelines are `ssr_jax.data.pipeline.InputPipeline`s read with `next_examples`.
    """

    def __init__(self, plan: SlotPlan, partitioner, vocabulary, ssr_pipeline, sc_pipeline=None,
                 teacher: Optional[teacher_lib.Teacher] = None, seed: int = 0,
                 fill_ratio: float = 2.0, config: SsrStageConfig = SsrStageConfig(),
                 summary_path: Optional[str] = None):
        self.plan, self.partitioner, self.vocabulary = plan, partitioner, vocabulary
        self.teacher, self.seed, self.fill_ratio, self.config = teacher, seed, fill_ratio, config
        self._pipelines = {"ssr": ssr_pipeline}
        if sc_pipeline is not None:
            self._pipelines["span_corruption"] = sc_pipeline
        self._counts = {"ssr": plan.host_ssr, "span_corruption": plan.host_sc}
        self._state = self._snapshot_state(0)
        self._queue: "queue.Queue" = queue.Queue(max(1, config.prefetch))
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._started = 0
        self._metrics = _Metrics()
        self._total = _Metrics()
        self.summary_path = summary_path

    # InputStage ------------------------------------------------------------------------------
    def start_next(self) -> _Pending:
        ssr, sc, self._state = self._take()
        self._started += 1
        call = None
        if self.teacher is not None:
            probe = (self.config.probe_every > 0
                     and self._started % self.config.probe_every == 2 % self.config.probe_every)
            if probe:
                drain_devices()
                t0 = time.perf_counter()
            call = TeacherCall(self.teacher, self.partitioner, ssr, self.plan.slot_lengths,
                               self.vocabulary, self.seed, self.fill_ratio)
            if probe:
                jax.block_until_ready(call.output)
                self._metrics.teacher_seconds = time.perf_counter() - t0
                self._total.teacher_seconds = self._metrics.teacher_seconds
        return _Pending(self, call, ssr, sc)

    def get_state(self) -> Any:
        return self._state

    def set_state(self, state: Any) -> None:
        self._halt()
        for name, pipeline in self._pipelines.items():
            entry = state[name]  # a snapshot + the examples read after it
            pipeline.set_state(entry["snapshot"])
            if entry["skip"]:
                got = len(pipeline.next_examples(int(entry["skip"])))
                if got != int(entry["skip"]):
                    raise UserError(f"SSR data state: the {name} pipeline ended while "
                                    "replaying to the saved position.")
        self._state = state

    def close(self) -> None:
        """Stops the prefetch thread; writes `summary()` to summary_path (process 0)."""
        self._halt()
        summary = self.summary()
        if summary and jax.process_index() == 0:
            if self.teacher is not None and "ssr/spans" in summary:
                print(f"online SSR over {int(summary['ssr/steps'])} steps: "
                      f"{summary['ssr/valid_fill_rate']:.1%} of spans filled validly, "
                      f"{summary['ssr/exact_copy_rate']:.1%} exact copies, mean fill "
                      f"{summary['ssr/mean_fill_length']:.2f} vs original "
                      f"{summary['ssr/mean_original_length']:.2f} tokens"
                      + (f", teacher {summary['ssr/teacher_time_share']:.0%} of the step time"
                         if "ssr/teacher_time_share" in summary else ""), flush=True)
            if self.summary_path:
                import json  # pylint: disable=import-outside-toplevel
                os.makedirs(os.path.dirname(os.path.abspath(self.summary_path)), exist_ok=True)
                with open(self.summary_path, "w") as f:
                    json.dump(summary, f, indent=2)

    def pop_metrics(self) -> Dict[str, float]:
        """Scalars over the steps since the last call (this host's examples)."""
        window, self._metrics = self._metrics, _Metrics()
        return self._scalars(window)

    def summary(self) -> Dict[str, float]:
        """The same scalars over every step so far."""
        return self._scalars(self._total)

    def _scalars(self, m: "_Metrics") -> Dict[str, float]:
        if not m.steps:
            return {}
        out: Dict[str, float] = {"ssr/steps": float(m.steps)}
        if self.teacher is not None:
            out.update({k: float(v) for k, v in m.stats.summary().items()})
            mean_orig = out["ssr/mean_original_length"]
            out["ssr/fill_to_original_length"] = (out["ssr/mean_fill_length"] / mean_orig
                                                  if mean_orig else 0.0)
        out["ssr/examples_per_step"] = float(self.plan.ssr_examples)
        out["ssr/span_corruption_examples_per_step"] = float(self.plan.sc_examples)
        out["ssr/host_seconds_per_step"] = m.host_seconds / m.steps
        if m.first_result is not None and m.last_result is not None and m.steps > 1:
            step_seconds = (m.last_result - m.first_result) / (m.steps - 1)
            out["ssr/step_seconds"] = step_seconds
            out["ssr/teacher_wait_share"] = min(1.0, m.waited / m.steps / step_seconds)
            if m.teacher_seconds is not None:
                out["ssr/teacher_seconds"] = m.teacher_seconds
                out["ssr/teacher_time_share"] = min(1.0, m.teacher_seconds / step_seconds)
        return out

    # internals -------------------------------------------------------------------------------
    def _finish(self, call: Optional[TeacherCall], ssr: List[Example], sc: List[Example]):
        waited = 0.0
        t0 = time.perf_counter()
        if call is not None:
            examples, stats, waited = call.rewrite()
        else:
            examples = [{"inputs": ex["inputs"], "targets": ex["targets"]} for ex in ssr]
        examples += [{"inputs": ex["inputs"], "targets": ex["targets"]} for ex in sc]
        batch = self.pack(examples)
        now = time.perf_counter()
        for m in (self._metrics, self._total):
            if call is not None:
                m.stats = m.stats.merge(stats)
            m.steps += 1
            m.waited += waited
            m.host_seconds += now - t0 - waited
            m.first_result = m.first_result if m.first_result is not None else now
            m.last_result = now
        return self.partitioner.make_global_batch(batch)

    def pack(self, examples: Sequence[Example]) -> Dict[str, np.ndarray]:
        """This host's student batch from one step's examples (never leaves any over)."""
        length_in, length_tgt = self.plan.student_lengths
        batch, left = packing.pack_examples(examples, self.plan.host_rows, length_in, length_tgt,
                                            pack=True)
        if left:
            raise RuntimeError(f"{len(left)} SSR examples did not fit the student batch; slot "
                               f"lengths {self.plan.slot_lengths} x m must fit a row.")
        return batch

    def _snapshot_state(self, step: int) -> Dict[str, Any]:
        state: Dict[str, Any] = {name: {"snapshot": p.get_state(), "skip": 0}
                                 for name, p in self._pipelines.items()}
        state["step"] = step
        return state

    def _take(self):
        if self._thread is None:
            self._launch()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._thread = None
            raise item
        return item

    def _launch(self):
        self._stop.clear()
        self._queue = queue.Queue(max(1, self.config.prefetch))
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop),
                                        name="ssr-prefetch", daemon=True)
        self._thread.start()

    def _produce(self, out: "queue.Queue", stop: threading.Event):
        """Reads one step of examples per item and the data state after it: a full snapshot
        every `snapshot_every` items plus the examples read since."""
        try:
            state = self._state
            count = 0
            curriculum = self.config.curriculum if self.teacher is not None else None
            while not stop.is_set():
                step = int(state.get("step", 0))
                if count % max(1, self.config.snapshot_every) == 0:
                    state = self._snapshot_state(step)
                taken, read = {}, {}
                for name, pipeline in self._pipelines.items():
                    need = self._counts[name]
                    taken[name], read[name] = take(pipeline, need, step, curriculum
                                                   if name == "ssr" else None, self.vocabulary)
                    if len(taken[name]) < need:
                        raise StopIteration(f"the {name} input pipeline ran out of examples")
                state = {name: {"snapshot": state[name]["snapshot"],
                                "skip": state[name]["skip"] + read[name]}
                         for name in self._pipelines}
                state["step"] = step + 1
                count += 1
                item = (taken["ssr"], taken.get("span_corruption", []), state)
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # pylint: disable=broad-except
            out.put(e if not isinstance(e, StopIteration) else StopIteration(*e.args))

    def _halt(self):
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread = None


# --- construction -----------------------------------------------------------------------------
def task_vocabulary(task_name: str, module: Optional[str] = "tasks"):
    """The 'inputs' vocabulary of a registered task (importing its module first)."""
    import seqio  # pylint: disable=import-outside-toplevel
    from ssr_jax.train.input_stage import import_task_module  # pylint: disable=C0415
    import_task_module(module)
    try:
        task = seqio.get_mixture_or_task(task_name)
    except ValueError as e:
        raise UserError(f"unknown task {task_name!r} (is its module imported?)") from e
    return task.output_features["inputs"].vocabulary


def make_pipelines(cfg, plan: SlotPlan, config: SsrStageConfig, task_name: str,
                   shuffle: bool, repeat: bool = True):
    """(ssr pipeline, span-corruption pipeline or None) for a plan: slot lengths, unpacked."""
    from ssr_jax.data.pipeline import InputPipeline  # pylint: disable=import-outside-toplevel
    from ssr_jax.train.input_stage import import_task_module  # pylint: disable=C0415
    import_task_module(cfg.module)
    common = dict(split=cfg.split, task_feature_lengths=plan.slot_feature_lengths,
                  seed=cfg.seed, pack=False, repeat=repeat)
    if cfg.use_cached:
        common["use_cached"] = True
    ssr = InputPipeline(task_name, batch_size=plan.host_ssr, shard_info=plan.ssr_shard,
                        shuffle=shuffle, **common)
    sc = None
    if plan.sc_examples:
        sc = InputPipeline(config.span_corruption_task, batch_size=plan.host_sc,
                           shard_info=plan.sc_shard, shuffle=cfg.shuffle, **common)
    return ssr, sc


def online_stage(cfg, partitioner, num_microbatches: int, teacher_config: teacher_lib.TeacherConfig,
                 config: SsrStageConfig = SsrStageConfig(),
                 student_vocab_size: Optional[int] = None,
                 summary_path: Optional[str] = None) -> SSRStage:
    """The online SSR stage for a student DatasetConfig (its task: an SSR-masked task; its
    lengths and batch size: the student's). Checks the teacher before loading anything."""
    vocabulary = task_vocabulary(cfg.mixture_or_task_name, cfg.module)
    teacher_lib.check_teacher(teacher_config, vocabulary, student_vocab_size)
    plan = plan_slots(cfg.task_feature_lengths, cfg.batch_size, config, partitioner,
                      num_microbatches)
    max_len = teacher_lib.static_decode_length(*plan.slot_lengths, teacher_config.fill_ratio)
    teacher = teacher_lib.Teacher.load(teacher_config, partitioner, vocabulary, max_len,
                                       student_vocab_size)
    ssr, sc = make_pipelines(cfg, plan, config, cfg.mixture_or_task_name, cfg.shuffle)
    print(f"online SSR: teacher {teacher_config.checkpoint_path} ({teacher.config.d_model} "
          f"d_model, {teacher.config.num_encoder_layers}+{teacher.config.num_decoder_layers} "
          f"layers, {teacher.config.dtype}); per step {plan.ssr_examples} masked + "
          f"{plan.sc_examples} span-corruption examples of slot {plan.slot_lengths} -> "
          f"{plan.rows} rows of {plan.student_lengths}", flush=True)
    return SSRStage(plan, partitioner, vocabulary, ssr, sc, teacher, teacher_config.seed,
                    teacher_config.fill_ratio, config, summary_path)
