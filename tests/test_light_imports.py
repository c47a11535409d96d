"""The model, the train step and the SSR teacher's sampler import and run without TensorFlow,
seqio, gin-config or TFDS (the GPU machine's image has none of them): a subprocess whose
import system refuses those packages builds a tiny T5, runs a train step and samples."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Installed first in every light subprocess (also used by test_gpu_bench.py).
BLOCKER = textwrap.dedent('''
    import sys
    BLOCKED = ("tensorflow", "tensorflow_datasets", "tensorflow_text", "seqio", "gin")
    # As if not installed: `import` raises ModuleNotFoundError, importlib.util.find_spec
    # (what libraries probe optional packages with) returns None.
    for _name in BLOCKED:
        assert sys.modules.get(_name) is None, _name
        sys.modules[_name] = None
''')

PROGRAM = textwrap.dedent('''
    import sys
    import jax
    import numpy as np
    from ssr_jax.models import decoding, layers, t5  # noqa: F401
    from ssr_jax.models.base import DecodeConfig
    from ssr_jax.models.config import T5Config
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel
    from ssr_jax.partitioning import Partitioner
    from ssr_jax.ssr import teacher as teacher_lib
    from ssr_jax.train import optimizers, steps, train_state as ts

    config = T5Config(vocab_size=256, d_model=32, num_heads=2, d_kv=16, d_ff=64,
                      num_encoder_layers=1, num_decoder_layers=1)
    model = EncoderDecoderModel(config)
    partitioner = Partitioner({"data": -1})
    optimizer = optimizers.adafactor(learning_rate=1e-2)
    abstract = ts.abstract_state(model, optimizer)
    shardings = ts.state_shardings(partitioner, model, abstract)
    state = ts.init_state(model, optimizer, partitioner, shardings, seed=0)
    rng = np.random.RandomState(0)
    enc = rng.randint(2, 150, (8, 16)).astype(np.int32)
    tgt = rng.randint(2, 150, (8, 8)).astype(np.int32)
    batch = {"encoder_input_tokens": enc, "decoder_target_tokens": tgt,
             "decoder_input_tokens": np.concatenate([np.zeros((8, 1), np.int32), tgt[:, :-1]], 1),
             "decoder_loss_weights": np.ones_like(tgt)}
    step = steps.make_train_step(model, optimizer, partitioner, shardings)
    g = partitioner.make_global_batch(batch)
    losses = []
    for _ in range(3):
        state, metrics = step(state, g)
        m = jax.device_get(metrics)
        losses.append(float(m["cross_ent_sum"]) / float(m["weight_sum"]))
    assert losses[-1] < losses[0], losses

    decode = DecodeConfig(method="sample", max_decode_length=6, top_p=0.9, top_k=50)
    teacher = teacher_lib.Teacher(model, state.params, partitioner, decode, shardings.params)
    enc[:, 5] = 255  # <extra_id_0>
    host = {"inputs": enc, "keys": teacher_lib.example_keys(enc, 0),
            "stops": teacher_lib.stop_tokens(np.ones(8, np.int64), 256),
            "lens": np.full((8,), 6, np.int32)}
    gb = partitioner.make_global_batch(host)
    out = np.asarray(jax.device_get(teacher.generate(gb["inputs"], gb["keys"], gb["stops"],
                                                     gb["lens"])))
    assert out.shape == (8, 6) and out.min() >= 0 and out.max() < 256, out
    leaked = sorted(m for m in sys.modules
                    if m.split(".")[0] in BLOCKED and sys.modules[m] is not None)
    assert not leaked, leaked
    print("LIGHT-OK", losses)
''')


def run_light(code: str, timeout: int = 300, args=()):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", BLOCKER + code, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_blocker_blocks():
    out = run_light("import importlib.util\nassert importlib.util.find_spec('gin') is None\n"
                    "import seqio\n")
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, out.stderr


def test_model_train_step_and_teacher_sampler_without_tf_seqio_gin():
    out = run_light(PROGRAM)
    assert out.returncode == 0 and "LIGHT-OK" in out.stdout, out.stderr[-3000:]
