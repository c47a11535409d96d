"""Continued training from INITIAL_CHECKPOINT_PATH (T5X's convention): the step and the
optimizer state travel with the params, TRAIN_STEPS counts the total, the learning-rate
schedule continues, and the data is not the initial run's order unless asked."""
import jax
import numpy as np
import optax
import pytest

from ssr_jax.cli import flags as flags_lib
from ssr_jax.cli import gin_registry
from ssr_jax.cli import train as train_cli
from ssr_jax.cli.spec import RunSpec
from ssr_jax.errors import UserError
from ssr_jax.partitioning import Partitioner
from ssr_jax.train import checkpoints as ckpt
from ssr_jax.train import optimizers, steps, trainer
from ssr_jax.train import train_state as ts
from ssr_jax.train.input_stage import PipelineInputStage
import helpers
from test_trainer import (VOCAB, BigramModel, _ckpt, array_batch, compilation_cache,  # noqa: F401
                          run_train)

S = 5  # the initial checkpoint's step; run_train's schedule: rsqrt, base 0.5, warmup 4


def rsqrt(step):
    """run_train's learning rate at (0-based) schedule step `step`, computed here."""
    return 0.5 / np.sqrt(max(step, 4))


class SeededStage:
    """An InputStage whose batches depend on (seed, position), as the real pipeline's do; its
    state refuses another seed, as InputPipeline.set_state does."""

    class _Ready:
        def __init__(self, batch):
            self._batch = batch

        def result(self):
            return self._batch

    def __init__(self, partitioner, batch_size, seed, position=0):
        self.partitioner, self.batch_size = partitioner, batch_size
        self.seed, self.position = seed, position

    def start_next(self):
        # (array_batch's RandomState takes seeds below 2^32 / 100003)
        batch = array_batch(self.position, self.batch_size, seed=self.seed % 40000)
        self.position += 1
        return self._Ready(self.partitioner.make_global_batch(batch))

    def get_state(self):
        return {"position": self.position, "seed": self.seed}

    def set_state(self, state):
        if state["seed"] != self.seed:
            raise UserError(f"data state of seed {state['seed']}, this stage's is {self.seed}")
        self.position = state["position"]

    def close(self):
        pass


def run(model_dir, train_steps, seeds=None, position=0, **kwargs):
    """run_train with a SeededStage starting at `position`; the seeds the stage factory was
    given are appended to `seeds`."""
    def factory(cfg, partitioner, num_microbatches):
        if seeds is not None:
            seeds.append(cfg.seed)
        return SeededStage(partitioner, cfg.batch_size, cfg.seed, position)
    kwargs.setdefault("checkpoint", _ckpt(1))
    return run_train(model_dir, train_steps, input_stage_factory=factory, **kwargs)


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    """A run trained 0 -> S (inside the rsqrt warmup and past it) with SEED 0."""
    path = tmp_path_factory.mktemp("init")
    run(path, S)
    return str(path)


