"""Checkpoints: restore onto another mesh, corrupt/truncated fallback, params-only loading, and
a run killed with SIGKILL that resumes bit for bit (subprocesses, real model and data)."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ssr_jax.errors import UserError
from ssr_jax.partitioning import Partitioner
from ssr_jax.train import checkpoints as ckpt
from ssr_jax.train import optimizers
from ssr_jax.train import train_state as ts
from test_trainer import BigramModel, compilation_cache  # noqa: F401  (module fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(part, step=0, seed=0):
    model, opt = BigramModel(), optimizers.adafactor(0.1)
    shardings = ts.state_shardings(part, model, ts.abstract_state(model, opt))
    state = ts.init_state(model, opt, part, shardings, seed=seed)
    return state.replace(step=jax.device_put(np.int32(step), shardings.step)), shardings


def _checkpointer(directory, keep=3):
    return ckpt.Checkpointer(str(directory), ckpt.CheckpointConfig(save_every=1, keep=keep),
                             model_config={"d_model": 16})


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_restore_onto_a_different_mesh_with_data_state(tmp_path):
    state, _ = _state(Partitioner({"data": 8}), step=7)
    saver = _checkpointer(tmp_path)
    saver.save(state, {"position": 7, "note": "next batch"})
    saver.close()
    part = Partitioner({"fsdp": 4, "model": 2}, "fsdp")
    template, shardings = _state(part)
    restored, data_state = _checkpointer(tmp_path).restore_latest(
            ts.abstract_state(BigramModel(), optimizers.adafactor(0.1)), shardings)
    assert data_state == {"position": 7, "note": "next batch"}
    assert int(restored.step) == 7
    _assert_same(restored, state)
    emb = restored.params["embed"]["embedding"]
    assert emb.sharding == shardings.params["embed"]["embedding"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("model", "fsdp")
    assert type(restored.opt_state[0]) is type(state.opt_state[0])  # noqa: E721 (NamedTuple)
    with open(tmp_path / "7" / "model_config.json") as f:
        assert json.load(f) == {"d_model": 16}


# garbage_data: the array data files only, metadata intact (TensorStore reads and fails).
DAMAGES = ["truncated", "garbage", "deleted_metadata", "garbage_data"]


def _damage(step_dir, damage):
    for f in glob.glob(os.path.join(str(step_dir), "params", "**", "*"), recursive=True):
        if not os.path.isfile(f):
            continue
        if damage == "truncated":
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 3)
        elif damage == "garbage" or (damage == "garbage_data" and os.path.dirname(f).endswith(
                os.path.join("params", "d"))):
            with open(f, "wb") as fh:
                fh.write(b"\x00not a checkpoint")
        elif damage == "deleted_metadata" and os.path.basename(f) == "_METADATA":
            os.remove(f)


def _two_checkpoints(root):
    """Steps 2 and 4 saved in root: (state 2, state 4, shardings, abstract state)."""
    part = Partitioner({"data": 8})
    s2, shardings = _state(part, step=2, seed=2)
    s4, _ = _state(part, step=4, seed=4)
    saver = _checkpointer(root)
    saver.save(s2, {"position": 2})
    saver.save(s4, {"position": 4})
    saver.close()
    return s2, s4, shardings, ts.abstract_state(BigramModel(), optimizers.adafactor(0.1))


@pytest.mark.parametrize("damage", DAMAGES)
def test_unreadable_latest_checkpoint_falls_back_with_one_warning_line(tmp_path, capfd, damage):
    s2, s4, shardings, abstract = _two_checkpoints(tmp_path)
    _damage(tmp_path / "4", damage)
    capfd.readouterr()
    restored, data_state = _checkpointer(tmp_path).restore_latest(abstract, shardings)
    assert int(restored.step) == 2 and data_state == {"position": 2}
    _assert_same(restored.params, s2.params)
    captured = capfd.readouterr()
    lines = [ln for ln in (captured.out + captured.err).splitlines() if ln.strip()]
    # Exactly one line, naming the step, the fallback and where it was moved; no spec dumps.
    assert len(lines) == 1, lines
    assert "checkpoint step 4" in lines[0] and "falling back to step 2" in lines[0]
    assert "4.corrupt-" in lines[0] and len(lines[0]) < 600, lines[0]
    assert glob.glob(str(tmp_path / "4.corrupt-*"))  # moved aside, not deleted
    # Training continues and can save step 4 again.
    saver = _checkpointer(tmp_path)
    saver.save(s4, {"position": 4})
    saver.close()
    assert saver.all_steps() == [2, 4]


@pytest.mark.parametrize("damage", DAMAGES)
def test_all_checkpoints_unreadable_is_refused_every_time_and_nothing_moved(tmp_path, capfd,
                                                                             damage):
    _, _, shardings, abstract = _two_checkpoints(tmp_path)
    for step in (2, 4):
        _damage(tmp_path / str(step), damage)
    before = sorted(os.listdir(tmp_path))
    capfd.readouterr()
    for _ in range(2):  # the rerun must refuse too, not start from step 0
        with pytest.raises(UserError) as e:
            _checkpointer(tmp_path).restore_latest(abstract, shardings)
        message = str(e.value)
        assert len(message.splitlines()) == 1 and len(message) < 1000, message
        assert "no readable checkpoint" in message and "step 4 (" in message and \
            "step 2 (" in message, message
        assert sorted(os.listdir(tmp_path)) == before
        assert not glob.glob(str(tmp_path / "*.corrupt-*"))
    captured = capfd.readouterr()
    noise = [ln for ln in (captured.out + captured.err).splitlines() if ln.strip()]
    assert not noise, noise[:5]


def test_tensorstore_errors_are_cut_to_one_readable_line():
    spec = ('{"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": {"driver": "file", '
            '"path": "/ckpt/4/params/"}, "path": "embed.embedding"}, "metadata": {"shape": '
            '[64, 16]}}' * 20)
    e = ValueError(f"DATA_LOSS: Error reading {spec}: unexpected end of data\n{spec}")
    assert ckpt._first_line(e) == ("ValueError: DATA_LOSS: Error reading "
                                   "(file /ckpt/4/params/embed.embedding)")
    e = Exception("Encountered error while reading array index: (slice(0, 32, 1),). See full "
                  "TensorStore details: <bound method spec of TensorStore>")
    assert ckpt._first_line(e) == ("Exception: Encountered error while reading array index: "
                                   "(slice(0, 32, 1),).")


def test_no_readable_checkpoint_and_wrong_model_are_user_errors(tmp_path):
    part = Partitioner({"data": 8})
    state, shardings = _state(part, step=3)
    saver = _checkpointer(tmp_path / "a")
    saver.save(state, None)
    saver.close()
    # A different model (wider embedding) is not corruption: error, checkpoint left alone.
    wide = BigramModel(d=32)
    opt = optimizers.adafactor(0.1)
    wide_abstract = ts.abstract_state(wide, opt)
    wide_shardings = ts.state_shardings(part, wide, wide_abstract)
    with pytest.raises(UserError, match=r"does not fit the model .*embed.*\(64, 16\)"):
        _checkpointer(tmp_path / "a").restore_latest(wide_abstract, wide_shardings)
    assert os.path.isdir(tmp_path / "a" / "3")
    os.remove(tmp_path / "a" / "3" / "params" / "_METADATA")
    with pytest.raises(UserError, match=r"no readable checkpoint in .*: step 3 \("):
        _checkpointer(tmp_path / "a").restore_latest(
                ts.abstract_state(BigramModel(), opt), shardings)


def test_params_only_checkpoints_load_from_step_dir_root_or_model_dir(tmp_path):
    part = Partitioner({"data": 4, "model": 2})
    state, shardings = _state(part)
    params = jax.device_get(state.params)
    ckpt.save_params(str(tmp_path / "imported" / "0"), params, {"d_model": 16})
    for path in (tmp_path / "imported" / "0", tmp_path / "imported"):
        loaded = ckpt.load_params(str(path), shardings.params, params)
        _assert_same(loaded, params)
        assert loaded["out"]["kernel"].sharding.spec == shardings.params["out"]["kernel"].spec
        assert ckpt.load_model_config(str(path)) == {"d_model": 16}
    host = ckpt.load_params(str(tmp_path / "imported"))  # no shardings: first local device
    _assert_same(host, params)
    # A MODEL_DIR (checkpoints/<step>/params) works too.
    saver = ckpt.Checkpointer(str(tmp_path / "run" / "checkpoints"), model_config=None)
    saver.save(state.replace(step=jax.device_put(np.int32(5), shardings.step)), None)
    saver.close()
    assert ckpt.resolve_step_dir(str(tmp_path / "run")).endswith(os.path.join("checkpoints", "5"))
    with pytest.raises(UserError, match="no checkpoint at"):
        ckpt.load_params(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"does not fit the model"):
        ckpt.load_params(str(tmp_path / "imported"), None,
                         {"embed": {"embedding": np.zeros((64, 8))}, "out": params["out"]})


# --- killed mid-way and restarted: bit for bit -------------------------------------------------
def _train_args(model_dir):
    return ["train", "--gin_file=gin/experiments/tiny_default.gin",
            f"--gin.MODEL_DIR='{model_dir}'",
            "--gin.TRAIN_STEPS=10", "--gin.BATCH_SIZE=8",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
            "--gin.DROPOUT_RATE=0.1",  # the dropout rng must resume too
            "--gin.t5_1_1_tiny/T5Config.d_model=32", "--gin.t5_1_1_tiny/T5Config.d_ff=64",
            "--gin.t5_1_1_tiny/T5Config.num_heads=2", "--gin.t5_1_1_tiny/T5Config.d_kv=16",
            "--gin.t5_1_1_tiny/T5Config.num_encoder_layers=1",
            "--gin.t5_1_1_tiny/T5Config.num_decoder_layers=1",
            "--gin.EVAL_EVERY=0", "--gin.train.log_every=1",
            "--gin.CheckpointConfig.save_every=5"]


def _env(cache_dir):
    """The test process's environment (8 fake devices) plus its compilation cache."""
    env = dict(os.environ)
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=REPO)
    return env


