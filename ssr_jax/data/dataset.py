"""Which examples a run reads, and how the per-host pipelines are built from that.

`DatasetConfig` names a registered SeqIO task or mixture and the module that registers it
(`module`, imported first; the library itself imports no task module). `make_pipeline`
builds this host's `InputPipeline` for a data layout (the partitioner's answer to "which
rows are mine"); `host_batches` reads a split once for eval and inference, with the hosts
agreeing on when it ends.
"""
import dataclasses
import importlib
import os
from typing import Dict, Iterator, Mapping, Optional, Tuple

import numpy as np

from ssr_jax import distributed
from ssr_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """Which examples, how many, in what order. batch_size is GLOBAL (over all hosts).

    module: the Python module that registers the task (e.g. 'tasks'); None when the task is
    already registered."""

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    split: str = "train"
    batch_size: int = 32
    shuffle: bool = True
    seed: int = 0
    pack: bool = True
    use_cached: bool = False
    module: Optional[str] = None


def import_task_module(module: Optional[str]):
    """Imports the module that registers tasks (e.g. 'tasks'), with a clear error."""
    if not module:
        return
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise UserError(f"cannot import task module {module!r}: no module {e.name!r} on "
                            "the search path (the current directory and PYTHONPATH="
                            f"{os.environ.get('PYTHONPATH', '')!r}); put "
                            f"{module.split('.')[0]}.py's directory on PYTHONPATH or fix "
                            "MIXTURE_OR_TASK_MODULE.") from e
        raise UserError(f"task module {module!r} was found but failed to import: {e}") from e
    except ImportError as e:
        raise UserError(f"task module {module!r} was found but failed to import: {e}") from e
    except SyntaxError as e:
        raise UserError(f"task module {module!r}: {e.filename}:{e.lineno}: {e.msg}") from e


def get_task(name: str, module: Optional[str] = None):
    """The registered SeqIO task or mixture `name` (its module imported first)."""
    import seqio  # pylint: disable=import-outside-toplevel
    import_task_module(module)
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError as e:
        from ssr_jax.data.pipeline import unknown_task_message  # pylint: disable=C0415
        raise UserError(unknown_task_message(name, module)) from e


def task_vocabulary(name: str, module: Optional[str] = None):
    """The 'inputs' vocabulary of a registered task."""
    return get_task(name, module).output_features["inputs"].vocabulary


def make_pipeline(cfg: DatasetConfig, layout, repeat: bool = True,
                  task_feature_lengths: Optional[Mapping[str, int]] = None,
                  task: Optional[str] = None, shuffle: Optional[bool] = None):
    """The host-local InputPipeline for cfg and this host's `layout` (a DataLayout) of the
    batch; the keyword overrides serve stages that read other tasks or lengths."""
    import_task_module(cfg.module)
    from ssr_jax.data.pipeline import InputPipeline  # pylint: disable=import-outside-toplevel
    lengths = task_feature_lengths or cfg.task_feature_lengths
    return InputPipeline(task or cfg.mixture_or_task_name, split=cfg.split,
                         task_feature_lengths=dict(lengths),
                         batch_size=layout.per_host_batch_size, shard_info=layout.shard_info,
                         seed=cfg.seed, shuffle=cfg.shuffle if shuffle is None else shuffle,
                         pack=cfg.pack, repeat=repeat, use_cached=cfg.use_cached,
                         module=cfg.module)


def host_batches(cfg: DatasetConfig, partitioner, num_batches: Optional[int],
                 repeat: bool = False) -> Iterator[Tuple[Dict[str, np.ndarray], dict, int]]:
    """(host batch, global batch, number of real rows on this host) for eval/infer.

    Without repeat the pipeline ends; hosts agree on when (a tiny allgather per batch when
    multi-host) and the last, short batches are padded with all-zero rows (zero loss weight).
    The real rows come first; a row is real when it holds a target (the packer itself pads
    a short last batch with all-zero rows, so the batch's row count is not the answer).
    """
    layout = partitioner.data_layout(cfg.batch_size)
    it = iter(make_pipeline(cfg, layout, repeat=repeat))
    template: Optional[Dict[str, np.ndarray]] = None
    count = 0
    while num_batches is None or count < num_batches:
        try:
            batch = {k: np.asarray(v) for k, v in next(it).items()}
        except StopIteration:
            batch = None
        if template is None and batch is not None:
            template = {k: np.zeros_like(v[:layout.per_host_batch_size]) for k, v in batch.items()}
        if not distributed.any_host(batch is not None):
            return
        if batch is None:
            if template is None:
                raise UserError(f"split {cfg.split!r} of {cfg.mixture_or_task_name!r} is empty "
                                "on this host.")
            batch, rows = {k: v.copy() for k, v in template.items()}, 0
        else:
            batch, rows = _pad_rows(batch, layout.per_host_batch_size), _real_rows(batch)
        count += 1
        yield batch, partitioner.make_global_batch(batch), rows


def _pad_rows(batch: Dict[str, np.ndarray], size: int) -> Dict[str, np.ndarray]:
    rows = next(iter(batch.values())).shape[0]
    if rows == size:
        return batch
    return {k: np.concatenate([v, np.zeros((size - rows,) + v.shape[1:], v.dtype)])
            for k, v in batch.items()}


def _real_rows(batch: Dict[str, np.ndarray]) -> int:
    """How many leading rows hold an example (a target token; padding rows are all zero)."""
    real = np.any(batch["decoder_target_tokens"] != 0, axis=1)
    count = int(real.sum())
    if not real[:count].all():
        raise ValueError("a padding row comes before a real one; real rows must lead")
    return count
