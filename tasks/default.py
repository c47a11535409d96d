"""Tasks over the embedded default corpus (built by TFDS on first use, no download)."""
import seqio

from ssr_jax.data import corpus, factories, metrics
from tasks.vocabularies import default_vocabulary

SPAN_CORRUPTION = "ssr_default_span_corruption"
SSR_MASKED = "ssr_default_ssr_masked"
DOCSTRING_SUMMARY = "ssr_default_docstring_summary"

if SPAN_CORRUPTION not in seqio.TaskRegistry.names():
    factories.register_task(SPAN_CORRUPTION, corpus.EmbeddedCorpusSource(), "span_corruption",
                            default_vocabulary())
    factories.register_task(SSR_MASKED, corpus.EmbeddedCorpusSource(), "ssr_masked",
                            default_vocabulary())
    factories.register_tfds_seq2seq_task(
        DOCSTRING_SUMMARY, corpus.TFDS_NAME, inputs_key="body", targets_key="summary",
        vocabulary=default_vocabulary(), prefix="summarize: ", metric_fns=[metrics.rouge],
        source=corpus.EmbeddedCorpusSource())
