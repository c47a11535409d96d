"""The one gin registry: library classes and functions under plain names, config parsing
and calls with one-line errors. The only module (with the rest of ssr_jax/cli/) that knows
gin; the library takes the plain values gin builds.

Registered names (also reachable as `ssr_jax.<name>`): T5Config, LossConfig, DecodeConfig,
EncoderDecoderModel, Partitioner, DatasetConfig, CheckpointConfig, adafactor, adamw,
rsqrt_schedule, constant_schedule, linear_schedule, cosine_schedule, TeacherConfig,
SsrStageConfig, SpanCurriculum, train (the run spec: ssr_jax/cli/spec.py), ssr_online,
ssr_offline (its `ssr`), evaluate, infer, model_from_checkpoint (the model a checkpoint's
model_config.json describes, checked against a bound MODEL), compare (`ssr-jax compare`'s
spec: ssr_jax/cli/compare_spec.py).
"""
import contextlib
import difflib
import io
import logging
import os
import re
import sys
import tokenize
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import gin

from ssr_jax.cli.flags import Flags, parse_flags
from ssr_jax.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULE = "ssr_jax"
_REGISTERED: Dict[str, Callable] = {}
_SEARCH_PATHS_ADDED: set = set()


def _registrations() -> Dict[str, Callable]:
    # pylint: disable=import-outside-toplevel
    from ssr_jax.cli.compare_spec import CompareSpec
    from ssr_jax.cli.spec import RunSpec
    from ssr_jax.data.dataset import DatasetConfig
    from ssr_jax.models.base import DecodeConfig, LossConfig
    from ssr_jax.models.config import T5Config
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel
    from ssr_jax.partitioning import Partitioner
    from ssr_jax.ssr import spec as ssr_spec
    from ssr_jax.ssr.curriculum import SpanCurriculum
    from ssr_jax.ssr.stage import SsrStageConfig
    from ssr_jax.ssr.teacher import TeacherConfig
    from ssr_jax.train import optimizers
    from ssr_jax.train.checkpoints import CheckpointConfig
    from ssr_jax.train.infer import infer
    from ssr_jax.train.trainer import evaluate
    return {
            "T5Config": T5Config, "LossConfig": LossConfig, "DecodeConfig": DecodeConfig,
            "EncoderDecoderModel": EncoderDecoderModel, "Partitioner": Partitioner,
            "DatasetConfig": DatasetConfig, "CheckpointConfig": CheckpointConfig,
            "adafactor": optimizers.adafactor, "adamw": optimizers.adamw,
            "rsqrt_schedule": optimizers.rsqrt_schedule,
            "constant_schedule": optimizers.constant_schedule,
            "linear_schedule": optimizers.linear_schedule,
            "cosine_schedule": optimizers.cosine_schedule,
            "TeacherConfig": TeacherConfig, "SsrStageConfig": SsrStageConfig,
            "SpanCurriculum": SpanCurriculum,
            "train": RunSpec, "ssr_online": ssr_spec.online, "ssr_offline": ssr_spec.offline,
            "evaluate": evaluate, "infer": infer,
            "model_from_checkpoint": model_from_checkpoint, "compare": CompareSpec,
    }


def register() -> Dict[str, Callable]:
    """Registers everything once; returns name -> gin-wrapped callable."""
    if not _REGISTERED:
        for name, obj in _registrations().items():
            _REGISTERED[name] = gin.external_configurable(obj, name=name, module=MODULE)
    return _REGISTERED


def search_paths(extra: Sequence[str] = ()) -> List[str]:
    """Where gin files and includes are looked up (after the path as given): --gin_search_paths,
    then the repository root and its gin/ directory."""
    return [os.path.abspath(p) for p in extra] + [REPO_ROOT, os.path.join(REPO_ROOT, "gin")]


def _search_paths(flags: Flags) -> List[str]:
    return search_paths(flags.search_paths)


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


_PARSE_ERRORS = (ValueError, SyntaxError, KeyError, TypeError, IOError)


