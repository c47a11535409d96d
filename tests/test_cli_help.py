"""`ssr-jax COMMAND --help` / `-h`: every command explains itself, exits 0, imports neither
jax nor TensorFlow for it, and prints no start-up noise; the gin commands' help lists their
flags, the search path, the run-mode file's macros with its defaults, and an example that
parses."""
import os
import re
import shlex
import subprocess
import sys

import pytest

from ssr_jax import cli, distributed
from ssr_jax.cli import flags as flags_lib
from ssr_jax.cli import generate_spans as generate_spans_cli
from ssr_jax.cli import gin_registry
from ssr_jax.cli import help as help_lib
from ssr_jax.cli import plan as plan_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SSR_JAX = os.path.join(REPO, ".venv", "bin", "ssr-jax")
GIN_COMMANDS = ["train", "eval", "infer", "plan", "generate-spans", "compare"]
ARGPARSE_COMMANDS = ["export-hf", "import-hf", "default-run", "build-vocab", "corpus"]
# The run-mode files whose macros a command's help shows (later files win, as in gin).
RUN_FILES = {"train": ["runs/pretrain.gin"], "eval": ["runs/eval.gin"],
             "infer": ["runs/infer.gin"], "plan": ["runs/pretrain.gin"],
             "generate-spans": ["runs/pretrain.gin", "objectives/ssr_online.gin",
                                "objectives/ssr_offline.gin"],
             "compare": ["compare/default.gin"]}


def _ssr_jax(*argv):
    cmd = [SSR_JAX] if os.path.exists(SSR_JAX) else [sys.executable, "-m", "ssr_jax.cli"]
    return subprocess.run(cmd + list(argv), cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": REPO})


def _file_macros(*paths):
    """MACRO -> value text of the `NAME = value` lines of gin files, read independently of
    ssr_jax.cli.help (one-line values only, which is all the run-mode files use)."""
    out = {}
    for path in paths:
        with open(os.path.join(REPO, "gin", path)) as f:
            for line in f:
                m = re.match(r"([A-Z][A-Z0-9_]*) = (.+?)(\s+#.*)?$", line.rstrip("\n"))
                if m:
                    out[m.group(1)] = m.group(2)
    return out


@pytest.mark.parametrize("command", GIN_COMMANDS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_gin_command_help(command, flag):
    proc = _ssr_jax(command, "--gin_file=x.gin", flag)  # help wins over the other flags
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no TF/CUDA noise, no error
    out = proc.stdout
    assert out.startswith(f"usage: ssr-jax {command} --gin_file=FILE")
    for gin_flag in ("--gin_file=FILE", "--gin.NAME=VALUE", "--gin_bindings=",
                     "--gin_search_paths="):
        assert gin_flag in out
    for name in distributed.FLAG_NAMES:  # the multi-process flags prepare() accepts
        assert (f"--{name}=" in out) == (command not in ("plan", "compare")), name
    for name in plan_cli.OWN_FLAGS:
        assert (f"--{name}=" in out) == (command == "plan"), name
    assert f"  {gin_registry.REPO_ROOT}\n  {os.path.join(gin_registry.REPO_ROOT, 'gin')}\n" in out
    macros = _file_macros(*RUN_FILES[command])
    assert ({"MODEL_DIR"} if command == "compare" else
            {"MODEL_DIR", "MIXTURE_OR_TASK_NAME", "MIXTURE_OR_TASK_MODULE",
             "TASK_FEATURE_LENGTHS", "BATCH_SIZE"}) <= set(macros)
    overridden = {"plan": plan_cli.UNUSED_REQUIRED,
                  "generate-spans": generate_spans_cli.DEFAULT_MACROS}.get(command, {})
    for name, value in {**macros, **overridden}.items():
        assert re.search(rf"^  {name} = {re.escape(value)}(\s|$)", out, re.M), (name, value)
    example = out.split("example:\n", 1)[1].strip()
    assert example.startswith(f"ssr-jax {command} ")


def test_help_lists_the_command_specific_macros():
    out = help_lib.command_help("generate-spans")
    for name, value in _file_macros("objectives/ssr_offline.gin").items():
        assert f"  {name} = {value}" in out
    assert "TRAIN_STEPS = %gin.REQUIRED" in help_lib.command_help("train")
    assert "TRAIN_STEPS" not in help_lib.command_help("eval")
    assert "CHECKPOINT_PATH = %MODEL_DIR" in help_lib.command_help("eval")


def test_help_imports_neither_jax_nor_tensorflow():
    code = ("import sys; from ssr_jax import cli\n"
            "for c in ['train', 'eval', 'infer', 'plan', 'generate-spans']:\n"
            "    assert cli.main([c, '--help']) == 0\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('jax', 'jaxlib', 'tensorflow', 'seqio', 'flax', 'orbax')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("command", GIN_COMMANDS)
def test_help_example_parses_and_sets_every_required_value(command, capsys):
    example = help_lib.COMMANDS[command].example
    argv = shlex.split(example)
    assert argv[:2] == ["ssr-jax", command]
    flags = flags_lib.parse_flags(argv[2:], allowed_other=help_lib.COMMANDS[command].own_flags)
    for name, value in help_lib.COMMANDS[command].command_macros.items():
        flags.bindings.insert(0, f"{name} = {value}")
    gin_registry.setup(flags)  # raises on a missing file, a bad binding, a required value
    assert capsys.readouterr().err == ""  # and warns about no unused macro


def test_distributed_flags_all_have_help():
    assert set(help_lib.DISTRIBUTED_HELP) == set(distributed.FLAG_NAMES)


def test_help_command_and_top_level_usage(capsys):
    assert cli.main(["help", "plan"]) == 0
    assert capsys.readouterr().out.startswith("usage: ssr-jax plan ")
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"  {name} " in out


@pytest.mark.parametrize("command", ARGPARSE_COMMANDS)
def test_argparse_command_help(command, capsys):
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as e:
            cli.main([command, flag])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: ssr-jax {command}")
    expected = {"export-hf": ["--checkpoint", "--params_npz", "--model_config", "--vocab",
                              "--out"],
                "import-hf": ["hf_dir", "--out", "--vocab"],
                "default-run": ["--out_dir", "--teacher_steps", "--student_steps",
                                "--eval_batches", "--gin"],
                "build-vocab": ["--input", "--model_prefix", "--vocab_size", "--extra_ids"],
                "corpus": ["--write_text", "--data_dir"]}[command]
    for name in expected:
        assert name in out, name
