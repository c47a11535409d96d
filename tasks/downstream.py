"""Downstream fine-tuning tasks from the paper's families (TFDS, prepared by the user).

  cnn_dailymail_v3           summarization, 'summarize: ' article -> highlights, ROUGE
  xsum                       summarization, 'summarize: ' document -> summary, ROUGE
  squad_question_generation  'generate question: answer: A context: C' -> question, BLEU+ROUGE
All use T5's vocabulary (tasks.t5_vocabulary, $SSR_JAX_T5_SPM).
"""
import functools

import seqio
import tensorflow as tf

from ssr_jax.data import factories, metrics
from tasks.vocabularies import t5_vocabulary

_SPLITS = ("train", "validation", "test")


@seqio.map_over_dataset
def squad_question_generation(ex):
    """SQuAD example -> question generation pair (first answer)."""
    answer = ex["answers"]["text"][0]
    inputs = tf.strings.join(["generate question: answer: ", answer, " context: ",
                              ex["context"]])
    return {"inputs": inputs, "targets": ex["question"]}


if "cnn_dailymail_v3" not in seqio.TaskRegistry.names():
    factories.register_tfds_seq2seq_task(
        "cnn_dailymail_v3", "cnn_dailymail:3.4.0", "article", "highlights", t5_vocabulary(),
        prefix="summarize: ", metric_fns=[metrics.rouge], splits=_SPLITS)
    factories.register_tfds_seq2seq_task(
        "xsum", "xsum:1.1.0", "document", "summary", t5_vocabulary(), prefix="summarize: ",
        metric_fns=[metrics.rouge], splits=_SPLITS)
    factories.add_task(
        "squad_question_generation",
        source=seqio.TfdsDataSource(tfds_name="squad/v1.1:3.0.0",
                                    splits=("train", "validation")),
        output_features=factories.output_features(t5_vocabulary(), "seq2seq"),
        preprocessors=[squad_question_generation]
        + factories.objective_preprocessors("seq2seq"),
        metric_fns=[metrics.bleu, functools.partial(metrics.rouge,
                                                    score_keys=("rougeL",))],
        shuffle_buffer_size=factories.DEFAULT_SHUFFLE_BUFFER)
