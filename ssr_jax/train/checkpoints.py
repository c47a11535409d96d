"""Orbax checkpoints of the train state, params-only loading, and their on-disk layout.

Layout of a checkpoint root (MODEL_DIR/checkpoints, or what import-hf writes):

    <root>/model_config.json           dataclasses.asdict(T5Config) (or None if unknown)
    <root>/<step>/params/              Orbax StandardSave of the params pytree
    <root>/<step>/train_state/         optimizer state, step, rng, non-finite counters
    <root>/<step>/data_state/          JSON: {"process_count": n, "hosts": [state of host i]}
    <root>/<step>/model_config.json    copy of the root's, once the step is finalised
    <root>/initial_checkpoint.json     a run started from INITIAL_CHECKPOINT_PATH: which
                                       checkpoint, at which step (its resumes read it)

Only `params/` (+ a model_config.json in the step dir or its root) is needed by
`load_params`, so params-only checkpoints (e.g. from import-hf) are valid initial
checkpoints and eval/infer inputs. `load_initial` also takes the step and, when it fits the
run's optimizer, the optimizer state (T5X's convention: the step travels with the params).
"""
import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from typing import Any, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from ssr_jax import distributed
from ssr_jax.errors import UserError

PARAMS = "params"
TRAIN_STATE = "train_state"
DATA_STATE = "data_state"
MODEL_CONFIG_FILE = "model_config.json"
CHECKPOINTS_SUBDIR = "checkpoints"
INITIAL_RECORD_FILE = "initial_checkpoint.json"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """save_every: steps between (async) saves; keep: how many to keep (None = all)."""

    save_every: int = 1000
    keep: Optional[int] = 3
    async_save: bool = True


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _first_line(e: BaseException) -> str:
    """One readable line: TensorStore quotes its whole JSON spec in errors; keep the message
    and the file it names instead."""
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    files = re.findall(r'"path":\s*"([^"]+)"', str(e))
    line = re.split(r"\s*See full TensorStore details", line)[0]
    if "{" in line:
        line = line[:line.index("{")].rstrip(" :[(")
    if files:  # a kvstore base dir and the array's path inside it
        where = files[-1] if len(files) < 2 or not files[-2].endswith("/") else \
            files[-2] + files[-1]
        line += f" (file {where})"
    return f"{type(e).__name__}: {line[:300]}"