def schedule_counts(opt_state):
    return [int(x.count) for x in jax.tree.leaves(
            opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
            if isinstance(x, optax.ScaleByScheduleState)]


def test_an_arm_continues_the_schedule_and_equals_the_uninterrupted_run(tmp_path, init_dir,
                                                                         capsys):
    full = run(tmp_path / "full", S + 3)
    # The arm reads the batches the uninterrupted run reads next (same seed, from position S).
    arm = run(tmp_path / "arm", S + 3, initial_checkpoint_path=init_dir,
              replay_initial_data=True, position=S)
    assert "initialised params and optimizer state from" in capsys.readouterr().out
    assert [m["step"] for m in arm.train_metrics] == [S + 1, S + 2, S + 3]
    rates = [m["learning_rate"] for m in arm.train_metrics]
    np.testing.assert_allclose(rates, [rsqrt(s) for s in range(S, S + 3)], rtol=1e-6)
    assert rates[0] != pytest.approx(rsqrt(0))  # not the warmup's start again
    # Bit for bit the uninterrupted run: params, optimizer state (Adafactor's moments and
    # counts), step, dropout rng.
    assert [m["loss"] for m in arm.train_metrics] == [m["loss"] for m in full.train_metrics[S:]]
    _same(arm.state, full.state)
    assert schedule_counts(arm.state.opt_state) == [S + 3]


def test_data_order_differs_from_the_initial_runs_unless_replay_is_asked(tmp_path, init_dir,
                                                                         monkeypatch, capsys):
    seeds = []
    run(tmp_path / "arm", S + 2, seeds, initial_checkpoint_path=init_dir)
    derived = trainer.data_seed(0, S)
    assert seeds == [derived] and derived != 0
    assert f"data: shuffle seed {derived}" in capsys.readouterr().out
    first = array_batch(0, seed=derived % 40000)["decoder_target_tokens"]
    assert not np.array_equal(first, array_batch(0, seed=0)["decoder_target_tokens"])
    replayed = []
    run(tmp_path / "replay", S + 2, replayed, initial_checkpoint_path=init_dir,
        replay_initial_data=True)
    assert replayed == [0]
    # The default input stage gets the same dataset config as a factory does.
    given = []
    monkeypatch.setattr(PipelineInputStage, "from_config", lambda cfg, p, m: (
            given.append(cfg), SeededStage(p, cfg.batch_size, cfg.seed))[1])
    run_train(tmp_path / "plain", S + 1, initial_checkpoint_path=init_dir,
              checkpoint=_ckpt(0), input_stage_factory=None)
    assert [c.seed for c in given] == [derived]


def test_a_resumed_arm_keeps_its_data_seed_and_resumes_bit_for_bit(tmp_path, init_dir, capsys):
    whole = run(tmp_path / "whole", S + 4, initial_checkpoint_path=init_dir)
    run(tmp_path / "split", S + 2, initial_checkpoint_path=init_dir)
    seeds = []
    # SeededStage refuses a data state of another seed: the resume derives the same one.
    second = run(tmp_path / "split", S + 4, seeds, initial_checkpoint_path=init_dir)
    assert f"resumed from step {S + 2}" in capsys.readouterr().out
    assert seeds == [trainer.data_seed(0, S)]
    assert ([m["loss"] for m in second.train_metrics]
            == [m["loss"] for m in whole.train_metrics[2:]])
    _same(second.state, whole.state)
    # A rerun of the finished arm trains nothing (TRAIN_STEPS already reached), as any run.
    again = run(tmp_path / "split", S + 4, initial_checkpoint_path=init_dir)
    assert "already at step 9 (TRAIN_STEPS=9)" in capsys.readouterr().out
    assert again.train_metrics == []


def test_train_steps_not_above_the_initial_step_is_one_line(tmp_path, init_dir):
    for steps_asked in (S, 3):
        with pytest.raises(UserError) as e:
            run(tmp_path / "arm", steps_asked, initial_checkpoint_path=init_dir)
        message = str(e.value)
        assert "\n" not in message
        assert (f"TRAIN_STEPS={steps_asked} counts all steps, the initial checkpoint's "
                f"included" in message)
        assert f"is at step {S}: to train N more steps set TRAIN_STEPS={S}+N" in message
        assert f"(e.g. {S + steps_asked})" in message
        assert "train.initial_checkpoint_params_only = True" in message


def test_params_only_checkpoint_starts_at_step_0_with_a_fresh_optimizer(tmp_path, init_dir,
                                                                        capsys):
    # As import-hf writes it, in a directory whose name is not its step.
    params = ckpt.load_params(init_dir)
    ckpt.save_params(str(tmp_path / "imported" / "7"), jax.device_get(params), None)
    assert ckpt.recorded_step(str(tmp_path / "imported")) == 0
    seeds = []
    arm = run(tmp_path / "arm", 2, seeds, initial_checkpoint_path=str(tmp_path / "imported"))
    assert "fresh optimizer state (the checkpoint holds params only" in capsys.readouterr().out
    assert [m["step"] for m in arm.train_metrics] == [1, 2]
    np.testing.assert_allclose([m["learning_rate"] for m in arm.train_metrics],
                               [rsqrt(0), rsqrt(1)], rtol=1e-6)
    assert seeds == [0]  # step 0: nothing to avoid replaying
    # The same as asking for the params only of the full checkpoint, with SEED's order.
    only = run(tmp_path / "only", 2, initial_checkpoint_path=init_dir,
               initial_checkpoint_params_only=True, replay_initial_data=True)
    assert [m["loss"] for m in only.train_metrics] == [m["loss"] for m in arm.train_metrics]
    _same(only.state, arm.state)


def test_params_only_field_restarts_at_step_0(tmp_path, init_dir, capsys):
    seeds = []
    arm = run(tmp_path / "arm", 2, seeds, initial_checkpoint_path=init_dir,
              initial_checkpoint_params_only=True)  # 2 <= S is no error here
    assert "starting at step 0 with a fresh optimizer state" in capsys.readouterr().out
    assert [m["step"] for m in arm.train_metrics] == [1, 2]
    np.testing.assert_allclose([m["learning_rate"] for m in arm.train_metrics],
                               [rsqrt(0), rsqrt(1)], rtol=1e-6)
    assert schedule_counts(arm.state.opt_state) == [2]
    assert seeds == [trainer.data_seed(0, S)]  # the data still avoids the initial run's order


def test_another_optimizers_checkpoint_gives_a_fresh_state_that_continues_the_schedule(
        tmp_path, init_dir, capsys):
    adam = run(tmp_path / "adam", S, optimizer=optimizers.adamw(1e-3))
    del adam
    arm = run(tmp_path / "arm", S + 2, initial_checkpoint_path=str(tmp_path / "adam"))
    out = capsys.readouterr().out
    assert ("fresh optimizer state (its optimizer state does not fit this run's optimizer; "
            f"the learning-rate schedule continues at step {S})") in out
    np.testing.assert_allclose([m["learning_rate"] for m in arm.train_metrics],
                               [rsqrt(S), rsqrt(S + 1)], rtol=1e-6)
    assert schedule_counts(arm.state.opt_state) == [S + 2]


def test_a_fresh_optimizer_at_step_s_applies_the_schedule_at_s():
    """The rate applied (optax's own count), not only the one logged: one step of a fresh
    optimizer at step S equals one step of a fresh optimizer at step 0 whose schedule is
    shifted by S, and differs from the unshifted one at step 0."""
    model, part = BigramModel(dropout_rate=0.0), Partitioner({"data": 8})
    schedule = optimizers.rsqrt_schedule(0.5, 4)
    batch = part.make_global_batch(array_batch(0))

    rng = np.random.RandomState(0)
    host_params = {"embed": {"embedding": rng.standard_normal((VOCAB, 16)).astype(np.float32)},
                   "out": {"kernel": rng.standard_normal((16, VOCAB)).astype(np.float32) / 4}}

    def one_step(learning_rate, step):
        opt = optimizers.adafactor(learning_rate)
        shardings = ts.state_shardings(part, model, ts.abstract_state(model, opt))
        params = jax.device_put(host_params, shardings.params)
        state = ts.state_from_params(params, opt, part, shardings, 0, step)
        new, metrics = steps.make_train_step(model, opt, part, shardings)(state, batch)
        return jax.device_get(new.params), float(metrics["learning_rate"])

    at_s, rate = one_step(schedule, S)
    shifted, _ = one_step(lambda count: schedule(count + S), 0)
    restarted, _ = one_step(schedule, 0)
    assert rate == pytest.approx(rsqrt(S))
    for a, b in zip(jax.tree.leaves(at_s), jax.tree.leaves(shifted)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.allclose(at_s["out"]["kernel"], restarted["out"]["kernel"], rtol=1e-4)


def test_run_start_step_reads_the_checkpoint_or_the_runs_record(tmp_path, init_dir):
    arm_dir = str(tmp_path / "arm")
    assert trainer.run_start_step(arm_dir) == 0
    assert trainer.run_start_step(arm_dir, init_dir) == S
    assert trainer.run_start_step(arm_dir, init_dir, params_only=True) == 0
    run(arm_dir, S + 1, initial_checkpoint_path=init_dir)
    record = ckpt.read_initial_record(f"{arm_dir}/checkpoints")
    assert (record["step"], record["start_step"], record["optimizer_state"]) == (S, S, "restored")
    assert trainer.run_start_step(arm_dir) == S  # a resume: the record, not the flags
    # A run from scratch in a directory whose earlier start from a checkpoint never saved a
    # step: the stale record goes (its resumes would otherwise take another data seed).
    stale = tmp_path / "stale" / "checkpoints"
    ckpt.write_initial_record(str(stale), {"step": S, "start_step": S})
    seeds = []
    run(tmp_path / "stale", 1, seeds)
    assert ckpt.read_initial_record(str(stale)) is None and seeds == [0]


def test_data_seeds_of_distinct_initial_steps_are_distinct():
    derived = [trainer.data_seed(3, s) for s in range(1, 5000)]
    assert len(set(derived)) == len(derived) and 3 not in derived
    assert all(0 <= d < 2 ** 31 for d in derived)
    assert trainer.data_seed(3, 0) == trainer.data_seed(3, 100, replay=True) == 3


def test_linear_schedule_counts_its_warmup_and_decay_from_start_step():
    """A fine-tuning run from a checkpoint at step S sees steps S, S+1, ...: start_step=S
    gives it the schedule a run from step 0 would have."""
    plain = optimizers.linear_schedule(0.05, warmup_steps=4, decay_steps=20)
    shifted = optimizers.linear_schedule(0.05, warmup_steps=4, decay_steps=20, start_step=600)
    for k in (0, 3, 4, 14, 23, 24, 30):
        assert float(shifted(600 + k)) == pytest.approx(float(plain(k)))
    # by hand: warmup (k + 1) / 4 of the rate, then 0.05 * (1 - (k - 4) / 20)
    assert float(shifted(601)) == pytest.approx(0.05 * 2 / 4)
    assert float(shifted(614)) == pytest.approx(0.05 * (1 - 10 / 20))
    assert float(shifted(624)) == 0.0
    with pytest.raises(ValueError, match="start_step=-1"):
        optimizers.linear_schedule(start_step=-1)


def test_run_spec_refuses_a_non_boolean_field():
    base = dict(model=None, model_dir="/tmp/x", train_dataset=None, train_steps=1,
                optimizer=None, partitioner=None)
    assert RunSpec(**base).train_kwargs()["replay_initial_data"] is False
    for field in ("replay_initial_data", "initial_checkpoint_params_only"):
        with pytest.raises(UserError, match=rf"train.{field}='yes' must be True or False"):
            RunSpec(**base, **{field: "yes"})


def test_gin_binds_the_fields_from_the_run_mode_files(capsys, tmp_path):
    tiny = ["--gin_file=gin/experiments/tiny_default.gin", f"--gin.MODEL_DIR='{tmp_path}'"]
    gin_registry.setup(flags_lib.parse_flags(tiny))
    spec = train_cli.run_spec()
    assert (spec.initial_checkpoint_params_only, spec.replay_initial_data) == (False, False)
    gin_registry.setup(flags_lib.parse_flags(tiny + ["--gin.train.replay_initial_data=True"]))
    assert train_cli.run_spec().replay_initial_data is True
    line = helpers.cli_error_line(capsys, ["train", *tiny,
                                           "--gin.train.initial_checkpoint_params_only=1"])
    assert line.endswith("train.initial_checkpoint_params_only=1 must be True or False.")
