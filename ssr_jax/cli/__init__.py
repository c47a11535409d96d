"""The edge: `ssr-jax COMMAND`, one module per command. Only this package imports gin,
argparse or the `tasks` registrations; it turns flags and gin files into the plain values
(frozen dataclasses) the library takes."""
import contextlib
import importlib
import os
import re
import sys
import tempfile

from ssr_jax.cli.tf_env import quiet_tensorflow_env

# subcommand -> (module, function, one-line help). Modules load lazily so that
# `ssr-jax --help` and light commands do not import jax/tensorflow.
COMMANDS = {
    "train": ("ssr_jax.cli.train", "main", "train (gin: --gin_file, --gin.X=Y)"),
    "eval": ("ssr_jax.cli.eval", "main", "evaluate a checkpoint on a task"),
    "infer": ("ssr_jax.cli.infer", "main", "decode a task's inputs to JSONL"),
    "generate-spans": ("ssr_jax.cli.generate_spans", "main",
                       "write SSR-rewritten examples offline"),
    "plan": ("ssr_jax.cli.plan", "main", "memory and FLOPs per device before launch"),
    "export-hf": ("ssr_jax.cli.hf", "export_main", "write a checkpoint as a Hugging Face T5"),
    "import-hf": ("ssr_jax.cli.hf", "import_main", "read a Hugging Face T5 into our params"),
    "default-run": ("ssr_jax.cli.default_run", "main", "the embedded end-to-end default run"),
    "compare": ("ssr_jax.cli.compare", "main",
                "does SSR help? teacher, shared init, arms, fine-tuning, report"),
    "build-vocab": ("ssr_jax.cli.vocab", "main",
                    "train a SentencePiece vocabulary (T5 settings)"),
    "corpus": ("ssr_jax.cli.corpus", "main", "build or dump the embedded default corpus"),
}


# What TensorFlow's C++ side prints while it loads, before absl::InitializeLog() exists (so
# TF_CPP_MIN_LOG_LEVEL does not reach it): not the framework's, and alarming on a CPU machine.
_NATIVE_NOISE = re.compile(
        r"All log messages before absl::InitializeLog|cudart_stub\.cc|failed call to cuInit|"
        r"cpu_feature_guard\.cc|rebuild TensorFlow with the appropriate compiler flags|"
        r"Unable to register cu(DNN|FFT|BLAS) factory|computation_placer\.cc|TF-TRT Warning|"
        r"oneDNN custom operations are on")



def _usage() -> str:
    lines = ["usage: ssr-jax COMMAND [flags]   (ssr-jax COMMAND --help: its flags)", "",
             "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


@contextlib.contextmanager
def _native_noise_filtered():
    """The process's stderr (fd 2, where C++ writes) captured, then replayed without the lines
    TensorFlow prints while it loads. Only around imports: a crash inside loses nothing that
    matters, and a running command's output is never held back."""
    quiet_tensorflow_env()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [ln for ln in captured.read().decode(errors="replace").splitlines(True)
                    if not _NATIVE_NOISE.search(ln)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def quiet_native_logs() -> None:
    """Keeps the console to the framework's own lines: log levels for TF's C++ side and the
    Python loggers, set before anything imports TensorFlow, and TensorFlow imported with its
    loading noise filtered. Every command but help reads data through tf.data (or seqio)
    or a checkpoint, so the import is paid anyway."""
    import logging  # pylint: disable=import-outside-toplevel
    for name in ("absl", "orbax", "tensorflow", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "tensorflow" in sys.modules:
        return
    with _native_noise_filtered():
        try:
            import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        except Exception:  # pylint: disable=broad-except
            pass  # not installed or broken: the command that needs it says so


def _command_help(name: str, rest) -> bool:
    """Prints `ssr-jax NAME --help` for a gin-configured command (argparse commands answer
    it themselves); True if it did. No jax or TensorFlow import."""
    from ssr_jax.cli import help as help_lib  # pylint: disable=import-outside-toplevel
    if name not in help_lib.COMMANDS or not help_lib.wants_help(rest):
        return False
    print(help_lib.command_help(name, rest))
    return True


def main(argv=None) -> int:
    command_line = argv is None  # the console script / python -m (tests pass argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "help":  # `ssr-jax help [COMMAND]`
        argv = argv[1:2] + ["--help"] if len(argv) > 1 else []
        if not argv:
            print(_usage())
            return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ssr-jax: unknown command {name!r}.\n{_usage()}", file=sys.stderr)
        return 2
    if _command_help(name, rest):
        return 0
    module, func, _ = COMMANDS[name]
    if not any(a in ("-h", "--help") for a in rest):  # argparse help needs no TensorFlow
        if command_line:
            from ssr_jax import host_malloc  # pylint: disable=import-outside-toplevel
            host_malloc.reexec_if_needed()  # XLA:CPU's buffers without page faults
        quiet_native_logs()
    try:
        with _native_noise_filtered():  # a command module may import TensorFlow itself
            fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        print(f"ssr-jax {name}: not available ({e}).", file=sys.stderr)
        return 2
    from ssr_jax.errors import UserError
    try:
        return int(fn(rest) or 0)
    except UserError as e:
        # gin appends "In call to configurable ..." lines; the first line is the message.
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"ssr-jax {name}: error: {first}", file=sys.stderr)
        return 2