class Checkpointer:
    """Saves and restores train state + per-host data pipeline state in one directory."""

    def __init__(self, directory: str, config: CheckpointConfig = CheckpointConfig(),
                 model_config: Optional[dict] = None):
        self.directory = os.path.abspath(directory)
        self.config = config
        self._model_config = model_config
        self._unmarked: list = []  # saved steps whose dir lacks model_config.json
        options = ocp.CheckpointManagerOptions(
                max_to_keep=config.keep, save_interval_steps=1,
                enable_async_checkpointing=config.async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=(PARAMS, TRAIN_STATE, DATA_STATE))
        if jax.process_index() == 0:
            with open(os.path.join(self.directory, MODEL_CONFIG_FILE), "w") as f:
                json.dump(model_config, f, indent=2)

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self):
        return list(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.config.save_every > 0 and step % self.config.save_every == 0

    def save(self, state, data_state: Any) -> int:
        """Starts an (async) save of the state at its step; returns the step."""
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return step
        hosts = distributed.gather_json(data_state)
        args = ocp.args.Composite(**{
                PARAMS: ocp.args.StandardSave(state.params),
                TRAIN_STATE: ocp.args.StandardSave({"opt_state": state.opt_state,
                                                    **state.meta()}),
                DATA_STATE: ocp.args.JsonSave({"process_count": jax.process_count(),
                                               "hosts": hosts}),
        })
        self._manager.save(step, args=args, force=True)
        # The previous save is finalised once a new one has started.
        self._mark_finalized(exclude=step)
        self._unmarked.append(step)
        return step

    def wait(self):
        self._manager.wait_until_finished()
        self._mark_finalized()

    def close(self):
        self.wait()
        self._manager.close()

    def _mark_finalized(self, exclude: Optional[int] = None):
        if jax.process_index() != 0:
            self._unmarked = []
            return
        remaining = []
        for step in self._unmarked:
            step_dir = os.path.join(self.directory, str(step))
            if step == exclude:
                remaining.append(step)
            elif os.path.isdir(step_dir):
                with open(os.path.join(step_dir, MODEL_CONFIG_FILE), "w") as f:
                    json.dump(self._model_config, f, indent=2)
        self._unmarked = remaining

    def restore_latest(self, state_template, state_shardings) -> Optional[Tuple[Any, Any]]:
        """The newest readable checkpoint as (state, this host's data state), or None if the
        directory has none. Unreadable newer checkpoints are moved aside (one warning line
        each) only once an older one has been restored: when none is readable nothing is
        moved and every call raises, so a rerun never silently starts from step 0."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        failures = []  # (step, one-line reason), newest first
        for step in steps:
            try:
                with _quiet_orbax():
                    restored = self._restore(step, state_template, state_shardings)
            except UserError:
                raise  # readable but does not fit this model/optimizer: not corruption
            except Exception as e:  # pylint: disable=broad-except
                failures.append((step, _first_line(e)))
                continue
            for bad, reason in failures:
                moved = self._quarantine(bad)
                print(f"WARNING: checkpoint step {bad} in {self.directory} is unreadable "
                      f"({reason}); falling back to step {step}"
                      + (f" (moved aside to {moved})." if moved else "."), flush=True)
            if failures:
                distributed.barrier("quarantine_checkpoint")
                self._manager.reload()
            return restored
        if steps:
            tried = "; ".join(f"step {s} ({reason})" for s, reason in failures)
            raise UserError(f"no readable checkpoint in {self.directory}: {tried}; nothing was "
                            "moved: fix or remove the step directories (or use a fresh "
                            "MODEL_DIR) to start afresh.")
        return None

    def _restore(self, step: int, template, shardings):
        train_target = {"opt_state": template.opt_state, **template.meta()}
        step_dir = os.path.join(self.directory, str(step))
        _check_compatible(_stored_tree(os.path.join(step_dir, PARAMS)), template.params,
                          step_dir)
        stored_shapes = sorted(tuple(m.shape) for m in jax.tree.leaves(
                _stored_tree(os.path.join(step_dir, TRAIN_STATE))))
        if stored_shapes != sorted(tuple(np.shape(x)) for x in jax.tree.leaves(train_target)):
            raise UserError(f"the optimizer state in {step_dir} does not fit this run's "
                            "optimizer; to start a new run from its params use "
                            "INITIAL_CHECKPOINT_PATH with a fresh MODEL_DIR.")
        train_shard = {"opt_state": shardings.opt_state, **shardings.meta()}
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
                PARAMS: ocp.args.StandardRestore(_abstract(template.params, shardings.params)),
                TRAIN_STATE: ocp.args.StandardRestore(_abstract(train_target, train_shard)),
                DATA_STATE: ocp.args.JsonRestore(),
        }))
        ts = restored[TRAIN_STATE]
        opt_state = _as_tree_of(template.opt_state, ts["opt_state"])
        state = template.replace(params=restored[PARAMS], opt_state=opt_state).replace_meta(ts)
        if int(jax.device_get(state.step)) != step:
            raise ValueError(f"stored step {int(state.step)} != directory step {step}")
        return state, _host_state(restored[DATA_STATE], step)

    def _quarantine(self, step: int) -> Optional[str]:
        """Renames an unreadable step dir to <step>.corrupt-<time> (process 0); its new path."""
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.directory, f"{step}.corrupt-{int(time.time())}")
        if jax.process_index() != 0 or not os.path.isdir(src):
            return None
        os.rename(src, dst)
        return dst


@contextlib.contextmanager
def _quiet_orbax():
    """A failed restore makes Orbax/absl log warnings and TensorStore's asyncio callbacks log
    'Event loop is closed' errors, hundreds of lines for one unreadable file; the caller
    reports each failure in one line instead."""
    names = ("absl", "asyncio", "orbax", "tensorstore")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _as_tree_of(template: Any, restored: Any) -> Any:
    """Orbax gives tuples back for NamedTuple nodes: rebuild the optimizer's own tree."""
    return jax.tree.unflatten(jax.tree.structure(template), jax.tree.leaves(restored))


def _stored_tree(item_dir: str) -> Any:
    """The stored tree of array metadata (shape, dtype) of one Orbax pytree item."""
    checkpointer = ocp.StandardCheckpointer()
    try:
        metadata = checkpointer.metadata(item_dir).item_metadata
    finally:
        checkpointer.close()
    if metadata is None:
        raise ValueError(f"no readable array metadata (_METADATA) in {item_dir}")
    return metadata.tree


def _host_state(stored: Optional[dict], step: int) -> Any:
    if not stored or "hosts" not in stored:
        return None
    hosts = stored["hosts"]
    if len(hosts) != jax.process_count():
        print(f"WARNING: checkpoint step {step} has data state for {len(hosts)} hosts but "
              f"{jax.process_count()} run now; the input pipeline restarts from the beginning.",
              flush=True)
        return None
    return hosts[jax.process_index()]


# --- params-only checkpoints (initial checkpoints, eval/infer, export-hf) ---------------------
def resolve_step_dir(checkpoint_path: str) -> str:
    """A step dir (holding params/) as is; a checkpoint root -> its newest step; a model dir ->
    its checkpoints/ root's newest step."""
    path = os.path.abspath(os.path.expanduser(checkpoint_path))
    if os.path.isdir(os.path.join(path, PARAMS)):
        return path
    for root in (path, os.path.join(path, CHECKPOINTS_SUBDIR)):
        if not os.path.isdir(root):
            continue
        steps = sorted((int(d) for d in os.listdir(root)
                        if d.isdigit() and os.path.isdir(os.path.join(root, d, PARAMS))),
                       reverse=True)
        if steps:
            return os.path.join(root, str(steps[0]))
    raise UserError(f"no checkpoint at {checkpoint_path}: expected a step directory holding "
                    f"'{PARAMS}/' or a directory of numbered step directories.")


def model_config_path(checkpoint_path: str) -> Optional[str]:
    """The model_config.json of a checkpoint (its step dir's, else its root's), or None."""
    step_dir = resolve_step_dir(checkpoint_path)
    for d in (step_dir, os.path.dirname(step_dir)):
        f = os.path.join(d, MODEL_CONFIG_FILE)
        if os.path.exists(f):
            return f
    return None


def _read_json(path: str, what_to_do: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}); {what_to_do}") from e


