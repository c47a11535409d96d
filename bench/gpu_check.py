"""GPU check (first in bench/gpu.sh): the fused attention path against the einsum path on the
device, so the MFU and sampling figures after it are known to compute the same model.

A T5 1.1-shaped model (d_kv 64, 2+2 layers) in bf16 activations on a batch with padding AND
packing (two segments per row, positions restarting) at 512/114: teacher-forced logits and
the gradients of the loss (the relative-position tables' included: cuDNN computes the bias
gradient) with attention_impl 'dot_product_attention' vs 'einsum', and the number of cuDNN
fused-attention calls in the lowered program (0: jax's XLA attention ran).
With --smoke: a tiny model in fp32 on any device.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position
import gpu_card  # noqa: E402  pylint: disable=wrong-import-position

common.setup_env(__name__)

SHAPE = dict(vocab_size=32128, d_model=512, num_heads=8, d_kv=64, d_ff=1024,
             num_encoder_layers=2, num_decoder_layers=2)
SMOKE = dict(vocab_size=512, d_model=64, num_heads=4, d_kv=16, d_ff=128, num_encoder_layers=2,
             num_decoder_layers=2)
CUDNN_CALL = "__cudnn$fmha"


def packed_batch(vocab_size: int, batch: int, inputs_length: int, targets_length: int,
                 seed: int = 0):
    """Rows of two packed examples each, then padding (lengths vary by row)."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    rng = np.random.RandomState(seed)
    out = {k: np.zeros((batch, n), np.int32) for k, n in (
            ("encoder_input_tokens", inputs_length), ("encoder_segment_ids", inputs_length),
            ("encoder_positions", inputs_length), ("decoder_input_tokens", targets_length),
            ("decoder_target_tokens", targets_length), ("decoder_segment_ids", targets_length),
            ("decoder_positions", targets_length), ("decoder_loss_weights", targets_length))}
    for b in range(batch):
        for prefix, length in (("encoder", inputs_length), ("decoder", targets_length)):
            used = rng.randint(length * 3 // 5, length + 1)
            cut = rng.randint(1, used)
            for seg, (lo, hi) in enumerate(((0, cut), (cut, used)), start=1):
                out[f"{prefix}_segment_ids"][b, lo:hi] = seg
                out[f"{prefix}_positions"][b, lo:hi] = np.arange(hi - lo)
                tokens = rng.randint(2, vocab_size - 100, hi - lo)
                if prefix == "encoder":
                    out["encoder_input_tokens"][b, lo:hi] = tokens
                else:
                    out["decoder_target_tokens"][b, lo:hi] = tokens
                    out["decoder_input_tokens"][b, lo:hi] = np.concatenate([[0], tokens[:-1]])
                    out["decoder_loss_weights"][b, lo:hi] = 1
    return out


def run(args):
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from ssr_jax.models import layers  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.config import T5Config  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel  # pylint: disable=C0415
    headers = ["check", "value", "note"]
    title = "GPU check: fused attention vs einsum attention"
    gpu = gpu_card.on_gpu()
    if not gpu and not args.smoke:
        return gpu_card.not_measured("gpu_check", title, headers,
                                     [["fused vs einsum", "not measured", "-"]],
                                     "no GPU on this machine; bench/gpu.sh on a GPU runs it.")
    smoke = args.smoke
    dtype = "bfloat16" if gpu else "float32"
    base = T5Config(**(SMOKE if smoke else SHAPE), dtype=dtype)
    li, lt, batch_size = (32, 8, 4) if smoke else (512, 114, 8)
    batch = packed_batch(base.vocab_size, batch_size, li, lt)
    params = jax.device_put(common.random_params(EncoderDecoderModel(base)))
    out = {}
    for impl in ("einsum", "dot_product_attention"):
        model = EncoderDecoderModel(base.replace(attention_impl=impl))

        def logits_and_grads(p, m=model):  # one program per path: one compile
            return m.logits(p, batch), jax.grad(lambda q: m.loss_fn(q, batch, None)[0])(p)
        fn = jax.jit(logits_and_grads)
        logits, grads = jax.tree.map(lambda a: np.asarray(a, np.float32), fn(params))
        out[impl] = (logits, grads, fn.lower(params).as_text().count(CUDNN_CALL))
    (ref_l, ref_g, _), (fus_l, fus_g, cudnn_calls) = out["einsum"], out["dot_product_attention"]
    logits_err = float(np.abs(fus_l - ref_l).max() / np.abs(ref_l).max())

    def rel(a, b):
        return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))
    grad_errs = {jax.tree_util.keystr(p): rel(a, b) for (p, a), b in zip(
            jax.tree_util.tree_leaves_with_path(fus_g), jax.tree.leaves(ref_g))}
    relpos = {k: v for k, v in grad_errs.items() if "relpos" in k}
    worst = max(grad_errs, key=grad_errs.get)
    # bf16 activations round both paths differently; fp32 (smoke) agrees to float rounding.
    tol = 0.05 if dtype == "bfloat16" else 1e-4
    agree = logits_err < tol and max(grad_errs.values()) < tol
    q = np.zeros((batch_size, lt, base.num_heads, base.d_kv), dtype)
    k = np.zeros((batch_size, li, base.num_heads, base.d_kv), dtype)
    choice = layers.fused_implementation(jax.numpy.asarray(q), jax.numpy.asarray(k))
    rows = [["activations", dtype, f"batch {batch_size}, {li}/{lt}, 2 segments per row"],
            ["jax attention implementation (decoder x encoder shapes)", choice,
             "cudnn where fused_implementation allows"],
            ["cuDNN fused-attention calls in the lowered program", cudnn_calls,
             f"custom calls named {CUDNN_CALL}*"],
            ["max |logits diff| / max |logits|", f"{logits_err:.2e}", f"tolerance {tol}"],
            ["worst gradient max |diff| / max |grad|", f"{grad_errs[worst]:.2e}", worst],
            ["relative-position gradients", ", ".join(f"{v:.2e}" for v in relpos.values()),
             "encoder, decoder tables"],
            ["verdict", "agree" if agree else "DISAGREE", ""]]
    return {"name": "gpu_check", "title": f"{title} ({gpu_card.card_name()})",
            "headers": headers, "rows": rows,
            "notes": ["Random weights (common.random_params); the loss's gradient of every "
                      "parameter, compared leaf by leaf."],
            "data": {"measured": True, "agree": agree, "logits_rel_err": logits_err,
                     "grad_rel_errs": grad_errs, "cudnn_calls": cudnn_calls,
                     "implementation": choice, "dtype": dtype}}


if __name__ == "__main__":
    gpu_card.main(run)
