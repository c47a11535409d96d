"""Multi-process runs on localhost: 2 processes x 4 fake CPU devices, gloo collectives.

Every process is a subprocess with a timeout and its own free coordinator port; the bodies
live in tests/multihost_worker.py. Covered:
  * training: 2 processes train a tiny model with span corruption (stopped and resumed half
    way) and then with online SSR; the loss traces equal those of 1 process with 8 devices
    on the same global batches (the single process reads the same two per-host shards), the
    per-host data shards, checkpoint shards and process-0-only logs are checked, and the
    2-process checkpoint restores (and trains on) in a single process;
  * failures: a killed worker or coordinator, a worker that raises, and a worker that hangs
    make the other process exit non-zero within the bound (heartbeat / fail_fast /
    watchdog); launch/local_multiprocess.sh stops the group and restarts it.
"""
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from ssr_jax import distributed
from ssr_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multihost_worker.py")
HEARTBEAT_S = 10  # for the failure tests; survivors must be gone well within 2 minutes
EXIT_BOUND_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, tmp_path, process_id=None, port=None, **extra) -> dict:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   env.get("XLA_FLAGS", ""))
    env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
               # Reruns of the same step function (resume, reference) skip compilation.
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    for k in [k for k in env if k.startswith("SSR_JAX_")]:
        del env[k]
    if process_id is not None:
        env.update(SSR_JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", SSR_JAX_NUM_PROCESSES="2",
                   SSR_JAX_PROCESS_ID=str(process_id))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _start(args, env, log_path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, WORKER, *args], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)


def _start_pair(args, tmp_path, name, per_process_env=({}, {})):
    port = _free_port()
    logs = [tmp_path / f"{name}_{i}.log" for i in range(2)]
    procs = [_start(args, _env(4, tmp_path, i, port, **per_process_env[i]), logs[i])
             for i in range(2)]
    return procs, logs


def _tail(path, n=25) -> str:
    lines = [ln for ln in open(path, errors="replace").read().splitlines()
             if not ln.startswith(("I0000", "W0000", "    @", "WARNING: All log"))]
    return f"--- {os.path.basename(str(path))}:\n" + "\n".join(lines[-n:])


