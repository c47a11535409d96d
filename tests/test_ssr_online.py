"""The online SSR input stage: a perfect (echo) teacher restores the original text, the real
sampler gives well-formed examples, fixed step sizes pack without leftovers, the curriculum
and the drop-example policy keep batches full, the data position resumes exactly, and a
student trains with a teacher sharded over model=4."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssr_jax.data.ssr_rewrite import teacher_outputs_from_targets
from ssr_jax.errors import UserError
from ssr_jax.models.base import DecodeConfig
from ssr_jax.partitioning import Partitioner
from ssr_jax.data.dataset import DatasetConfig
from ssr_jax.ssr import stage as stage_lib
from ssr_jax.ssr import teacher as tl
from ssr_jax.ssr.curriculum import SpanCurriculum
from helpers import host
from test_teacher import SMALL, VOCAB

LENGTHS = {"inputs": 64, "targets": 16}  # student rows; slots of 32 / 8 with m = 2
SC_TASK = "ssr_default_span_corruption"


def dataset(batch_size=4, seed=0, shuffle=False):
    return DatasetConfig("ssr_default_ssr_masked", LENGTHS, batch_size=batch_size, seed=seed,
                         shuffle=shuffle, module="tasks")


def stage_config(**kw):
    kw.setdefault("span_corruption_examples", 2)
    return stage_lib.SsrStageConfig(examples_per_row=2, span_corruption_task=SC_TASK,
                                    probe_every=2, **kw)


def teacher_stage(plan, partitioner, vocabulary, cfg, config, teacher):
    """An SSRStage over the plan's pipelines with a (stub) teacher as its source."""
    pipes = stage_lib.make_pipelines(cfg, plan, config, cfg.mixture_or_task_name, cfg.shuffle)
    source = stage_lib.TeacherRewrite(teacher, partitioner, plan.slot_lengths, vocabulary,
                                      seed=0, fill_ratio=2.0)
    return stage_lib.SSRStage(plan, partitioner, pipes, source, config)


def segments(batch):
    """(inputs, targets) of every packed example, row-major: the order they were packed in."""
    out = []
    for r in range(batch["encoder_input_tokens"].shape[0]):
        es, ds = batch["encoder_segment_ids"][r], batch["decoder_segment_ids"][r]
        for s in range(1, int(es.max()) + 1):
            out.append((batch["encoder_input_tokens"][r][es == s],
                        batch["decoder_target_tokens"][r][ds == s]))
    return out


def reference_examples(cfg, config, partitioner, steps):
    """The examples the stage reads, from independent pipelines with the same settings."""
    plan = stage_lib.plan_slots(cfg.task_feature_lengths, cfg.batch_size, config, partitioner)
    pipes = stage_lib.make_pipelines(cfg, plan, config, cfg.mixture_or_task_name, cfg.shuffle)
    ssr, sc = pipes["ssr"], pipes.get("span_corruption")
    return [(ssr.next_examples(plan.host_ssr), sc.next_examples(plan.host_sc) if sc else [])
            for _ in range(steps)]


def restore(teacher_input, target, vocab_size=4100):
    """The original tokens: the teacher input with sentinel k replaced by span k (from the
    student target `orig_0 <x_1> orig_1 ... <x_n> EOS`)."""
    spans, cur = [], []
    for t in target.tolist():
        if t >= vocab_size - 100 and t < vocab_size:
            spans.append(cur)
            cur = []
        elif t != 1:
            cur.append(t)
    out = []
    for t in teacher_input.tolist():
        if vocab_size - 100 <= t < vocab_size:
            out.extend(spans[vocab_size - 1 - t])
        elif t != 1:
            out.append(t)
    return out


class EchoTeacher:
    """Test stub: answers each teacher input with its original spans (the perfect teacher)."""

    def __init__(self, examples, max_len, vocab_size=4100):
        self.decode = DecodeConfig(method="sample", max_decode_length=max_len)
        self.table = {}
        for ex in examples:
            out = teacher_outputs_from_targets(ex["targets"][None], vocab_size)[0]
            self.table[ex["inputs"].tobytes()] = out[:max_len]

    def generate(self, inputs, keys, stops, lens):
        x = np.asarray(inputs)
        out = np.zeros((x.shape[0], self.decode.max_decode_length), np.int32)
        for b, row in enumerate(x):
            got = self.table[stage_lib.strip_pad(row).tobytes()]
            out[b, :len(got)] = got
        return jnp.asarray(out)


