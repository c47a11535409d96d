"""launch/gpu_slurm.sbatch under a real SLURM: a one-node cluster on localhost.

The module's fixture starts munged, slurmctld and slurmd (as root, as CI runs) from a
generated slurm.conf: one node "localhost" with 2 CPUs and 2 "GPUs" (gres backed by
/dev/null and /dev/zero; JAX runs on fake CPU devices), one partition, no accounting,
proctrack/linuxproc (no cgroups in a container). It waits until sinfo shows the node idle and
stops everything after, even when a test fails, asserting that no daemon or job process it
started is left. Skipped when the packages are missing (.ci/run installs them) or not root.
Jobs are submitted with sbatch as users do, only scaled down:
  * a stand-in ssr-jax (no JAX) checks the task layout srun gets (per GPU and per node),
    that `scancel --signal=KILL` of the step restarts it on the next coordinator port, and
    that a SIGTERM to the batch script too (`scancel --full`; srun then SIGKILLs its tasks)
    stops the restarts;
  * the real tiny training, 2 tasks x 4 fake devices: `scancel --signal=TERM` (the steps)
    makes both save and exit 75 and the launcher reruns the step; then task 1 is SIGKILLed
    (an OOM kill) and --kill-on-bad-exit ends the step long before the 300 s heartbeat
    timeout; the third run finishes, and every step's loss equals that of 1 process with 8
    devices on the same global batches; each output line names its task.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from test_multihost import _env, _losses, _span_corruption_args, _start, _tail, _wait

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH_SCRIPT = os.path.join(REPO, "launch", "gpu_slurm.sbatch")
VENV = os.path.dirname(os.path.dirname(sys.executable))
NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scancel", "sinfo", "squeue",
          "scontrol")
DAEMONS = ("munged", "slurmctld", "slurmd", "slurmstepd")
MARK = "SSR_SLURM_TEST_ROOT"  # in the daemons' and jobs' environment: finds what we started
# What a test job asks for; the script's #SBATCH lines are for real clusters.
SBATCH_OPTS = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"]
JOB_TIMEOUT_S = 420


def _missing():
    if sys.platform != "linux":
        return "the SLURM test needs Linux"
    absent = [b for b in NEEDED if shutil.which(b) is None]
    if absent:
        return (f"SLURM not installed (missing {', '.join(absent)}): apt-get install "
                "slurm-wlm munge (.ci/run does)")
    if os.geteuid() != 0:
        return "the one-node SLURM cluster runs its daemons as root; run as root (as CI does)"
    if not os.path.exists(os.path.join(VENV, "bin", "ssr-jax")):
        return f"no ssr-jax entry point in {VENV}/bin (make install)"
    return None


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]


def _free_port() -> int:
    import socket  # pylint: disable=import-outside-toplevel
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_conf(root: str) -> str:
    return f"""ClusterName=ssrtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
PlugStackConfig={root}/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SlurmdParameters=config_overrides
# SLURM's default is 30 s; shorter, a killed task's step ends sooner
KillWait=10
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _marked_pids(root: str):
    """Processes whose environment carries our mark: (pid, name)."""
    found = []
    needle = f"{MARK}={root}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/comm") as f:
                found.append((int(pid), f.read().strip()))
        except OSError:
            continue
    return [(p, n) for p, n in found if p != os.getpid()]


