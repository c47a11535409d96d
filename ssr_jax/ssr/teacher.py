"""The SSR teacher: a frozen T5 checkpoint sharded on the student's mesh, sampling span fills.

The teacher is any checkpoint in our layout (a training run of ours, or `ssr-jax import-hf`
of a Hugging Face T5) with its own model_config.json, so its size is independent of the
student's. Its params are restored straight into shardings derived from ITS OWN logical axes
on the SAME `Partitioner` as the student, so a teacher several times larger than the student
is split over the 'model' (and 'fsdp') axes instead of being replicated. It is frozen (no
optimizer state) and optionally held in bfloat16 (params and activations).

Generation is one jitted function with explicit in/out shardings (every per-example array is
sharded on the batch axes like a student batch): temperature/top-k/top-p sampling in a
`lax.while_loop` with the KV cache (the model's predict_batch; ssr_jax.models.decoding's
`sample_tokens` draws among the top k candidates, nucleus on those k only). The default
sampler is the one the paper's data generation ran: Hugging Face `generate(do_sample=True,
top_p=0.9)`, whose implicit defaults add top_k=50 and temperature 1, applied in HF's order
(top-k, then top-p on the renormalised k), docs/FACTS.md. For each masked example:
  * its PRNG key is a 64-bit hash of its teacher-input tokens and the run seed, computed on
    the host (`example_keys`), so its fills do not depend on the batch it lands in, the mesh,
    the number of hosts, or a restart; online and offline generation therefore agree;
  * it stops after `<extra_id_n>` (n = its number of spans; `stop_tokens`) or at its own
    max length (`teacher_decode_lengths`: the task's fill_ratio, about twice its masked
    tokens, capped by the room left in its slot); the static decode length is the largest
    such cap for the slot.

Vocabulary safety. `check_teacher` runs before anything is loaded or compiled: the teacher
checkpoint must exist, its model_config.json (or an explicit config) must have the student's
padded vocab_size and cover the task vocabulary's ids, and, when the checkpoint records its
vocabulary (`vocab.json`, see `write_vocab_record`), the SentencePiece model must be the same
bytes. Any mismatch is one UserError line.
"""
import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Dict, Optional

import jax
import numpy as np

from ssr_jax.errors import UserError
from ssr_jax.models.base import DecodeConfig
from ssr_jax.models.config import T5Config
from ssr_jax.models.encoder_decoder import EncoderDecoderModel
from ssr_jax.train import checkpoints
from ssr_jax import vocab as vocab_lib
from ssr_jax.vocab import VOCAB_RECORD_FILE, vocab_record

TEACHER_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Which teacher and how it samples.

    checkpoint_path: a step dir, checkpoint root or model dir (ssr_jax.train.checkpoints).
    model_config: overrides the checkpoint's model_config.json (needed when it has none).
    dtype: 'bfloat16' casts the teacher's params and activations (halves its memory).
    top_p / top_k / temperature: the sampler; the defaults are what the paper's code ran
      (HF generate with top_p=0.9 and its implicit top_k=50, temperature 1): top-k first,
      then the nucleus of the renormalised k. top_k=0 turns top-k off (pure top-p).
    seed: mixed into every example's key; the same seed gives the same fills.
    """

    checkpoint_path: str
    model_config: Optional[T5Config] = None
    dtype: str = "float32"
    top_p: float = 0.9
    top_k: int = 50
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.dtype not in TEACHER_DTYPES:
            raise UserError(f"TeacherConfig.dtype={self.dtype!r}: use one of {TEACHER_DTYPES}.")
        if not 0.0 < self.top_p <= 1.0 or self.top_k < 0 or self.temperature <= 0:
            raise UserError(f"TeacherConfig sampler top_p={self.top_p}, top_k={self.top_k}, "
                            f"temperature={self.temperature}: need 0 < top_p <= 1, top_k >= 0 "
                            "and temperature > 0.")


# --- vocabulary records and checks -------------------------------------------------------------
def read_vocab_record(step_dir: str) -> Optional[Dict[str, Any]]:
    """vocab.json of a checkpoint: in its step dir, its root, or the root's model dir."""
    d = step_dir
    for _ in range(3):
        path = os.path.join(d, VOCAB_RECORD_FILE)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    return json.load(f)
            except ValueError as e:
                raise UserError(f"SSR teacher vocabulary record {path} is not valid JSON "
                                f"({e}); delete it or fix it.") from e
        d = os.path.dirname(d)
    return None