def test_perfect_teacher_restores_the_original_text(vocabulary):
    partitioner = Partitioner({"data": 1}, devices=jax.devices()[:1])
    cfg, config = dataset(), stage_config()
    refs = reference_examples(cfg, config, partitioner, 3)
    plan = stage_lib.plan_slots(LENGTHS, cfg.batch_size, config, partitioner)
    teacher = EchoTeacher([ex for r, _ in refs for ex in r], 16)
    stage = teacher_stage(plan, partitioner, vocabulary, cfg, config, teacher)
    for ref_ssr, ref_sc in refs:
        segs = segments(host(stage.start_next().result()))
        assert len(segs) == len(ref_ssr) + len(ref_sc) == 8  # 2 per row, none left over
        for (inputs, targets), ex in zip(segs, ref_ssr):
            np.testing.assert_array_equal(targets, ex["targets"])
            original = restore(ex["inputs"], ex["targets"])
            no_sentinels = [t for t in inputs.tolist() if not 4000 <= t < 4100 and t != 1]
            assert no_sentinels == original
            assert vocabulary.decode(no_sentinels) == vocabulary.decode(original)
            assert inputs[-1] == 1 and len(inputs) <= 32
        for (inputs, targets), ex in zip(segs[len(ref_ssr):], ref_sc):
            np.testing.assert_array_equal(inputs, ex["inputs"])
            np.testing.assert_array_equal(targets, ex["targets"])
    metrics = stage.pop_metrics()
    assert metrics["ssr/nonempty_fill_rate"] == 1.0 and metrics["ssr/exact_copy_rate"] == 1.0
    assert metrics["ssr/empty_fill_rate"] == metrics["ssr/fallback_rate"] == 0.0
    assert metrics["ssr/fill_to_original_length"] == pytest.approx(1.0)
    stage.close()


class EmptyTeacher:
    """Test stub: always answers nothing (every span falls back to the empty fill)."""

    def __init__(self, max_len):
        self.decode = DecodeConfig(method="sample", max_decode_length=max_len)

    def generate(self, inputs, keys, stops, lens):
        return jnp.zeros((inputs.shape[0], self.decode.max_decode_length), jnp.int32)


def test_span_curriculum_gives_shorter_spans_first(vocabulary):
    """The curriculum masks the first steps' examples again with shorter spans: every step
    reads exactly its examples (nothing rejected), batches stay full, the teacher sees the
    new masks, and the spans grow with the step (the task's own mask after `steps`)."""
    from ssr_jax.ssr.curriculum import original_tokens
    partitioner = Partitioner({"data": 1}, devices=jax.devices()[:1])
    cfg = dataset(batch_size=16)
    config = stage_config(span_corruption_examples=0,
                          curriculum=SpanCurriculum(steps=2, start_mean_span=1.1))
    plan = stage_lib.plan_slots(LENGTHS, cfg.batch_size, config, partitioner)
    refs = reference_examples(cfg, config, partitioner, 3)
    seen = []

    class Recorder(EmptyTeacher):
        def generate(self, inputs, keys, stops, lens):
            seen.append(np.asarray(inputs))
            return super().generate(inputs, keys, stops, lens)

    stage = teacher_stage(plan, partitioner, vocabulary, cfg, config, Recorder(16))
    means = []
    for step, (ref_ssr, _) in enumerate(refs):
        segs = segments(host(stage.start_next().result()))
        assert len(segs) == 32  # full: 2 per row
        assert stage.get_state()["ssr"]["skip"] == 32 * (step + 1)  # read, never rejected
        spans = masked = 0
        for (inputs, targets), ex, tin in zip(segs, ref_ssr, seen[step]):
            n = sum(4000 <= t < 4100 for t in targets.tolist())
            spans, masked = spans + n, masked + len(targets) - 1 - n
            # The same segment (a prefix of it), masked again; the teacher got that mask.
            orig = original_tokens({"inputs": tin, "targets": targets}, 4100, 100, 1)
            assert orig.tolist() == original_tokens(ex, 4100, 100, 1)[:len(orig)].tolist()
            sentinel_layout_holds(inputs, targets, stage_lib.strip_pad(tin))
        means.append(masked / spans)
        if step == 2:  # after the curriculum: the task's own examples
            for (_, targets), ex in zip(segs, ref_ssr):
                np.testing.assert_array_equal(targets, ex["targets"])
    assert means[0] < means[1] < means[2], means
    assert len(seen) == 3 and all(x.shape == (32, 32) for x in seen)
    stage.close()