class Cluster:
    """munged + slurmctld + slurmd under `root`; clients find it through SLURM_CONF."""

    def __init__(self, root: str):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.daemons = {}
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        self.env = dict(base, SLURM_CONF=self.conf, **{MARK: root})

    def start(self):
        for d in ("munge", "state", "spool", "log"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        os.chmod(os.path.join(self.root, "munge"), 0o755)  # munged wants it searchable
        key = os.path.join(self.root, "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(os.urandom(1024))
        with open(self.conf, "w") as f:
            f.write(_slurm_conf(self.root))
        with open(os.path.join(self.root, "gres.conf"), "w") as f:  # next to slurm.conf
            f.write("Name=gpu File=/dev/null\nName=gpu File=/dev/zero\n")
        open(os.path.join(self.root, "plugstack.conf"), "w").close()
        munge = os.path.join(self.root, "munge")
        self._daemon("munged", ["munged", "--foreground", "--force",
                                f"--socket={munge}/munge.socket", f"--key-file={key}",
                                f"--pid-file={munge}/munged.pid", f"--seed-file={munge}/seed",
                                f"--log-file={self.root}/log/munged.log"])
        self.wait_for(lambda: os.path.exists(f"{munge}/munge.socket"), 30, "munged's socket")
        self._daemon("slurmctld", ["slurmctld", "-D", "-f", self.conf])
        self._daemon("slurmd", ["slurmd", "-D", "-f", self.conf, "-N", "localhost"])
        self.wait_for(lambda: self._node_state() == "idle", 90, "the node to be idle")

    def _daemon(self, name, argv):
        log = open(os.path.join(self.root, "log", f"{name}.out"), "w")
        self.daemons[name] = subprocess.Popen(argv, env=self.env, stdout=log,
                                              stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL,
                                              start_new_session=True)
        log.close()

    def _node_state(self):
        out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.strip()
        for name, proc in self.daemons.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited {proc.returncode}\n{self.logs()}")
        return out

    def wait_for(self, ready, timeout, what):
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        text = []
        for name in self.daemons:
            path = os.path.join(self.root, "log", f"{name}.out")
            lines = open(path, errors="replace").read().splitlines() if os.path.exists(
                    path) else []
            text.append(f"--- {name}:\n" + "\n".join(lines[-15:]))
        return "\n".join(text)

    def run(self, argv, check=True):
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stderr}")
        return proc

    def sbatch(self, job_env, args, opts=()) -> str:
        env = dict(self.env, **{k: str(v) for k, v in job_env.items()})
        out = os.path.join(self.root, "job-%j.out")
        proc = subprocess.run(["sbatch", "--parsable", f"--output={out}", f"--chdir={REPO}",
                               *SBATCH_OPTS, *opts, SBATCH_SCRIPT, *args], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    def output(self, job) -> str:
        path = os.path.join(self.root, f"job-{job}.out")
        return open(path, errors="replace").read() if os.path.exists(path) else ""

    def wait_output(self, job, pattern, after=0, timeout=JOB_TIMEOUT_S):
        """The first match of `pattern` (multiline) in the job's output past offset `after`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.compile(pattern, re.M).search(self.output(job), after)
            if found:
                return found
            if not self.run(["squeue", "-h", "-j", job], check=False).stdout.strip():
                found = re.compile(pattern, re.M).search(self.output(job), after)
                if found:
                    return found
                break
            time.sleep(0.2)
        self.run(["scancel", job], check=False)
        pytest.fail(f"job {job}: no {pattern!r} in its output\n{_job_tail(self.output(job))}")

    def wait_job(self, job, timeout=JOB_TIMEOUT_S):
        """(state, exit code of the batch script) once the job has ended."""
        deadline = time.monotonic() + timeout
        while self.run(["squeue", "-h", "-j", job], check=False).stdout.strip():
            if time.monotonic() > deadline:
                self.run(["scancel", job], check=False)
                pytest.fail(f"job {job} still running after {timeout} s\n"
                            f"{_job_tail(self.output(job))}")
            time.sleep(0.5)
        info = self.run(["scontrol", "show", "job", job]).stdout
        state = re.search(r"JobState=(\S+)", info).group(1)
        return state, int(re.search(r"ExitCode=(\d+):", info).group(1))

    def stop(self):
        """Cancels every job, stops the daemons, kills anything left; returns what was left."""
        if self.daemons.get("slurmctld") and self.daemons["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--user=root"], check=False)
            deadline = time.monotonic() + 30
            while (time.monotonic() < deadline and
                   self.run(["squeue", "-h"], check=False).stdout.strip()):
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.daemons.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # A finished job's slurmstepd may still be cleaning up: give it a moment.
        deadline = time.monotonic() + 15
        while _marked_pids(self.root) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _marked_pids(self.root)
        for pid, _ in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return left


def _job_tail(text, n=40) -> str:
    lines = [ln for ln in text.splitlines()
             if not re.match(r"^\d+: (I0000|W0000|\[Gloo\]|WARNING: All log)", ln)]
    return "\n".join(lines[-n:])


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = Cluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
        yield cluster
    finally:
        left = cluster.stop()
        # Every daemon this module started, and each job's slurmstepd and tasks, are gone.
        running = [p for p in cluster.daemons.values() if p.poll() is None]
        still = _marked_pids(cluster.root)
        assert not left and not running and not still, (
                f"left running after the SLURM test: {left or still or running}")


# --- the launcher's layout and signal handling, with a stand-in ssr-jax ----------------------
_STAND_IN = """#!/usr/bin/env bash
# Reports what the task sees; MODE=wait (step 0 only with WAIT_STEP0=1) waits for a signal.
echo "run step=$SLURM_STEP_ID task=$SLURM_PROCID of $SLURM_NTASKS local=$SLURM_LOCALID" \\
     "nodes=$SLURM_STEP_NODELIST port=$JAX_COORDINATOR_PORT" \\
     "device_ids=${SSR_JAX_LOCAL_DEVICE_IDS:-} cpus=$(nproc) args=$*"
if [ "${MODE:-}" = wait ] && { [ "${WAIT_STEP0:-0}" = 0 ] || [ "$SLURM_STEP_ID" = 0 ]; }; then
  trap 'echo "task $SLURM_PROCID got SIGTERM"; exit 75' TERM
  touch "$READY_DIR/$SLURM_STEP_ID.$SLURM_PROCID"
  while :; do sleep 0.1; done
fi
exit 0
"""


def _runs(text):
    return re.findall(r"^(\d+): run step=(\d+) task=(\d+) of (\d+) local=(\d+) nodes=(\S+) "
                      r"port=(\d+) device_ids=(\S*) cpus=(\d+) args=(.*)$", text, re.M)


def test_launcher_layout_kill_and_term_under_slurm(slurm, tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "ssr-jax").write_text(_STAND_IN)
    (venv / "bin" / "ssr-jax").chmod(0o755)
    ready = tmp_path / "ready"
    ready.mkdir()
    base = {"VENV": venv, "READY_DIR": ready}

    # One process per GPU: 2 tasks, one CPU each, GPUS_PER_NODE from the allocation; one per
    # node: a single task that drives both GPUs and gets both CPUs.
    per_gpu = slurm.sbatch(base, ["--gin.TRAIN_STEPS=5"])
    per_node = slurm.sbatch(dict(base, PER_GPU=0), ["--gin.TRAIN_STEPS=5"])
    for job, tasks, device_ids, cpus in ((per_gpu, 2, "", 1), (per_node, 1, "0,1", 2)):
        assert slurm.wait_job(job) == ("COMPLETED", 0), slurm.output(job)
        runs = _runs(slurm.output(job))
        assert sorted(r[0] for r in runs) == [str(t) for t in range(tasks)], slurm.output(job)
        for label, step, task, ntasks, local, nodes, port, ids, ncpu, args in runs:
            assert (label, step, ntasks, local, nodes) == (task, "0", str(tasks), task,
                                                           "localhost")
            # The script's formula, as JAX's own default: a port from the job id.
            assert int(port) == int(job) % 4096 + 61440
            assert (ids, int(ncpu), args) == (device_ids, cpus, "train --gin.TRAIN_STEPS=5")

    # scancel --signal=KILL of the step: srun fails, the step is rerun on the next port.
    killed = slurm.sbatch(dict(base, MODE="wait", WAIT_STEP0=1, MAX_RESTARTS=1), [])
    slurm.wait_for(lambda: len(os.listdir(ready)) == 2, 120, "both tasks of step 0")
    slurm.run(["scancel", "--signal=KILL", f"{killed}.0"])
    assert slurm.wait_job(killed) == ("COMPLETED", 0), slurm.output(killed)
    text = slurm.output(killed)
    assert "job step failed (exit 137); restart 1 of 1" in text, text
    ports = {(run[1], int(run[6])) for run in _runs(text)}
    assert ports == {("0", int(killed) % 4096 + 61439), ("1", int(killed) % 4096 + 61440)}

    # SIGTERM to the batch script too (scancel --full): srun, hit as well, SIGKILLs its tasks
    # (hence the documented `scancel --signal=TERM JOBID`); the script does not rerun the
    # step in the ending allocation.
    for name in os.listdir(ready):
        os.unlink(ready / name)
    ending = slurm.sbatch(dict(base, MODE="wait", MAX_RESTARTS=3), [])
    slurm.wait_for(lambda: len(os.listdir(ready)) == 2, 120, "both tasks of step 0")
    slurm.run(["scancel", "--full", "--signal=TERM", ending])
    state, code = slurm.wait_job(ending)
    text = slurm.output(ending)
    assert code == 137, (state, text)
    assert "batch script got SIGTERM" in text, text
    assert "job step exited 137; not restarting: the job is ending" in text, text
    assert {r[1] for r in _runs(text)} == {"0"}, text


# --- the real training: preempted, a task killed, resumed; losses as 1 process ---------------
STEPS = 16


def _train_args(model_dir):
    return [re.sub(r"save_every=\d+", "save_every=4", a)
            for a in _span_corruption_args(model_dir, STEPS)]


def test_training_job_survives_preemption_and_a_killed_task(slurm, tmp_path, request):
    # Reference: 1 process, 8 devices, reading both hosts' shards (tests/multihost_worker.py),
    # run while the job waits on SLURM (its own compile cache: no race with the job's).
    ref_dir, run_dir = tmp_path / "one_process", tmp_path / "slurm_run"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"emulate_hosts": 2, "runs": [_train_args(ref_dir)]}))
    ref_log = tmp_path / "reference.log"
    (tmp_path / "ref").mkdir()
    ref = _start(["train", str(spec)], _env(8, tmp_path / "ref"), ref_log)
    request.addfinalizer(lambda: ref.poll() is None and (ref.kill(), ref.wait()))

    job_env = {k: v for k, v in _env(4, tmp_path).items() if k.startswith(("XLA_", "JAX_"))}
    job_env.update(VENV=VENV, MAX_RESTARTS=2, HEARTBEAT_TIMEOUT_S=300, PYTHONUNBUFFERED=1)
    job = slurm.sbatch(job_env, _train_args(run_dir))

    # Preemption as `scancel --signal=TERM JOB` sends it: every task saves, exits 75.
    slurm.wait_output(job, r"^0: step 3/")
    slurm.run(["scancel", "--signal=TERM", job])
    restart1 = slurm.wait_output(job, r"job step was preempted \(exit 75\); restart 1 of 2")
    first = slurm.wait_output(job, r"^0: resumed from step (\d+) in ", restart1.end())
    saved = int(first.group(1))
    text = slurm.output(job)[:restart1.start()]
    for task in (0, 1):
        assert f"{task}: preempted: saved step {saved};" in text, _job_tail(text)

    # Then task 1 dies (SIGKILL, as an OOM kill): --kill-on-bad-exit ends the step; with a
    # 300 s heartbeat timeout nothing else would stop task 0 this soon.
    slurm.wait_output(job, rf"^0: step {saved + 2}/", first.end())
    pid = int(slurm.wait_output(job, r"^1: jax.distributed: process 1 of 2 \(pid (\d+)\)",
                                restart1.end()).group(1))
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    restart2 = slurm.wait_output(job, r"job step failed \(exit (\d+)\); restart 2 of 2",
                                 first.end())
    assert time.monotonic() - killed_at < 120, "the step outlived its killed task"
    assert int(restart2.group(1)) != 75
    second = slurm.wait_output(job, r"^0: resumed from step (\d+) in ", restart2.end())
    assert saved <= int(second.group(1)) < STEPS

    assert slurm.wait_job(job) == ("COMPLETED", 0), _job_tail(slurm.output(job))
    text = slurm.output(job)
    # The task's wrapper (see the script) passes its SIGKILL on as exit status 137.
    assert "task 1: Exited with exit code 137" in text, _job_tail(text)
    # A preempted step is never cut short: no task was killed at its first exit.
    preempted = text[:restart1.start()]
    assert "Killed" not in preempted and "exit code 75" not in preempted, _job_tail(preempted)
    # Every line a task wrote names it: 3 runs x 2 tasks joined, each under its label.
    joined = re.findall(r"^(\d+): jax.distributed: process (\d+) of 2", text, re.M)
    assert len(joined) == 6 and all(label == proc for label, proc in joined), joined

    # Every step's loss (after the reruns, the last one logged) equals the single process's.
    assert _wait([ref], [ref_log], timeout=300) == [0], _tail(ref_log)
    two, one = _losses(run_dir), _losses(ref_dir)
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step
    assert one[STEPS] < one[1]  # it trains
