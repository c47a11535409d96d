"""import-hf on hostile directories: config.json sizes are checked against the safetensors
headers before anything is allocated (a 10**9-layer config fails at once), and a weight
index may only name files inside the model directory; a normal import stays bit-identical."""
import contextlib
import json
import os
import shutil
import signal
import time

import numpy as np
import pytest

from ssr_jax.errors import UserError
from ssr_jax.hf import convert, export_hf, import_hf
from ssr_jax.models.config import T5Config
import helpers

pytest.importorskip("safetensors")

CONFIG = T5Config(vocab_size=128, d_model=16, num_heads=2, d_kv=8, d_ff=24,
                  num_encoder_layers=2, num_decoder_layers=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    params = helpers.random_params(CONFIG, 0, norm_noise=0.1)
    out = str(tmp_path_factory.mktemp("hf_tiny"))
    export_hf(params, CONFIG, out)
    return params, out


@pytest.fixture
def model_dir(exported, tmp_path):
    """A fresh copy of the exported model to tamper with."""
    d = str(tmp_path / "model")
    shutil.copytree(exported[1], d)
    return d


@contextlib.contextmanager
def deadline(seconds):
    """Fails (instead of hanging the suite) when the body runs longer than `seconds`."""
    def expire(*_):
        raise TimeoutError(f"took more than {seconds}s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert time.perf_counter() - t0 < seconds


def edit_config(d, **changes):
    path = os.path.join(d, "config.json")
    hf = json.load(open(path))
    hf.update(changes)
    json.dump(hf, open(path, "w"))


def assert_identical(a, b):
    import jax
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def test_normal_import_is_bit_identical(exported):
    params, out = exported
    got, config = import_hf(out)
    assert config == CONFIG
    assert_identical(params, got)


@pytest.mark.parametrize("changes,match", [
    ({"num_layers": 1_000_000_000}, r"implies 1000000000 encoder layers \(num_layers\) but "
                                    r"the weights hold encoder blocks 0-1; blocks 2-999999999 "
                                    r"are missing"),
    ({"num_decoder_layers": 1_000_000_000}, r"1000000000 decoder layers .* hold decoder block "
                                            r"0; blocks 1-999999999 are missing"),
    ({"num_layers": 1}, r"implies 1 encoder layers .* hold encoder blocks 0-1; block 1 is "
                        r"unexpected"),
    ({"d_model": 1_000_000_000}, r"d_model=1000000000, so shared.weight should have shape "
                                  r"\(128, 1000000000\), but it has shape \(128, 16\)"),
    ({"vocab_size": 10**12}, r"vocab_size=1000000000000, so shared.weight"),
    ({"d_ff": 10**9}, r"d_ff=1000000000, so encoder.block.0.layer.1.DenseReluDense.wi_0"),
    ({"num_heads": 4}, r"num_heads=4, so encoder.block.0.*relative_attention_bias"),
    ({"d_kv": 10**9}, r"num_heads x d_kv=2000000000, so encoder.block.0.layer.0.SelfAttention"),
])
def test_config_sizes_checked_against_tensor_headers_first(model_dir, changes, match):
    edit_config(model_dir, **changes)
    with deadline(60), pytest.raises(UserError, match=match) as err:
        import_hf(model_dir)
    assert "\n" not in str(err.value) and "model.safetensors" in str(err.value)


def test_sizes_are_checked_before_tensor_data_is_read(model_dir, monkeypatch):
    edit_config(model_dir, num_layers=3)
    def no_load(path):
        raise AssertionError(f"tensor data of {path} read before the config was checked")
    monkeypatch.setattr(convert, "_read_safetensors", no_load)
    with pytest.raises(UserError, match="implies 3 encoder layers"):
        import_hf(model_dir)


def write_index(d, files):
    """A sharded-checkpoint index mapping every tensor of model.safetensors to `files`
    (one name, or a function of the tensor name)."""
    names = convert._safetensors_shapes(os.path.join(d, convert.SAFETENSORS))
    pick = files if callable(files) else (lambda _: files)
    with open(os.path.join(d, convert.SAFETENSORS_INDEX), "w") as f:
        json.dump({"metadata": {}, "weight_map": {n: pick(n) for n in names}}, f)


def test_sharded_index_inside_the_directory_imports(exported, model_dir):
    write_index(model_dir, "shards/part.safetensors")
    os.makedirs(os.path.join(model_dir, "shards"))
    os.rename(os.path.join(model_dir, convert.SAFETENSORS),
              os.path.join(model_dir, "shards", "part.safetensors"))
    got, _ = import_hf(model_dir)
    assert_identical(exported[0], got)


@pytest.mark.parametrize("entry", ["../outside.safetensors", "shards/../../outside.safetensors",
                                   "ABSOLUTE", "..\\outside.safetensors"])
def test_weight_index_paths_outside_the_directory_are_refused(model_dir, entry):
    outside = os.path.join(os.path.dirname(model_dir), "outside.safetensors")
    shutil.copy(os.path.join(model_dir, convert.SAFETENSORS), outside)
    entry = outside if entry == "ABSOLUTE" else entry
    write_index(model_dir, entry)
    with pytest.raises(UserError, match="may only name files of its own directory") as err:
        import_hf(model_dir)
    assert convert.SAFETENSORS_INDEX in str(err.value) and "\n" not in str(err.value)


def test_weight_index_symlink_out_of_the_directory_is_refused(model_dir):
    outside = os.path.join(os.path.dirname(model_dir), "outside.safetensors")
    shutil.copy(os.path.join(model_dir, convert.SAFETENSORS), outside)
    os.symlink(outside, os.path.join(model_dir, "link.safetensors"))
    write_index(model_dir, "link.safetensors")
    with pytest.raises(UserError, match=r"resolves \(through a link\) to .*outside"):
        import_hf(model_dir)


def test_hub_cache_snapshot_links_to_its_blobs_are_followed(exported, tmp_path):
    """A Hugging Face hub cache snapshot links each file to ../../blobs/<hash>: allowed."""
    repo = tmp_path / "models--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for name in ("config.json", convert.SAFETENSORS):
        shutil.copy(os.path.join(exported[1], name), blobs / (name + ".blob"))
        os.symlink(os.path.join("..", "..", "blobs", name + ".blob"), snap / name)
    write_index(str(snap), convert.SAFETENSORS)
    got, _ = import_hf(str(snap))
    assert_identical(exported[0], got)


def test_truncated_safetensors_header_is_one_line(model_dir):
    path = os.path.join(model_dir, convert.SAFETENSORS)
    with open(path, "r+b") as f:
        f.write((10**12).to_bytes(8, "little"))
    with pytest.raises(UserError, match="cannot read safetensors .*header length"):
        import_hf(model_dir)
