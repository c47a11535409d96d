"""`ssr-jax generate-spans --gin_file=... --gin.OUTPUT_DIR=...`: write SSR-rewritten
examples once (ssr_jax.ssr.offline) for the run that gin/objectives/ssr_offline.gin
configures; training with the same files then reads them. MODEL_DIR, required by the
run-mode files, defaults to OUTPUT_DIR (generate-spans writes nothing there)."""
import os
from typing import List

import gin

from ssr_jax import distributed
from ssr_jax.cli import gin_registry
from ssr_jax.errors import UserError

# Macros generate-spans binds when the command line does not (`--help` shows them).
DEFAULT_MACROS = {"MODEL_DIR": "%OUTPUT_DIR"}


def main(argv: List[str]) -> int:
    # pylint: disable=import-outside-toplevel
    import jax
    import tensorflow as tf
    from ssr_jax.cli.train import run_spec  # imports the library: not for --help
    from ssr_jax.ssr import spec as ssr_spec
    argv = list(argv)
    for name, value in DEFAULT_MACROS.items():
        if not any(a.startswith((f"--gin.{name}=", f"--gin.{name} ")) for a in argv):
            argv.append(f"--gin.{name}={value}")
    with distributed.fail_fast("ssr-jax generate-spans"):
        gin_registry.prepare(argv)
        spec = run_spec()
        if spec.ssr is None or spec.ssr.mode != ssr_spec.OFFLINE:
            raise UserError("generate-spans writes offline SSR data: include "
                            "gin/objectives/ssr_offline.gin (train.ssr = @ssr_offline()).")
        if jax.process_index() == 0:
            tf.io.gfile.makedirs(spec.ssr.output_dir)
            with tf.io.gfile.GFile(os.path.join(spec.ssr.output_dir, "generate_config.gin"),
                                   "w") as f:
                f.write(gin.config_str())
        ssr_spec.generate_spans(spec.ssr, spec.train_dataset, spec.partitioner)
        return 0
