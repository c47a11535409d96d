"""The SSR input stage: one step's examples -> rewrite -> pack -> the student's global batch.

One `SSRStage` serves online SSR, offline SSR and generate-spans; what differs is where a
step's SSR examples come from (its *source*):
  * `TeacherRewrite` (online, and generate-spans): masked examples go through the teacher on
    the student's mesh and are rewritten (numpy);
  * `StoredRewrites` (offline training): examples rewritten earlier by generate-spans.
Training packs each step's examples (plus any span-corruption examples) into a batch;
generate-spans takes the rewritten examples instead (`start_step`), so what it writes is
exactly what online training would have trained on.

Lockstep without coordination (docs/ARCHITECTURE.md). Every step, every host runs the
teacher exactly once, from the training loop's thread, on a FIXED number of masked examples,
so all hosts launch the same sharded computations in the same order and no host ever has to
ask another what to do:

  * The student's rows have length L (inputs) / T (targets); `examples_per_row` = m. Masked
    examples are made for a SLOT of L/m / T/m tokens, and the rewrite caps every student
    input to the slot, so next-fit packing of m x rows examples (each <= one slot) into rows
    always fits: a row is only closed when the next example does not fit, i.e. when it holds
    more than (m-1)/m of its length, i.e. at least m examples. No example is ever left over.
  * Per step: n = m x rows - k masked examples go through the teacher, and k span-corruption
    examples (same slot lengths; the SSR + span-corruption mixture) are packed with them.
  * The data position is the number of examples consumed from each pipeline.

Overlap. `start_next()` (called by the loop for step t+1 before it dispatches student step t)
takes the next host-local examples, builds global arrays and dispatches the teacher
asynchronously; `result()` pulls this host's rows of the teacher output, rewrites and packs
them (numpy) and builds the global student batch; by then the devices are busy with step t.
Sampling keys come from each example's tokens and the seed, so the fills do not depend on
the batch, mesh or host count.

Malformed teacher outputs (`SsrStageConfig.malformed`): by default a span without a
well-formed non-empty fill reads `<x_k> <x_k+1>`; 'drop_example' (the paper's policy) puts
the span-corruption example of the same segment in that example's slot instead, so the step
keeps its fixed sizes (no extra teacher call, no example read ahead).

Metrics (`pop_metrics()`, this host's examples since the last call; ssr/stats.py): the
shares of spans with a non-empty fill, an empty fill, a fallback and a fill dropped for
length (they add up to 1), the examples with every span filled and those dropped, exact
copies of the original span, mean fill vs original length,
the teacher's share of the step time (measured every `probe_every` steps by draining the
devices, timing the teacher alone, and comparing with the mean step time) and the share of
the loop's time spent blocked on the teacher.
"""
import dataclasses
import json
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from ssr_jax import distributed
from ssr_jax.data import packing
from ssr_jax.data.dataset import get_task, import_task_module, task_vocabulary
from ssr_jax.data.prefetch import Prefetcher
from ssr_jax.data.ssr_preprocessors import task_mask_config, teacher_decode_lengths
from ssr_jax.data.ssr_rewrite import MALFORMED_POLICIES, RewriteStats, rewrite_examples
from ssr_jax.errors import UserError
from ssr_jax.ssr import stats as stats_lib
from ssr_jax.ssr import teacher as teacher_lib
from ssr_jax.ssr.curriculum import CurriculumMask, SpanCurriculum

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
    curriculum: optional span-length curriculum: the first steps' examples are masked again
      with shorter spans at the same masked fraction (curriculum.py).
    malformed: an example with a span that has no non-empty well-formed teacher fill:
      'empty_fill' (default) keeps it, that span rewritten `<x_k> <x_k+1>`; 'drop_example'
      (the paper's data_gen.py) makes its slot the span-corruption example of the same
      segment (ssr_rewrite.rewrite_examples), so batches stay full and lockstep holds.
      The default keeps every example because dropping scales badly with the spans per
      example: at 512 tokens (~28 spans) a teacher with 97% good fills per span completes
      only 0.97^28 = 43% of its examples (the paper masked one line of text at a time).
      Either way the stats count the kinds of spans and the dropped examples.
    """

    examples_per_row: int = 2
    span_corruption_examples: int = 0
    span_corruption_task: Optional[str] = None
    snapshot_every: int = 100
    probe_every: int = 50
    prefetch: int = 2
    curriculum: Optional[SpanCurriculum] = None
    malformed: str = "empty_fill"

    def __post_init__(self):
        if self.malformed not in MALFORMED_POLICIES:
            raise UserError(f"SsrStageConfig.malformed={self.malformed!r}: use one of "
                            f"{MALFORMED_POLICIES}.")
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


# --- example sources --------------------------------------------------------------------------
class TeacherCall:
    """One dispatched teacher batch: host inputs + the (async) global output."""

    def __init__(self, teacher, partitioner, examples: Sequence[Example],
                 slot_lengths: Tuple[int, int], vocabulary, seed: int, fill_ratio: float,
                 malformed: str = "empty_fill"):
        self.vocabulary, self.partitioner = vocabulary, partitioner
        self.slot_lengths, self.malformed = slot_lengths, malformed
        self.inputs = pad_rows([ex["inputs"] for ex in examples], slot_lengths[0])
        self.targets = pad_rows([ex["targets"] for ex in examples], slot_lengths[1])
        # Carried by the SSR mask (0 for the padding examples of a last, short step).
        num_spans = np.array([int(ex.get("num_spans", 0)) for ex in examples], np.int32)
        masked = np.array([int(ex.get("masked_length", 0)) for ex in examples], np.int32)
        lengths = teacher_decode_lengths(np.count_nonzero(self.inputs, axis=1), num_spans,
                                         masked, slot_lengths[0], fill_ratio)
        host = {"inputs": self.inputs,
                "keys": teacher_lib.example_keys(self.inputs, seed),
                "stops": teacher_lib.stop_tokens(num_spans, vocabulary.vocab_size),
                "lens": np.clip(lengths, 1, teacher.decode.max_decode_length).astype(np.int32)}
        g = partitioner.make_global_batch(host)
        self.output = teacher.generate(g["inputs"], g["keys"], g["stops"], g["lens"])

    def result(self) -> Tuple[List[Dict[str, np.ndarray]], RewriteStats, float]:
        """(student examples, stats, seconds blocked on the teacher)."""
        t0 = time.perf_counter()
        outputs = self.partitioner.host_rows(self.output)
        waited = time.perf_counter() - t0
        v = self.vocabulary
        examples, stats = rewrite_examples(self.inputs, outputs, self.targets, v.vocab_size,
                                           v.extra_ids, v.eos_id, self.slot_lengths[0],
                                           self.malformed)
        return examples, stats, waited


class TeacherRewrite:
    """Source of online SSR: the teacher fills each step's masked examples."""

    rewrites = True

    def __init__(self, teacher, partitioner, slot_lengths: Tuple[int, int], vocabulary,
                 seed: int, fill_ratio: float, malformed: str = "empty_fill"):
        self.teacher, self.partitioner, self.slot_lengths = teacher, partitioner, slot_lengths
        self.vocabulary, self.seed, self.fill_ratio = vocabulary, seed, fill_ratio
        self.malformed = malformed

    def start(self, examples: Sequence[Example]) -> TeacherCall:
        return TeacherCall(self.teacher, self.partitioner, examples, self.slot_lengths,
                           self.vocabulary, self.seed, self.fill_ratio, self.malformed)


class _Stored:
    def __init__(self, examples: Sequence[Example]):
        self._examples = [{"inputs": ex["inputs"], "targets": ex["targets"]}
                          for ex in examples]

    def result(self):
        return self._examples, None, 0.0


class StoredRewrites:
    """Source of offline SSR: examples already rewritten by generate-spans."""

    rewrites = False

    def start(self, examples: Sequence[Example]) -> _Stored:
        return _Stored(examples)


def drain_devices():
    """Blocks until every live array is computed, i.e. all dispatched work has finished."""
    jax.block_until_ready(jax.live_arrays())


# --- the stage --------------------------------------------------------------------------------
@dataclasses.dataclass
class Step:
    """One step's examples in flight: `real` of this host's SSR examples are real (fewer
    only in a last, short step of a finite pass, padded to the fixed teacher batch);
    `ended`: some host ran out of examples in this step."""

    call: Any
    span_corruption: List[Example]
    real: int
    ended: bool = False


class SSRStage:
    """InputStage of SSR student batches (see the module docstring).

    pipelines: {'ssr': InputPipeline[, 'span_corruption': InputPipeline]} read with
    `next_examples`; source: TeacherRewrite or StoredRewrites. allow_partial: a pipeline
    that ends gives a last, short step (generate-spans' one pass) instead of an error.
    label: names the statistics line close() prints.
    """

    def __init__(self, plan: SlotPlan, partitioner, pipelines: Mapping[str, Any], source,
                 config: SsrStageConfig = SsrStageConfig(),
                 summary_path: Optional[str] = None, allow_partial: bool = False,
                 label: str = "online SSR"):
        self.plan, self.partitioner, self.source, self.config = plan, partitioner, source, config
        self._pipelines = dict(pipelines)
        self._counts = {"ssr": plan.host_ssr, "span_corruption": plan.host_sc}
        self._curriculum = None  # offline training reads examples masked at generation
        if config.curriculum is not None and config.curriculum.steps and source.rewrites:
            v = source.vocabulary
            self._curriculum = CurriculumMask(
                    config.curriculum, task_mask_config(get_task(self._pipelines["ssr"].name)),
                    plan.slot_lengths, v.vocab_size, v.extra_ids, v.eos_id, source.seed)
        self._allow_partial, self.label = allow_partial, label
        self._state = self._snapshot_state(0)
        self._prefetch = Prefetcher(lambda: self._items(self._state), config.prefetch,
                                    "ssr-prefetch")
        self._started = 0
        self._metrics = stats_lib.StageMetrics()
        self._total = stats_lib.StageMetrics()
        self.summary_path = summary_path

    # InputStage ------------------------------------------------------------------------------
    def start_next(self) -> "_Batch":
        return _Batch(self, self.start_step())

    def get_state(self) -> Any:
        return self._state

    def set_state(self, state: Any) -> None:
        self._prefetch.halt()
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
        self._prefetch.halt()
        summary = self.summary()
        if summary and jax.process_index() == 0:
            if self.source.rewrites and "ssr/spans" in summary:
                print(f"{self.label} over {int(summary['ssr/steps'])} steps: "
                      f"{stats_lib.describe(summary)}", flush=True)
            if self.summary_path:
                os.makedirs(os.path.dirname(os.path.abspath(self.summary_path)), exist_ok=True)
                with open(self.summary_path, "w") as f:
                    json.dump(summary, f, indent=2)

    def pop_metrics(self) -> Dict[str, float]:
        """Scalars over the steps since the last call (this host's examples)."""
        window, self._metrics = self._metrics, stats_lib.StageMetrics()
        return self._scalars(window)

    def pop_stats(self) -> RewriteStats:
        """The rewrite counts since the last pop (this host's examples)."""
        window, self._metrics = self._metrics, stats_lib.StageMetrics()
        return window.stats

    def summary(self) -> Dict[str, float]:
        """The same scalars over every step so far."""
        return self._scalars(self._total)

    # steps -----------------------------------------------------------------------------------
    def start_step(self) -> Step:
        """Takes the next step's examples and dispatches their source (the teacher) from
        the calling (loop) thread. `finish(step)` gives the examples."""
        ssr, sc, self._state = self._prefetch.get()
        real = len(ssr)
        ended = False
        if self._allow_partial:
            ended = distributed.any_host(real < self.plan.host_ssr)
            ssr = list(ssr) + [_EMPTY] * (self.plan.host_ssr - real)
        self._started += 1
        every = self.config.probe_every
        probe = self.source.rewrites and every > 0 and self._started % every == 2 % every
        if probe:
            drain_devices()
            t0 = time.perf_counter()
        call = self.source.start(ssr)
        if probe:
            jax.block_until_ready(call.output)
            self._metrics.teacher_seconds = self._total.teacher_seconds = (
                    time.perf_counter() - t0)
        return Step(call, sc, real, ended)

    def finish(self, step: Step) -> List[Dict[str, np.ndarray]]:
        """A started step's real SSR examples (rewritten) followed by its span-corruption
        examples; records the step's metrics."""
        t0 = time.perf_counter()
        examples, stats, waited = step.call.result()
        examples = list(examples[:step.real])
        examples += [{"inputs": ex["inputs"], "targets": ex["targets"]}
                     for ex in step.span_corruption]
        host_seconds = time.perf_counter() - t0 - waited
        for m in (self._metrics, self._total):
            m.add(stats, waited, host_seconds)
        return examples

    def pack(self, examples: Sequence[Example]) -> Dict[str, np.ndarray]:
        """This host's student batch from one step's examples (never leaves any over)."""
        length_in, length_tgt = self.plan.student_lengths
        batch, left = packing.pack_examples(examples, self.plan.host_rows, length_in, length_tgt,
                                            pack=True)
        if left:
            raise RuntimeError(f"{len(left)} SSR examples did not fit the student batch; slot "
                               f"lengths {self.plan.slot_lengths} x m must fit a row.")
        return batch

    # internals -------------------------------------------------------------------------------
    def _scalars(self, m: stats_lib.StageMetrics) -> Dict[str, float]:
        return m.scalars(self.plan.ssr_examples, self.plan.sc_examples, self.source.rewrites)

    def _snapshot_state(self, step: int) -> Dict[str, Any]:
        state: Dict[str, Any] = {name: {"snapshot": p.get_state(), "skip": 0}
                                 for name, p in self._pipelines.items()}
        state["step"] = step
        return state

    def _items(self, state):
        """One step of examples per item and the data state after it: a full snapshot every
        `snapshot_every` items plus the examples read since."""
        count = 0
        while True:
            step = int(state.get("step", 0))
            if count % max(1, self.config.snapshot_every) == 0:
                state = self._snapshot_state(step)
            taken, read = {}, {}
            for name, pipeline in self._pipelines.items():
                need = self._counts[name]
                taken[name] = pipeline.next_examples(need)
                read[name] = len(taken[name])
                if name == "ssr" and self._curriculum is not None:
                    taken[name] = self._curriculum.apply(taken[name], step)
                if len(taken[name]) < need and not (self._allow_partial and name == "ssr"):
                    yield StopIteration(f"the {name} input pipeline ran out of examples")
                    return
            state = {name: {"snapshot": state[name]["snapshot"],
                            "skip": state[name]["skip"] + read[name]}
                     for name in self._pipelines}
            state["step"] = step + 1
            count += 1
            yield taken["ssr"], taken.get("span_corruption", []), state
            if len(taken["ssr"]) < self._counts["ssr"]:
                yield StopIteration("the ssr input pipeline ran out of examples")
                return


_EMPTY = {"inputs": np.zeros(0, np.int32), "targets": np.zeros(0, np.int32)}


class _Batch:
    """The student batch of a started step, packed when result() is called."""

    def __init__(self, stage: SSRStage, step: Step):
        self._stage, self._step = stage, step
        self._batch = None

    def result(self):
        if self._batch is None:
            examples = self._stage.finish(self._step)
            self._batch = self._stage.partitioner.make_global_batch(self._stage.pack(examples))
            self._step = None
        return self._batch


# --- construction -----------------------------------------------------------------------------
def make_pipelines(cfg, plan: SlotPlan, config: SsrStageConfig, task_name: str,
                   shuffle: bool, repeat: bool = True) -> Dict[str, Any]:
    """{'ssr': pipeline[, 'span_corruption': pipeline]} for a plan: slot lengths, unpacked."""
    from ssr_jax.data.pipeline import InputPipeline  # pylint: disable=import-outside-toplevel
    import_task_module(cfg.module)
    common = dict(split=cfg.split, task_feature_lengths=plan.slot_feature_lengths,
                  seed=cfg.seed, pack=False, repeat=repeat, use_cached=cfg.use_cached)
    out = {"ssr": InputPipeline(task_name, batch_size=plan.host_ssr, shard_info=plan.ssr_shard,
                                shuffle=shuffle, **common)}
    if plan.sc_examples:
        out["span_corruption"] = InputPipeline(
                config.span_corruption_task, batch_size=plan.host_sc,
                shard_info=plan.sc_shard, shuffle=cfg.shuffle, **common)
    return out


def task_fill_ratio(cfg) -> float:
    """The length budget (fill tokens per masked token) of cfg's SSR-masked task."""
    return task_mask_config(get_task(cfg.mixture_or_task_name, cfg.module)).fill_ratio


def teacher_source(cfg, plan: SlotPlan, partitioner, teacher_config: teacher_lib.TeacherConfig,
                   student_vocab_size: Optional[int] = None,
                   malformed: str = "empty_fill") -> TeacherRewrite:
    """Checks the teacher (no compute), then loads it onto the partitioner's mesh for the
    SSR-masked task of `cfg`, with the task's length budget and a malformed policy."""
    vocabulary = task_vocabulary(cfg.mixture_or_task_name, cfg.module)
    teacher_lib.check_teacher(teacher_config, vocabulary, student_vocab_size)
    fill_ratio = task_fill_ratio(cfg)
    max_len = teacher_lib.static_decode_length(*plan.slot_lengths, fill_ratio)
    teacher = teacher_lib.Teacher.load(teacher_config, partitioner, vocabulary, max_len,
                                       student_vocab_size)
    return TeacherRewrite(teacher, partitioner, plan.slot_lengths, vocabulary,
                          teacher_config.seed, fill_ratio, malformed)


def online_stage(cfg, partitioner, num_microbatches: int, teacher_config: teacher_lib.TeacherConfig,
                 config: SsrStageConfig = SsrStageConfig(),
                 student_vocab_size: Optional[int] = None,
                 summary_path: Optional[str] = None) -> SSRStage:
    """The online SSR stage for a student DatasetConfig (its task: an SSR-masked task; its
    lengths and batch size: the student's). Checks the teacher before loading anything."""
    plan = plan_slots(cfg.task_feature_lengths, cfg.batch_size, config, partitioner,
                      num_microbatches)
    source = teacher_source(cfg, plan, partitioner, teacher_config, student_vocab_size,
                            config.malformed)
    pipelines = make_pipelines(cfg, plan, config, cfg.mixture_or_task_name, cfg.shuffle)
    t = source.teacher.config
    print(f"online SSR: teacher {teacher_config.checkpoint_path} ({t.d_model} d_model, "
          f"{t.num_encoder_layers}+{t.num_decoder_layers} layers, {t.dtype}); per step "
          f"{plan.ssr_examples} masked + {plan.sc_examples} span-corruption examples of slot "
          f"{plan.slot_lengths} -> {plan.rows} rows of {plan.student_lengths}", flush=True)
    return SSRStage(plan, partitioner, pipelines, source, config, summary_path)
