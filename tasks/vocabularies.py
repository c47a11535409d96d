"""The vocabularies of the shipped tasks (the embedded corpus's, and T5's for C4)."""
import functools
import os

from ssr_jax import vocab as _vocab

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_SPM_PATH = os.path.join(ASSETS_DIR, "default_spm.model")
# T5's public SentencePiece model (cc_all.32000); override with $SSR_JAX_T5_SPM.
T5_SPM_PATH = os.environ.get("SSR_JAX_T5_SPM",
                             "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model")


@functools.lru_cache(maxsize=None)
def default_vocabulary():
    """The shipped SentencePiece vocabulary of the embedded corpus (+100 extra ids)."""
    return _vocab.get_vocabulary(DEFAULT_SPM_PATH, extra_ids=_vocab.DEFAULT_EXTRA_IDS)


def default_model_vocab_size() -> int:
    """T5Config.vocab_size for the default vocabulary: its size padded to a multiple of 128."""
    return _vocab.padded_vocab_size(default_vocabulary())


@functools.lru_cache(maxsize=None)
def t5_vocabulary():
    """T5's vocabulary (loaded lazily, so registering C4 tasks needs no file)."""
    import seqio
    return seqio.SentencePieceVocabulary(T5_SPM_PATH, extra_ids=_vocab.DEFAULT_EXTRA_IDS)
