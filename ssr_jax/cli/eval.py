"""`ssr-jax eval --gin_file=... --gin.X=Y`: loss and accuracy of a checkpoint over a split
(gin/runs/eval.gin binds `evaluate`); flags as `ssr-jax train`."""
from typing import List

from ssr_jax.cli import gin_registry


def main(argv: List[str]) -> int:
    def evaluate() -> int:
        gin_registry.call("evaluate")
        return 0
    return gin_registry.run_command("eval", argv, evaluate)
