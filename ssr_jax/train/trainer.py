"""The training loop (`train`) and checkpoint evaluation (`evaluate`).

`train` reads as one screen; each detail (state setup, logging, eval, preemption) is a named
function below it. The model is any `BaseModel`; everything about devices goes through the
`Partitioner`; batches come through an `InputStage` (see input_stage.py).
"""
import contextlib
import dataclasses
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import jax
import numpy as np

from ssr_jax import distributed
from ssr_jax.errors import UserError
from ssr_jax.models.base import BaseModel
from ssr_jax.partitioning import Partitioner
from ssr_jax.train import checkpoints as ckpt
from ssr_jax.train import metrics as metrics_lib
from ssr_jax.train import steps as steps_lib
from ssr_jax.train import train_state as ts
from ssr_jax.data.dataset import DatasetConfig, host_batches
from ssr_jax.train.input_stage import InputStage, PipelineInputStage
from ssr_jax.train.optimizers import Optimizer

StageFactory = Callable[[DatasetConfig, Partitioner, int], InputStage]


class TrainingDiverged(UserError):
    """Too many consecutive steps with a non-finite loss, gradient or updated params."""


@dataclasses.dataclass
class TrainResult:
    state: ts.TrainState
    train_metrics: List[Dict[str, float]]  # one dict per log step ("step" included)
    eval_metrics: List[Dict[str, float]]
    preempted: bool = False


def train(*, model: BaseModel, model_dir: str, train_dataset: DatasetConfig, train_steps: int,
          optimizer: Optimizer, partitioner: Partitioner,
          checkpoint: ckpt.CheckpointConfig = ckpt.CheckpointConfig(),
          eval_dataset: Optional[DatasetConfig] = None, eval_every: int = 0, eval_steps: int = 20,
          log_every: int = 50, num_microbatches: int = 1, seed: int = 0,
          initial_checkpoint_path: Optional[str] = None,
          initial_checkpoint_params_only: bool = False, replay_initial_data: bool = False,
          input_stage_factory: Optional[StageFactory] = None,
          max_consecutive_nonfinite: int = 20,
          peak_flops_per_device: Optional[float] = None) -> TrainResult:
    """Trains to `train_steps`, resuming from MODEL_DIR/checkpoints when it has a checkpoint.

    From `initial_checkpoint_path` (T5X's convention): the run starts at the checkpoint's
    step S with its optimizer state when that fits the optimizer, so the learning-rate
    schedule continues; `train_steps` is the total (S + the steps to train). Its data is
    shuffled with `data_seed(seed, S)`, another order than the checkpoint's run read, unless
    `replay_initial_data`. `initial_checkpoint_params_only`: take the params only and start at
    step 0 with a fresh optimizer state."""
    run = _Run.setup(**locals())
    state, stage, result = run.state, run.stage, TrainResult(run.state, [], [])
    step = int(jax.device_get(state.step))
    if step >= train_steps:
        print(f"already at step {step} (TRAIN_STEPS={train_steps}) in {model_dir}: nothing to "
              "train; raise TRAIN_STEPS to train further.", flush=True)
        run.close()
        return result
    try:
        state = _loop(run, result, state, step, train_steps, eval_every, log_every)
    except BaseException:
        # Divergence, an error, Ctrl-C: let the in-flight async save finish (the latest
        # checkpoint stays restorable, no *-tmp dir is left) and close the rest quietly.
        run.close(quietly=True)
        raise
    run.close()
    result.state = state
    return result


