"""Partitioner: mesh building, logical rules, golden T5 1.1 small specs, optimizer-state
shardings, host data layout, and identical loss/gradients on different meshes."""
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ssr_jax.errors import UserError
from ssr_jax.models.config import T5Config
from ssr_jax.models.encoder_decoder import EncoderDecoderModel
from ssr_jax.partitioning import (Partitioner, bytes_on_device, logical_to_mesh_spec,
                                  shard_bytes)
from ssr_jax.train import optimizers, steps

# Golden mesh specs of every T5 1.1 small param (layer index replaced by N), full length.
# Standard rules on data=4, model=2: 1-D tensor parallelism over heads / mlp / vocab.
GOLDEN_STANDARD = {
        "token_embedder/embedding": ("model", None),
        "encoder/relpos_bias/rel_embedding": ("model", None),
        "encoder/layers_N/attention/query/kernel": (None, "model"),
        "encoder/layers_N/attention/key/kernel": (None, "model"),
        "encoder/layers_N/attention/value/kernel": (None, "model"),
        "encoder/layers_N/attention/out/kernel": ("model", None),
        "encoder/layers_N/mlp/wi_0/kernel": (None, "model"),
        "encoder/layers_N/mlp/wi_1/kernel": (None, "model"),
        "encoder/layers_N/mlp/wo/kernel": ("model", None),
        "encoder/layers_N/pre_attention_layer_norm/scale": (None,),
        "encoder/layers_N/pre_mlp_layer_norm/scale": (None,),
        "encoder/encoder_norm/scale": (None,),
        "decoder/relpos_bias/rel_embedding": ("model", None),
        "decoder/layers_N/self_attention/query/kernel": (None, "model"),
        "decoder/layers_N/self_attention/key/kernel": (None, "model"),
        "decoder/layers_N/self_attention/value/kernel": (None, "model"),
        "decoder/layers_N/self_attention/out/kernel": ("model", None),
        "decoder/layers_N/encoder_decoder_attention/query/kernel": (None, "model"),
        "decoder/layers_N/encoder_decoder_attention/key/kernel": (None, "model"),
        "decoder/layers_N/encoder_decoder_attention/value/kernel": (None, "model"),
        "decoder/layers_N/encoder_decoder_attention/out/kernel": ("model", None),
        "decoder/layers_N/mlp/wi_0/kernel": (None, "model"),
        "decoder/layers_N/mlp/wi_1/kernel": (None, "model"),
        "decoder/layers_N/mlp/wo/kernel": ("model", None),
        "decoder/layers_N/pre_self_attention_layer_norm/scale": (None,),
        "decoder/layers_N/pre_cross_attention_layer_norm/scale": (None,),
        "decoder/layers_N/pre_mlp_layer_norm/scale": (None,),
        "decoder/decoder_norm/scale": (None,),
        "decoder/logits_dense/kernel": (None, "model"),
}
# FSDP rules on fsdp=4, model=2: weights additionally split over 'fsdp' along embed.
_FSDP_SWAP = {(None, "model"): ("fsdp", "model"), ("model", None): ("model", "fsdp"),
              (None,): ("fsdp",)}
GOLDEN_FSDP = {k: _FSDP_SWAP.get(v, v) for k, v in GOLDEN_STANDARD.items()}
GOLDEN_FSDP["encoder/relpos_bias/rel_embedding"] = ("model", None)  # [heads, buckets]
GOLDEN_FSDP["decoder/relpos_bias/rel_embedding"] = ("model", None)


def _small_model():
    return EncoderDecoderModel(T5Config())  # defaults are T5 1.1 small


def _flat(tree):
    """{'encoder/layers_N/...': [leaf per layer]}"""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = "/".join(str(getattr(p, "key", p)) for p in path)
        out.setdefault(re.sub(r"layers_\d+", "layers_N", key), []).append(leaf)
    return out


def _full(spec, ndim):
    spec = tuple(spec)
    return spec + (None,) * (ndim - len(spec))


@pytest.mark.parametrize("mesh_shape,rules,golden", [
        ({"data": 4, "model": 2}, "standard", GOLDEN_STANDARD),
        ({"data": 1, "fsdp": 4, "model": 2}, "fsdp", GOLDEN_FSDP),
], ids=["standard", "fsdp"])
def test_golden_t5_1_1_small_param_specs(mesh_shape, rules, golden):
    model = _small_model()
    shapes = model.abstract_params()
    part = Partitioner(mesh_shape, rules)
    shardings = part.param_shardings(shapes, model.param_logical_axes())
    flat_sh, flat_shape = _flat(shardings), _flat(shapes)
    assert set(flat_sh) == set(golden)
    for key, expected in golden.items():
        for sharding, shape in zip(flat_sh[key], flat_shape[key]):
            assert _full(sharding.spec, len(shape.shape)) == expected, key
    # 8 + 8 layers of each kind.
    assert len(flat_sh["encoder/layers_N/mlp/wo/kernel"]) == 8
    assert len(flat_sh["decoder/layers_N/encoder_decoder_attention/out/kernel"]) == 8


