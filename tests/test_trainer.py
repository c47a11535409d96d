"""Train step and loop: gradient accumulation, non-finite skipping, the loop's resume, logs.

`BigramModel` and `ArrayStage` (a tiny BaseModel and an in-memory InputStage that compile in
a second) are shared with test_checkpoints.py.
"""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from ssr_jax.errors import UserError
from ssr_jax.models.base import BaseModel
from ssr_jax.partitioning import Partitioner
from ssr_jax.train import optimizers, steps, trainer
from ssr_jax.train import train_state as ts
from ssr_jax.data.dataset import DatasetConfig

@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache for this module: the loop tests build the same programs several
    times (each train() call jits afresh) and CPU compiles cost seconds each. The directory is
    shared by the session (subprocess runs use it via JAX_COMPILATION_CACHE_DIR)."""
    from jax._src import compilation_cache as cc  # pylint: disable=import-outside-toplevel
    path = tmp_path_factory.getbasetemp() / "jax_compilation_cache"
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    for n, v in zip(names, (str(path), 0, 0)):
        jax.config.update(n, v)
    cc.reset_cache()
    yield path
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()


VOCAB = 64
POISON = VOCAB - 1  # a target token that makes BigramModel's loss NaN


class BigramModel(BaseModel):
    """logits[t] = (emb[decoder_input[t]] + mean emb[encoder tokens]) @ out, with dropout."""

    def __init__(self, d: int = 16, dropout_rate: float = 0.1):
        self.d, self.dropout_rate = d, dropout_rate

    def init(self, rng):
        k1, k2 = jax.random.split(rng)
        return {"embed": {"embedding": jax.random.normal(k1, (VOCAB, self.d))},
                "out": {"kernel": jax.random.normal(k2, (self.d, VOCAB)) / np.sqrt(self.d)}}

    def param_logical_axes(self):
        return {"embed": {"embedding": P("vocab", "embed")}, "out": {"kernel": P("embed", "vocab")}}

    def _sums(self, params, batch, dropout_rng):
        emb = params["embed"]["embedding"]
        enc = jnp.take(emb, batch["encoder_input_tokens"], axis=0).mean(1, keepdims=True)
        h = jnp.take(emb, batch["decoder_input_tokens"], axis=0) + enc
        if dropout_rng is not None:
            keep = jax.random.bernoulli(dropout_rng, 1 - self.dropout_rate, h.shape)
            h = jnp.where(keep, h / (1 - self.dropout_rate), 0)
        logits = h @ params["out"]["kernel"]
        targets = batch["decoder_target_tokens"]
        w = batch["decoder_loss_weights"].astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, -1)
        ce = lse - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        z = 1e-4 * lse ** 2
        poison = jnp.where(jnp.any(targets == POISON), jnp.nan, 0.0)
        aux = {"weight_sum": w.sum(), "cross_ent_sum": (ce * w).sum(),
               "z_loss_sum": (z * w).sum(),
               "correct_sum": ((jnp.argmax(logits, -1) == targets) * w).sum()}
        return ((ce + z) * w).sum() + poison, aux

    def loss_fn(self, params, batch, dropout_rng):
        return self._sums(params, batch, dropout_rng)

    def train_flops(self, batch_size, inputs_length, targets_length):
        return 3 * 2.0 * batch_size * targets_length * self.d * VOCAB  # the output matmul

    def eval_fn(self, params, batch):
        return self._sums(params, batch, None)[1]

    def predict_batch(self, params, batch, decode, rng=None, stop_tokens=None,
                      max_decode_lengths=None):
        raise NotImplementedError("BigramModel does not decode")


def array_batch(position: int, batch_size: int = 8, length: int = 8, seed: int = 0,
                poison: bool = False):
    """Deterministic in (seed, position): targets follow t -> (3t + 1) mod 60 + 2."""
    rng = np.random.RandomState(seed * 100003 + position)
    first = rng.randint(2, 62, size=(batch_size, 1))
    tgt = [first]
    for _ in range(length - 1):
        tgt.append((tgt[-1] * 3 + 1) % 60 + 2)
    tgt = np.concatenate(tgt, 1).astype(np.int32)
    if poison:
        tgt[0, -1] = POISON
    dec_in = np.concatenate([np.zeros((batch_size, 1), np.int32), tgt[:, :-1]], 1)
    weights = np.ones_like(tgt)
    weights[: batch_size // 2, -2:] = 0  # uneven weights per row
    return {"encoder_input_tokens": rng.randint(2, 62, (batch_size, length)).astype(np.int32),
            "decoder_input_tokens": dec_in, "decoder_target_tokens": tgt,
            "decoder_loss_weights": weights}


class ArrayStage:
    """In-memory InputStage: batch n = array_batch(n); state = the next position."""

    class _Ready:
        def __init__(self, batch):
            self._batch = batch

        def result(self):
            return self._batch

    def __init__(self, partitioner, batch_size=8, poison_from=None, sigterm_at=None):
        self.partitioner, self.batch_size, self.poison_from = partitioner, batch_size, poison_from
        self.sigterm_at = sigterm_at
        self.position = 0

    def start_next(self):
        if self.position == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)  # as a cluster scheduler would
        poison = self.poison_from is not None and self.position >= self.poison_from
        batch = array_batch(self.position, self.batch_size, poison=poison)
        self.position += 1
        return self._Ready(self.partitioner.make_global_batch(batch))

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]

    def close(self):
        pass


def run_train(model_dir, train_steps, poison_from=None, sigterm_at=None, **kwargs):
    """trainer.train on BigramModel + ArrayStage with small defaults."""
    part = Partitioner({"data": 4, "model": 2})
    args = dict(model=BigramModel(), model_dir=str(model_dir),
                train_dataset=DatasetConfig("arrays", {"inputs": 8, "targets": 8}, batch_size=8),
                train_steps=train_steps,
                optimizer=optimizers.adafactor(optimizers.rsqrt_schedule(0.5, 4)),
                partitioner=part, log_every=1,
                input_stage_factory=lambda cfg, p, m: ArrayStage(p, cfg.batch_size, poison_from,
                                                                 sigterm_at))
    args.update(kwargs)
    return trainer.train(**args)


# --- gradient accumulation ---------------------------------------------------------------------
def test_gradient_accumulation_over_4_microbatches_equals_full_batch():
    model = BigramModel(dropout_rate=0.0)
    rng = np.random.RandomState(0)
    part = Partitioner({"data": 4, "model": 2})
    b, t = 16, 8
    batch = array_batch(0, batch_size=b, length=t)
    lengths = rng.randint(1, t + 1, b)  # rows have different numbers of target tokens
    weights = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    batch["decoder_loss_weights"] = weights
    params = {"embed": {"embedding": rng.standard_normal((VOCAB, 16)).astype(np.float32)},
              "out": {"kernel": rng.standard_normal((16, VOCAB)).astype(np.float32) / 4}}
    params = jax.device_put(params, part.param_shardings(params, model.param_logical_axes()))

    def run(m):
        fn = lambda p, x: steps.loss_and_grads(model, p, x, jax.random.PRNGKey(0), part, m)  # noqa
        # (the key is made inside jit: an eager PRNGKey costs a compile of its own)
        with part.activation_context():
            return jax.device_get(jax.jit(fn)(params, part.make_global_batch(batch)))

    full_loss, full_grads, full_sums = run(1)
    acc_loss, acc_grads, acc_sums = run(4)
    np.testing.assert_allclose(acc_loss, full_loss, rtol=1e-5)
    np.testing.assert_allclose(acc_sums["weight_sum"], weights.sum())
    for g, r in zip(jax.tree.leaves(acc_grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    # Averaging per-microbatch means would NOT match (weights differ between microbatches),
    # so the check above really tests normalisation by the global weight sum.
    per_micro = [weights[i::4].sum() for i in range(4)]
    assert len(set(per_micro)) > 1


# --- non-finite steps --------------------------------------------------------------------------
def test_nonfinite_step_applies_no_update_and_is_counted():
    model, part = BigramModel(), Partitioner({"data": 8})
    opt = optimizers.adafactor(0.1)
    shardings = ts.state_shardings(part, model, ts.abstract_state(model, opt))
    state = ts.init_state(model, opt, part, shardings, seed=0)
    step = steps.make_train_step(model, opt, part, shardings, donate=False)
    bad, _ = step(state, part.make_global_batch(array_batch(0, poison=True)))
    for new, old in zip(jax.tree.leaves((bad.params, bad.opt_state)),
                        jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(new, old)
    assert (int(bad.step), int(bad.nonfinite_consecutive), int(bad.nonfinite_total)) == (1, 1, 1)
    good, metrics = step(bad, part.make_global_batch(array_batch(1)))
    assert (int(good.nonfinite_consecutive), int(good.nonfinite_total)) == (0, 1)
    assert not np.array_equal(good.params["out"]["kernel"], bad.params["out"]["kernel"])
    assert np.isfinite(float(metrics["loss_sum"])) and int(metrics["nonfinite"]) == 0


def test_update_that_makes_params_nonfinite_is_skipped():
    model, part = BigramModel(), Partitioner({"data": 8})
    # Finite gradients, an overflowing update (like a huge learning rate).
    huge = optimizers.Optimizer(optax.chain(optax.scale(-1e30), optax.scale(1e30)),
                                lambda step: 1e30)
    shardings = ts.state_shardings(part, model, ts.abstract_state(model, huge))
    state = ts.init_state(model, huge, part, shardings, seed=0)
    step = steps.make_train_step(model, huge, part, shardings, donate=False)
    new, metrics = step(state, part.make_global_batch(array_batch(0)))
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    assert (int(new.step), int(new.nonfinite_total), int(metrics["nonfinite"])) == (1, 1, 1)


def test_training_stops_after_n_consecutive_nonfinite_steps(tmp_path):
    # Poisoned batches from position 4: steps 5, 6, 7 are skipped; step 6's save is in flight
    # when the run stops at step 7.
    with pytest.raises(trainer.TrainingDiverged,
                       match=r"3 consecutive steps had a non-finite .* last checkpoint, step 6,"):
        run_train(tmp_path, 20, poison_from=4, max_consecutive_nonfinite=3, checkpoint=_ckpt(2))
    directory = tmp_path / "checkpoints"
    assert sorted(os.listdir(directory)) == ["4", "6", "model_config.json"]  # no *-tmp
    # The latest checkpoint restores: its params are step 4's (5 and 6 were skipped).
    from ssr_jax.train import checkpoints as ckpt  # pylint: disable=import-outside-toplevel
    for a, b in zip(jax.tree.leaves(ckpt.load_params(str(directory / "6"))),
                    jax.tree.leaves(ckpt.load_params(str(directory / "4")))):
        np.testing.assert_array_equal(a, b)
    resumed = run_train(tmp_path, 6, checkpoint=_ckpt(2))
    assert int(resumed.state.step) == 6 and int(resumed.state.nonfinite_consecutive) == 2


def test_max_consecutive_nonfinite_must_be_at_least_1(tmp_path):
    with pytest.raises(UserError, match=r"max_consecutive_nonfinite=0 must be >= 1"):
        run_train(tmp_path, 3, max_consecutive_nonfinite=0)


# --- the loop ----------------------------------------------------------------------------------
def test_loop_resume_matches_uninterrupted_run_and_writes_logs(tmp_path, capsys):
    full = run_train(tmp_path / "full", 9, checkpoint=_ckpt(3))
    first = run_train(tmp_path / "split", 5, checkpoint=_ckpt(3))
    second = run_train(tmp_path / "split", 9, checkpoint=_ckpt(3))
    out = capsys.readouterr().out
    assert "resumed from step 5" in out
    losses = lambda r: [m["loss"] for m in r.train_metrics]  # noqa: E731
    assert losses(first) + losses(second) == losses(full)  # bit for bit
    for a, b in zip(jax.tree.leaves(second.state), jax.tree.leaves(full.state)):
        np.testing.assert_array_equal(a, b)
    assert losses(full)[-1] < losses(full)[0] - 0.3  # it learns the bigram rule
    line = [ln for ln in out.splitlines() if ln.startswith("step 9/9")][0]
    for part in ("loss", "acc", "lr", "gnorm", "tok/s", "ETA"):
        assert part in line
    assert "MFU" not in line  # a CPU has no known peak FLOP/s
    assert glob.glob(str(tmp_path / "full" / "train" / "events.out.tfevents.*"))
    assert sorted(os.listdir(tmp_path / "full" / "checkpoints")) == [
            "6", "9", "model_config.json"]


def test_mfu_only_with_a_known_peak_and_equal_to_its_definition(tmp_path, capsys):
    run_train(tmp_path / "cpu", 2, checkpoint=_ckpt(0))
    out = capsys.readouterr().out
    assert "step 2/2" in out and "MFU" not in out
    assert all("timing/mfu" not in r for r in _jsonl(tmp_path / "cpu/train/metrics.jsonl"))
    peak = 1e9  # FLOP/s per device, as train.peak_flops_per_device
    run_train(tmp_path / "peak", 3, checkpoint=_ckpt(0), peak_flops_per_device=peak)
    printed = [float(ln.split("MFU ")[1].split("%")[0])
               for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    flops = BigramModel().train_flops(8, 8, 8)
    rows = _jsonl(tmp_path / "peak/train/metrics.jsonl")
    assert len(printed) == len(rows) == 3
    for row, shown in zip(rows, printed):
        expected = flops * row["timing/steps_per_second"] / (peak * jax.device_count())
        assert row["timing/mfu"] == pytest.approx(expected, rel=1e-9)
        assert shown == pytest.approx(100 * expected, rel=5e-3)  # printed to 3 digits


def test_sigterm_saves_and_stops_then_the_run_resumes(tmp_path, capsys):
    full = run_train(tmp_path / "full", 8, checkpoint=_ckpt(100))
    first = run_train(tmp_path / "split", 8, sigterm_at=4, checkpoint=_ckpt(100))
    # The signal arrives during step 4; the loop notices at the next step boundary, finishes
    # that step (its batch was already taken) and saves.
    assert first.preempted and int(first.state.step) == 5
    assert "preempted: saved step 5" in capsys.readouterr().out
    second = run_train(tmp_path / "split", 8, checkpoint=_ckpt(100))
    assert not second.preempted
    for a, b in zip(jax.tree.leaves(second.state), jax.tree.leaves(full.state)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_ssr_jax_train_exits_75_on_sigterm_and_a_rerun_resumes(tmp_path):
    """A real `ssr-jax train` process and a real signal: the status tells the launchers'
    restart loops (launch/*) that the run was preempted, not finished."""
    from ssr_jax import distributed  # pylint: disable=import-outside-toplevel
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tiny = "--gin.t5_1_1_tiny/T5Config."
    cmd = [sys.executable, "-m", "ssr_jax.cli", "train",
           "--gin_file=gin/experiments/tiny_default.gin", f"--gin.MODEL_DIR='{tmp_path}'",
           "--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
           f"{tiny}d_model=16", f"{tiny}d_ff=32", f"{tiny}num_heads=2", f"{tiny}d_kv=8",
           f"{tiny}num_encoder_layers=1", f"{tiny}num_decoder_layers=1",
           "--gin.EVAL_EVERY=0", "--gin.train.log_every=1",
           "--gin.CheckpointConfig.save_every=100000"]
    env = dict(os.environ, PYTHONPATH=repo)
    proc = subprocess.Popen(cmd + ["--gin.TRAIN_STEPS=100000"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "train" / "metrics.jsonl"
    deadline = time.time() + 400
    while not (log.exists() and log.read_text().count("\n") >= 2):  # it is training
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == distributed.EXIT_PREEMPTED == 75, out[-3000:]
    saved = int(re.search(r"preempted: saved step (\d+)", out).group(1))
    rerun = subprocess.run(cmd + [f"--gin.TRAIN_STEPS={saved + 2}"], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert f"resumed from step {saved}" in rerun.stdout
    assert f"step {saved + 2}/{saved + 2}" in rerun.stdout


def test_initial_checkpoint_gives_its_step_and_own_checkpoints_win(tmp_path, capsys):
    pretrained = run_train(tmp_path / "pre", 3, checkpoint=_ckpt(0))
    fine = run_train(tmp_path / "fine", 5, initial_checkpoint_path=str(tmp_path / "pre"),
                     checkpoint=_ckpt(1))
    assert "initialised params and optimizer state from" in capsys.readouterr().out
    # Continues at the initial checkpoint's step 3 (TRAIN_STEPS counts the total);
    # test_continued_training.py checks the schedule, optimizer state and data order.
    assert int(fine.state.step) == 5 and [m["step"] for m in fine.train_metrics] == [4, 5]
    scratch = run_train(tmp_path / "scratch", 1, checkpoint=_ckpt(0))
    assert fine.train_metrics[0]["loss"] < scratch.train_metrics[0]["loss"] - 0.5
    del pretrained
    # Rerun in the same MODEL_DIR: its own checkpoint (step 5) wins over the initial one.
    again = run_train(tmp_path / "fine", 6, initial_checkpoint_path=str(tmp_path / "pre"),
                      checkpoint=_ckpt(1))
    assert "resumed from step 5" in capsys.readouterr().out
    assert [m["step"] for m in again.train_metrics] == [6]


EVAL_CFG = DatasetConfig("arrays", {"inputs": 8, "targets": 8}, split="validation",
                         batch_size=8)


def fake_split(batches):
    """A stand-in for dataset.host_batches over a split of these batches: it ends after the
    last one, or wraps around with repeat=True, as the real pipeline does."""
    def host_batches(cfg, partitioner, num_batches, repeat=False):
        i = 0
        while num_batches is None or i < num_batches:
            if i >= len(batches) and not repeat:
                return
            yield batches[i % len(batches)], None, 8
            i += 1
    return host_batches


def test_eval_during_training_covers_the_split_once(tmp_path, capsys, monkeypatch):
    batches = [array_batch(100 + i) for i in range(3)]
    monkeypatch.setattr(trainer, "host_batches", fake_split(batches))
    # The split's target tokens, counted from its examples.
    tokens = [int(b["decoder_loss_weights"].sum()) for b in batches]
    # eval_steps beyond the split's 3 batches: the whole split once, no wrapping around.
    result = run_train(tmp_path / "whole", 4, eval_dataset=EVAL_CFG, eval_every=2,
                       eval_steps=5, checkpoint=_ckpt(0))
    assert [m["step"] for m in result.eval_metrics] == [2, 4]
    assert [m["weight_sum"] for m in result.eval_metrics] == [sum(tokens)] * 2
    assert result.eval_metrics[1]["loss"] < result.eval_metrics[0]["loss"]
    assert (f"| 3 batches (the whole split: {sum(tokens):,} target tokens)"
            in capsys.readouterr().out)
    assert glob.glob(str(tmp_path / "whole" / "eval" / "events.out.tfevents.*"))
    # Fewer than the split has: its first 2 batches, said so.
    result = run_train(tmp_path / "first", 2, eval_dataset=EVAL_CFG, eval_every=2,
                       eval_steps=2, checkpoint=_ckpt(0))
    assert result.eval_metrics[0]["weight_sum"] == sum(tokens[:2])
    assert (f"| 2 batches (the first 2 batches of the split: {sum(tokens[:2]):,} target "
            "tokens)" in capsys.readouterr().out)
    monkeypatch.setattr(trainer, "host_batches", fake_split([]))
    with pytest.raises(UserError, match="eval split 'validation' of 'arrays' is empty"):
        run_train(tmp_path / "empty", 2, eval_dataset=EVAL_CFG, eval_every=2,
                  checkpoint=_ckpt(0))


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_resumed_run_logs_each_step_once_and_a_finished_run_trains_nothing(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trainer, "host_batches", fake_split([array_batch(100)]))
    kwargs = dict(checkpoint=_ckpt(3), eval_dataset=EVAL_CFG, eval_every=2, eval_steps=1)
    full = run_train(tmp_path / "full", 9, **kwargs)
    run_train(tmp_path / "split", 5, **kwargs)
    # Killed after step 5 was logged but before its checkpoint was written: resumes at 3.
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "5")
    run_train(tmp_path / "split", 9, **kwargs)
    assert "resumed from step 3" in capsys.readouterr().out
    train_log = _jsonl(tmp_path / "split" / "train" / "metrics.jsonl")
    assert [r["step"] for r in train_log] == list(range(1, 10))
    assert [r["loss"] for r in train_log] == [m["loss"] for m in full.train_metrics]
    eval_log = _jsonl(tmp_path / "split" / "eval" / "metrics.jsonl")
    assert [r["step"] for r in eval_log] == [2, 4, 6, 8, 9]
    assert eval_log == _jsonl(tmp_path / "full" / "eval" / "metrics.jsonl")
    # Rerunning the finished run: one line, nothing trained or logged.
    again = run_train(tmp_path / "split", 9, **kwargs)
    out = capsys.readouterr().out
    assert f"already at step 9 (TRAIN_STEPS=9) in {tmp_path / 'split'}: nothing to train" in out
    assert again.train_metrics == [] and int(again.state.step) == 9 and "step 9/9" not in out
    assert _jsonl(tmp_path / "split" / "train" / "metrics.jsonl") == train_log


def _ckpt(every):
    from ssr_jax.train.checkpoints import CheckpointConfig
    return CheckpointConfig(save_every=every, keep=2)