def _loop(run: "_Run", result: TrainResult, state: ts.TrainState, step: int, train_steps: int,
          eval_every: int, log_every: int) -> ts.TrainState:
    """Steps from `step` to `train_steps` (or a preemption); returns the last state."""
    stage = run.stage
    batch = stage.start_next().result()
    window, tick, paused = [], time.time(), 0.0  # paused: eval time inside a log window
    # Multi-process: exits if a step hangs (a stuck peer or collective), see distributed.py.
    watchdog = distributed.step_watchdog()
    with _preemption_flag() as preempted, watchdog:
        while step < train_steps:
            stop = preempted(step)
            save = stop or run.checkpointer.should_save(step + 1) or step + 1 == train_steps
            # The position of batch t+1, the first one a checkpoint after this step lacks.
            data_state = stage.get_state() if save else None
            pending = stage.start_next() if step + 1 < train_steps else None  # t+1 first
            state, step_metrics = run.train_step(state, batch)  # async dispatch
            step += 1
            window.append(step_metrics)
            batch = pending.result() if pending is not None else None
            if step % log_every == 0 or step == train_steps or stop:
                result.train_metrics.append(run.log_window(step, window, tick + paused))
                window, tick, paused = [], time.time(), 0.0
            if save:
                run.checkpointer.save(state, data_state)
            if eval_every and (step % eval_every == 0 or step == train_steps):
                eval_start = time.time()
                result.eval_metrics.append(run.evaluate(state.params, step))
                paused += time.time() - eval_start
            if stop:
                print(f"preempted: saved step {step}; rerun the same command to resume.",
                      flush=True)
                result.preempted = True
                break
            watchdog.kick(step)
    return state


@dataclasses.dataclass
class _Run:
    """Everything the loop needs, built once."""

    state: ts.TrainState
    stage: Optional[InputStage]  # None (and so are the step, logger, evaluate): run finished
    train_step: Optional[Callable]
    checkpointer: ckpt.Checkpointer
    logger: Optional[metrics_lib.MetricsLogger]
    evaluate: Optional[Callable[[Any, int], Dict[str, float]]]
    max_consecutive_nonfinite: int

    @classmethod
    def setup(cls, *, model, model_dir, train_dataset, train_steps, optimizer, partitioner,
              checkpoint, eval_dataset, eval_every, eval_steps, log_every, num_microbatches,
              seed, initial_checkpoint_path, initial_checkpoint_params_only,
              replay_initial_data, input_stage_factory, max_consecutive_nonfinite,
              peak_flops_per_device) -> "_Run":
        if train_steps <= 0 or log_every <= 0:
            raise UserError(f"TRAIN_STEPS={train_steps} and log_every={log_every} must be > 0.")
        if max_consecutive_nonfinite < 1:
            raise UserError(
                    f"train.max_consecutive_nonfinite={max_consecutive_nonfinite} must be >= 1: "
                    "training stops after that many consecutive skipped (non-finite) steps; "
                    "to never stop, set it above TRAIN_STEPS.")
        os.makedirs(model_dir, exist_ok=True)
        print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}, "
              f"{jax.process_count()} process(es); mesh {partitioner.mesh_sizes}", flush=True)
        partitioner.data_layout(train_dataset.batch_size, num_microbatches)  # validate early
        abstract = ts.abstract_state(model, optimizer)
        shardings = ts.state_shardings(partitioner, model, abstract)
        checkpointer = ckpt.Checkpointer(os.path.join(model_dir, ckpt.CHECKPOINTS_SUBDIR),
                                         checkpoint, model_config=model.config_dict())
        start = _Start(initial_checkpoint_path, initial_checkpoint_params_only,
                       replay_initial_data, seed, train_steps)
        state, data_state, train_dataset = start.state(
                model, optimizer, partitioner, abstract, shardings, checkpointer, train_dataset)
        step = int(jax.device_get(state.step))
        if step >= train_steps:  # a finished run: nothing more is built
            return cls(state, None, None, checkpointer, None, None, max_consecutive_nonfinite)
        # Logs past the restored step came from steps that are trained again now.
        metrics_lib.drop_steps_after(model_dir, step)
        factory = input_stage_factory or PipelineInputStage.from_config
        stage = factory(train_dataset, partitioner, num_microbatches)
        if data_state is not None:
            stage.set_state(data_state)
        train_step = steps_lib.make_train_step(model, optimizer, partitioner, shardings,
                                               num_microbatches)
        lengths = dict(train_dataset.task_feature_lengths)
        li, lt = lengths.get("inputs", 0), lengths.get("targets", 0)
        flops = model.train_flops(train_dataset.batch_size, li, lt)
        tokens = train_dataset.batch_size * (li + lt)  # incl. padding
        # MFU against the peak of the activation dtype (fp32 for models without a config).
        dtype = (model.config_dict() or {}).get("dtype", "float32")
        logger = metrics_lib.MetricsLogger(model_dir, train_steps, tokens, flops,
                                           metrics_lib.peak_flops(peak_flops_per_device, dtype))
        print(f"model: {metrics_lib.count_params(abstract.params):,} params; "
              f"batch {train_dataset.batch_size}; {tokens:,} tokens/step", flush=True)
        evaluate = _make_evaluator(model, partitioner, shardings.params, eval_dataset,
                                   eval_steps, logger) if eval_every else None
        return cls(state, stage, train_step, checkpointer, logger, evaluate,
                   max_consecutive_nonfinite)

    def log_window(self, step: int, window: List[Dict[str, jax.Array]],
                   since: float) -> Dict[str, float]:
        """The only per-window host sync: fetch the window's metrics (waiting for its last
        step), then time, print and write them. `since`: the window's start (+ pauses)."""
        fetched = jax.device_get(window)
        seconds = time.time() - since
        summed = {k: float(sum(m[k] for m in fetched))
                  for k in ("loss_sum", *steps_lib.AUX_KEYS, "real_tokens", "nonfinite")}
        summed["grad_norm"] = float(fetched[-1]["grad_norm"])
        summed["learning_rate"] = float(fetched[-1]["learning_rate"])
        # Stages with their own statistics (online SSR) expose pop_metrics().
        extra = getattr(self.stage, "pop_metrics", dict)()
        scalars = self.logger.log_train(step, summed, len(window), seconds, extra)
        worst = max(int(m["nonfinite_consecutive"]) for m in fetched)
        if worst >= self.max_consecutive_nonfinite:
            self.checkpointer.wait()  # the save in flight is the last good checkpoint
            raise TrainingDiverged(
                    f"stopped at step {step}: {worst} consecutive steps had a non-finite loss, "
                    "gradient or update (their updates were skipped); lower the learning rate "
                    "or check the data. " + _latest_checkpoint(self.checkpointer))
        return {"step": step, **scalars}

    def close(self, quietly: bool = False):
        """Waits for the last checkpoint save and closes the stage and logs. quietly (closing
        after an error): a failure here is one line, not a second traceback."""
        for part in (self.checkpointer, self.stage, self.logger):
            try:
                if part is not None:
                    part.close()
            except Exception as e:  # pylint: disable=broad-except
                if not quietly:
                    raise
                print(f"WARNING: while stopping: {type(e).__name__}: {e}", flush=True)


