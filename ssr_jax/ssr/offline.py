"""Offline SSR: `ssr-jax generate-spans` writes teacher-rewritten examples to TFRecord shards,
and a SeqIO task (and input stage) reads them back.

Generation drives the stage that online training uses (ssr_jax.ssr.stage.SSRStage with the
teacher as its source, without span-corruption examples): the same masked task, split, seed
and shards, the same teacher batch per step (examples_per_row x BATCH_SIZE -
span_corruption_examples), the same per-example keys, decode lengths, rewrite and lag (the
teacher runs step s + 1 while step s is rewritten). `offline_stage` is the same stage with
the stored examples as its source, plus the span-corruption examples, packed by the same
packer: for the same settings it gives the student batches the online stage gives.

Layout of OUTPUT_DIR:
    manifest.json                                  the settings (a rerun must match them)
    ssr-<chunk:06d>-<shard:05d>-of-<shards:05d>.tfrecord   tf.train.Example {'inputs',
                                                   'targets'} int64 lists, in step order
    progress-<shard:05d>-of-<shards:05d>.json      chunks committed, pipeline state after
                                                   the last two, rewrite statistics
One writer per data shard (hosts that read the same shard write identical files). A chunk
of `chunk_steps` steps is written to a temporary file and renamed into place, then the
progress file is replaced (also atomically). After an interruption the hosts agree on the
smallest committed chunk count and regenerate from there: a chunk that was renamed but not
yet recorded is simply rewritten with the same content, so every example appears exactly
once.

Use:  ssr-jax generate-spans --gin_file=gin/objectives/ssr_offline.gin \
          --gin_file=gin/experiments/default_student_ssr.gin --gin.OUTPUT_DIR="'/data/ssr'"
then train with gin/objectives/ssr_offline.gin (SSR_OFFLINE_DIR = the same directory).
"""
import dataclasses
import hashlib
import json
import os
import re
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ssr_jax import distributed
from ssr_jax import vocab as vocab_lib
from ssr_jax.data.dataset import task_vocabulary
from ssr_jax.data.ssr_rewrite import RewriteStats
from ssr_jax.errors import UserError
from ssr_jax.ssr import stage as stage_lib
from ssr_jax.ssr import stats as stats_lib
from ssr_jax.ssr import teacher as teacher_lib

MANIFEST = "manifest.json"
FORMAT = 2  # 2: progress states are the SSR stage's data states
_CHUNK_RE = re.compile(r"^ssr-(\d{6})-(\d{5})-of-(\d{5})\.tfrecord$")


def chunk_name(chunk: int, shard: int, num_shards: int) -> str:
    return f"ssr-{chunk:06d}-{shard:05d}-of-{num_shards:05d}.tfrecord"


def progress_name(shard: int, num_shards: int) -> str:
    return f"progress-{shard:05d}-of-{num_shards:05d}.json"


def _write_json_atomic(path: str, obj: Any):
    import jax  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tmp = f"{path}.tmp-{jax.process_index()}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(json.dumps(obj))
    tf.io.gfile.rename(tmp, path, overwrite=True)


def _read_json(path: str) -> Optional[Any]:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        try:
            return json.loads(f.read())
        except ValueError as e:
            raise UserError(f"{path} is not valid JSON ({e}); delete it to regenerate.") from e