def _unclosed_bracket(text: str) -> Optional[Tuple[int, str]]:
    """(line, bracket) of the first bracket `text` never closes, or None if it tokenizes."""
    opened: List[Tuple[int, str]] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.OP and tok.string in "([{":
                opened.append((tok.start[0], tok.string))
            elif tok.type == tokenize.OP and tok.string in ")]}" and opened:
                opened.pop()
    except tokenize.TokenError as e:
        if opened:
            return opened[0]
        return (e.args[1][0] if len(e.args) > 1 else 0), "string or line continuation"
    return None


def _token_error_in(path: str, search: Sequence[str], seen: Set[str]) -> str:
    """Where the tokenize error of gin file `path` (or one it includes) is, as one line."""
    seen.add(os.path.abspath(path))
    with open(path) as f:
        text = f.read()
    hit = _unclosed_bracket(text)
    if hit:
        return f"{path}:{hit[0]}: unclosed {hit[1]!r} (the file ends inside it)"
    for inc in re.findall(r"^\s*include\s+['\"]([^'\"]+)['\"]", text, re.M):
        try:
            found = _find_file(inc, [os.path.dirname(path), *search])
        except UserError:
            continue
        if os.path.abspath(found) not in seen:
            where = _token_error_in(found, search, seen)
            if where:
                return where
    return ""


def _syntax_error_line(e: SyntaxError) -> str:
    where = f"{e.filename}:{e.lineno}: " if e.filename else ""
    text = f" in {e.text.strip()!r}" if e.text and e.text.strip() else ""
    # gin's message may span lines and quote Python's ast objects: keep its words.
    msg = re.sub(r"\s*<ast\.\w+ object at 0x[0-9a-f]+>", "", " ".join(str(e.msg).split()))
    return f"{where}{msg}{text}"


def _parse_files(files: Sequence[str], search: Sequence[str]) -> None:
    for path in files:
        try:
            gin.parse_config_file(path)
        except tokenize.TokenError as e:
            where = _token_error_in(path, search, set()) or f"{path}: {e.args[0] if e.args else e}"
            raise UserError(f"gin file {where}") from e
        except SyntaxError as e:
            # An unclosed bracket mid-file makes gin misread the lines after it: name it.
            where = _token_error_in(path, search, set()) or _syntax_error_line(e)
            raise UserError(f"gin file {where}") from e
        except _PARSE_ERRORS as e:
            raise UserError(f"gin file {path}: {_one_line(e)}") from e


def _parse_bindings(bindings: Sequence[str]) -> None:
    """Command-line bindings, after every file (only their syntax errors get the quoting
    hint: a file's errors are the file's)."""
    try:
        gin.parse_config(list(bindings))
    except tokenize.TokenError as e:
        bad = next((b for b in bindings if _unclosed_bracket(b)), "")
        raise UserError(f"gin binding {bad!r}: unclosed bracket.") from e
    except SyntaxError as e:
        raise UserError(f"gin binding: {_syntax_error_line(e)} (string values need quotes: "
                        "--gin.MODEL_DIR=\"'/tmp/run'\")") from e
    except _PARSE_ERRORS as e:
        raise UserError(f"gin binding: {_one_line(e)}") from e


def _macro_bindings(bindings: Sequence[str]) -> Dict[str, str]:
    """MACRO -> `--gin.MACRO=VALUE` for the command-line bindings that set a macro."""
    out = {}
    for binding in bindings:
        for line in binding.splitlines():
            m = re.match(r"\s*([A-Za-z_]\w*)\s*=\s*(.*?)\s*$", line)
            if m:
                out[m.group(1)] = f"--gin.{m.group(1)}={m.group(2)}"
    return out


def _referenced_macros() -> Set[str]:
    """Macros some binding (or macro) of the parsed config refers to as %NAME."""
    found: Set[str] = set()

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple, set)):
            for x in v:
                walk(x)
        elif isinstance(v, gin.config.ConfigurableReference) and repr(v).startswith("%"):
            found.add(repr(v)[1:])
    for params in gin.config._CONFIG.values():  # pylint: disable=protected-access
        walk(params)
    return found