def _losses(model_dir):
    """step -> the losses logged for it (a resumed run drops the lines past its checkpoint,
    so each step is logged once)."""
    by_step = {}
    with open(os.path.join(model_dir, "train", "metrics.jsonl")) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by SIGKILL
                continue
            by_step.setdefault(row["step"], []).append(row["loss"])
    return by_step


@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_bit_for_bit(tmp_path, compilation_cache):  # noqa: F811
    from ssr_jax import cli  # pylint: disable=import-outside-toplevel
    # The uninterrupted reference runs in this process (same 8 devices and programs; its
    # compiled programs land in the cache the subprocesses read).
    assert cli.main(_train_args(tmp_path / "full")) == 0

    cmd = [sys.executable, "-m", "ssr_jax.cli"] + _train_args(tmp_path / "killed")
    env = _env(compilation_cache)
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 400
    while not os.path.isdir(killed_dir / "checkpoints" / "5") and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(_losses(killed_dir)) < 10, "the run finished before it could be killed"

    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 5" in resumed.stdout
    full_losses, killed_losses = _losses(tmp_path / "full"), _losses(killed_dir)
    assert sorted(killed_losses) == list(range(1, 11))
    for step, values in killed_losses.items():
        assert values == full_losses[step], f"step {step}: {values} vs {full_losses[step]}"
    _assert_same(ckpt.load_params(str(tmp_path / "full")), ckpt.load_params(str(killed_dir)))
    assert ckpt.resolve_step_dir(str(killed_dir)).endswith("10")
