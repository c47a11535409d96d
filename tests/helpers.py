"""Helpers shared by the test files (import as `from helpers import ...`)."""
import math

import jax
import numpy as np


def random_params(config, seed: int = 0, *, scale: float = 1.0, norm_noise: float = 0.0,
                  embedding_std=None):
    """Random params of a T5Config's shapes with sane scales (numpy: no init to compile).

    Matrices ~ N(0, scale^2 / fan_in); the token embedding ~ N(0, embedding_std^2) when given;
    norm scales are 1 (+ norm_noise * N(0, 1) when norm_noise > 0)."""
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel  # noqa: E402
    rng = np.random.RandomState(seed)

    def draw(path, s):
        if len(s.shape) == 1:
            if not norm_noise:
                return np.ones(s.shape, np.float32)
            return (1.0 + norm_noise * rng.standard_normal(s.shape)).astype(np.float32)
        std = scale / math.sqrt(s.shape[0])
        if embedding_std is not None and "token_embedder" in jax.tree_util.keystr(path):
            std = embedding_std
        return (rng.standard_normal(s.shape) * std).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, EncoderDecoderModel(config).abstract_params())


def host(batch):
    """A batch of (global) arrays as numpy."""
    return {k: np.asarray(v) for k, v in batch.items()}


def cli_error_line(capsys, argv):
    """Runs `ssr-jax ARGV` in-process; returns its single stderr line (asserting rc 2)."""
    from ssr_jax import cli  # noqa: E402
    assert cli.main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"ssr-jax {argv[0]}: error: ") and "Traceback" not in lines[0]
    return lines[0]


def cached_decode(model, params, encoder_tokens, decoder_inputs):
    """Teacher-forced incremental decoding through the decode caches, one position per
    step: (logits [batch, length, vocab], the final cache pytree)."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    length = decoder_inputs.shape[1]

    @jax.jit
    def run(params, enc, dec_in):
        m = model.module(params)
        state = m.init_decode_state(enc, length)

        def step(cache, inputs):
            t, tokens = inputs
            logits, cache = m.decode_step(tokens, cache, state["cross_kv"],
                                          state["cross_bias"], t)
            return cache, logits
        cache, out = jax.lax.scan(step, state["cache"], (jnp.arange(length), dec_in.T))
        return jnp.swapaxes(out, 0, 1), cache
    return run(params, encoder_tokens, decoder_inputs)