class PartlyMalformedTeacher(EchoTeacher):
    """Test stub: the perfect fills, except that for every third example (by its tokens)
    the output stops before `<x_n>`, so its last span has no well-formed fill."""

    def __init__(self, examples, max_len):
        super().__init__(examples, max_len)
        self.cut = set()
        for key, out in self.table.items():
            if sum(np.frombuffer(key, np.int32).tolist()) % 3 == 0:
                n = int(np.count_nonzero(out))
                out[n - 1] = 0  # drop the closing <x_n>
                self.cut.add(key)


def test_drop_example_policy_keeps_batches_full(vocabulary):
    """malformed='drop_example': an example with a malformed fill is packed as the
    span-corruption example of its segment (same slot), every other one as SSR; batches
    stay full and the dropped examples are counted."""
    from ssr_jax.data.ssr_rewrite import span_corruption_target
    partitioner = Partitioner({"data": 1}, devices=jax.devices()[:1])
    cfg = dataset()
    config = stage_config(span_corruption_examples=0, malformed="drop_example")
    refs = reference_examples(cfg, config, partitioner, 3)
    plan = stage_lib.plan_slots(LENGTHS, cfg.batch_size, config, partitioner)
    teacher = PartlyMalformedTeacher([ex for r, _ in refs for ex in r], 16)
    pipes = stage_lib.make_pipelines(cfg, plan, config, cfg.mixture_or_task_name, cfg.shuffle)
    source = stage_lib.TeacherRewrite(teacher, partitioner, plan.slot_lengths, vocabulary,
                                      seed=0, fill_ratio=2.0, malformed="drop_example")
    stage = stage_lib.SSRStage(plan, partitioner, pipes, source, config)
    dropped = 0
    for ref_ssr, _ in refs:
        segs = segments(host(stage.start_next().result()))
        assert len(segs) == len(ref_ssr) == 8
        for (inputs, targets), ex in zip(segs, ref_ssr):
            if ex["inputs"].tobytes() in teacher.cut:
                dropped += 1
                np.testing.assert_array_equal(inputs, ex["inputs"])
                np.testing.assert_array_equal(targets, span_corruption_target(
                        ex["targets"], 4100))
                assert targets[0] == 4099 and len(targets) == len(ex["targets"])
            else:
                np.testing.assert_array_equal(targets, ex["targets"])
                assert restore(ex["inputs"], ex["targets"]) == [
                        t for t in inputs.tolist() if not 4000 <= t < 4100 and t != 1]
    assert 0 < dropped < 24
    metrics = stage.pop_metrics()
    assert metrics["ssr/dropped_examples"] == dropped and metrics["ssr/examples"] == 24
    assert metrics["ssr/complete_example_rate"] == (24 - dropped) / 24
    assert metrics["ssr/fallback_rate"] * metrics["ssr/spans"] == pytest.approx(dropped)
    stage.close()
    with pytest.raises(UserError, match="malformed"):
        stage_lib.SsrStageConfig(malformed="drop")


def sentinel_layout_holds(inputs, targets, teacher_input):
    """Student input = teacher input with `<x_k>` -> `<x_k> fill_k <x_k+1>`, fills free of
    sentinels; ends with EOS."""
    lo, hi = 4000, 4100
    n = sum(lo <= t < hi for t in targets.tolist())
    sentinels = [hi - 1 - t for t in inputs.tolist() if lo <= t < hi]
    assert sentinels == [k for i in range(n) for k in (i, i + 1)]
    context, inside = [], False
    for t in inputs.tolist():
        if lo <= t < hi:
            if not inside:
                context.append(t)
            inside = not inside
        elif not inside:
            context.append(t)
    assert context == teacher_input.tolist()
    assert inputs[-1] == 1


