"""`ssr-jax corpus`: build the embedded default corpus, or write its train split as text."""
import argparse

from ssr_jax.data import corpus


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ssr-jax corpus",
                                     description="Build or dump the embedded default corpus.")
    parser.add_argument("--write_text", help="write the train split here, one paragraph per "
                        "line (input for `ssr-jax build-vocab`)")
    parser.add_argument("--data_dir", default=None, help="build the TFDS dataset here")
    args = parser.parse_args(argv)
    if args.write_text:
        docs = corpus.corpus_documents()
        with open(args.write_text, "w", encoding="utf-8") as f:
            for doc in docs["train"]:
                f.write(doc["text"] + "\n")
        print(f"wrote {len(docs['train'])} train documents to {args.write_text} "
              f"({len(docs['validation'])} held out for validation)")
    else:
        print(f"built {corpus.TFDS_NAME} in {corpus.ensure_built(args.data_dir)}")
    return 0