def load_model_config(checkpoint_path: str) -> Optional[dict]:
    """The model_config.json of a checkpoint (its step dir, else its root), or None."""
    path = model_config_path(checkpoint_path)
    if path is None:
        return None
    return _read_json(path, "restore it or give the model's gin file.")


def load_params(checkpoint_path: str, shardings: Any = None, abstract_params: Any = None) -> Any:
    """Params from a checkpoint (step dir, checkpoint root or model dir).

    With `shardings` (a params-shaped tree of NamedShardings) the params are restored straight
    into them, on any mesh. Without, each array lands on the first local device. When
    `abstract_params` is given, a checkpoint with a different tree or shapes is a UserError
    naming the first differences.
    """
    step_dir = resolve_step_dir(checkpoint_path)
    params_dir = os.path.join(step_dir, PARAMS)
    try:
        stored = _stored_tree(params_dir)
    except Exception as e:  # pylint: disable=broad-except
        raise UserError(f"cannot read checkpoint {params_dir}: {_first_line(e)}") from e
    checkpointer = ocp.StandardCheckpointer()
    if abstract_params is not None:
        _check_compatible(stored, abstract_params, params_dir)
    if shardings is None:
        device = jax.local_devices()[0]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(
                m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(device)), stored)
    else:
        shapes = abstract_params if abstract_params is not None else stored
        target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                              shapes, shardings)
    try:
        return checkpointer.restore(params_dir, target)
    except Exception as e:  # pylint: disable=broad-except
        raise UserError(f"cannot restore params from {params_dir}: {_first_line(e)}") from e
    finally:
        checkpointer.close()


def restore_model_params(model, partitioner, checkpoint_path: str) -> Tuple[Any, Any]:
    """(params, shardings) of a BaseModel from a checkpoint: restored straight into the
    shardings of the model's logical axes on the partitioner's mesh, in the model's param
    dtype (e.g. a bfloat16 teacher from a float32 checkpoint). The one "abstract params ->
    shardings -> load" path of eval, infer and the SSR teacher."""
    abstract, shardings = partitioner.model_param_shardings(model)
    params = load_params(checkpoint_path, shardings, abstract)
    params = jax.tree.map(lambda x, a: x if x.dtype == a.dtype else x.astype(a.dtype),
                          params, abstract)
    return params, shardings


def save_params(step_dir: str, params: Any, model_config: Optional[dict] = None):
    """Writes a params-only checkpoint in the layout above (e.g. for import-hf)."""
    step_dir = os.path.abspath(step_dir)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(step_dir, PARAMS), params, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()
    if jax.process_index() == 0:
        with open(os.path.join(step_dir, MODEL_CONFIG_FILE), "w") as f:
            json.dump(model_config, f, indent=2)


def _check_compatible(stored: Any, expected: Any, where: str):
    flat_stored = {jax.tree_util.keystr(p): tuple(m.shape) for p, m in
                   jax.tree_util.tree_flatten_with_path(stored)[0]}
    flat_expected = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in
                     jax.tree_util.tree_flatten_with_path(expected)[0]}
    missing = sorted(set(flat_expected) - set(flat_stored))
    extra = sorted(set(flat_stored) - set(flat_expected))
    wrong = sorted(k for k in set(flat_stored) & set(flat_expected)
                   if flat_stored[k] != flat_expected[k])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if extra:
            parts.append(f"unexpected {extra[:3]}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape of {k} is {flat_stored[k]} but the model has {flat_expected[k]}")
        raise UserError(f"checkpoint {where} does not fit the model ({'; '.join(parts)}); "
                        "check that the gin model size matches the checkpoint (or use a fresh "
                        "MODEL_DIR).")


