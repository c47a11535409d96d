"""`ssr-jax COMMAND --help` for the gin-configured commands (train, eval, infer, plan,
generate-spans, compare): their flags, the gin search path, the main macros with the defaults their
run-mode gin files set, and an example. It reads the gin files as text, so help needs no
jax, TensorFlow or registered configurables."""
import io
import os
import re
import textwrap
import tokenize
from typing import Dict, List, NamedTuple, Sequence, Tuple

from ssr_jax import distributed
from ssr_jax.cli import generate_spans as generate_spans_cli
from ssr_jax.cli import gin_registry
from ssr_jax.cli import plan as plan_cli

GIN_FLAGS = (
        ("--gin_file=FILE", "a gin file (repeatable; later files and their values win)"),
        ("--gin.NAME=VALUE", "one binding `NAME = VALUE` after all files (repeatable); strings "
                             "need inner quotes: --gin.MODEL_DIR=\"'/tmp/run'\""),
        ("--gin_bindings='NAME = VALUE'", "the same, as a whole binding line (repeatable)"),
        ("--gin_search_paths=A,B", "more directories to look up gin files and includes in"),
)
DISTRIBUTED_HELP = {  # name -> (metavar, help), for distributed.FLAG_NAMES
        "coordinator_address": ("HOST:PORT", "process 0's address (with --num_processes and "
                                             "--process_id)"),
        "num_processes": ("N", "number of processes in the run"),
        "process_id": ("I", "this process's index, 0 .. N-1"),
        "local_device_ids": ("0,1,..", "the local devices this process uses"),
        "heartbeat_timeout_s": ("S", "seconds without a heartbeat before a peer is declared "
                                     f"dead (default {distributed.DEFAULT_HEARTBEAT_TIMEOUT_S})"),
        "step_timeout_s": ("S", "exit when no step finished for this many seconds (default "
                                f"{distributed.DEFAULT_STEP_TIMEOUT_S:g}; 0 = no watchdog)"),
        "multiprocess": ("true", "let JAX detect the cluster (TPU pod, SLURM)"),
}
WIDTH = 100


class CommandHelp(NamedTuple):
    about: str
    run_files: Tuple[str, ...]  # gin files (under gin/) whose macros are the command's
    own_flags: Dict[str, Tuple[str, str]]  # --name -> (metavar, help)
    multi_process: bool  # accepts distributed.FLAG_NAMES
    example: str
    command_macros: Dict[str, str] = {}  # macros the command binds unless the flags do


