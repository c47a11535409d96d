"""Tasks over the embedded default corpus (built by TFDS on first use, no download).

Pre-training reads the corpus's 'train' split ('validation' for held-out loss); the
downstream tasks come from its 'downstream' pool only (ssr_jax/data/corpus.py says how
they are carved and kept apart from pre-training text), each with 'train', 'validation'
and 'test' splits:
  ssr_default_docstring_summary  'summarize: ' docstring body -> its first paragraph
                                 (ROUGE: rouge1, rouge2, rougeLsum)
  ssr_default_gec                'fix: ' sentence with synthetic errors (ERROR_RATE per
                                 word, at least one) -> the clean sentence (GLEU with its
                                 interval, the copy-the-input GLEU floor, exact match)
Split sizes on Python 3.11.7 (train/validation/test): summary 1032/119/134 documents; GEC
25082/431/412 examples (3246/431/412 sentences; GEC_TRAIN_VERSIONS corruptions of each
train sentence). Another Python's stdlib gives other sizes; `num_input_examples` counts.
`trivial_predictions(task_name, inputs)` gives the baselines a downstream score must beat,
for any registered task.
"""
import functools
from typing import Dict, List, Sequence

import seqio

from ssr_jax.data import corpus, factories, metrics, sentences
from tasks.vocabularies import default_vocabulary

SPAN_CORRUPTION = "ssr_default_span_corruption"
SSR_MASKED = "ssr_default_ssr_masked"
DOCSTRING_SUMMARY = "ssr_default_docstring_summary"
GEC = "ssr_default_gec"
PREFIXES = {DOCSTRING_SUMMARY: "summarize: ", GEC: "fix: "}

if SPAN_CORRUPTION not in seqio.TaskRegistry.names():
    factories.register_task(SPAN_CORRUPTION, corpus.EmbeddedCorpusSource(), "span_corruption",
                            default_vocabulary())
    factories.register_task(SSR_MASKED, corpus.EmbeddedCorpusSource(), "ssr_masked",
                            default_vocabulary())
    factories.register_task(
        DOCSTRING_SUMMARY, corpus.DownstreamSource("summary"), "seq2seq", default_vocabulary(),
        prefix=PREFIXES[DOCSTRING_SUMMARY], metric_fns=[metrics.rouge])
    factories.register_task(
        GEC, corpus.DownstreamSource("gec"), "seq2seq", default_vocabulary(),
        prefix=PREFIXES[GEC],
        metric_fns=[metrics.gleu, metrics.gleu_copy_source, metrics.exact_match],
        postprocess_fn=metrics.source_and_references(prefix=PREFIXES[GEC]))


def input_prefix(task_name: str) -> str:
    """The prefix a registered task puts before its inputs: the `prefix` argument of its
    preprocessors (as the factories' seq2seq tasks take it), '' when it has none."""
    task = seqio.get_mixture_or_task(task_name)
    for step in getattr(task, "preprocessors", ()):
        prefix = step.keywords.get("prefix") if isinstance(step, functools.partial) else None
        if isinstance(prefix, str) and prefix:
            return prefix
    return ""


def trivial_predictions(task_name: str, inputs: Sequence[str]) -> Dict[str, List[str]]:
    """The baselines of a registered task for its raw inputs (prefixed, as seqio's
    inputs_pretokenized and `ssr-jax infer`'s rows hold them): {'copy_input': each input
    less the task's prefix, 'first_sentence': its first sentence}."""
    return sentences.trivial_predictions(inputs, input_prefix(task_name))
