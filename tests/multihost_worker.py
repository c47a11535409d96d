"""Subprocess body for tests/test_multihost.py (not a test module itself).

  python tests/multihost_worker.py train SPEC.json
      Runs `ssr-jax train` (ssr_jax.cli.train.main) once per argv list in
      SPEC["runs"], in this one process: joined to a multi-process run through the
      SSR_JAX_* environment exactly as launch/local_multiprocess.sh does it, or alone.
      With SPEC["emulate_hosts"] = H (single process only) the input pipelines read what
      H hosts would read - host h's shard (h, H) with 1/H of the batch, concatenated in host
      order - and the online SSR stage packs each emulated host's examples separately, so
      the global batches equal those of an H-process run (see `emulate_hosts`).
      With SPEC["compare_params"] = [[dir_a, dir_b], ...] it then loads both checkpoints'
      params in this process and writes the max abs differences to SPEC["out"].
      With SPEC["record_teacher"] = PREFIX it saves, per online SSR step, the teacher's
      inputs and this process's rows of its sampled outputs to PREFIX_<process>.npz.

  python tests/multihost_worker.py collectives STEPS [FAIL_PROCESS FAIL_STEP raise|hang]
      A light stand-in for the train loop: joins the run (SSR_JAX_* environment), then
      STEPS iterations of a jitted cross-process sum under the trainer's failure handling
      (distributed.fail_fast + distributed.step_watchdog); process FAIL_PROCESS raises or
      hangs (alive, heartbeating) at FAIL_STEP - only once when $FAIL_ONCE_MARKER names a
      file (created at the failure; a restarted run then succeeds). Prints
      "pid P process I step S" lines.
"""
import copy
import dataclasses
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


