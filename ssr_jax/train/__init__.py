"""Training: optimizers, train state, jitted steps, checkpoints, metrics, the loop, inference.

Entry points (gin edge) are in `ssr_jax.train.main`; the loop is `trainer.train`.
"""
