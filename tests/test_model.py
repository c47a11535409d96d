"""T5 network, losses and EncoderDecoderModel: parity with transformers' PyTorch T5 on the
same weights, cached vs full decoding, packing, losses, dropout, dtypes, remat, sharding
annotations and the gin model files."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from ssr_jax.models import losses
from ssr_jax.models.base import DecodeConfig, LossConfig
from ssr_jax.models.config import T5Config
from ssr_jax.models.encoder_decoder import EncoderDecoderModel
import helpers

LOGICAL = {"vocab", "embed", "mlp", "heads", "kv", "joined_kv", "relpos_buckets"}

# Small but exercising: encoder depth != decoder depth, sequences longer than max_distance
# so the log-spaced relative-position buckets are used.
TINY = T5Config(vocab_size=64, d_model=32, num_heads=4, d_kv=8, d_ff=48, num_encoder_layers=3,
                num_decoder_layers=2, relative_attention_num_buckets=8,
                relative_attention_max_distance=20, dropout_rate=0.0)


_JITTED = {}


def jitted(config: T5Config, name: str, loss: LossConfig = LossConfig()):
    """One jitted model method per (config, name): tests share compilations."""
    key = (config, name, loss)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(getattr(EncoderDecoderModel(config, loss), name))
    return _JITTED[key]


def random_params(config: T5Config, seed: int = 0):
    """Random params of the right shapes with sane scales, without compiling an init."""
    return helpers.random_params(config, seed, norm_noise=0.1, embedding_std=1.0)


def padded_batch(seed=0, batch=3, enc_len=30, dec_len=25, vocab=64):
    """Random tokens with right padding (row 0 full length)."""
    rng = np.random.RandomState(seed)
    enc = rng.randint(2, vocab, size=(batch, enc_len))
    targets = rng.randint(2, vocab, size=(batch, dec_len))
    for b in range(1, batch):
        enc[b, enc_len - 7 * b:] = 0
        targets[b, dec_len - 6 * b:] = 0
    dec_in = np.concatenate([np.zeros((batch, 1), int), targets[:, :-1]], axis=1)
    dec_in[targets == 0] = 0
    return {"encoder_input_tokens": jnp.asarray(enc, jnp.int32),
            "decoder_input_tokens": jnp.asarray(dec_in, jnp.int32),
            "decoder_target_tokens": jnp.asarray(targets, jnp.int32),
            "decoder_loss_weights": jnp.asarray(targets > 0, jnp.int32)}


# --- parity with transformers -----------------------------------------------------------------
@pytest.fixture(scope="module", params=["t5_1_0", "t5_1_1"])
def hf_pair(request, tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from ssr_jax.hf import import_hf
    v11 = request.param == "t5_1_1"
    torch.manual_seed(0)
    hf_config = transformers.T5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_decoder_layers=2,
            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
            dropout_rate=0.0, feed_forward_proj="gated-gelu" if v11 else "relu",
            tie_word_embeddings=not v11, decoder_start_token_id=0)
    hf = transformers.T5ForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" in name:  # default init is all ones: make the scales matter
                p.normal_(1.0, 0.1)
            elif "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)
        if v11:  # transformers 5 ties in memory; T5 1.1 has its own output layer
            hf.lm_head.weight = torch.nn.Parameter(torch.randn(64, 32) * 32 ** -0.5)
    out = str(tmp_path_factory.mktemp(request.param))
    hf.save_pretrained(out)
    params, config = import_hf(out)
    return hf, params, config


def test_imported_config_matches_hf(hf_pair):
    hf, _, config = hf_pair
    v11 = hf.config.feed_forward_proj == "gated-gelu"
    assert config.tie_word_embeddings == (not v11)
    assert (config.num_encoder_layers, config.num_decoder_layers) == (3, 2)
    assert config.feed_forward_proj == hf.config.feed_forward_proj
    if v11:
        assert config == TINY  # so the tests below share compilations


def test_logits_match_transformers(hf_pair):
    import torch
    hf, params, config = hf_pair
    batch = padded_batch()
    with torch.no_grad():
        enc = torch.tensor(np.asarray(batch["encoder_input_tokens"]), dtype=torch.long)
        ref = hf(input_ids=enc, attention_mask=(enc != 0).long(),
                 decoder_input_ids=torch.tensor(np.asarray(batch["decoder_input_tokens"]),
                                                dtype=torch.long)).logits.numpy()
    ours = np.asarray(jitted(config, "logits")(params, batch))
    assert ours.dtype == np.float32
    assert np.abs(ref).max() > 1.0  # not trivially small
    np.testing.assert_array_less(np.abs(ours - ref).max(), 1e-4)


def test_greedy_matches_transformers_generate(hf_pair):
    import torch
    hf, params, config = hf_pair
    if config == TINY:
        pytest.skip("checked on the T5 1.0 config (tied, scaled logits); the cache on 1.1")
    batch = padded_batch(seed=1)
    enc = torch.tensor(np.asarray(batch["encoder_input_tokens"]), dtype=torch.long)
    max_len = 12
    with torch.no_grad():
        ref = hf.generate(input_ids=enc, attention_mask=(enc != 0).long(), do_sample=False,
                          num_beams=1, max_new_tokens=max_len).numpy()[:, 1:]
    ref = np.pad(ref, ((0, 0), (0, max_len - ref.shape[1])))
    model = EncoderDecoderModel(config)
    tokens, _ = model.predict_batch(params, batch, DecodeConfig(max_decode_length=max_len))
    np.testing.assert_array_equal(np.asarray(tokens), ref)


def test_cached_decoder_matches_full_decoder(hf_pair):
    _, params, config = hf_pair
    if config != TINY:
        pytest.skip("the cache logic is shared; checked once on the T5 1.1 config")
    model = EncoderDecoderModel(config)
    batch = padded_batch(seed=2)
    full = np.asarray(jitted(config, "logits")(params, batch))
    cached, _ = helpers.cached_decode(model, params, batch["encoder_input_tokens"],
                                      batch["decoder_input_tokens"])
    cached = np.asarray(cached)
    np.testing.assert_allclose(cached, full, atol=2e-5, rtol=1e-5)


# --- our own model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return EncoderDecoderModel(TINY), random_params(TINY)


def test_init_shapes_axes_and_scales():
    config = dataclasses.replace(TINY, vocab_size=256, d_model=64, d_ff=128,
                                 num_encoder_layers=1, num_decoder_layers=1)
    model = EncoderDecoderModel(config)
    params = model.init(jax.random.PRNGKey(0))
    again = model.init(jax.random.PRNGKey(0))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, again))
    axes = model.param_logical_axes()
    assert jax.tree.structure(axes) == jax.tree.structure(params)
    for spec, p in zip(jax.tree.leaves(axes), jax.tree.leaves(params)):
        assert isinstance(spec, PartitionSpec) and len(spec) == p.ndim
        assert set(spec) <= LOGICAL
        assert p.dtype == jnp.float32
    # T5 initialisation: embedding std 1, query folded 1/sqrt(d_kv), others fan-in.
    emb = params["token_embedder"]["embedding"]
    q = params["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    k = params["encoder"]["layers_0"]["attention"]["key"]["kernel"]
    assert abs(float(jnp.std(emb)) - 1.0) < 0.05
    assert abs(float(jnp.std(q)) * math.sqrt(64 * 8) - 1.0) < 0.15
    assert abs(float(jnp.std(k)) * math.sqrt(64) - 1.0) < 0.15
    assert "logits_dense" in params["decoder"]
    tied = EncoderDecoderModel(dataclasses.replace(config, tie_word_embeddings=True))
    assert "logits_dense" not in tied.abstract_params()["decoder"]


def test_packed_equals_separate(tiny):
    _, params = tiny
    rng = np.random.RandomState(3)
    enc_a, enc_b = rng.randint(2, 64, 11), rng.randint(2, 64, 17)
    tgt_a, tgt_b = rng.randint(2, 64, 9), rng.randint(2, 64, 13)

    def shift(t):
        return np.concatenate([[0], t[:-1]])

    def row(parts, length):
        return np.pad(np.concatenate(parts), (0, length - sum(len(p) for p in parts)))

    def batch(rows):
        return {k: jnp.asarray(np.stack([r[i] for r in rows]), jnp.int32)
                for i, k in enumerate(("encoder_input_tokens", "encoder_segment_ids",
                                       "encoder_positions", "decoder_input_tokens",
                                       "decoder_segment_ids", "decoder_positions"))}

    def single(enc, tgt):  # one example per row, described with segment 1
        return (row([enc], 30), row([np.ones_like(enc)], 30), row([np.arange(len(enc))], 30),
                row([shift(tgt)], 25), row([np.ones_like(tgt)], 25),
                row([np.arange(len(tgt))], 25))
    packed = (row([enc_a, enc_b], 30), row([np.full(11, 1), np.full(17, 2)], 30),
              row([np.arange(11), np.arange(17)], 30), row([shift(tgt_a), shift(tgt_b)], 25),
              row([np.full(9, 1), np.full(13, 2)], 25), row([np.arange(9), np.arange(13)], 25))
    # Same shapes and keys for both batches: one compilation.
    logits_fn = jitted(TINY, "logits")
    p = np.asarray(logits_fn(params, batch([packed, single(enc_a, tgt_a)])))[0]
    s = np.asarray(logits_fn(params, batch([single(enc_a, tgt_a), single(enc_b, tgt_b)])))
    np.testing.assert_allclose(p[:9], s[0, :9], atol=1e-5)
    np.testing.assert_allclose(p[9:22], s[1, :13], atol=1e-5)


def _manual_losses(logits, targets, weights, z_loss, label_smoothing):
    logits = np.asarray(logits, np.float64)
    vocab = logits.shape[-1]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logp = logits - lse[..., None]
    low = label_smoothing / (vocab - 1)
    soft = np.full(logits.shape, low)
    np.put_along_axis(soft, targets[..., None], 1.0 - label_smoothing, axis=-1)
    entropy = -np.sum(soft * np.log(soft), axis=-1)  # minimum of the smoothed loss
    ce = -np.sum(soft * logp, axis=-1) - entropy
    z = z_loss * lse ** 2
    correct = (logits.argmax(-1) == targets)
    w = np.asarray(weights, np.float64)
    return {"cross_ent_sum": (ce * w).sum(), "z_loss_sum": (z * w).sum(),
            "weight_sum": w.sum(), "correct_sum": (correct * w).sum(),
            "loss_sum": ((ce + z) * w).sum()}


def test_loss_fn_matches_manual(tiny):
    _, params = tiny
    loss = LossConfig(z_loss=1e-3, label_smoothing=0.1)
    model = EncoderDecoderModel(TINY, loss)
    batch = padded_batch(seed=4)
    # Weights differ from the pad mask on purpose: the loss must follow the weights.
    weights = np.asarray(batch["decoder_loss_weights"]).copy()
    weights[0, :3] = 0
    batch["decoder_loss_weights"] = jnp.asarray(weights)
    loss_sum, aux = jitted(TINY, "loss_fn", loss)(params, batch, None)
    logits = np.asarray(jitted(TINY, "logits")(params, batch))
    want = _manual_losses(logits, np.asarray(batch["decoder_target_tokens"]), weights, 1e-3, 0.1)
    for key, value in want.items():
        np.testing.assert_allclose(float(aux[key]), value, rtol=2e-5, err_msg=key)
    np.testing.assert_allclose(float(loss_sum), want["loss_sum"], rtol=2e-5)
    eval_aux = jax.eval_shape(model.eval_fn, params, batch)
    assert set(eval_aux) == set(aux) and all(v.shape == () for v in eval_aux.values())


def test_loss_gradient_and_minimum():
    rng = np.random.RandomState(5)
    logits = jnp.asarray(rng.standard_normal((4, 7, 11)) * 3, jnp.float32)
    targets = jnp.asarray(rng.randint(0, 11, (4, 7)))
    weights = jnp.asarray(rng.rand(4, 7) > 0.3, jnp.float32)
    settings = ((0.0, 0.0), (0.3, 1e-2))

    def soft_targets(ls):
        return jax.nn.one_hot(targets, 11) * (1 - ls - ls / 10) + ls / 10

    def naive(lg, ls, z):
        lse = jax.nn.logsumexp(lg, axis=-1)
        ce = -jnp.sum(soft_targets(ls) * jax.nn.log_softmax(lg), -1)
        return jnp.sum(weights * (ce + z * lse ** 2))

    def ours(lg, ls, z):
        return losses.summed_metrics(lg, targets, weights, z, ls)[0]

    @jax.jit
    def everything(lg):
        grads = [(jax.grad(ours)(lg, ls, z), jax.grad(naive)(lg, ls, z)) for ls, z in settings]
        at_min = losses.token_losses(jnp.log(soft_targets(0.2)), targets, 0.0, 0.2)[0]
        elsewhere = losses.token_losses(lg, targets, 0.0, 0.2)[0]
        return grads, at_min, elsewhere
    grads, at_min, elsewhere = everything(logits)
    for g_ours, g_naive in grads:
        np.testing.assert_allclose(g_ours, g_naive, atol=1e-5)
    # With label smoothing the loss is 0 exactly at the soft-target distribution.
    np.testing.assert_allclose(at_min, 0.0, atol=1e-5)
    assert float(jnp.min(elsewhere)) > 0


def test_token_accuracy_is_argmax_accuracy_ties_included():
    """correct_sum counts a token iff argmax (first index of the max) is its target: a tie
    for the top is a hit only for the first tied index, as jnp.argmax decides."""
    weights = jnp.ones((2, 5), jnp.float32)
    # A collapsed model (every logit equal): argmax is id 0, never a real target.
    flat = jnp.zeros((2, 5, 11), jnp.float32)
    targets = jnp.asarray(np.arange(1, 11).reshape(2, 5))
    assert float(losses.summed_metrics(flat, targets, weights)[1]["correct_sum"]) == 0.0
    # ... and with every logit -inf too; id 0 (argmax) is the only hit.
    dead = jnp.full((1, 2, 11), -jnp.inf)
    assert float(losses.summed_metrics(dead, jnp.asarray([[0, 3]]), None,
                                       )[1]["correct_sum"]) == 0.0  # weights: target > 0
    assert float(losses.summed_metrics(dead, jnp.asarray([[0, 3]]), jnp.ones((1, 2)),
                                       )[1]["correct_sum"]) == 1.0
    rng = np.random.RandomState(7)
    # Logits from a few levels: many ties for the top, targets often among the tied ids.
    logits = rng.randint(0, 3, (6, 9, 13)).astype(np.float32)
    targets = rng.randint(0, 13, (6, 9))
    targets[:3] = logits[:3].argmax(-1)  # hits, some of them first of a tie
    tied = (logits == logits.max(-1, keepdims=True)).sum(-1) > 1
    last_tied = 12 - np.argmax(logits[..., ::-1] == logits.max(-1, keepdims=True), -1)
    targets[3:] = np.where(tied[3:], last_tied[3:], targets[3:])  # ties, not the first
    w = rng.rand(6, 9).astype(np.float32)
    expected = float(((logits.argmax(-1) == targets) * w).sum())
    got = float(losses.summed_metrics(jnp.asarray(logits), jnp.asarray(targets),
                                      jnp.asarray(w))[1]["correct_sum"])
    assert tied.sum() > 10 and got == pytest.approx(expected, rel=1e-6)
    assert expected < float(((logits[np.arange(6)[:, None], np.arange(9), targets]
                              == logits.max(-1)) * w).sum())  # ">= max" would count more


def test_dropout_is_random_in_rng_and_off_without():
    config = dataclasses.replace(TINY, dropout_rate=0.2, num_encoder_layers=1,
                                 num_decoder_layers=1)
    params = random_params(config)
    batch = padded_batch(seed=6)
    fn = jitted(config, "loss_fn")
    a = float(fn(params, batch, jax.random.PRNGKey(1))[0])
    a2 = float(fn(params, batch, jax.random.PRNGKey(1))[0])
    b = float(fn(params, batch, jax.random.PRNGKey(2))[0])
    assert a == a2 and a != b
    # No rng: deterministic, the dropout ops are not even traced.
    model = EncoderDecoderModel(config)
    det = str(jax.make_jaxpr(lambda p: model.loss_fn(p, batch, None))(params))
    rand = str(jax.make_jaxpr(lambda p: model.loss_fn(p, batch, jax.random.PRNGKey(1)))(params))
    assert "random_bits" not in det and "random_bits" in rand


def test_bfloat16_activations(tiny):
    _, params = tiny
    batch = padded_batch(seed=7)
    config16 = dataclasses.replace(TINY, dtype="bfloat16")
    logits16 = jitted(config16, "logits")(params, batch)
    assert logits16.dtype == jnp.bfloat16
    logits32 = jitted(TINY, "logits")(params, batch)
    err = jnp.abs(logits16.astype(jnp.float32) - logits32)
    assert float(jnp.max(err)) < 0.1 * float(jnp.max(jnp.abs(logits32)))
    # Params and their gradients stay fp32; the loss is fp32.
    model16 = EncoderDecoderModel(config16)
    loss, grads = jax.eval_shape(
            jax.value_and_grad(lambda p: model16.loss_fn(p, batch, None)[0]), params)
    assert loss.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_remat_full_checkpoints_each_layer(tiny):
    _, params = tiny
    batch = padded_batch(seed=8)

    def jaxpr(config):
        model = EncoderDecoderModel(config)
        return str(jax.make_jaxpr(lambda p: model.loss_fn(p, batch, None)[0])(params))
    n_layers = TINY.num_encoder_layers + TINY.num_decoder_layers
    assert jaxpr(TINY).count("remat2[") == 0
    assert jaxpr(dataclasses.replace(TINY, remat_policy="full")).count("remat2[") == n_layers
    with pytest.raises(ValueError, match="remat_policy"):
        EncoderDecoderModel(dataclasses.replace(TINY, remat_policy="sometimes"))


def test_activation_constraints_only_under_rules(tiny):
    model, params = tiny
    batch = padded_batch(seed=9, batch=4)
    fn = lambda p, b: model.loss_fn(p, b, None)[0]  # noqa: E731
    plain = jax.jit(fn).lower(params, batch).as_text()
    assert "sharding_constraint" not in plain and "mhlo.sharding" not in plain
    devices = np.asarray(jax.devices()[:8]).reshape(4, 2)
    mesh = jax.sharding.Mesh(devices, ("data", "model"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = (("batch", "data"), ("heads", "model"), ("joined_kv", "model"), ("mlp", "model"),
             ("vocab", "model"), ("embed", None), ("length", None), ("kv", None))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        text = jax.jit(fn).lower(params, batch).as_text()
    # Activations [batch, length, embed] get batch -> data; attention heads -> model.
    assert text.count("sharding_constraint") >= TINY.num_encoder_layers * 4
    assert '[{"data"}, {}, {"model"}, {}]' in text  # q/k/v [batch, length, heads, kv]


# --- gin model files --------------------------------------------------------------------------
# Published T5 sizes (d_model, heads, d_kv, d_ff, enc layers, dec layers).
PUBLISHED = {
        "t5_1_1/small": (512, 6, 64, 1024, 8, 8), "t5_1_1/base": (768, 12, 64, 2048, 12, 12),
        "t5_1_1/large": (1024, 16, 64, 2816, 24, 24), "t5_1_1/xl": (2048, 32, 64, 5120, 24, 24),
        "t5_1_1/xxl": (4096, 64, 64, 10240, 24, 24), "t5_1_1/tiny": (128, 4, 32, 256, 2, 2),
        "t5_1_0/small": (512, 8, 64, 2048, 6, 6), "t5_1_0/base": (768, 12, 64, 3072, 12, 12),
        "t5_1_0/large": (1024, 16, 64, 4096, 24, 24),
}


def test_gin_model_files():
    import os

    import gin
    from ssr_jax.cli.gin_registry import t5config_from_gin
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin",
                        "models")
    try:
        for name, sizes in PUBLISHED.items():
            c = t5config_from_gin(os.path.join(root, name + ".gin"))
            got = (c.d_model, c.num_heads, c.d_kv, c.d_ff, c.num_encoder_layers,
                   c.num_decoder_layers)
            assert got == sizes, name
            v11 = name.startswith("t5_1_1")
            assert c.feed_forward_proj == ("gated-gelu" if v11 else "relu")
            assert c.tie_word_embeddings == (not v11)
            assert (c.vocab_size, c.relative_attention_num_buckets,
                    c.relative_attention_max_distance) == (32128, 32, 128)
        # Unscoped bindings reach every scope.
        c = t5config_from_gin(os.path.join(root, "t5_1_1/base.gin"),
                              ["T5Config.dtype = 'bfloat16'"])
        assert c.dtype == "bfloat16" and c.d_model == 768
    finally:
        gin.clear_config()