def _latest_checkpoint(checkpointer: ckpt.Checkpointer) -> str:
    latest = checkpointer.latest_step()
    return (f"No checkpoint was saved in {checkpointer.directory}." if latest is None else
            f"The last checkpoint, step {latest}, is in {checkpointer.directory}.")


# An odd multiplier (2^32 / golden ratio): distinct initial steps give distinct seeds mod 2^31.
_DATA_SEED_STRIDE = 0x9E3779B1


def data_seed(seed: int, initial_step: int, replay: bool = False) -> int:
    """The shuffle seed of a run's training data: `seed` for a run from scratch, from a
    step-0 checkpoint or with `replay`; else (seed + 2654435761 * S) mod 2^31 for a run from
    an initial checkpoint at step S, so that the run does not read the data in the order the
    checkpoint's own run did (deterministic: its resumes get the same seed)."""
    if replay or initial_step == 0:
        return seed
    return (seed + _DATA_SEED_STRIDE * initial_step) % 2 ** 31


def run_start_step(model_dir: str, initial_checkpoint_path: Optional[str] = None,
                   params_only: bool = False) -> int:
    """The step at which a run's data stream began (no compute): its recorded start when
    MODEL_DIR has checkpoints, else the initial checkpoint's step (0 with params_only or
    without one). TRAIN_STEPS minus it is how many batches the run reads from its data's
    beginning (e.g. what offline SSR data must hold)."""
    directory = os.path.join(model_dir, ckpt.CHECKPOINTS_SUBDIR)
    if os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory)):
        record = ckpt.read_initial_record(directory)
        return int(record["start_step"]) if record else 0
    if not initial_checkpoint_path or params_only:
        return 0
    return ckpt.recorded_step(initial_checkpoint_path)