COMMANDS: Dict[str, CommandHelp] = {
        "train": CommandHelp(
                "Trains (or resumes) the run the gin files configure; rerun the same command "
                "to resume from MODEL_DIR's newest checkpoint.",
                ("runs/pretrain.gin",), {}, True,
                "ssr-jax train --gin_file=gin/experiments/tiny_default.gin "
                "--gin.MODEL_DIR=\"'/tmp/tiny'\" --gin.TRAIN_STEPS=100"),
        "eval": CommandHelp(
                "Loss and token accuracy of a checkpoint (CHECKPOINT_PATH, default MODEL_DIR's "
                "newest) over a split.",
                ("runs/eval.gin",), {}, True,
                "ssr-jax eval --gin_file=gin/models/t5_1_1/tiny.gin --gin_file=gin/runs/eval.gin "
                "--gin.MODEL_DIR=\"'/tmp/tiny'\" "
                "--gin.MIXTURE_OR_TASK_NAME=\"'ssr_default_span_corruption'\" "
                "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': 128, 'targets': 32}\" "
                "--gin.VOCAB_SIZE=4224"),
        "infer": CommandHelp(
                "Decodes a split with a checkpoint to MODEL_DIR/inference/*.jsonl and computes "
                "the task's metrics.",
                ("runs/infer.gin",), {}, True,
                "ssr-jax infer --gin_file=gin/models/t5_1_1/tiny.gin "
                "--gin_file=gin/runs/infer.gin --gin.MODEL_DIR=\"'/tmp/tiny'\" "
                "--gin.MIXTURE_OR_TASK_NAME=\"'ssr_default_span_corruption'\" "
                "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': 128, 'targets': 32}\" "
                "--gin.VOCAB_SIZE=4224 --gin.DecodeConfig.method=\"'greedy'\""),
        "plan": CommandHelp(
                "Compiles the configured training step on N fake CPU devices and prints its "
                "per-device memory and FLOPs, before launching the run (MODEL_DIR is not "
                "needed).",
                ("runs/pretrain.gin",), dict(plan_cli.OWN_FLAGS), False,
                "ssr-jax plan --gin_file=gin/experiments/plan_xl_xxl.gin "
                "--extrapolate_from_layers=2", dict(plan_cli.UNUSED_REQUIRED)),
        "generate-spans": CommandHelp(
                "Writes the SSR-rewritten examples of TRAIN_STEPS steps to OUTPUT_DIR once; "
                "training with the same files and OUTPUT_DIR then reads them (MODEL_DIR "
                "defaults to OUTPUT_DIR). Rerun the same command to resume.",
                ("runs/pretrain.gin", "objectives/ssr_online.gin", "objectives/ssr_offline.gin"),
                {}, True,
                "ssr-jax generate-spans --gin_file=gin/experiments/default_student_ssr.gin "
                "--gin_file=gin/objectives/ssr_offline.gin "
                "--gin.TEACHER_CHECKPOINT=\"'/ckpt/teacher'\" "
                "--gin.OUTPUT_DIR=\"'/data/ssr_spans'\"", dict(generate_spans_cli.DEFAULT_MACROS)),
        "compare": CommandHelp(
                "Does SSR help? Trains or checks the teacher, a shared student init, the "
                "continued pre-training arms, fine-tunes each arm on each task with several "
                "seeds and writes MODEL_DIR/report.md, results.json and plots. Every field is "
                "a compare.X binding (ssr_jax/cli/compare_spec.py). Rerun the same command to "
                "resume: finished stages are skipped.",
                ("compare/default.gin",), {}, False,
                "ssr-jax compare --gin_file=gin/compare/default.gin "
                "--gin.MODEL_DIR=\"'runs/compare'\" --gin.compare.seeds=[0]"),
}