def test_adafactor_state_follows_params_with_factored_dims_dropped():
    model = _small_model()
    shapes = model.abstract_params()
    part = Partitioner({"fsdp": 4, "model": 2}, "fsdp")
    p_sh = part.param_shardings(shapes, model.param_logical_axes())
    opt = optimizers.adafactor(0.01)
    abstract_opt = jax.eval_shape(opt.tx.init, shapes)
    o_sh = part.opt_state_shardings(abstract_opt, shapes, p_sh)
    factored = o_sh[0]
    q = ("encoder", "layers_0", "attention", "query", "kernel")  # [512 embed, 384 joined_kv]
    get = lambda tree: tree[q[0]][q[1]][q[2]][q[3]][q[4]]  # noqa: E731
    # v_row drops the larger dim (embed, 'fsdp'); v_col drops joined_kv ('model').
    assert get(abstract_opt[0].v_row).shape == (384,)
    assert _full(get(factored.v_row).spec, 1) == ("model",)
    assert _full(get(factored.v_col).spec, 1) == ("fsdp",)
    assert _full(get(factored.v).spec, 1) == (None,)  # a (1,) dummy when factored
    norm = factored.v["encoder"]["encoder_norm"]["scale"]  # unfactored vector: as the param
    assert _full(norm.spec, 1) == ("fsdp",)
    assert factored.count.spec == P()
    # Every leaf got a sharding whose spec fits its shape.
    for sh, leaf in zip(jax.tree.leaves(o_sh), jax.tree.leaves(abstract_opt)):
        assert len(sh.spec) <= len(leaf.shape)


def test_rules_take_first_free_mesh_axis_and_skip_indivisible_dims():
    rules = Partitioner({"data": -1}, "tensor_parallel").rules
    # mlp comes before embed in the rules, so a [embed, mlp] kernel shards mlp.
    assert logical_to_mesh_spec(P("embed", "mlp"), rules) == P(None, "model")
    # activations [batch, length, embed]: embed takes 'model' when free.
    assert logical_to_mesh_spec(P("batch", "length", "embed"), rules) == P("data", None, "model")
    sizes = {"data": 2, "fsdp": 1, "model": 4}
    # 6 heads do not split 4 ways: replicated instead of an error inside jit.
    assert logical_to_mesh_spec(P("heads", "relpos_buckets"), rules, (6, 32), sizes) == P()


def test_mesh_errors_are_one_line():
    with pytest.raises(UserError, match=r"do not divide the 8 devices"):
        Partitioner({"data": -1, "model": 3})
    with pytest.raises(UserError, match=r"has 6 devices but 8 are available"):
        Partitioner({"data": 3, "model": 2})
    with pytest.raises(UserError, match=r"unknown axes \['tensor'\]"):
        Partitioner({"tensor": 8})
    with pytest.raises(UserError, match="not a preset"):
        Partitioner({"data": -1}, "megatron")
    part = Partitioner({"data": 4, "model": 2})
    with pytest.raises(UserError, match=r"BATCH_SIZE=6 is not divisible .* multiple of 4"):
        part.data_layout(6)
    with pytest.raises(UserError, match=r"num_microbatches=4.*multiple of 16"):
        part.data_layout(8, num_microbatches=4)
    with pytest.raises(UserError) as info:
        Partitioner({"data": 5})
    assert "\n" not in str(info.value)


def test_data_layout_and_global_batch():
    part = Partitioner({"data": 2, "fsdp": 2, "model": 2}, "fsdp")
    layout = part.data_layout(8)
    assert part.batch_mesh_axes == ("data", "fsdp")
    assert (layout.per_host_batch_size, layout.shard_index, layout.num_shards) == (8, 0, 1)
    local = {"encoder_input_tokens": np.arange(8 * 5, dtype=np.int32).reshape(8, 5)}
    batch = part.make_global_batch(local)
    x = batch["encoder_input_tokens"]
    assert x.shape == (8, 5) and x.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(x), local["encoder_input_tokens"])
    # Each device holds 2 rows (4 batch shards), replicated over 'model'.
    assert {s.data.shape for s in x.addressable_shards} == {(2, 5)}