# --- initial checkpoints (INITIAL_CHECKPOINT_PATH) ----------------------------------------------
@dataclasses.dataclass(frozen=True)
class InitialCheckpoint:
    """What a run takes from its initial checkpoint. step: the step the checkpoint records
    (0 when it holds params only); opt_state: None when not taken (`fresh_reason` says why)."""

    step_dir: str
    step: int
    params: Any
    opt_state: Any = None
    fresh_reason: str = ""


def recorded_step(checkpoint_path: str) -> int:
    """The step a checkpoint records: its train state's (`ssr-jax train` checkpoints), 0 when
    it holds params only (`import-hf`, `save_params`). Reads one scalar."""
    item = os.path.join(resolve_step_dir(checkpoint_path), TRAIN_STATE)
    if not os.path.isdir(item):
        return 0
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        with _quiet_orbax():
            meta = checkpointer.restore(item, args=ocp.args.PyTreeRestore(
                    item={"step": np.zeros((), np.int32)},
                    restore_args={"step": ocp.RestoreArgs(restore_type=np.ndarray)},
                    partial_restore=True))
    except Exception as e:  # pylint: disable=broad-except
        raise UserError(f"cannot read the step of checkpoint {item}: {_first_line(e)}") from e
    finally:
        checkpointer.close()
    return int(meta["step"])


def _signature(tree: Any) -> dict:
    """{path: shape} with path keys as plain strings: Orbax stores a NamedTuple node as a
    dict of its fields, so `[0].count` (GetAttrKey) and `['0']['count']` (DictKey) agree."""
    def name(key):
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)
    return {tuple(name(k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_initial(checkpoint_path: str, template, shardings,
                 with_opt_state: bool = True) -> InitialCheckpoint:
    """Params, recorded step and (with_opt_state) the optimizer state of a checkpoint, restored
    into the run's shardings. The optimizer state is taken only when its tree and shapes are
    the run's optimizer's (a checkpoint of the same optimizer); else None, with the reason."""
    step_dir = resolve_step_dir(checkpoint_path)
    step = recorded_step(step_dir)
    params = load_params(step_dir, shardings.params, template.params)
    item = os.path.join(step_dir, TRAIN_STATE)
    if not with_opt_state:
        return InitialCheckpoint(step_dir, step, params, None, "asked for params only")
    if not os.path.isdir(item):
        return InitialCheckpoint(step_dir, step, params, None, "the checkpoint holds params "
                                 "only")
    target = {"opt_state": template.opt_state, **template.meta()}
    try:
        stored = _stored_tree(item)
    except Exception as e:  # pylint: disable=broad-except
        raise UserError(f"cannot read checkpoint {item}: {_first_line(e)}") from e
    if _signature(stored) != _signature(target):
        return InitialCheckpoint(step_dir, step, params, None, "its optimizer state does not "
                                 "fit this run's optimizer")
    train_shard = {"opt_state": shardings.opt_state, **shardings.meta()}
    checkpointer = ocp.StandardCheckpointer()
    try:
        with _quiet_orbax():
            restored = checkpointer.restore(item, _abstract(target, train_shard))
    except Exception as e:  # pylint: disable=broad-except
        raise UserError(f"cannot restore the optimizer state from {item}: "
                        f"{_first_line(e)}") from e
    finally:
        checkpointer.close()
    return InitialCheckpoint(step_dir, step, params,
                             _as_tree_of(template.opt_state, restored["opt_state"]))


def write_initial_record(directory: str, record: Optional[dict]):
    """Records (process 0) where a run in `directory` (its checkpoint root) started from;
    None removes the record (a run from scratch)."""
    if jax.process_index() != 0:
        return
    path = os.path.join(directory, INITIAL_RECORD_FILE)
    if record is None:
        if os.path.exists(path):
            os.remove(path)
        return
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


def read_initial_record(directory: str) -> Optional[dict]:
    """The record `write_initial_record` wrote in `directory`, or None (a run from scratch)."""
    path = os.path.join(directory, INITIAL_RECORD_FILE)
    if not os.path.isfile(path):
        return None
    return _read_json(path, "it records the initial checkpoint this run started from: "
                            "restore it, or use a fresh MODEL_DIR.")
