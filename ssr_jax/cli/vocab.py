"""`ssr-jax build-vocab`: train a SentencePiece vocabulary with T5's settings."""
import argparse

from ssr_jax import vocab as vocab_lib


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="ssr-jax build-vocab",
        description="Train a SentencePiece vocabulary with T5's settings (unigram, pad=0, "
                    "eos=1, unk=2, no byte fallback).")
    parser.add_argument("--input", nargs="+", required=True, help="text files, one "
                        "sentence/paragraph per line")
    parser.add_argument("--model_prefix", required=True, help="output prefix: writes "
                        "PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab_size", type=int, default=32000,
                        help="SentencePiece pieces, without the extra ids (default: 32000)")
    parser.add_argument("--extra_ids", type=int, default=vocab_lib.DEFAULT_EXTRA_IDS,
                        help="sentinels <extra_id_k> appended after the pieces (default: "
                        f"{vocab_lib.DEFAULT_EXTRA_IDS})")
    args = parser.parse_args(argv)
    path = vocab_lib.train_sentencepiece(args.input, args.model_prefix, args.vocab_size)
    vocab = vocab_lib.get_vocabulary(path, args.extra_ids)
    print(f"wrote {path}: {vocab.vocab_size} ids with {args.extra_ids} extra ids; "
          f"model vocab_size (padded to 128) = {vocab_lib.padded_vocab_size(vocab)}")
    return 0