def wants_help(argv: Sequence[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def _statements(text: str) -> List[Tuple[str, str]]:
    """(statement, trailing comment) for each logical line of a gin file (a value may span
    lines inside brackets)."""
    out, parts, comment = [], [], ""
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.COMMENT:
                comment = tok.string.lstrip("#").strip()
            elif tok.type == tokenize.NEWLINE:
                out.append((" ".join(parts), comment))
                parts, comment = [], ""
            elif tok.type == tokenize.NL:
                if not parts:
                    comment = ""  # a comment on its own line belongs to nothing
            elif tok.type not in (tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
                parts.append(tok.string)
    except tokenize.TokenError:
        pass  # a broken file: help shows what came before; running the command says where
    if parts:
        out.append((" ".join(parts), comment))
    return out


def _compact(value: str) -> str:
    """Tokens joined by spaces, tidied: `{ 'a' : 1 }` -> `{'a': 1}`, `% gin . REQUIRED`."""
    value = re.sub(r"\s*([.:,])\s*", lambda m: m.group(1) + (" " if m.group(1) != "." else ""),
                   value)
    value = re.sub(r"([\[({%@])\s+", r"\1", value)
    return re.sub(r"\s+([\])}])", r"\1", value).strip()


def run_file_macros(path: str, search: Sequence[str], seen=None) -> Dict[str, Tuple[str, str]]:
    """MACRO -> (value, comment) as the gin file `path` and its includes set them (later
    assignments win, as in gin)."""
    seen = set() if seen is None else seen
    found = _resolve(path, search)
    if found is None or found in seen:
        return {}
    seen.add(found)
    with open(found) as f:
        text = f.read()
    macros: Dict[str, Tuple[str, str]] = {}
    for statement, comment in _statements(text):
        inc = _included(statement)
        if inc:
            macros.update(run_file_macros(inc, search, seen))
            continue
        m = re.match(r"([A-Z][A-Z0-9_]*)\s*=\s*(.+)$", statement)
        if m:
            macros[m.group(1)] = (_compact(m.group(2)), comment)
    return macros


def gin_file_closure(path: str, search: Sequence[str], seen=None) -> List[str]:
    """The resolved paths of the gin file `path` and, depth first, of every file it includes
    (a file not found is left out: running the command says so)."""
    seen = [] if seen is None else seen
    found = _resolve(path, search)
    if found is None or found in seen:
        return seen
    seen.append(found)
    with open(found) as f:
        for statement, _ in _statements(f.read()):
            inc = _included(statement)
            if inc:
                gin_file_closure(inc, search, seen)
    return seen


def _included(statement: str):
    """The path of an `include '...'` statement, else None."""
    m = re.match(r"include\s+['\"](.+)['\"]$", statement)
    return m.group(1) if m else None


def _resolve(path: str, search: Sequence[str]):
    for c in [path] + [os.path.join(d, path) for d in search]:
        if os.path.isfile(c):
            return os.path.abspath(c)
    return None


def _extra_search_paths(argv: Sequence[str]) -> List[str]:
    out = []
    for i, a in enumerate(argv):
        if a.startswith("--gin_search_paths="):
            out += a.split("=", 1)[1].split(",")
        elif a == "--gin_search_paths" and i + 1 < len(argv):
            out += argv[i + 1].split(",")
    return [p for p in out if p]


def _rows(pairs, width: int = 32, wrap: bool = True) -> List[str]:
    """Two columns, the second wrapped to WIDTH."""
    out = []
    for name, text in pairs:
        wrapped = (textwrap.wrap(text, WIDTH - width - 2) if wrap else [text]) or [""]
        first = f"  {name:<{width}}{wrapped[0]}" if len(name) < width else f"  {name}"
        rest = wrapped[1:] if len(name) < width else wrapped
        out += [first] + [f"  {'':<{width}}{ln}" for ln in rest]
    return [ln.rstrip() for ln in out if ln.strip()]


def command_help(name: str, argv: Sequence[str] = ()) -> str:
    """The --help text of a gin-configured command."""
    info = COMMANDS[name]
    search = gin_registry.search_paths(_extra_search_paths(argv))
    lines = [f"usage: ssr-jax {name} --gin_file=FILE [--gin_file=FILE ...] [--gin.NAME=VALUE ...]"
             + (" [flags]" if info.own_flags or info.multi_process else ""), "",
             *textwrap.wrap(info.about, WIDTH), "", "gin flags:", *_rows(GIN_FLAGS)]
    if info.own_flags:
        lines += ["", f"{name} flags:",
                  *_rows((f"--{k}={v[0]}", v[1]) for k, v in info.own_flags.items())]
    if info.multi_process:
        lines += ["", "multi-process flags (or the SSR_JAX_<NAME> environment variables; "
                  "see ssr_jax/distributed.py):",
                  *_rows((f"--{k}={DISTRIBUTED_HELP.get(k, ('VALUE',))[0]}",
                          DISTRIBUTED_HELP.get(k, ("", ""))[1]) for k in distributed.FLAG_NAMES)]
    lines += ["", "gin search path (for --gin_file and `include`): the path as given, then",
              *[f"  {d}" for d in search]]
    macros: Dict[str, Tuple[str, str]] = {}
    for run_file in info.run_files:
        macros.update(run_file_macros(run_file, search))
    for k, v in info.command_macros.items():
        macros[k] = (v, f"`ssr-jax {name}` binds it unless you do")
    files = ", ".join(os.path.join("gin", f) for f in info.run_files)
    lines += [""] + textwrap.wrap(
            f"main macros, with the defaults of {files} (%gin.REQUIRED: must be set; an "
            "experiment file or --gin.NAME=VALUE overrides them):", WIDTH)
    lines += _rows(((f"{k} = {v}", f"  # {c}" if c else "") for k, (v, c) in macros.items()),
                   width=44, wrap=False)
    lines += ["", "example:", f"  {info.example}"]
    return "\n".join(lines)