def test_host_rows_and_bytes_per_device():
    part = Partitioner({"data": 4, "model": 2})
    rows = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    x = part.make_global_batch({"x": rows})["x"]
    np.testing.assert_array_equal(part.host_rows(x), rows)
    replicated = jax.device_put(rows, part.replicated())
    np.testing.assert_array_equal(part.host_rows(replicated), rows)
    # Bytes: a device holds 2 of the 8 rows; the largest device's share of a sharded tree.
    device = part.mesh.devices.flat[0]
    assert bytes_on_device({"x": x}, device) == 2 * 3 * 4
    assert bytes_on_device({"x": replicated}, device) == rows.nbytes
    assert shard_bytes([x], [x.sharding]) == 2 * 3 * 4


# --- same loss and gradients on every mesh -----------------------------------------------------
TINY = T5Config(vocab_size=128, d_model=32, num_heads=4, d_kv=8, d_ff=64, num_encoder_layers=1,
                num_decoder_layers=1)


def _packed_batch(rng, batch=8, inputs=16, targets=8, vocab=128):
    enc = rng.randint(2, vocab - 2, size=(batch, inputs)).astype(np.int32)
    tgt = rng.randint(2, vocab - 2, size=(batch, targets)).astype(np.int32)
    enc_seg = np.repeat(np.array([[1] * (inputs // 2) + [2] * (inputs // 2)]), batch, 0)
    dec_seg = np.repeat(np.array([[1] * (targets // 2) + [2] * (targets // 4)
                                  + [0] * (targets // 4)]), batch, 0).astype(np.int32)
    tgt = np.where(dec_seg > 0, tgt, 0)
    pos = lambda seg: np.concatenate(  # noqa: E731
            [np.arange((seg[0] == s).sum()) for s in (1, 2, 0) if (seg[0] == s).any()])
    dec_in = np.zeros_like(tgt)
    for start in (0, targets // 2):
        dec_in[:, start + 1:start + targets // 2] = tgt[:, start:start + targets // 2 - 1]
    dec_in = np.where(dec_seg > 0, dec_in, 0)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
            "decoder_target_tokens": tgt, "decoder_loss_weights": (dec_seg > 0).astype(np.int32),
            "encoder_segment_ids": enc_seg.astype(np.int32), "decoder_segment_ids": dec_seg,
            "encoder_positions": np.repeat(pos(enc_seg)[None], batch, 0).astype(np.int32),
            "decoder_positions": np.repeat(pos(dec_seg)[None], batch, 0).astype(np.int32)}


def _loss_and_grads_on(part: Partitioner, model, params_host, batch_host):
    shardings = part.param_shardings(jax.eval_shape(lambda: params_host),
                                     model.param_logical_axes())
    params = jax.device_put(params_host, shardings)
    batch = part.make_global_batch(batch_host)

    def fn(p, b):
        loss, grads, _ = steps.loss_and_grads(model, p, b, jax.random.PRNGKey(0), part)
        return loss, grads

    with part.activation_context():
        loss, grads = jax.jit(fn, in_shardings=(shardings, None))(params, batch)
    return float(loss), jax.device_get(grads), params


def test_same_loss_and_grads_on_one_device_and_sharded_meshes():
    model = EncoderDecoderModel(TINY)
    # Random params straight from numpy (compiling the model's init would cost more than
    # the test itself on CPU); scaled so that logits stay O(1).
    rng = np.random.RandomState(1)
    params_host = jax.tree.map(
            lambda s: (rng.standard_normal(s.shape) / np.sqrt(s.shape[0])).astype(np.float32),
            model.abstract_params())
    batch = _packed_batch(np.random.RandomState(0))
    ref_loss, ref_grads, _ = _loss_and_grads_on(
            Partitioner({"data": 1}, devices=jax.devices()[:1]), model, params_host, batch)
    assert np.isfinite(ref_loss) and ref_loss > 1.0
    for mesh_shape, rules in (({"data": 4, "model": 2}, "standard"), ({"fsdp": 8}, "fsdp")):
        part = Partitioner(mesh_shape, rules)
        loss, grads, params = _loss_and_grads_on(part, model, params_host, batch)
        # The params really are split (otherwise this would compare a mesh with itself).
        emb = params["token_embedder"]["embedding"]
        assert emb.addressable_shards[0].data.shape != emb.shape
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                                jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5,
                                       err_msg=f"{mesh_shape} {jax.tree_util.keystr(path)}")
