"""The edge: `ssr-jax COMMAND`, one module per command. Only this package imports gin,
argparse or the `tasks` registrations; it turns flags and gin files into the plain values
(frozen dataclasses) the library takes."""
import importlib
import sys

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
    "build-vocab": ("ssr_jax.cli.vocab", "main",
                    "train a SentencePiece vocabulary (T5 settings)"),
    "corpus": ("ssr_jax.cli.corpus", "main", "build or dump the embedded default corpus"),
}


def _usage() -> str:
    lines = ["usage: ssr-jax COMMAND [flags]", "", "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ssr-jax: unknown command {name!r}.\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    try:
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

