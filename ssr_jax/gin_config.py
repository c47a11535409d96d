"""Gin at the edge: registrations of library classes/functions under plain names, flag parsing
and config parsing with one-line errors.

Library code never imports gin; entry points call `parse_flags`, `setup` and `call`.
Registered names (also reachable as `ssr_jax.<name>`): T5Config, LossConfig, DecodeConfig,
EncoderDecoderModel, Partitioner, DatasetConfig, CheckpointConfig, InputPipeline,
PipelineInputStage, adafactor, adamw, rsqrt_schedule, constant_schedule, linear_schedule,
cosine_schedule, train, evaluate, infer.

Flags: --gin_file=F (repeatable), --gin.X=Y (repeatable; = a binding line `X = Y`),
--gin_bindings='X = Y' (repeatable), --gin_search_paths=a,b (the repository root and its gin/
directory are always searched, after these).
"""
import contextlib
import dataclasses
import logging
import os
import re
from typing import Callable, Dict, List, Optional, Sequence

import gin

from ssr_jax.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = "ssr_jax"
_REGISTERED: Dict[str, Callable] = {}
_SEARCH_PATHS_ADDED: set = set()


def _registrations() -> Dict[str, Callable]:
    # pylint: disable=import-outside-toplevel
    from ssr_jax.models.base import DecodeConfig, LossConfig
    from ssr_jax.models.config import T5Config
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel
    from ssr_jax.partitioning import Partitioner
    from ssr_jax.train import optimizers
    from ssr_jax.train.checkpoints import CheckpointConfig
    from ssr_jax.train.infer import infer
    from ssr_jax.train.input_stage import DatasetConfig, PipelineInputStage
    from ssr_jax.train.trainer import evaluate, train
    entries = {
            "T5Config": T5Config, "LossConfig": LossConfig, "DecodeConfig": DecodeConfig,
            "EncoderDecoderModel": EncoderDecoderModel, "Partitioner": Partitioner,
            "DatasetConfig": DatasetConfig, "CheckpointConfig": CheckpointConfig,
            "PipelineInputStage": PipelineInputStage.from_config,
            "adafactor": optimizers.adafactor, "adamw": optimizers.adamw,
            "rsqrt_schedule": optimizers.rsqrt_schedule,
            "constant_schedule": optimizers.constant_schedule,
            "linear_schedule": optimizers.linear_schedule,
            "cosine_schedule": optimizers.cosine_schedule,
            "train": train, "evaluate": evaluate, "infer": infer,
    }
    from ssr_jax.ssr import gin_bindings as ssr_gin
    entries.update(ssr_gin.registrations())
    try:
        from ssr_jax.data.pipeline import InputPipeline
        entries["InputPipeline"] = InputPipeline
    except ImportError:
        pass
    return entries


def register() -> Dict[str, Callable]:
    """Registers everything once; returns name -> gin-wrapped callable."""
    if not _REGISTERED:
        for name, obj in _registrations().items():
            _REGISTERED[name] = gin.external_configurable(obj, name=name, module=MODULE)
    return _REGISTERED


@dataclasses.dataclass
class Flags:
    gin_files: List[str]
    bindings: List[str]
    search_paths: List[str]
    other: Dict[str, str]  # remaining --name=value flags, for the entry point to use


def parse_flags(argv: Sequence[str], allowed_other: Sequence[str] = ()) -> Flags:
    """Parses gin flags (and the entry point's own `allowed_other` flags)."""
    flags = Flags([], [], [], {})
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}; use --gin_file=F, --gin.X=Y or "
                            "--gin_search_paths=a,b.")
        name, has_eq, value = arg[2:].partition("=")
        if not has_eq and not name.startswith("gin."):
            if i + 1 >= len(args):
                raise UserError(f"flag --{name} needs a value.")
            value, i = args[i + 1], i + 1
        if name == "gin_file":
            flags.gin_files.append(value)
        elif name.startswith("gin."):
            if not has_eq:
                raise UserError(f"flag {arg!r} needs a value: --gin.X=Y.")
            flags.bindings.append(f"{name[4:]} = {value}")
        elif name == "gin_bindings":
            flags.bindings.append(value)
        elif name == "gin_search_paths":
            flags.search_paths.extend(p for p in value.split(",") if p)
        elif name in allowed_other:
            flags.other[name] = value
        else:
            known = ["gin_file", "gin.X", "gin_bindings", "gin_search_paths", *allowed_other]
            raise UserError(f"unknown flag --{name}; known flags: "
                            + ", ".join("--" + k for k in known) + ".")
        i += 1
    return flags


def _search_paths(flags: Flags) -> List[str]:
    return [os.path.abspath(p) for p in flags.search_paths] + [REPO_ROOT,
                                                               os.path.join(REPO_ROOT, "gin")]


