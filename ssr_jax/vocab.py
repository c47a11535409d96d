"""SentencePiece vocabularies with T5's layout, and the sentinel arithmetic everyone shares.

T5's layout: pad=0, eos=1, unk=2, no bos; 100 extra ids appended after the SentencePiece
pieces, so `<extra_id_0>` is the highest id and `<extra_id_k>` = vocab_size - 1 - k. A user
with T5's own `cc_all.32000` model simply points `get_vocabulary` at it. The sentinel helpers
take plain sizes and work on ints, numpy arrays and TF tensors alike (only arithmetic and
comparisons), so the mask (TF), the rewrite (numpy) and the teacher share one definition.
"""
import hashlib
import json
import os
from typing import Any, Dict, Sequence, Tuple

from ssr_jax.errors import UserError

DEFAULT_EXTRA_IDS = 100
# Beside a checkpoint's model_config.json: which vocabulary its ids mean.
VOCAB_RECORD_FILE = "vocab.json"


def train_sentencepiece(text_files: Sequence[str], model_prefix: str, vocab_size: int,
                        *, character_coverage: float = 0.9999,
                        input_sentence_size: int = 2_000_000,
                        num_threads: int = 2, seed_sentencepiece_size: int = 1_000_000) -> str:
    """Trains a unigram SentencePiece model with T5's settings; returns the .model path."""
    import sentencepiece as spm

    for path in text_files:
        if not os.path.isfile(path):
            raise UserError(f"input file {path!r} does not exist.")
        if os.path.getsize(path) == 0:
            raise UserError(f"input file {path!r} is empty; give it text.")
    if vocab_size < 16:
        raise UserError(f"--vocab_size={vocab_size} is too small (need >= 16).")
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(text_files),
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=character_coverage,
            byte_fallback=False,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            seed_sentencepiece_size=seed_sentencepiece_size,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        # SentencePiece reports e.g. "Vocabulary size is too high" for small corpora.
        raise UserError(f"SentencePiece training on {list(text_files)} failed: "
                        f"{str(e).strip().splitlines()[-1]}") from e
    return model_prefix + ".model"


def get_vocabulary(spm_path: str, extra_ids: int = DEFAULT_EXTRA_IDS):
    """A seqio.SentencePieceVocabulary with T5's extra ids."""
    import seqio

    if not os.path.isfile(spm_path):
        raise UserError(f"vocabulary file {spm_path!r} does not exist; build one with "
                        "`ssr-jax build-vocab` or point VOCABULARY at T5's cc_all.32000 model.")
    return seqio.SentencePieceVocabulary(spm_path, extra_ids=extra_ids)


def padded_vocab_size(vocab, multiple: int = 128) -> int:
    """The model's embedding size: vocab size (with extra ids) rounded up, as T5 does."""
    return -(-vocab.vocab_size // multiple) * multiple


def sentinel(vocab_size, k):
    """Id of `<extra_id_k>` for a vocabulary of `vocab_size` ids (extra ids included)."""
    return vocab_size - 1 - k


def sentinel_index(vocab_size, token):
    """k of the sentinel `<extra_id_k>` = token (the inverse of `sentinel`)."""
    return vocab_size - 1 - token


def sentinel_range(vocab_size: int, num_extra_ids: int) -> Tuple[int, int]:
    """[lo, hi): the ids that are sentinels."""
    return vocab_size - num_extra_ids, vocab_size


def is_sentinel(token, vocab_size: int, num_extra_ids: int):
    """True where token is one of the sentinel ids (elementwise for arrays)."""
    lo, hi = sentinel_range(vocab_size, num_extra_ids)
    return (token >= lo) & (token < hi)


def sentinel_id(vocab, k: int) -> int:
    """Id of `<extra_id_k>` of a vocabulary object."""
    return sentinel(vocab.vocab_size, k)


def vocab_record(vocabulary) -> Dict[str, Any]:
    """What identifies a vocabulary: its class, size, extra ids and (SentencePiece) the
    sha256 of the serialized model, so the record does not depend on where the file lives."""
    record = {"type": type(vocabulary).__name__, "vocab_size": int(vocabulary.vocab_size),
              "extra_ids": int(getattr(vocabulary, "extra_ids", 0) or 0)}
    sp_model = getattr(vocabulary, "sp_model", None)
    if sp_model:
        record["sentencepiece_sha256"] = hashlib.sha256(sp_model).hexdigest()
        record["sentencepiece_model_file"] = getattr(vocabulary, "sentencepiece_model_file",
                                                     None)
    return record


def write_vocab_record(directory: str, vocabulary) -> str:
    """Writes DIR/vocab.json (next to a checkpoint's model_config.json); returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, VOCAB_RECORD_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(vocab_record(vocabulary), f, indent=2)
    os.replace(tmp, path)
    return path
