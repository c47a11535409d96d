"""bench/gpu.sh and its scripts: the printed bound and weight ratios against closed forms, the
card table, and (slow) the whole script end to end with --smoke on CPU, without TF/seqio/gin
(as on the GPU image)."""
import json
import os
import subprocess
import sys

import pytest

from ssr_jax.models.config import T5Config
from ssr_jax.models.encoder_decoder import EncoderDecoderModel
from test_light_imports import BLOCKER, ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_card  # noqa: E402  pylint: disable=wrong-import-position
import gpu_sampling  # noqa: E402  pylint: disable=wrong-import-position
import gpu_ssr_step  # noqa: E402  pylint: disable=wrong-import-position

CONFIGS = [T5Config(vocab_size=256, d_model=32, num_heads=2, d_kv=8, d_ff=48,
                    num_encoder_layers=2, num_decoder_layers=3),
           T5Config(vocab_size=256, d_model=32, num_heads=2, d_kv=8, d_ff=48,
                    num_encoder_layers=1, num_decoder_layers=2, feed_forward_proj="relu",
                    tie_word_embeddings=True)]


def per_step_weights(c: T5Config) -> int:
    """Closed form: per decoder layer self-attention q,k,v,o + cross-attention q,o + MLP +
    3 norms; the final norm, the relative-position table, the output layer."""
    inner = c.num_heads * c.d_kv
    mlp = (3 if c.is_gated else 2) * c.d_model * c.d_ff
    layer = 6 * c.d_model * inner + mlp + 3 * c.d_model
    return (c.num_decoder_layers * layer + c.d_model
            + c.num_heads * c.relative_attention_num_buckets + c.d_model * c.vocab_size)


@pytest.mark.parametrize("config", CONFIGS, ids=["t5_1_1", "t5_1_0_tied"])
def test_bandwidth_bound_against_closed_form(config):
    model = EncoderDecoderModel(config)
    assert gpu_sampling.decode_step_weights(model) == per_step_weights(config)
    b, s, n, e, bw = 3, 40, 7, 2, 1e12
    bound = gpu_sampling.bandwidth_bound(model, b, s, n, e, bw)
    kv = 2 * config.num_decoder_layers * b * config.num_heads * config.d_kv * (
            n * (n + 1) // 2 + n * s)
    total = e * (n * per_step_weights(config) + kv + n * b * config.d_model)
    assert bound["bytes"] == total
    assert bound["tokens_per_s"] == pytest.approx(b * n / (total / bw))


def test_teacher_to_student_ratio_against_closed_form():
    def closed(c):  # attention q,k,v,o (x2 in the decoder) + MLP kernels per layer
        inner, mlp = c.num_heads * c.d_kv, (3 if c.is_gated else 2) * c.d_model * c.d_ff
        return (c.num_encoder_layers * (4 * c.d_model * inner + mlp)
                + c.num_decoder_layers * (8 * c.d_model * inner + mlp))
    for c in CONFIGS:
        assert gpu_ssr_step.layer_weights(c) == closed(c)
    student = T5Config(**gpu_ssr_step.SMOKE_STUDENT[0])
    teacher = T5Config(**gpu_ssr_step.SMOKE_TEACHER)
    assert closed(teacher) / closed(student) == pytest.approx(4.0, rel=0.01)


def test_teacher_inputs_layout():
    import numpy as np
    x, spans = gpu_sampling.teacher_inputs(512, 3, 40, seed=0)
    assert x.shape == (3, 40) and (x[:, -1] == 1).all() and (spans == 3).all()
    for row in x:  # sentinels <extra_id_0..2> in order, nothing else from the sentinel range
        sent = row[row >= 512 - 100]
        np.testing.assert_array_equal(sent, [511, 510, 509])


def test_card_bandwidth_table():
    assert gpu_card.bandwidth("NVIDIA H200") == 4.8e12
    assert gpu_card.bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert gpu_card.bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert gpu_card.bandwidth("cpu") is None
    assert gpu_card.bandwidth("cpu", 0.5) == 0.5e12


@pytest.mark.slow
def test_gpu_sh_smoke_runs_end_to_end_without_tf(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(site), OUT=str(out),
               JAX_PLATFORMS="cpu")
    probe = subprocess.run([sys.executable, "-c", "import seqio"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr  # the block holds
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), "--smoke",
                           "--bandwidth_tb_s=0.02"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "gpu.md").read_text()
    for part in ("gpu_check", "gpu_mfu", "gpu_sampling", "gpu_ssr_step"):
        data = json.loads((out / f"{part}.json").read_text())
        assert data["smoke"] and data["data"]["measured"], part
        assert data["title"] in report
    check = json.loads((out / "gpu_check.json").read_text())["data"]
    assert check["agree"] and check["logits_rel_err"] < 1e-4
