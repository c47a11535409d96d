"""The peak FLOP/s behind MFU: per device kind and activation dtype, none where unknown."""
import math
import types

import jax
import pytest

from ssr_jax.train import metrics as metrics_lib


def _devices(monkeypatch, platform, kind, n=8):
    fake = [types.SimpleNamespace(platform=platform, device_kind=kind)] * n
    monkeypatch.setattr(metrics_lib.jax, "devices", lambda: fake)


@pytest.mark.parametrize("platform,kind,dtype,per_device", [
        ("gpu", "NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
        ("gpu", "NVIDIA H200", "float32", 494e12),  # JAX's default: TF32 tensor cores
        ("gpu", "NVIDIA A100-SXM4-40GB", "float32", 156e12),
        ("gpu", "NVIDIA A100-SXM4-40GB", "bfloat16", 312e12),
        ("tpu", "TPU v4", "bfloat16", 275e12),
        ("tpu", "TPU v4", "float32", 275e12),  # one bf16 pass at the default precision
        ("tpu", "TPU v5 lite", "bfloat16", 197e12),
        ("tpu", "TPU v5p", "bfloat16", 459e12),
        ("tpu", "TPU v6 lite", "bfloat16", 918e12),
        ("gpu", "NVIDIA H100 80GB HBM3", "auto", 989e12),  # T5Config.dtype 'auto': bf16
        ("tpu", "TPU v4", "auto", 275e12),
])
def test_peak_of_the_dtype_in_use(monkeypatch, platform, kind, dtype, per_device):
    _devices(monkeypatch, platform, kind)
    assert metrics_lib.peak_flops(None, dtype) == per_device * 8


def test_highest_precision_fp32_peak(monkeypatch):
    with jax.default_matmul_precision("highest"):
        _devices(monkeypatch, "gpu", "NVIDIA H100 80GB HBM3", 1)
        assert metrics_lib.peak_flops(None, "float32") == 67e12  # not the tensor cores
        _devices(monkeypatch, "tpu", "TPU v4", 1)
        assert metrics_lib.peak_flops(None, "float32") == 275e12 / 6  # 6 bf16 passes


def test_no_peak_where_unknown_unless_given(monkeypatch):
    for platform, kind in (("cpu", "cpu"), ("gpu", "Some Future GPU")):
        _devices(monkeypatch, platform, kind, 4)
        assert math.isnan(metrics_lib.peak_flops(None, "float32"))
        assert metrics_lib.peak_flops(2e9, "float32") == 8e9  # per device x 4