# Set in the environment of a process that re-runs a command whose parent already warned
# (`ssr-jax plan` re-executing itself with fake devices), so each warning shows once.
WARNED_ENV = "SSR_JAX_GIN_WARNED"


# Offered to every fine-tuning recipe by `ssr-jax compare` (the fine-tuning's first step and
# length, for a schedule over its own steps); a recipe that does not need them ignores them.
OFFERED_MACROS = frozenset({"FINETUNE_START_STEP", "FINETUNE_STEPS"})


def _warn_unused_macros(bindings: Sequence[str]) -> None:
    """gin silently ignores a macro nothing refers to: `--gin.TRAIN_STEP=10` (a typo of
    TRAIN_STEPS) would train with the file's value. One warning line each."""
    if os.environ.get(WARNED_ENV):
        return
    config = gin.config._CONFIG  # pylint: disable=protected-access
    defined = {scope for (scope, selector) in config if selector == "gin.macro"}
    used = _referenced_macros()
    for name, flag in _macro_bindings(bindings).items():
        if name not in defined or name in used or name in OFFERED_MACROS:
            continue
        close = difflib.get_close_matches(name, sorted((used | defined) - {name}), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"ssr-jax: warning: {flag} is not used by any binding{hint}", file=sys.stderr,
              flush=True)


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
    _tolerant_file_readers()
    with _quiet_include_search():
        _parse_files(files, search)
        _parse_bindings(flags.bindings)
    _warn_unused_macros(flags.bindings)
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


def _name_macro(message: str) -> str:
    """`train.train_steps='ten' must be ...` -> `TRAIN_STEPS='ten' must be ...` when that
    binding is a macro: the user set the macro, not the binding."""
    m = re.match(r"([A-Za-z_]\w*\.[A-Za-z_]\w*)=", message)
    macro = bound_macro(m.group(1)) if m else None
    return macro + message[len(m.group(1)):] if macro else message


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
        raise cls(_name_macro(lines[0]) if lines else "") from e
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


def bound_macro(selector: str) -> Optional[str]:
    """The macro `selector` is bound to (`train.train_steps = %TRAIN_STEPS` -> 'TRAIN_STEPS'),
    or None (unbound, or bound to a value)."""
    try:
        text = repr(gin.query_parameter(selector))
    except ValueError:
        return None
    return text[1:] if text.startswith("%") and text != "%gin.REQUIRED" else None


def query(selector: str, default=None):
    """The value gin would pass for `selector` (a configurable reference is called), or
    `default` when it is unbound."""
    try:
        value = gin.query_parameter(selector)
    except ValueError:
        return default
    for _ in range(10):  # macros may point at macros
        if not isinstance(value, gin.config.ConfigurableReference):
            return value
        # pylint: disable-next=protected-access
        value = value.scoped_configurable_fn() if value._evaluate else value.scoped_configurable_fn
    return value


def quiet_logs():
    from ssr_jax.cli.tf_env import quiet_tensorflow_env  # pylint: disable=C0415
    quiet_tensorflow_env()
    for name in ("absl", "orbax", "tensorflow", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.ERROR)


def prepare(argv: Sequence[str], allowed_other: Sequence[str] = ()) -> Flags:
    """What every gin-configured command does first: parse its flags, quiet the logs, parse
    gin, then join the multi-process runtime (before anything touches jax devices)."""
    from ssr_jax import distributed  # pylint: disable=import-outside-toplevel
    flags = parse_flags(argv, allowed_other=(*distributed.FLAG_NAMES, *allowed_other))
    quiet_logs()
    setup(flags)
    distributed.initialize(distributed.config_from_strings(flags.other))
    return flags