@dataclasses.dataclass(frozen=True)
class _Start:
    """Where a run starts: its own newest checkpoint (a resume), else its initial checkpoint,
    else fresh params."""

    initial_checkpoint_path: Optional[str]
    params_only: bool
    replay: bool
    seed: int
    train_steps: int

    def state(self, model, optimizer, partitioner, abstract, shardings, checkpointer,
              dataset: DatasetConfig):
        """(state, data state or None, the dataset with the run's data seed)."""
        restored = checkpointer.restore_latest(abstract, shardings)
        if restored is not None:
            state, data_state = restored
            print(f"resumed from step {int(state.step)} in {checkpointer.directory}",
                  flush=True)
            if data_state is None:
                print("WARNING: no input pipeline state in the checkpoint; data restarts.")
            record = ckpt.read_initial_record(checkpointer.directory)
            initial_step = int(record["step"]) if record else 0
            return state, data_state, self._with_data_seed(dataset, initial_step, False)
        if not self.initial_checkpoint_path:
            # A record left by a start from an initial checkpoint that never saved a step
            # would give this run's resumes another data seed than it starts with.
            ckpt.write_initial_record(checkpointer.directory, None)
            return (ts.init_state(model, optimizer, partitioner, shardings, self.seed), None,
                    dataset)
        state, initial_step = self._from_initial(optimizer, partitioner, abstract, shardings,
                                                 checkpointer)
        return state, None, self._with_data_seed(dataset, initial_step, True)

    def _from_initial(self, optimizer, partitioner, abstract, shardings, checkpointer):
        """(state, the initial checkpoint's recorded step); records where the run started."""
        step_dir = ckpt.resolve_step_dir(self.initial_checkpoint_path)
        initial_step = ckpt.recorded_step(step_dir)
        if not self.params_only and self.train_steps <= initial_step:
            raise UserError(
                    f"TRAIN_STEPS={self.train_steps} counts all steps, the initial "
                    f"checkpoint's included, and INITIAL_CHECKPOINT_PATH {step_dir} is at step "
                    f"{initial_step}: to train N more steps set TRAIN_STEPS={initial_step}+N "
                    f"(e.g. {initial_step + self.train_steps}), or set "
                    "train.initial_checkpoint_params_only = True to start at step 0.")
        init = ckpt.load_initial(step_dir, abstract, shardings,
                                 with_opt_state=not self.params_only)
        step = 0 if self.params_only else init.step
        state = ts.state_from_params(init.params, optimizer, partitioner, shardings,
                                     self.seed, step, init.opt_state)
        if self.params_only:
            print(f"initialised params from {step_dir} (step {init.step}); "
                  "train.initial_checkpoint_params_only: starting at step 0 with a fresh "
                  "optimizer state.", flush=True)
        elif init.opt_state is not None:
            print(f"initialised params and optimizer state from {step_dir}: continuing at "
                  f"step {step} of TRAIN_STEPS={self.train_steps}.", flush=True)
        else:
            print(f"initialised params from {step_dir}: continuing at step {step} of "
                  f"TRAIN_STEPS={self.train_steps} with a fresh optimizer state "
                  f"({init.fresh_reason}; the learning-rate schedule continues at step "
                  f"{step}).", flush=True)
        ckpt.write_initial_record(checkpointer.directory, {
                "initial_checkpoint": step_dir, "step": init.step, "start_step": step,
                "optimizer_state": "fresh" if init.opt_state is None else "restored"})
        return state, init.step

    def _with_data_seed(self, dataset: DatasetConfig, initial_step: int,
                        announce: bool) -> DatasetConfig:
        seed = data_seed(dataset.seed, initial_step, self.replay)
        if seed == dataset.seed:
            return dataset
        if announce:
            print(f"data: shuffle seed {seed}, from the dataset's seed {dataset.seed} and the "
                  f"initial checkpoint's step {initial_step}: another order than the initial "
                  "checkpoint's run read (train.replay_initial_data = True: the same order).",
                  flush=True)
        return dataclasses.replace(dataset, seed=seed)