# --- reading ----------------------------------------------------------------------------------
def list_chunks(output_dir: str) -> List[str]:
    """Committed chunk files, chunk-major then shard (the global step order)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    names = [os.path.basename(p) for p in tf.io.gfile.glob(os.path.join(output_dir,
                                                                          "ssr-*.tfrecord"))]
    return [os.path.join(output_dir, n) for n in sorted(n for n in names if _CHUNK_RE.match(n))]


def _parse(record):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    spec = {"inputs": tf.io.VarLenFeature(tf.int64), "targets": tf.io.VarLenFeature(tf.int64)}
    ex = tf.io.parse_single_example(record, spec)
    return {k: tf.cast(tf.sparse.to_dense(v), tf.int32) for k, v in ex.items()}


def _make_source(output_dir: str, split: str):
    import seqio  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    class OfflineSSRSource(seqio.DataSource):
        """Rewritten examples of one generate-spans directory, in generation order. Read with
        the writers' shard count, shard i gets exactly writer i's examples."""

        def __init__(self):
            super().__init__(splits=(split,), caching_permitted=False)
            self.output_dir = output_dir

        @property
        def supports_arbitrary_sharding(self) -> bool:
            return True

        def list_shards(self, split: str) -> Sequence[str]:
            return list_chunks(self.output_dir)

        def get_dataset(self, split: str = split, shuffle: bool = False,
                        seed: Optional[int] = None, shard_info=None, **_) -> tf.data.Dataset:
            files = list_chunks(self.output_dir)
            if not files:
                raise UserError(f"no SSR chunks in {self.output_dir}; run `ssr-jax "
                                "generate-spans` first.")
            by_example = False
            if shard_info is not None and shard_info.num_shards > 1:
                tag = f"-{shard_info.index:05d}-of-{shard_info.num_shards:05d}.tfrecord"
                mine = [f for f in files if f.endswith(tag)]
                files, by_example = (mine, False) if mine else (files, True)
            if shuffle:
                files = list(np.random.RandomState(seed or 0).permutation(files))
            ds = tf.data.TFRecordDataset(files).map(_parse)
            if by_example:
                ds = ds.shard(shard_info.num_shards, shard_info.index)
            return ds

    return OfflineSSRSource()


def register_offline_ssr_task(name: str, output_dir: str, vocabulary, overwrite: bool = True):
    """Registers the rewritten examples of `output_dir` as a SeqIO task {'inputs' (student
    input), 'targets'} with the split they were generated from. The vocabulary must be the
    one recorded in the manifest."""
    import seqio  # pylint: disable=import-outside-toplevel
    from ssr_jax.data import factories  # pylint: disable=import-outside-toplevel
    manifest = read_manifest(output_dir)
    recorded, mine = manifest["vocabulary"], vocab_lib.vocab_record(vocabulary)
    for key in ("vocab_size", "extra_ids", "sentencepiece_sha256"):
        if recorded.get(key) != mine.get(key):
            raise UserError(f"offline SSR data {output_dir} was written with vocabulary "
                            f"{recorded.get('sentencepiece_model_file')} ({key}="
                            f"{recorded.get(key)}), not {mine.get('sentencepiece_model_file')}.")
    features = {"inputs": seqio.Feature(vocabulary, add_eos=True),
                "targets": seqio.Feature(vocabulary, add_eos=True)}
    return factories.add_task(name, overwrite, source=_make_source(output_dir, manifest["split"]),
                              output_features=features, preprocessors=[],
                              shuffle_buffer_size=10_000)


def read_manifest(output_dir: str) -> Dict[str, Any]:
    manifest = _read_json(os.path.join(output_dir, MANIFEST))
    if manifest is None:
        raise UserError(f"{output_dir} holds no {MANIFEST}: not a generate-spans output "
                        "directory (run `ssr-jax generate-spans` with OUTPUT_DIR there).")
    return manifest


def progress(output_dir: str, manifest: Dict[str, Any]) -> List[Optional[Dict[str, Any]]]:
    shards = manifest["num_shards"]
    return [_read_json(os.path.join(output_dir, progress_name(i, shards)))
            for i in range(shards)]


def available_steps(manifest: Dict[str, Any], records: Sequence[Optional[Dict[str, Any]]],
                    readers: Optional[int] = None) -> int:
    """Student steps a complete generate-spans output holds for `readers` data shards (None:
    as many as wrote it): its num_steps, or for one pass of the split (num_steps None) the
    full steps of the reader that gets the fewest examples (a short last step is not one)."""
    if manifest.get("num_steps") is not None:
        return int(manifest["num_steps"])
    writers = int(manifest["num_shards"])
    readers = writers if readers is None else int(readers)
    per_step = int(manifest["ssr_examples_per_step"])
    counts = [int(r["examples"]) if r else 0 for r in records]
    if readers == writers:  # reader i reads writer i's files
        return min(c // (per_step // writers) for c in counts)
    # Otherwise every reader takes every readers-th example of all files.
    return (sum(counts) // readers) // (per_step // readers)


def check_offline_data(output_dir: str, train_steps: Optional[int] = None,
                       readers: Optional[int] = None) -> Dict[str, Any]:
    """Refuses, before any step, generate-spans output that is unfinished or holds fewer
    steps than the run trains for; returns its manifest. A resumed run continues from its
    saved data position, so TRAIN_STEPS is compared with the steps from the start."""
    manifest = read_manifest(output_dir)
    records = progress(output_dir, manifest)
    if not all(r and r.get("complete") for r in records):
        done = [r["chunks_done"] if r else 0 for r in records]
        raise UserError(f"generate-spans into {output_dir} has not finished (chunks per shard: "
                        f"{done}); rerun it to complete.")
    if train_steps is not None:
        have = available_steps(manifest, records, readers)
        if train_steps > have:
            raise UserError(
                    f"offline SSR data {output_dir} holds {have} steps, fewer than "
                    f"TRAIN_STEPS={train_steps}; generate {train_steps} steps with `ssr-jax "
                    f"generate-spans` (TRAIN_STEPS={train_steps}, a new OUTPUT_DIR) or lower "
                    f"TRAIN_STEPS to {have}.")
    return manifest


# --- generation -------------------------------------------------------------------------------
def _manifest(cfg, plan: stage_lib.SlotPlan, teacher: teacher_lib.TeacherConfig, vocabulary,
              config: stage_lib.SsrStageConfig, fill_ratio: float, num_steps: Optional[int],
              chunk_steps: int):
    sampler = {k: getattr(teacher, k) for k in ("top_p", "top_k", "temperature", "seed",
                                                "dtype")}
    sampler["fill_ratio"] = fill_ratio
    return {"format": FORMAT, "task": cfg.mixture_or_task_name, "split": cfg.split,
            "seed": cfg.seed, "shuffle": cfg.shuffle,
            "student_lengths": list(plan.student_lengths),
            "slot_lengths": list(plan.slot_lengths), "rows": plan.rows,
            "examples_per_row": config.examples_per_row,
            "ssr_examples_per_step": plan.ssr_examples,
            "span_corruption_examples_per_step": plan.sc_examples,
            "num_shards": plan.ssr_shard[1], "examples_per_step_per_shard": plan.host_ssr,
            "teacher": os.path.abspath(teacher.checkpoint_path), "sampler": sampler,
            "curriculum": dataclasses.asdict(config.curriculum) if config.curriculum else None,
            "malformed": config.malformed,
            "vocabulary": vocab_lib.vocab_record(vocabulary), "num_steps": num_steps,
            "chunk_steps": chunk_steps}


def _write_chunk(path: str, examples: Sequence[Dict[str, np.ndarray]]):
    import jax  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tmp = f"{path}.tmp-{jax.process_index()}"
    with tf.io.TFRecordWriter(tmp) as w:
        for ex in examples:
            feats = {k: tf.train.Feature(int64_list=tf.train.Int64List(
                    value=np.asarray(ex[k]).tolist())) for k in ("inputs", "targets")}
            w.write(tf.train.Example(features=tf.train.Features(feature=feats))
                    .SerializeToString())
    tf.io.gfile.rename(tmp, path, overwrite=True)


def generate_spans(*, teacher: teacher_lib.TeacherConfig, dataset, output_dir: str,
                   partitioner,
                   ssr: stage_lib.SsrStageConfig = stage_lib.SsrStageConfig(),
                   num_steps: Optional[int] = None, chunk_steps: int = 50,
                   student_vocab_size: Optional[int] = None,
                   stop_after_chunks: Optional[int] = None) -> Dict[str, Any]:
    """Writes the rewritten examples of `num_steps` student steps (None: one pass of the
    split) to output_dir; resumes where a previous run stopped. `dataset` is the student's
    DatasetConfig (the SSR-masked task, the student's lengths and global batch size).
    stop_after_chunks: stop after committing that many chunks in this call (tests).
    Returns this shard's progress record."""
    import jax  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    if chunk_steps < 1 or (num_steps is not None and num_steps < 1):
        raise UserError(f"generate-spans: chunk_steps={chunk_steps} and num_steps={num_steps} "
                        "must be >= 1.")
    vocabulary = task_vocabulary(dataset.mixture_or_task_name, dataset.module)
    teacher_lib.check_teacher(teacher, vocabulary, student_vocab_size)  # before any compute
    plan = stage_lib.plan_slots(dataset.task_feature_lengths, dataset.batch_size, ssr,
                                partitioner)
    shard, shards = plan.ssr_shard
    fill_ratio = stage_lib.task_fill_ratio(dataset)
    manifest = _manifest(dataset, plan, teacher, vocabulary, ssr, fill_ratio, num_steps,
                         chunk_steps)
    tf.io.gfile.makedirs(output_dir)
    old = _read_json(os.path.join(output_dir, MANIFEST))
    if old is not None and old != manifest:
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        raise UserError(f"OUTPUT_DIR {output_dir} was generated with other settings "
                        f"(different: {', '.join(diff)}); use a new OUTPUT_DIR or the same "
                        "settings to resume.")
    _write_json_atomic(os.path.join(output_dir, MANIFEST), manifest)
    progress_path = os.path.join(output_dir, progress_name(shard, shards))
    record = _read_json(progress_path) or {"chunks_done": 0, "states": {}, "complete": False,
                                           "examples": 0, "stats": None}
    RewriteStats.from_json(record.get("stats"), progress_path)  # refuse old counts up front
    if distributed.min_over_hosts(int(record["complete"])) == 1:
        print(f"generate-spans: {output_dir} is already complete "
              f"({record['examples']} examples in this shard).", flush=True)
        return record
    start_chunk = distributed.min_over_hosts(int(record["chunks_done"]))
    total_chunks = None if num_steps is None else -(-num_steps // chunk_steps)
    gen_plan = dataclasses.replace(plan, sc_examples=0, host_sc=0)
    config = dataclasses.replace(ssr, probe_every=0, snapshot_every=chunk_steps)
    source = stage_lib.teacher_source(dataset, gen_plan, partitioner, teacher,
                                      student_vocab_size, ssr.malformed)
    pipelines = stage_lib.make_pipelines(dataset, gen_plan, config,
                                         dataset.mixture_or_task_name, dataset.shuffle,
                                         repeat=num_steps is not None)
    stage = stage_lib.SSRStage(gen_plan, partitioner, pipelines, source, config,
                               allow_partial=num_steps is None)
    if start_chunk:
        state = record["states"].get(str(start_chunk))
        if state is None:
            raise UserError(f"{progress_path} has no data state for chunk {start_chunk}; "
                            "delete OUTPUT_DIR and regenerate.")
        stage.set_state(state)
        print(f"generate-spans: resuming at chunk {start_chunk} ({start_chunk * chunk_steps} "
              "steps done)", flush=True)
    chunk, committed, t_start = start_chunk, 0, time.time()
    ended = False
    while not ended and (total_chunks is None or chunk < total_chunks):
        steps = chunk_steps if num_steps is None else min(chunk_steps,
                                                         num_steps - chunk * chunk_steps)
        examples, prev = [], None
        for _ in range(steps):
            step = stage.start_step()  # the teacher runs step s + 1 ...
            if prev is not None:
                examples += stage.finish(prev)  # ... while step s is rewritten
            prev, ended = step, step.ended
            if ended:
                break
        examples += stage.finish(prev)
        _write_chunk(os.path.join(output_dir, chunk_name(chunk, shard, shards)), examples)
        chunk += 1
        committed += 1
        states = {k: v for k, v in record["states"].items() if int(k) == chunk - 1}
        states[str(chunk)] = stage.get_state()
        done = ended or (total_chunks is not None and chunk >= total_chunks)
        stats = RewriteStats.from_json(record.get("stats"), progress_path).merge(
                stage.pop_stats())
        record = {"chunks_done": chunk, "states": states, "complete": done,
                  "examples": int(record["examples"]) + len(examples),
                  "stats": stats.to_json()}
        _write_json_atomic(progress_path, record)
        if jax.process_index() == 0:
            print(f"generate-spans: chunk {chunk}" + (f"/{total_chunks}" if total_chunks else "")
                  + f" committed ({record['examples']} examples in shard {shard}, "
                  f"{time.time() - t_start:.0f}s)", flush=True)
        if stop_after_chunks is not None and committed >= stop_after_chunks and not done:
            stage.close()
            return record
    stage.close()
    distributed.barrier("generate_spans_done")
    if jax.process_index() == 0:
        summary = RewriteStats.from_json(record.get("stats"), progress_path).summary()
        print(f"generate-spans: done; {record['examples']} examples in shard {shard} of "
              f"{shards} under {output_dir}; {stats_lib.describe(summary)}", flush=True)
    return record


# --- training from offline data ---------------------------------------------------------------
def offline_task_name(output_dir: str) -> str:
    digest = hashlib.sha1(os.path.abspath(output_dir).encode()).hexdigest()[:10]
    return f"ssr_offline_{digest}"


def offline_stage(cfg, partitioner, num_microbatches: int, output_dir: str,
                  config: stage_lib.SsrStageConfig = stage_lib.SsrStageConfig(),
                  train_steps: Optional[int] = None) -> stage_lib.SSRStage:
    """Student batches from generate-spans output: each step's group of rewritten examples
    plus the span-corruption examples, packed exactly as the online stage packs them.
    `cfg` is the student's DatasetConfig (its task: the SSR-masked task it was made from);
    train_steps: the run's TRAIN_STEPS, refused if the data holds fewer steps."""
    manifest = read_manifest(output_dir)
    vocabulary = task_vocabulary(cfg.mixture_or_task_name, cfg.module)
    plan = stage_lib.plan_slots(cfg.task_feature_lengths, cfg.batch_size, config, partitioner,
                                num_microbatches)
    expect = {"slot_lengths": list(plan.slot_lengths),
              "ssr_examples_per_step": plan.ssr_examples, "split": cfg.split,
              "curriculum": dataclasses.asdict(config.curriculum) if config.curriculum
              else None}
    wrong = {k: (manifest.get(k), v) for k, v in expect.items() if manifest.get(k) != v}
    if wrong:
        raise UserError(f"offline SSR data {output_dir} does not fit this run (written, now): "
                        f"{wrong}; generate it with the student's lengths, BATCH_SIZE and "
                        "examples_per_row.")
    check_offline_data(output_dir, train_steps, readers=plan.ssr_shard[1])
    if manifest["num_shards"] != plan.ssr_shard[1]:
        print(f"WARNING: {output_dir} was written by {manifest['num_shards']} data shards, this "
              f"run reads {plan.ssr_shard[1]}: same examples, different batches.", flush=True)
    name = offline_task_name(output_dir)
    register_offline_ssr_task(name, output_dir, vocabulary)
    pipelines = stage_lib.make_pipelines(cfg, plan, config, name, shuffle=False, repeat=False)
    steps = manifest["num_steps"]
    print(f"offline SSR: {output_dir} ({steps if steps else 'one pass of'} steps of "
          f"{plan.ssr_examples} rewritten + {plan.sc_examples} span-corruption examples)",
          flush=True)
    # The curriculum chose the examples at generation time; read them all, in order.
    return stage_lib.SSRStage(plan, partitioner, pipelines, stage_lib.StoredRewrites(),
                              dataclasses.replace(config, curriculum=None))