def run_command(kind: str, argv: Sequence[str], body: Callable[[], int]) -> int:
    """A gin-configured command: prepare, write the parsed config beside MODEL_DIR's outputs
    (process 0: config.gin for train, <kind>_config.gin otherwise), then run `body`. In a
    multi-process run an error ends the process at once (distributed.fail_fast)."""
    from ssr_jax import distributed  # pylint: disable=import-outside-toplevel
    with distributed.fail_fast(f"ssr-jax {kind}"):
        prepare(argv)
        model_dir = query_macro("MODEL_DIR")
        if isinstance(model_dir, str) and distributed.is_primary():
            write_config(os.path.join(model_dir, "config.gin" if kind == "train"
                                      else f"{kind}_config.gin"))
        return body()


def write_config(path: str) -> None:
    """The parsed gin config, as gin writes it (process 0 calls this)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(gin.config_str())


def t5config_from_gin(path: str, bindings: Sequence[str] = ()):
    """The T5Config of the model a gin file binds to MODEL (gin/models/*/*.gin)."""
    from ssr_jax.models.config import T5Config  # pylint: disable=import-outside-toplevel
    setup(Flags([path], list(bindings), [], {}))
    try:
        ref = gin.query_parameter("%MODEL")
    except ValueError:
        ref = None
    if not hasattr(ref, "scoped_configurable_fn"):
        raise UserError(f"{path}: binds no MODEL = @.../EncoderDecoderModel(); use a file "
                        "from gin/models/.")
    scope = "/".join(ref.scopes)
    try:
        config_ref = gin.query_parameter(f"{scope + '/' if scope else ''}{ref.selector}.config")
        config = config_ref.scoped_configurable_fn()
    except (ValueError, AttributeError) as e:
        raise UserError(f"{path}: MODEL has no T5Config bound to its 'config' ({e}).") from e
    if not isinstance(config, T5Config):
        raise UserError(f"{path}: MODEL.config is not a T5Config.")
    return config


# --- the model that comes with a checkpoint ----------------------------------------------------
# Fields that do not change what a checkpoint's params mean (the run may choose them).
_RUNTIME_FIELDS = ("dropout_rate", "dtype", "param_dtype", "remat_policy", "attention_impl")


def model_from_checkpoint(checkpoint_path: str, dropout_rate: Optional[float] = None):
    """The model of a checkpoint: the gin MODEL when one is bound (refused when its config
    disagrees with the checkpoint's model_config.json), else built from that file, so eval,
    infer, fine-tuning and export need no model gin file. `dropout_rate` (fine-tuning)
    replaces the stored one."""
    # pylint: disable=import-outside-toplevel
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel
    from ssr_jax.train import checkpoints
    if not checkpoint_path:
        raise UserError("no checkpoint to take the model from: set CHECKPOINT_PATH (eval, "
                        "infer) or INITIAL_CHECKPOINT_PATH (fine-tuning), or bind MODEL with a "
                        "model gin file (gin/models/...).")
    path = checkpoints.model_config_path(checkpoint_path)
    stored = checkpoints.load_model_config(checkpoint_path) if path else None
    bound = query("%MODEL")  # None when MODEL is unbound
    if bound is None:
        if not stored:
            raise UserError(f"checkpoint {checkpoint_path} has no model_config.json: give the "
                            "model's gin file (e.g. --gin_file=gin/models/t5_1_1/small.gin).")
        model = EncoderDecoderModel.from_config_dict(stored, path)
        if dropout_rate is not None:
            model = model.replace_config(dropout_rate=float(dropout_rate))
        return model
    mine = bound.config_dict() or {}
    for key, value in (stored or {}).items():
        if key in mine and key not in _RUNTIME_FIELDS and mine[key] != value:
            raise UserError(f"the gin MODEL does not fit checkpoint {checkpoint_path}: {key} "
                            f"{mine[key]} in the gin MODEL, {value} in {path}; drop the model "
                            "gin file (the model comes with the checkpoint) or use this "
                            "model's checkpoint.")
    return bound