class _SplitBatches:
    """Iterates over up to `num_batches` batches of a split (all of it when None or <= 0),
    each example once (no wrapping around); `whole` then says whether that was the whole
    split (one batch more is read to know)."""

    def __init__(self, cfg: DatasetConfig, partitioner: Partitioner,
                 num_batches: Optional[int]):
        self.cfg, self.partitioner = cfg, partitioner
        self.limit = num_batches if num_batches and num_batches > 0 else None
        self.whole = True

    def __iter__(self):
        ask = None if self.limit is None else self.limit + 1
        for i, item in enumerate(host_batches(self.cfg, self.partitioner, ask, repeat=False)):
            if i == self.limit:
                self.whole = False
                return
            yield item


def _make_evaluator(model, partitioner, param_shardings, cfg: Optional[DatasetConfig],
                    eval_steps: int, logger: metrics_lib.MetricsLogger):
    """Eval over the split's first `eval_steps` batches, or the whole split if it has no
    more (each example once; read once, kept on the host)."""
    if cfg is None:
        raise UserError("eval_every is set but there is no eval_dataset; bind "
                        "train.eval_dataset or set train.eval_every = 0.")
    cache: List[Dict[str, np.ndarray]] = []
    batches = _SplitBatches(cfg, partitioner, eval_steps)
    step_fn = steps_lib.make_eval_step(model, partitioner, param_shardings)

    def evaluate(params, step: int) -> Dict[str, float]:
        if not cache:
            cache.extend(b for b, _, _ in batches)
        if not cache:
            raise UserError(f"eval split {cfg.split!r} of {cfg.mixture_or_task_name!r} is "
                            "empty; bind another train.eval_dataset or set train.eval_every = 0.")
        sums = None
        for host_batch in cache:
            out = step_fn(params, partitioner.make_global_batch(host_batch))
            sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
        summed = {k: float(v) for k, v in jax.device_get(sums).items()}
        return {"step": step, **logger.log_eval(step, summed, len(cache),
                                                whole_split=batches.whole)}

    return evaluate


@contextlib.contextmanager
def _preemption_flag():
    """Yields `preempted(step) -> bool`: SIGTERM was received (by any host, when the JAX
    distributed service is up; hosts then agree on the step)."""
    received = threading.Event()
    previous = None
    # Multi-process, JAX's own handler must keep SIGTERM (see distributed.jax_handles_sigterm).
    if (threading.current_thread() is threading.main_thread()
            and not distributed.jax_handles_sigterm()):
        previous = signal.signal(signal.SIGTERM, lambda *_: received.set())

    def preempted(step: int) -> bool:
        agreed = distributed.reached_preemption_sync_point(step)
        return received.is_set() if agreed is None else agreed

    try:
        yield preempted
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def evaluate(*, model: BaseModel, checkpoint_path: str, dataset: DatasetConfig,
             partitioner: Partitioner, num_batches: Optional[int] = None,
             model_dir: Optional[str] = None) -> Dict[str, float]:
    """Loss and accuracy of a checkpoint over a split (all of it when num_batches is None)."""
    params, shardings = ckpt.restore_model_params(model, partitioner, checkpoint_path)
    step_fn = steps_lib.make_eval_step(model, partitioner, shardings)
    logger = metrics_lib.MetricsLogger(model_dir, 0, 0, 0.0, float("nan"))
    sums, count = None, 0
    batches = _SplitBatches(dataset, partitioner, num_batches)
    for _, batch, _ in batches:
        out = step_fn(params, batch)
        sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
        count += 1
    if sums is None:
        raise UserError(f"split {dataset.split!r} of {dataset.mixture_or_task_name!r} is empty.")
    summed = {k: float(v) for k, v in jax.device_get(sums).items()}
    step = _checkpoint_step(checkpoint_path)
    scalars = logger.log_eval(step, summed, count, name=f"eval_{dataset.split}",
                              whole_split=batches.whole)
    logger.close()
    return scalars


def _checkpoint_step(checkpoint_path: str) -> int:
    name = os.path.basename(ckpt.resolve_step_dir(checkpoint_path))
    return int(name) if name.isdigit() else 0