def _wait(procs, logs, timeout):
    """Exit codes; on timeout kills everything and fails with the logs."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        pytest.fail(f"timed out after {timeout} s\n" + "\n".join(_tail(f) for f in logs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _losses(model_dir) -> dict:
    with open(os.path.join(model_dir, "train", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {int(r["step"]): r["loss"] for r in rows}


# --- training equivalence ----------------------------------------------------------------------
_LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}"


def _span_corruption_args(model_dir, steps):
    return ["--gin_file=gin/experiments/tiny_default.gin", f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.TRAIN_STEPS={steps}", "--gin.BATCH_SIZE=8", "--gin.EVAL_EVERY=0",
            "--gin.train.log_every=1", "--gin.CheckpointConfig.save_every=2", _LENGTHS,
            "--gin.t5_1_1_tiny/T5Config.d_model=64", "--gin.t5_1_1_tiny/T5Config.d_ff=128",
            "--gin.t5_1_1_tiny/T5Config.d_kv=16",
            "--gin.t5_1_1_tiny/T5Config.num_encoder_layers=1",
            "--gin.t5_1_1_tiny/T5Config.num_decoder_layers=1"]


def _online_ssr_args(model_dir, teacher_dir, steps):
    # Per step 16 slots of 32/8 tokens: 8 rewritten by the teacher + 8 span corruption.
    return ["--gin_file=gin/experiments/default_student_ssr.gin",
            f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TEACHER_CHECKPOINT='{teacher_dir}'",
            f"--gin.TRAIN_STEPS={steps}", "--gin.BATCH_SIZE=8",
            "--gin.SSR_SPAN_CORRUPTION_EXAMPLES=8", "--gin.train.log_every=1",
            "--gin.SsrStageConfig.probe_every=0", _LENGTHS,
            "--gin.ssr_student/T5Config.num_encoder_layers=1",
            "--gin.ssr_student/T5Config.num_decoder_layers=1"]


@pytest.mark.slow
def test_two_processes_train_like_one_and_checkpoint_restores_in_one(tmp_path):
    sc2, ssr2 = tmp_path / "sc_2proc", tmp_path / "ssr_2proc"
    sc1, ssr1, resumed = tmp_path / "sc_1proc", tmp_path / "ssr_1proc", tmp_path / "resumed"
    # 2 processes: span corruption to step 2, a restart that resumes to step 4, then online
    # SSR with the step-4 model as the teacher.
    spec2 = tmp_path / "spec2.json"
    spec2.write_text(json.dumps({"runs": [_span_corruption_args(sc2, 2),
                                          _span_corruption_args(sc2, 4),
                                          _online_ssr_args(ssr2, sc2, 3)],
                                 "record_teacher": str(tmp_path / "teacher_2proc")}))
    procs, logs = _start_pair(["train", str(spec2)], tmp_path, "train")
    rcs = _wait(procs, logs, timeout=540)
    assert rcs == [0, 0], "\n".join(_tail(f) for f in logs)
    worker_pids = [int(re.search(r"\(pid (\d+)\)", open(f).read()).group(1)) for f in logs]

    # 1 process, 8 devices, reading both hosts' shards; then the 2-process checkpoint is
    # restored and trained on in a single process.
    shutil.copytree(sc2, resumed)
    spec1 = tmp_path / "spec1.json"
    spec1.write_text(json.dumps({
            "emulate_hosts": 2,
            "runs": [_span_corruption_args(sc1, 4), _online_ssr_args(ssr1, sc2, 3),
                     _span_corruption_args(resumed, 5)],
            "compare_params": [[str(sc1), str(sc2)], [str(ssr1), str(ssr2)]],
            "out": str(tmp_path / "compare.json"),
            "record_teacher": str(tmp_path / "teacher_1proc")}))
    ref_log = tmp_path / "reference.log"
    ref = _start(["train", str(spec1)], _env(8, tmp_path), ref_log)
    assert _wait([ref], [ref_log], timeout=400) == [0], _tail(ref_log)

    for two, one, steps in ((sc2, sc1, 4), (ssr2, ssr1, 3)):
        loss2, loss1 = _losses(two), _losses(one)
        assert sorted(loss2) == sorted(loss1) == list(range(1, steps + 1))
        for step in loss1:
            assert loss2[step] == pytest.approx(loss1[step], rel=1e-5, abs=1e-6), (two, step)
    assert _losses(sc1)[4] < _losses(sc1)[1]  # it trains
    # The teacher, sharded over both processes, sampled exactly what it samples in one
    # (its fills only reach the student when well-formed, so compare its raw outputs).
    two = [np.load(tmp_path / f"teacher_2proc_{i}.npz") for i in range(2)]
    one = np.load(tmp_path / "teacher_1proc_0.npz")
    for key in ("inputs", "outputs"):
        both = np.concatenate([two[0][key], two[1][key]], axis=1)  # [step, row, length]
        assert both.shape[:2] == (3, 8) and np.array_equal(both, one[key]), key
    assert np.count_nonzero(one["outputs"]) > 0
    diffs = json.loads((tmp_path / "compare.json").read_text())["param_max_abs_diff"]
    assert max(diffs) < 1e-4, diffs

    # Per host: each read its own data shard; each wrote its own checkpoint shards;
    # only process 0 wrote TensorBoard/metrics and the progress lines.
    with open(sc2 / "checkpoints" / "4" / "data_state" / "metadata") as f:
        hosts = json.load(f)["hosts"]
    assert [h["pipeline"]["settings"]["shard"] for h in hosts] == [[0, 2], [1, 2]]
    params_dir = os.listdir(sc2 / "checkpoints" / "4" / "params")
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(params_dir), params_dir
    events = [n for d in (sc2, ssr2) for n in os.listdir(d / "train") if "tfevents" in n]
    assert events and all(f".{worker_pids[0]}." in n for n in events), (events, worker_pids)
    assert "step 1/" in open(logs[0]).read() and "step 1/" not in open(logs[1]).read()

    # The single process resumed the 2-process checkpoint and trained one more step.
    reference = open(ref_log).read()
    assert f"resumed from step 4 in {resumed}" in reference
    assert math.isfinite(_losses(resumed)[5])


# --- failures ----------------------------------------------------------------------------------
def _wait_for_steps(procs, logs, step, timeout=150):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(f"step {step}\n" in open(f).read() for f in logs):
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        p.kill()
        p.wait()
    pytest.fail(f"workers did not reach step {step}\n" + "\n".join(_tail(f) for f in logs))


@pytest.mark.parametrize("victim", [1, 0], ids=["worker_killed", "coordinator_killed"])
def test_killed_process_makes_the_other_exit(tmp_path, victim):
    extra = {"SSR_JAX_HEARTBEAT_TIMEOUT_S": HEARTBEAT_S}
    procs, logs = _start_pair(["collectives", "100000"], tmp_path, "kill", (extra, extra))
    _wait_for_steps(procs, logs, 3)
    procs[victim].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    survivor = procs[1 - victim]
    rc = _wait([survivor], [logs[1 - victim]], timeout=EXIT_BOUND_S)[0]
    took = time.monotonic() - killed_at
    procs[victim].wait()
    assert rc != 0, _tail(logs[1 - victim])
    assert took < EXIT_BOUND_S
    # Either JAX's coordination service aborts it (missed heartbeats, closed socket) or its
    # collective fails first and fail_fast ends it; both say why.
    text = open(logs[1 - victim]).read()
    assert ("distributed service detected fatal errors" in text
            or "failed; exiting now so that the other processes stop too" in text), text[-2000:]


def test_process_that_raises_exits_at_once_and_stops_the_other(tmp_path):
    # Without fail_fast the raising process would sit at JAX's shutdown barrier (5 min)
    # while the other blocks in the next collective.
    extra = {"SSR_JAX_HEARTBEAT_TIMEOUT_S": HEARTBEAT_S}
    procs, logs = _start_pair(["collectives", "100000", "1", "5", "raise"], tmp_path, "raise",
                              (extra, extra))
    start = time.monotonic()
    rcs = _wait(procs, logs, timeout=150 + EXIT_BOUND_S)
    assert rcs[1] == distributed.EXIT_ERROR, _tail(logs[1])
    assert rcs[0] != 0, _tail(logs[0])
    assert time.monotonic() - start < 150 + EXIT_BOUND_S
    text = open(logs[1]).read()
    assert "RuntimeError: injected failure at step 5" in text
    assert "failed; exiting now so that the other processes stop too" in text


def test_hung_process_trips_the_other_ones_step_watchdog(tmp_path):
    # Process 1 stays alive (heartbeats keep flowing) but stops joining collectives;
    # process 0 blocks in one until its step watchdog (5 s) ends it.
    procs, logs = _start_pair(["collectives", "100000", "1", "5", "hang"], tmp_path, "hang",
                              ({"SSR_JAX_STEP_TIMEOUT_S": 5}, {"SSR_JAX_STEP_TIMEOUT_S": 0}))
    rc0 = _wait(procs[:1], logs[:1], timeout=150 + EXIT_BOUND_S)[0]
    assert rc0 == distributed.EXIT_WATCHDOG, _tail(logs[0])
    assert "no training step finished in" in open(logs[0]).read()
    # Its coordinator gone, the hung process is stopped by the coordination service.
    rc1 = _wait(procs[1:], logs[1:], timeout=EXIT_BOUND_S)[0]
    assert rc1 != 0


def test_local_multiprocess_script_stops_the_group_and_restarts_it(tmp_path):
    env = _env(4, tmp_path, SSR_JAX=f"{sys.executable} {WORKER}", LOG_DIR=tmp_path / "logs",
               PORT=_free_port(), HEARTBEAT_TIMEOUT_S=HEARTBEAT_S, KILL_GRACE_S=5)
    script = os.path.join(REPO, "launch", "local_multiprocess.sh")
    args = [script, "collectives", "100000", "1", "3", "raise"]
    failed = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=150 + EXIT_BOUND_S)
    assert failed.returncode == distributed.EXIT_ERROR, failed.stdout + failed.stderr
    assert "failed (exit 1); stopping the others" in failed.stderr
    # With a restart budget the group is run again (the injected failure happens once).
    env.update(MAX_RESTARTS="1", FAIL_ONCE_MARKER=str(tmp_path / "failed_once"),
               LOG_DIR=str(tmp_path / "logs2"), PORT=str(_free_port()))
    args[2] = "8"
    restarted = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=150 + EXIT_BOUND_S)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "restarting all processes (attempt 2 of 2)" in restarted.stderr
    assert "process 0 step 8" in restarted.stdout


# Stand-ins for ssr-jax, srun and gcloud: the launchers' restart decisions without a cluster.
_STAND_IN = """#!/usr/bin/env bash
# ssr-jax: exits with the next of $STATUSES, one per run (runs are lines of $RUNS_FILE).
echo "$*" >> "$RUNS_FILE"
statuses=($STATUSES)
n=$(wc -l < "$RUNS_FILE")
exit "${statuses[$((n - 1))]}"
"""
_SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""
_GCLOUD = """#!/usr/bin/env bash
for a in "$@"; do case "$a" in --command=*) cmd="${a#--command=}" ;; esac; done
case "$cmd" in *bin/ssr-jax*) exec "$STAND_IN" ;; *) exit 0 ;; esac
"""


def _executable(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("launcher", ["local_multiprocess.sh", "gpu_slurm.sbatch",
                                      "tpu_pod.sh"])
@pytest.mark.parametrize("statuses,max_restarts,final,runs", [
        ("75 0", 3, 0, 2),  # preempted (SIGTERM): rerun, then finished
        ("75 3 1 0", 3, 0, 4),  # preempted, watchdog, error: each rerun
        ("2 0", 3, 2, 1),  # bad input: a rerun would fail the same way
        ("0", 3, 0, 1),  # finished: stop
        ("75 75 0", 1, 75, 2),  # the restart budget is spent
])
def test_launchers_restart_a_preempted_or_failed_run_and_stop_when_done(
        tmp_path, launcher, statuses, max_restarts, final, runs):
    stand_in = _executable(tmp_path / "venv" / "bin" / "ssr-jax", _STAND_IN)
    fake_bin = tmp_path / "bin"
    _executable(fake_bin / "srun", _SRUN)
    _executable(fake_bin / "gcloud", _GCLOUD)
    env = dict(os.environ, STATUSES=statuses, RUNS_FILE=str(tmp_path / "runs"),
               MAX_RESTARTS=str(max_restarts), STAND_IN=stand_in, SSR_JAX=stand_in,
               NUM_PROCESSES="1", LOG_DIR=str(tmp_path / "logs"), KILL_GRACE_S="1",
               VENV=str(tmp_path / "venv"), TPU_NAME="pod", ZONE="zone",
               PATH=f"{fake_bin}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", os.path.join(REPO, "launch", launcher), "train",
                           "--gin.TRAIN_STEPS=5"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == final, proc.stdout + proc.stderr
    assert len((tmp_path / "runs").read_text().splitlines()) == runs, proc.stderr
    if statuses.startswith("75") and runs > 1:
        assert "preempted" in proc.stderr


# --- configuration (no subprocess) -------------------------------------------------------------
def test_flags_environment_and_watchdog_configuration(monkeypatch):
    for k in [k for k in os.environ if k.startswith("SSR_JAX_")]:
        monkeypatch.delenv(k)
    cfg = distributed.config_from_strings({"coordinator_address": "10.0.0.1:1234",
                                           "num_processes": "4", "process_id": "3",
                                           "heartbeat_timeout_s": "30", "multiprocess": "true"})
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == ("10.0.0.1:1234", 4, 3)
    assert cfg.heartbeat_timeout_s == 30 and cfg.multiprocess
    with pytest.raises(UserError, match="--num_processes='two'"):
        distributed.config_from_strings({"num_processes": "two"})
    # Flags win over SSR_JAX_* variables, which fill what flags leave unset.
    monkeypatch.setenv("SSR_JAX_COORDINATOR_ADDRESS", "127.0.0.1:9")
    monkeypatch.setenv("SSR_JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("SSR_JAX_PROCESS_ID", "0")
    merged = distributed._from_env(  # pylint: disable=protected-access
            distributed.DistributedConfig(process_id=1))
    assert (merged.coordinator_address, merged.num_processes, merged.process_id) == \
        ("127.0.0.1:9", 2, 1)
    monkeypatch.delenv("SSR_JAX_PROCESS_ID")
    with pytest.raises(UserError, match="missing: process_id"):
        distributed.initialize()
    monkeypatch.setenv("SSR_JAX_PROCESS_ID", "5")
    with pytest.raises(UserError, match="outside"):
        distributed.initialize()
    monkeypatch.setenv("SSR_JAX_NUM_PROCESSES", "x")
    with pytest.raises(UserError, match="SSR_JAX_NUM_PROCESSES"):
        distributed.initialize()
    # One process: nothing to join; no watchdog unless a step timeout is set explicitly.
    for k in ("SSR_JAX_COORDINATOR_ADDRESS", "SSR_JAX_NUM_PROCESSES", "SSR_JAX_PROCESS_ID"):
        monkeypatch.delenv(k)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    assert distributed.initialize() is False
    assert not isinstance(distributed.step_watchdog(), distributed.StepWatchdog)
    monkeypatch.setenv("SSR_JAX_STEP_TIMEOUT_S", "30")
    watchdog = distributed.step_watchdog()
    assert isinstance(watchdog, distributed.StepWatchdog)
    assert (watchdog.timeout_s, watchdog.first_timeout_s) == (30.0, 90.0)
    with watchdog:  # kicked in time: nothing happens
        watchdog.kick(1)