# --- emulating H hosts in one process ---------------------------------------------------------
class HostShardsPipeline:
    """What H hosts' InputPipelines read, in one process: host h's pipeline has shard
    (h, H) and batch_size / H; batches and example lists are concatenated in host order
    (the order of the rows of the global batch that hosts build)."""

    def __init__(self, make, num_hosts, args, kwargs):
        batch = int(kwargs["batch_size"])
        if batch % num_hosts:
            raise ValueError(f"batch {batch} is not divisible by {num_hosts} emulated hosts")
        self.hosts = [make(*args, **{**kwargs, "batch_size": batch // num_hosts,
                                     "shard_info": (h, num_hosts)})
                      for h in range(num_hosts)]

    def __iter__(self):
        return self

    def __next__(self):
        import numpy as np  # pylint: disable=import-outside-toplevel
        parts = [next(p) for p in self.hosts]
        return {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}

    next = __next__

    def next_examples(self, n):
        if n % len(self.hosts):
            raise ValueError(f"{n} examples do not split over {len(self.hosts)} hosts")
        return [ex for p in self.hosts for ex in p.next_examples(n // len(self.hosts))]

    def get_state(self, include_iterator=True):
        return {"hosts": [p.get_state(include_iterator) for p in self.hosts]}

    def set_state(self, state):
        for p, s in zip(self.hosts, state["hosts"]):
            p.set_state(s)


def emulate_hosts(num_hosts: int):
    """Patches the pipeline class and the SSR stage's packing for `num_hosts` hosts."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    from ssr_jax.data import pipeline as pipeline_lib  # pylint: disable=import-outside-toplevel
    from ssr_jax.ssr import stage as online  # pylint: disable=import-outside-toplevel

    real = pipeline_lib.InputPipeline

    def make(*args, **kwargs):
        if tuple(kwargs.get("shard_info") or (0, 1)) != (0, 1):
            raise AssertionError(f"single process asked for shard {kwargs['shard_info']}")
        return HostShardsPipeline(real, num_hosts, args, kwargs)

    pipeline_lib.InputPipeline = make
    real_pack = online.SSRStage.pack

    def pack(self, examples):
        # finish() gives the step's n rewritten examples, then its k span-corruption ones;
        # each emulated host packs its 1/H of both into its 1/H of the rows.
        n, k = self.plan.ssr_examples, self.plan.sc_examples
        assert len(examples) == n + k, (len(examples), n, k)
        sub = copy.copy(self)
        sub.plan = dataclasses.replace(self.plan, host_rows=self.plan.host_rows // num_hosts)
        parts = []
        for h in range(num_hosts):
            group = (list(examples[h * n // num_hosts:(h + 1) * n // num_hosts])
                     + list(examples[n + h * k // num_hosts:n + (h + 1) * k // num_hosts]))
            parts.append(real_pack(sub, group))
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    online.SSRStage.pack = pack


def record_teacher_calls():
    """Keeps (teacher inputs, this process's rows of the teacher output) of every online SSR
    step; returns the list they are appended to."""
    from ssr_jax.ssr import stage  # pylint: disable=import-outside-toplevel
    calls = []
    real_result = stage.TeacherCall.result

    def result(self):
        out = real_result(self)
        calls.append((self.inputs.copy(), self.partitioner.host_rows(self.output)))
        return out

    stage.TeacherCall.result = result
    return calls


# --- modes ---------------------------------------------------------------------------------
def train_mode(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("emulate_hosts"):
        emulate_hosts(int(spec["emulate_hosts"]))
    calls = record_teacher_calls() if spec.get("record_teacher") else None
    from ssr_jax.cli.train import main as train_main  # pylint: disable=C0415
    for argv in spec["runs"]:
        rc = train_main(list(argv))
        if rc:
            return rc
    if calls:
        import jax  # pylint: disable=import-outside-toplevel
        import numpy as np  # pylint: disable=import-outside-toplevel
        np.savez(f"{spec['record_teacher']}_{jax.process_index()}.npz",
                 inputs=np.stack([c[0] for c in calls]), outputs=np.stack([c[1] for c in calls]))
    print("worker: all runs finished", flush=True)
    if spec.get("compare_params"):
        diffs = [_param_diff(a, b) for a, b in spec["compare_params"]]
        with open(spec["out"], "w") as f:
            json.dump({"param_max_abs_diff": diffs}, f)
    return 0


def _param_diff(dir_a: str, dir_b: str) -> float:
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from ssr_jax.train import checkpoints  # pylint: disable=import-outside-toplevel
    a, b = checkpoints.load_params(dir_a), checkpoints.load_params(dir_b)
    if jax.tree.structure(a) != jax.tree.structure(b):
        return float("inf")
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def collectives_mode(steps: int, fail_process: int = -1, fail_step: int = -1,
                     fail_mode: str = "") -> int:
    from ssr_jax import distributed  # pylint: disable=import-outside-toplevel
    with distributed.fail_fast("multihost_worker"):
        distributed.initialize()
        import jax  # pylint: disable=import-outside-toplevel
        import numpy as np  # pylint: disable=import-outside-toplevel
        from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=C0415
        me, local = jax.process_index(), jax.local_device_count()
        sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
        total = jax.jit(lambda x: x.sum())
        with distributed.step_watchdog() as watchdog:
            for step in range(1, steps + 1):
                if me == fail_process and step == fail_step and _first_failure():
                    print(f"pid {os.getpid()} process {me} failing ({fail_mode})", flush=True)
                    if fail_mode == "raise":
                        raise RuntimeError(f"injected failure at step {step}")
                    time.sleep(10 ** 6)  # hang: alive and heartbeating, but no collective
                x = jax.make_array_from_process_local_data(
                        sharding, np.full(local, step, np.float32), (jax.device_count(),))
                value = float(total(x))
                if value != step * jax.device_count():
                    raise AssertionError(f"collective sum {value} at step {step}")
                print(f"pid {os.getpid()} process {me} step {step}", flush=True)
                watchdog.kick(step)
                time.sleep(0.05)
    return 0


def _first_failure() -> bool:
    """False if $FAIL_ONCE_MARKER exists (a restart); else creates it (when set)."""
    marker = os.environ.get("FAIL_ONCE_MARKER")
    if not marker:
        return True
    if os.path.exists(marker):
        return False
    with open(marker, "w"):
        pass
    return True


def main(argv) -> int:
    if argv[:1] == ["train"] and len(argv) == 2:
        return train_mode(argv[1])
    if argv[:1] == ["collectives"] and len(argv) in (2, 5):
        args = [int(argv[1])] + ([int(argv[2]), int(argv[3]), argv[4]] if len(argv) == 5
                                 else [])
        return collectives_mode(*args)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
