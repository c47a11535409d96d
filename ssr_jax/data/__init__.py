"""Data layer: where SSR is defined.

  dataset            DatasetConfig, task-module import, per-host pipelines, eval/infer batches
  prefetch           host read-ahead shared by the input stages
  span_corruption    T5's span corruption (noise mask, sentinels, raw-length arithmetic)
  ssr_preprocessors  SSR mask (SeqIO preprocessor) and its length budget
  ssr_rewrite        SSR rewrite (numpy, online + offline), RewriteStats
  batched_masking    both masks for a batch of segments per call (numpy, same examples)
  philox             numpy twins of TF's stateless random ops (the masks' random numbers)
  packing            the one packer: examples -> the trainer's encoder-decoder batch
  pipeline           InputPipeline: a SeqIO task/mixture -> per-host packed numpy batches
  corpus             the embedded default corpus (TFDS builder over Python's own docs) and
                     its held-out downstream pool (docstring summary, synthetic GEC)
  sentences          sentence splitting, the prose filter, trivial downstream baselines
  synthetic_errors   seeded synthetic grammatical errors (the GEC task's inputs)
  user_files         validated sources over the user's text / JSONL / TFRecord files
  factories          register SeqIO tasks for an objective (explicit vocabulary)
  metrics            ROUGE / BLEU / exact match / GLEU as seqio metric functions
  gleu               GLEU (JFLEG's GEC metric), corpus level, several references
Import submodules directly; this package imports nothing heavy.
"""
