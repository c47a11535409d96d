"""Matmul FLOPs of a T5: the one count behind MFU in the training log and `ssr-jax plan`.

Counted: every matmul (2 FLOPs per multiply-add) of the projections, attention scores and
weighted sums, the MLPs and the output layer, over every position of the batch's static
shape, padded or not (the device computes them all; the log reports the padding share
apart). Not counted: the input embedding lookup (a gather), norms, softmax, biases.
"""


def t5_forward_flops(config, batch: int, inputs_length: int, targets_length: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one teacher-forced forward pass: projections,
    attention scores and weighted sums, the output layer (no norms, softmax, gathers)."""
    c = config
    s, t = inputs_length, targets_length
    inner = c.num_heads * c.d_kv
    mlp = (3 if c.is_gated else 2) * c.d_model * c.d_ff
    attn_proj = 4 * c.d_model * inner
    enc_layer = s * (attn_proj + mlp) + 2 * s * s * inner
    dec_layer = t * (2 * attn_proj + mlp) + 2 * t * t * inner + 2 * t * s * inner
    output = t * c.d_model * c.vocab_size
    return 2.0 * batch * (c.num_encoder_layers * enc_layer + c.num_decoder_layers * dec_layer
                          + output)


def t5_train_flops(config, batch: int, inputs_length: int, targets_length: int) -> float:
    """Forward + backward (3x the forward's matmul FLOPs)."""
    return 3.0 * t5_forward_flops(config, batch, inputs_length, targets_length)


def t5_generate_flops(config, batch: int, inputs_length: int, decode_length: int) -> float:
    """Encoder once + `decode_length` cached decoder steps (cross K/V projected once)."""
    c = config
    inner = c.num_heads * c.d_kv
    mlp = (3 if c.is_gated else 2) * c.d_model * c.d_ff
    enc_layer = inputs_length * (4 * c.d_model * inner + mlp) + 2 * inputs_length ** 2 * inner
    cross_kv = c.num_decoder_layers * inputs_length * 2 * c.d_model * inner
    per_token = 0.0
    for step in range(decode_length):
        layer = 6 * c.d_model * inner + mlp + 2 * (step + 1) * inner + 2 * inputs_length * inner
        per_token += c.num_decoder_layers * layer + c.d_model * c.vocab_size
    return 2.0 * batch * (c.num_encoder_layers * enc_layer + cross_kv + per_token)
