"""`ssr-jax infer --gin_file=... --gin.X=Y`: decode a split with a checkpoint to JSONL and
the task's metrics (gin/runs/infer.gin binds `infer`); flags as `ssr-jax train`."""
from typing import List

from ssr_jax.cli import gin_registry


def main(argv: List[str]) -> int:
    def infer() -> int:
        gin_registry.call("infer")
        return 0
    return gin_registry.run_command("infer", argv, infer)
