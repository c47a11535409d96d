"""Training: optimizers, train state, jitted steps, checkpoints, metrics, the loop, inference.

The loop is `trainer.train` (plain arguments); its command line is `ssr_jax.cli.train`.
"""