def test_real_sampler_gives_well_formed_examples(teacher_dir, vocabulary):
    partitioner = Partitioner({"data": 2, "model": 4})
    cfg, config = dataset(), stage_config(span_corruption_examples=0)
    refs = reference_examples(cfg, config, partitioner, 2)
    stage = stage_lib.online_stage(cfg, partitioner, 1, tl.TeacherConfig(teacher_dir, seed=3),
                                config, VOCAB)
    for ref_ssr, _ in refs:
        segs = segments(host(stage.start_next().result()))
        assert len(segs) == 8
        for (inputs, targets), ex in zip(segs, ref_ssr):
            np.testing.assert_array_equal(targets, ex["targets"])
            sentinel_layout_holds(inputs, targets, ex["inputs"])
            assert len(inputs) <= 32
    metrics = stage.pop_metrics()
    assert metrics["ssr/spans"] > 0 and sum(metrics[f"ssr/{k}_rate"] for k in (
            "nonempty_fill", "empty_fill", "fallback", "truncated")) == pytest.approx(1.0)
    assert 0.0 < metrics["ssr/teacher_time_share"] <= 1.0
    stage.close()


def test_state_resumes_exactly(teacher_dir, vocabulary):
    partitioner = Partitioner({"data": 1}, devices=jax.devices()[:1])
    cfg, config = dataset(shuffle=True), stage_config(snapshot_every=2,
                                                      span_corruption_examples=0)
    teacher = tl.TeacherConfig(teacher_dir)
    a = stage_lib.online_stage(cfg, partitioner, 1, teacher, config, VOCAB)
    batches, states = [], []
    for _ in range(4):
        states.append(a.get_state())
        batches.append(host(a.start_next().result()))
    a.close()
    assert states[3]["ssr"]["skip"] > 0  # replays from a snapshot
    b = stage_lib.online_stage(cfg, partitioner, 1, teacher, config, VOCAB)
    b.set_state(states[3])
    again = host(b.start_next().result())
    for k in batches[3]:
        np.testing.assert_array_equal(again[k], batches[3][k])
    b.close()


def test_plan_validation():
    partitioner = Partitioner({"data": 2, "model": 4})
    plan = stage_lib.plan_slots(LENGTHS, 4, stage_config(), partitioner)
    assert plan.slot_lengths == (32, 8) and plan.ssr_examples == 6 and plan.sc_examples == 2
    assert (plan.host_rows, plan.host_ssr, plan.host_sc) == (4, 6, 2)
    with pytest.raises(UserError, match="not divisible"):
        stage_lib.plan_slots({"inputs": 65, "targets": 16}, 4, stage_config(), partitioner)
    with pytest.raises(UserError, match="multiples of the 2 batch shards"):
        stage_lib.plan_slots(LENGTHS, 4, stage_config(span_corruption_examples=1), partitioner)
    with pytest.raises(UserError, match="leaves no SSR example"):
        stage_lib.plan_slots(LENGTHS, 4, stage_config(span_corruption_examples=8), partitioner)


def test_online_ssr_trains_with_teacher_sharded_over_model4(tmp_path, teacher_dir, vocabulary):
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel
    from ssr_jax.train import optimizers, trainer
    from ssr_jax.train.checkpoints import CheckpointConfig
    partitioner = Partitioner({"data": 2, "model": 4})
    student = EncoderDecoderModel(SMALL)
    teacher = tl.TeacherConfig(teacher_dir)
    config = stage_config()
    stages = []

    def factory(cfg, part, num_microbatches):
        stages.append(stage_lib.online_stage(cfg, part, num_microbatches, teacher, config, VOCAB))
        return stages[-1]

    result = trainer.train(
            model=student, model_dir=str(tmp_path / "student"), train_dataset=dataset(),
            train_steps=20, optimizer=optimizers.adamw(learning_rate=1e-2),
            partitioner=partitioner, checkpoint=CheckpointConfig(save_every=0, async_save=False),
            log_every=5, input_stage_factory=factory)
    losses = [m["loss"] for m in result.train_metrics]
    assert losses[-1] < losses[0] - 1.0, losses
    # The teacher's params are split over 'model' on the student's mesh.
    params = stages[0].source.teacher.params
    assert any("model" in str(x.sharding.spec) for x in jax.tree.leaves(params))
    assert stages[0].source.teacher.partitioner is partitioner
