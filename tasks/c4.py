"""C4 tasks for real runs (TFDS c4/en:3.1.0, prepared by the user; T5's vocabulary)."""
import seqio

from ssr_jax.data import factories
from tasks.vocabularies import t5_vocabulary


C4_TFDS = "c4/en:3.1.0"

if "c4_span_corruption" not in seqio.TaskRegistry.names():
    factories.register_tfds_text_task("c4_span_corruption", C4_TFDS, "span_corruption",
                                      t5_vocabulary())
    factories.register_tfds_text_task("c4_ssr_masked", C4_TFDS, "ssr_masked", t5_vocabulary())