def _resolve_checkpoint(checkpoint_path: str) -> str:
    if not checkpoint_path:
        raise UserError("no SSR teacher checkpoint: set TEACHER_CHECKPOINT to a trained "
                        "T5 checkpoint (ours, or `ssr-jax import-hf` of a Hugging Face T5).")
    try:
        return checkpoints.resolve_step_dir(checkpoint_path)
    except UserError as e:
        raise UserError(f"SSR teacher checkpoint TEACHER_CHECKPOINT={checkpoint_path!r} not "
                        f"found ({e}); train a teacher first or import one with "
                        "`ssr-jax import-hf`.") from e


def teacher_model_config(cfg: TeacherConfig) -> T5Config:
    """The teacher's T5Config: explicit (then no checkpoint is needed, e.g. for a plan), else
    its checkpoint's model_config.json; frozen (no dropout), in the teacher's dtype."""
    if cfg.model_config is not None:
        config = cfg.model_config
    else:
        step_dir = _resolve_checkpoint(cfg.checkpoint_path)
        stored = checkpoints.load_model_config(step_dir)
        if not stored:
            raise UserError(f"SSR teacher checkpoint {step_dir} has no model_config.json; "
                            "bind TeacherConfig.model_config (e.g. to a gin model's T5Config).")
        config = T5Config.from_dict(stored, f"SSR teacher model_config.json in {step_dir}")
    dtype = cfg.dtype
    # Frozen and sampled: no dropout; bf16 holds params and activations in bfloat16.
    return config.replace(dropout_rate=0.0, dtype=dtype, param_dtype=dtype)


def teacher_model(cfg: TeacherConfig) -> EncoderDecoderModel:
    """The teacher's model (no params): see teacher_model_config."""
    return EncoderDecoderModel(teacher_model_config(cfg))


def check_teacher(cfg: TeacherConfig, vocabulary, student_vocab_size: Optional[int] = None
                  ) -> T5Config:
    """All checks that need no compute; returns the teacher's T5Config. UserError on any
    mismatch: missing checkpoint, vocab_size vs the student's, sentinel ids out of range,
    or a recorded vocabulary that is not the task's."""
    step_dir = _resolve_checkpoint(cfg.checkpoint_path)
    config = teacher_model_config(cfg)
    where = f"SSR teacher {cfg.checkpoint_path}"
    if student_vocab_size is not None and int(student_vocab_size) != config.vocab_size:
        raise UserError(f"{where} has vocab_size {config.vocab_size} but the student has "
                        f"{student_vocab_size}: teacher and student must share one vocabulary "
                        "(VOCAB_SIZE and the task's SentencePiece model).")
    if vocabulary.vocab_size > config.vocab_size:
        raise UserError(f"{where} has vocab_size {config.vocab_size}, smaller than the task "
                        f"vocabulary's {vocabulary.vocab_size} ids: it was trained with another "
                        "vocabulary.")
    record = read_vocab_record(step_dir)
    if record is not None:
        mine = vocab_record(vocabulary)
        for key in ("vocab_size", "extra_ids", "sentencepiece_sha256"):
            if key in record and record.get(key) != mine.get(key):
                raise UserError(
                        f"{where} was trained with vocabulary "
                        f"{record.get('sentencepiece_model_file') or record.get('type')} "
                        f"({key}={record.get(key)}) but the task uses "
                        f"{mine.get('sentencepiece_model_file') or mine.get('type')} "
                        f"({key}={mine.get(key)}); use the teacher's vocabulary.")
    return config