def _find_file(path: str, search: Sequence[str]) -> str:
    candidates = [path] + [os.path.join(d, path) for d in search]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise UserError(f"gin file {path!r} not found (searched: . {' '.join(search)}).")


def _tolerant_file_readers():
    """gin's package-path reader (`include 'runs/x.gin'` -> Python package `runs`) raises
    instead of answering "no" when a directory of that name (e.g. the `runs/` that `make run`
    writes) is importable as a namespace package; make its existence check answer False."""
    # pylint: disable=protected-access
    readers = gin.config._FILE_READERS
    for i, (reader, exists) in enumerate(readers):
        if getattr(exists, "_ssr_jax_tolerant", False):
            continue

        def safe(path, _exists=exists):
            try:
                return _exists(path)
            except (TypeError, ValueError, ImportError):
                return False
        safe._ssr_jax_tolerant = True
        readers[i] = (reader, safe)


@contextlib.contextmanager
def _quiet_include_search():
    """gin logs an ERROR for every search path an `include` misses before it finds the file;
    a missing file still raises, so those lines are noise."""
    def drop(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found")
    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return " | ".join(lines[:3]) if lines else type(e).__name__


def setup(flags: Flags) -> None:
    """Registers configurables, parses files then bindings, checks required values."""
    register()
    gin.clear_config()
    search = _search_paths(flags)
    for d in search:
        if d not in _SEARCH_PATHS_ADDED:
            gin.add_config_file_search_path(d)
            _SEARCH_PATHS_ADDED.add(d)
    files = [_find_file(f, search) for f in flags.gin_files]
    if not files:
        raise UserError("no --gin_file given; e.g. --gin_file=gin/experiments/tiny_default.gin")
    try:
        _tolerant_file_readers()
        with _quiet_include_search():
            gin.parse_config_files_and_bindings(files, flags.bindings, finalize_config=False)
    except (ValueError, SyntaxError, KeyError, TypeError, IOError) as e:
        what = "gin binding" if any(b.split("=")[0].strip() in str(e) for b in flags.bindings) \
            else "gin config"
        hint = ""
        if isinstance(e, SyntaxError) and flags.bindings:
            hint = " (string values need quotes: --gin.MODEL_DIR=\"'/tmp/run'\")"
        raise UserError(f"{what}: {_one_line(e)}{hint}") from e
    missing = sorted(_required_unset())
    if missing:
        names = ", ".join(missing)
        first = missing[0].split(".")[0]
        raise UserError(f"required gin value(s) not set: {names}; set them in a gin file or "
                        f"with e.g. --gin.{first}=...")


def _required_unset() -> List[str]:
    """Bindings and macros whose value is still %gin.REQUIRED."""
    out = []
    config = gin.config._CONFIG  # pylint: disable=protected-access

    def is_required(v) -> bool:
        if isinstance(v, dict):
            return any(is_required(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return any(is_required(x) for x in v)
        return repr(v) == "%gin.REQUIRED"

    for (scope, selector), params in config.items():
        for param, value in params.items():
            if is_required(value):
                out.append(scope if selector == "gin.macro" else
                           f"{scope + '/' if scope else ''}{selector.split('.')[-1]}.{param}")
    return out


def call(name: str, **kwargs):
    """Calls a registered configurable, turning gin's call-time errors into one line."""
    fn = register()[name]
    try:
        return fn(**kwargs)
    except UserError as e:
        # gin appends "In call to configurable ..." lines to exceptions passing through it.
        # The raised object is gin's proxy subclass; re-raise the user's own class.
        cls = type(e)
        while "ExceptionProxy" in getattr(cls.__init__, "__qualname__", ""):
            cls = cls.__mro__[1]
        lines = str(e).strip().splitlines()
        raise cls(lines[0] if lines else "") from e
    except TypeError as e:
        text = str(e)
        macro = re.search(r"configurable 'macro'.*in scope '([^']+)'", text, re.S)
        if macro:
            raise UserError(f"gin macro {macro.group(1)} is used but never set; set it in a "
                            f"gin file or with --gin.{macro.group(1)}=...") from e
        if "No values supplied by Gin or caller" in text:
            raise UserError(f"missing gin binding: {_one_line(e)}") from e
        raise


def query_macro(name: str) -> Optional[object]:
    """The value of a macro (references to other macros followed), or None if unset."""
    try:
        value = gin.query_parameter(f"%{name}")
        for _ in range(10):
            text = repr(value)
            if not text.startswith("%") or text == "%gin.REQUIRED":
                break
            value = gin.query_parameter(text)
        return value
    except (ValueError, KeyError):
        return None
