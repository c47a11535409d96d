"""SeqIO task registrations for ssr-jax (import this module to register them).

  ssr_default_span_corruption   embedded corpus (Python's docs), T5 span corruption
  ssr_default_ssr_masked        embedded corpus, SSR mask for the online SSR stage
  ssr_default_docstring_summary embedded corpus's downstream pool, docstring body -> its
                                summary paragraph (ROUGE); train/validation/test
  ssr_default_gec               downstream pool, sentence with synthetic errors -> the clean
                                sentence (GLEU, copy floor, exact match); train/validation/test
  c4_span_corruption, c4_ssr_masked             C4 (c4/en:3.1.0 from TFDS), T5's vocabulary
  cnn_dailymail_v3, xsum, squad_question_generation   downstream fine-tuning tasks

Each has 'train' and 'validation' splits. Users add their own tasks in their own module with
`ssr_jax.data.factories` and select it with --gin.MIXTURE_OR_TASK_MODULE.
"""
from tasks.vocabularies import (ASSETS_DIR, DEFAULT_SPM_PATH, T5_SPM_PATH,  # noqa: F401
                                default_model_vocab_size, default_vocabulary, t5_vocabulary)
from tasks import c4, default, downstream  # noqa: E402,F401  (registers the tasks)
from tasks.default import (DOCSTRING_SUMMARY, GEC, input_prefix,  # noqa: E402,F401
                           trivial_predictions)