# --- per-example decoding inputs (host, numpy) -------------------------------------------------
def example_keys(teacher_inputs: np.ndarray, seed: int) -> np.ndarray:
    """uint32 [B, 2] PRNG key data per row: a 64-bit BLAKE2b hash of the row's tokens (up to
    the first pad) keyed by the seed. Identical teacher inputs get identical keys."""
    teacher_inputs = np.asarray(teacher_inputs, np.int32)
    salt = int(seed).to_bytes(8, "little", signed=True)
    out = np.zeros((teacher_inputs.shape[0], 2), np.uint32)
    for b, row in enumerate(teacher_inputs):
        n = int(np.count_nonzero(row))  # pad (0) only after the example
        digest = hashlib.blake2b(row[:n].astype("<i4").tobytes(), digest_size=8,
                                 key=salt).digest()
        out[b] = np.frombuffer(digest, "<u4")
    return out


def stop_tokens(num_spans: np.ndarray, vocab_size: int) -> np.ndarray:
    """The id of `<extra_id_n>` per row: the teacher is done after n fills."""
    return vocab_lib.sentinel(vocab_size, np.asarray(num_spans, np.int64)).astype(np.int32)


def static_decode_length(inputs_length: int, targets_length: int, fill_ratio: float) -> int:
    """The largest per-example teacher budget for a slot: the room cap never exceeds the slot
    length, and n + 1 + ceil(r M) <= max(1, r) * targets_length because M + n + 1 fits the
    student target."""
    return int(max(1, min(inputs_length, max(targets_length,
                                             int(np.ceil(fill_ratio * targets_length))))))


# --- sampling ---------------------------------------------------------------------------------
def _sample(model, decode, params, inputs, keys, stops, max_lens):
    """Ancestral sampling with the KV cache (the model's own predict_batch) from per-row keys."""
    tokens, _ = model.predict_batch(params, {"encoder_input_tokens": inputs}, decode, keys,
                                    stop_tokens=stops, max_decode_lengths=max_lens)
    return tokens


_SAMPLERS: Dict[Any, Any] = {}


def sampler(model, decode, partitioner, param_shardings):
    """The jitted sampler, shared by teachers of the same config, decoding and mesh (so a
    reloaded teacher reuses the compiled program)."""
    key = (model.config, decode, partitioner.mesh, partitioner.rules)
    if key not in _SAMPLERS:
        batch = partitioner.batch_sharding()
        _SAMPLERS[key] = jax.jit(functools.partial(_sample, model, decode),
                                 in_shardings=(param_shardings, batch, batch, batch, batch),
                                 out_shardings=batch)
    return _SAMPLERS[key]


# --- the teacher on the mesh -------------------------------------------------------------------
class Teacher:
    """Frozen teacher params on a Partitioner's mesh and one jitted, sharded sampler.

    Build with `Teacher.load`. `generate` takes GLOBAL arrays sharded on the batch axes
    (e.g. from `partitioner.make_global_batch`) and returns the tokens [B, max_decode_length]
    as a global array with the same batch sharding, without waiting (async dispatch).
    """

    def __init__(self, model, params, partitioner, decode, param_shardings):
        self.model, self.params, self.partitioner, self.decode = model, params, partitioner, decode
        self.config: T5Config = model.config
        self._sample = sampler(model, decode, partitioner, param_shardings)

    @classmethod
    def load(cls, cfg: TeacherConfig, partitioner, vocabulary, max_decode_length: int,
             student_vocab_size: Optional[int] = None) -> "Teacher":
        """Checks (no compute), then restores the params into their shardings."""
        config = check_teacher(cfg, vocabulary, student_vocab_size)
        model = EncoderDecoderModel(config)
        params, shardings = checkpoints.restore_model_params(model, partitioner,
                                                             cfg.checkpoint_path)
        decode = DecodeConfig(method="sample", max_decode_length=int(max_decode_length),
                              temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        return cls(model, params, partitioner, decode, shardings)

    def generate(self, inputs, keys, stops, max_lens):
        """Samples fills for global [B, L] inputs; returns global tokens [B, T] (async)."""
        with self.partitioner.activation_context():
            return self._sample(self.params, inputs, keys, stops, max_lens)
