"""The fused attention path (T5Config.attention_impl='dot_product_attention', through
jax.nn.dot_product_attention) against the einsum path on CPU in fp32: relative-position bias,
padding, packing, gradients, cached decoding; and what 'auto' resolves to per backend."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from ssr_jax.models import config as config_lib
from ssr_jax.models import layers
from ssr_jax.models.base import DecodeConfig
from ssr_jax.models.config import T5Config
from ssr_jax.models.encoder_decoder import EncoderDecoderModel
import helpers
from test_model import TINY, padded_batch, random_params

FUSED = TINY.replace(attention_impl="dot_product_attention")
EINSUM = TINY.replace(attention_impl="einsum")


@pytest.fixture(scope="module")
def params():
    return random_params(TINY, seed=4)


def packed_batch(seed=0):
    """Two rows: row 0 packs three examples (segments 1, 2, 3, then padding), row 1 one."""
    rng = np.random.RandomState(seed)
    enc_lens, dec_lens = [(9, 13, 5), (24,)], [(7, 10, 4), (20,)]

    def rows(lens_per_row, length, shift):
        tok, seg, pos = (np.zeros((2, length), np.int32) for _ in range(3))
        for r, lens in enumerate(lens_per_row):
            i = 0
            for s, n in enumerate(lens):
                t = rng.randint(2, 64, n)
                tok[r, i:i + n] = np.concatenate([[0], t[:-1]]) if shift else t
                seg[r, i:i + n], pos[r, i:i + n] = s + 1, np.arange(n)
                i += n
        return tok, seg, pos
    enc, enc_seg, enc_pos = rows(enc_lens, 30, False)
    dec, dec_seg, dec_pos = rows(dec_lens, 25, True)
    tgt = np.where(dec_seg > 0, rng.randint(2, 64, dec.shape), 0).astype(np.int32)
    return {"encoder_input_tokens": enc, "encoder_segment_ids": enc_seg,
            "encoder_positions": enc_pos, "decoder_input_tokens": dec,
            "decoder_segment_ids": dec_seg, "decoder_positions": dec_pos,
            "decoder_target_tokens": tgt, "decoder_loss_weights": (tgt > 0).astype(np.int32)}


def logits(config, params, batch):
    return np.asarray(jax.jit(EncoderDecoderModel(config).logits)(params, batch))


def test_the_fused_path_runs_dot_product_attention():
    # Not vacuous: the fused model's program differs (jax's attention masks with select).
    batch = padded_batch()
    p = random_params(TINY)
    jaxprs = {c.attention_impl: str(jax.make_jaxpr(EncoderDecoderModel(c).logits)(p, batch))
              for c in (EINSUM, FUSED)}
    assert jaxprs["einsum"].count("select_n") < jaxprs["dot_product_attention"].count("select_n")


@pytest.mark.parametrize("batch_fn", [padded_batch, packed_batch], ids=["padding", "packing"])
def test_logits_equal_the_einsum_path(params, batch_fn):
    batch = batch_fn(seed=5)
    ref, fused = logits(EINSUM, params, batch), logits(FUSED, params, batch)
    np.testing.assert_allclose(fused, ref, atol=1e-5, rtol=1e-5)
    # The relative-position bias matters here: zeroing it changes the logits a lot.
    flat = jax.tree.map(np.copy, params)
    for stack in ("encoder", "decoder"):
        flat[stack]["relpos_bias"]["rel_embedding"][...] = 0.0
    assert np.abs(logits(FUSED, flat, batch) - fused).max() > 1e-2


@pytest.mark.parametrize("remat", ["none", "full"])
def test_gradients_equal_the_einsum_path(params, remat):
    batch = packed_batch(seed=6)

    def grads(config):
        model = EncoderDecoderModel(config.replace(remat_policy=remat))
        return jax.jit(jax.grad(lambda p: model.loss_fn(p, batch, None)[0]))(params)
    ref, fused = grads(EINSUM), grads(FUSED)
    for path, g in jax.tree_util.tree_leaves_with_path(fused):
        r = np.asarray(_at(ref, path))
        scale = max(float(np.abs(r).max()), 1e-6)
        np.testing.assert_allclose(np.asarray(g) / scale, r / scale, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    rel = fused["encoder"]["relpos_bias"]["rel_embedding"]
    assert float(jnp.abs(rel).max()) > 0  # the bias table is trained through the fused call


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_cached_decoding_equals_full_decoding(params):
    batch = padded_batch(seed=2)
    length = batch["decoder_input_tokens"].shape[1]

    def cached(config):
        out, cache = helpers.cached_decode(EncoderDecoderModel(config), params,
                                           batch["encoder_input_tokens"],
                                           batch["decoder_input_tokens"])
        return np.asarray(out), cache["layers_0"][0].shape
    full = logits(EINSUM, params, batch)
    fused, fused_shape = cached(FUSED)
    _, einsum_shape = cached(EINSUM)
    np.testing.assert_allclose(fused, full, atol=1e-5, rtol=1e-5)
    n, h, d = batch["encoder_input_tokens"].shape[0], TINY.num_heads, TINY.d_kv
    assert fused_shape == (n, length, h, d)  # dot_product_attention's layout
    assert einsum_shape == (n, h, length, d)  # head-major


@pytest.mark.parametrize("decode", [DecodeConfig(max_decode_length=12),
                                    DecodeConfig(method="beam", num_beams=3,
                                                 max_decode_length=12)],
                         ids=["greedy", "beam"])
def test_decoding_methods_agree(params, decode):
    batch = padded_batch(seed=3)
    tokens = {c.attention_impl: np.asarray(EncoderDecoderModel(c).predict_batch(
            params, batch, decode)[0]) for c in (EINSUM, FUSED)}
    np.testing.assert_array_equal(tokens["dot_product_attention"], tokens["einsum"])


def test_cudnn_arguments(monkeypatch):
    """What the cuDNN call is given (checked on CPU by recording the call): the bias in the
    inputs' dtype and both bias and mask at full query/key lengths; same result as einsum."""
    calls = []
    real = jax.nn.dot_product_attention

    def record(q, k, v, bias=None, mask=None, **kw):
        calls.append((kw["implementation"], bias, mask, kw["scale"]))
        return real(q, k, v, bias=bias, mask=mask, scale=kw["scale"],
                    is_causal=kw["is_causal"], implementation="xla")
    monkeypatch.setattr(layers, "fused_implementation", lambda q, k: "cudnn")
    monkeypatch.setattr(jax.nn, "dot_product_attention", record)
    rng = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 6, 4, 8)), jnp.bfloat16) for _ in range(3))
    bias = jnp.asarray(rng.standard_normal((1, 4, 6, 6)), jnp.float32)
    mask = jnp.asarray(rng.rand(2, 1, 1, 6) > 0.3).at[:, :, :, 0].set(True)
    out = layers.fused_attention(q, k, v, bias, mask, causal=False)
    impl, b, m, scale = calls[0]
    assert impl == "cudnn" and scale == 1.0
    assert b.dtype == jnp.bfloat16 and b.shape == (1, 4, 6, 6) and m.shape == (2, 1, 6, 6)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    w = jax.nn.softmax(logits + bias + layers.mask_to_bias(mask), axis=-1)
    ref = jnp.einsum("bhqk,bkhd->bqhd", w.astype(jnp.bfloat16), v)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=0.05)


def test_fused_implementation_choice(monkeypatch):
    def choice(shape_q, shape_k, dtype, backend):
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        return layers.fused_implementation(jnp.zeros(shape_q, dtype), jnp.zeros(shape_k, dtype))
    bf16 = jnp.bfloat16
    assert choice((2, 114, 12, 64), (2, 512, 12, 64), bf16, "gpu") == "cudnn"
    assert choice((2, 114, 12, 64), (2, 512, 12, 64), jnp.float32, "gpu") == "xla"
    assert choice((2, 114, 12, 64), (2, 512, 12, 64), bf16, "cpu") == "xla"
    assert choice((2, 1, 12, 64), (2, 512, 12, 64), bf16, "gpu") == "xla"  # decoding
    assert choice((2, 113, 12, 64), (2, 512, 12, 64), bf16, "gpu") == "xla"  # odd length
    assert choice((2, 114, 12, 12), (2, 512, 12, 12), bf16, "gpu") == "xla"  # d_kv % 8


def test_auto_resolution_per_backend():
    assert config_lib.resolve_dtype("auto", "gpu") == "bfloat16"
    assert config_lib.resolve_dtype("auto", "tpu") == "bfloat16"
    assert config_lib.resolve_dtype("auto", "cpu") == "float32"
    assert config_lib.resolve_dtype("float32", "gpu") == "float32"  # explicit wins
    impl = config_lib.resolve_attention_impl
    assert impl("auto", 0.0, "gpu") == "dot_product_attention"
    assert impl("auto", 0.1, "gpu") == "einsum"  # no attention dropout in the fused call
    assert impl("auto", 0.0, "tpu") == "einsum" and impl("auto", 0.0, "cpu") == "einsum"
    assert impl("einsum", 0.0, "gpu") == "einsum"
    c = T5Config()
    assert (c.dtype, c.attention_impl, c.param_dtype) == ("auto", "auto", "float32")
    gpu = c.resolved("gpu")
    assert (gpu.dtype, gpu.attention_impl, gpu.param_dtype) == (
            "bfloat16", "dot_product_attention", "float32")
    assert c.resolved("cpu").dtype == "float32"
    assert jax.default_backend() == "cpu" and c.resolved() == c.resolved("cpu")


def test_auto_on_a_gpu_builds_bf16_activations_and_fused_attention(monkeypatch, params):
    # As the module would be built on a GPU backend (jax's attention itself runs XLA here).
    monkeypatch.setattr(config_lib, "default_backend", lambda: "gpu")
    model = EncoderDecoderModel(TINY)  # dtype and attention_impl 'auto'
    batch = padded_batch(seed=7)
    out = jax.jit(model.logits)(params, batch)
    assert out.dtype == jnp.bfloat16
    assert model.module(params).config.attention_impl == "dot_product_attention"
    assert model.config_dict()["dtype"] == "auto"  # checkpoints keep 'auto'
    ref = logits(EINSUM, params, batch)
    err = np.abs(np.asarray(out, np.float32) - ref).max()
    assert err < 0.1 * np.abs(ref).max()
    grads = jax.eval_shape(jax.grad(lambda p: model.loss_fn(p, batch, None)[0]), params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))  # params stay fp32


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        T5Config(attention_impl="flash")
    with pytest.raises(ValueError, match="dropout"):
        T5Config(attention_impl="dot_product_attention", dropout_rate=0.1)
    assert T5Config(attention_impl="auto", dropout_rate=0.1).resolved("gpu").attention_impl \
        == "einsum"
    with pytest.raises(ValueError, match="dtype"):
        EncoderDecoderModel(T5Config(dtype="bf16"))
