"""Text metrics for downstream tasks, as seqio metric functions fn(targets, predictions).

A target is one reference string, a list of reference strings (every reference a task
provides), or a mapping {"source": str, "references": str | [str, ...]} as the
`source_and_references` postprocessor makes it for GLEU; every metric here takes all three.

ROUGE uses Google's `rouge-score` (rouge1, rouge2, rougeLsum over sentences split at
'. ', stemming on, F-measure x 100, as T5 reports it; with several references the best
one per score, rouge-score's `score_multi`); BLEU uses `sacrebleu`'s corpus BLEU with T5's
settings (exp smoothing, 'intl' tokenizer) over every reference. Both packages are imported
lazily: a missing one raises UserError saying what to install. GLEU (`ssr_jax.data.gleu`)
needs each example's source.

GLEU for a seq2seq task (e.g. JFLEG): the targets must carry the source, which seqio does
through the task's postprocess_fn (it sees the example, whose `inputs_pretokenized` is the
input text; `ssr-jax infer` passes the same). With `separator`, an eval target holding
several references joined by it is split into them. E.g. over a JSONL file of
{"sentence", "corrections"} (tests/test_infer.py does this):
    seqio.TaskRegistry.add(
        "jfleg", source=user_files.UserFileSource(files, "jsonl",
                                                  {"inputs": "sentence", "targets": "corrections"}),
        output_features=factories.output_features(vocabulary, "seq2seq"),
        preprocessors=factories.objective_preprocessors("seq2seq", prefix="gec: "),
        postprocess_fn=metrics.source_and_references(prefix="gec: ", separator=" ||| "),
        metric_fns=[metrics.gleu, metrics.gleu_copy_source])
"""
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ssr_jax.data import gleu as gleu_lib
from ssr_jax.errors import UserError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _need(module: str, package: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise UserError(f"this task's metric needs `{package}`: pip install {package}") from e


def references(target: Any) -> List[str]:
    """Every reference of one target (a string, a list of strings or a GLEU mapping)."""
    if isinstance(target, Mapping):
        if "references" not in target:
            raise ValueError(f"target mapping needs 'references': {sorted(target)}")
        target = target["references"]
    if not isinstance(target, (list, tuple)):
        target = [target]
    refs = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in target]
    if not refs:
        raise ValueError("a target has no reference")
    return refs


def _check(targets: Sequence, predictions: Sequence):
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")


def rouge(targets: Sequence, predictions: Sequence[str],
          score_keys: Sequence[str] = ("rouge1", "rouge2", "rougeLsum")) -> Dict[str, float]:
    """Mean ROUGE F-measure x 100 over examples (the best reference per example and key)."""
    rouge_scorer = _need("rouge_score.rouge_scorer", "rouge-score")
    _check(targets, predictions)
    scorer = rouge_scorer.RougeScorer(list(score_keys), use_stemmer=True, split_summaries=False)
    totals = {k: [] for k in score_keys}
    for t, p in zip(targets, predictions):
        scores = scorer.score_multi([_lines(r) for r in references(t)], _lines(p))
        for k in score_keys:
            totals[k].append(scores[k].fmeasure)
    return {k: 100.0 * float(np.mean(v)) if v else 0.0 for k, v in totals.items()}


def _lines(text: str) -> str:
    """One sentence per line, which rougeLsum needs (no nltk data download)."""
    return _SENTENCE_END.sub("\n", str(text).strip())


def bleu(targets: Sequence, predictions: Sequence[str]) -> Dict[str, float]:
    """Corpus BLEU (sacrebleu, T5's settings) against every reference of each example."""
    sacrebleu = _need("sacrebleu", "sacrebleu")
    _check(targets, predictions)
    refs = [references(t) for t in targets]
    # sacrebleu takes reference streams; None pads examples with fewer references.
    streams = [[r[i] if i < len(r) else None for r in refs]
               for i in range(max((len(r) for r in refs), default=1))]
    # force: predictions are detokenized by SentencePiece; " ." endings are the model's, not a
    # forgotten detokenization (sacrebleu would warn on every call).
    score = sacrebleu.corpus_bleu(list(predictions), streams, smooth_method="exp",
                                  smooth_value=0.0, force=True, lowercase=False,
                                  tokenize="intl", use_effective_order=False)
    return {"bleu": float(score.score)}


def exact_match(targets: Sequence, predictions: Sequence[str]) -> Dict[str, float]:
    """Percentage of predictions equal to one of their references after stripping."""
    if not targets:
        return {"exact_match": 0.0}
    same = [str(p).strip() in {r.strip() for r in references(t)}
            for t, p in zip(targets, predictions)]
    return {"exact_match": 100.0 * float(np.mean(same))}


def _sources(targets: Sequence, sources: Optional[Sequence[str]]) -> List[str]:
    if sources is not None:
        if len(sources) != len(targets):
            raise ValueError(f"{len(sources)} sources for {len(targets)} targets")
        return [str(s) for s in sources]
    if not all(isinstance(t, Mapping) and "source" in t for t in targets):
        raise UserError("GLEU needs each example's source: give sources=..., or make the "
                        "task's targets {'source', 'references'} with postprocess_fn="
                        "metrics.source_and_references(...).")
    return [str(t["source"]) for t in targets]


def gleu(targets: Sequence, predictions: Sequence[str],
         sources: Optional[Sequence[str]] = None, iterations: int = gleu_lib.ITERATIONS,
         seed: int = 0) -> Dict[str, float]:
    """Corpus GLEU x 100 (JFLEG's): mean over the reference-sampling rounds, their standard
    deviation and normal 95% interval. Sources from `sources` or the target mappings."""
    _check(targets, predictions)
    srcs = _sources(targets, sources)
    scores = gleu_lib.gleu_scores(srcs, [str(p) for p in predictions],
                                  [references(t) for t in targets], iterations, seed)
    mean, std, (low, high) = gleu_lib.summary(scores)
    return {"gleu": 100 * mean, "gleu_std": 100 * std, "gleu_ci95_low": 100 * low,
            "gleu_ci95_high": 100 * high}


def gleu_copy_source(targets: Sequence, predictions: Optional[Sequence[str]],
                     sources: Optional[Sequence[str]] = None,
                     iterations: int = gleu_lib.ITERATIONS, seed: int = 0) -> Dict[str, float]:
    """The GLEU floor: GLEU x 100 of copying each source unchanged. `predictions` is unused
    (it may be None); it is there so a task can list this seqio metric fn next to `gleu`."""
    del predictions
    srcs = _sources(targets, sources)
    scores = gleu_lib.gleu_scores(srcs, srcs, [references(t) for t in targets], iterations,
                                  seed)
    return {"gleu_copy_source": 100 * gleu_lib.summary(scores)[0]}


def source_and_references(prefix: str = "", separator: Optional[str] = None) -> Callable:
    """A seqio postprocess_fn giving targets {"source", "references"} for GLEU: the source is
    the example's `inputs_pretokenized` less the task's input `prefix`; the references are
    the target text, split at `separator` when given. Predictions pass unchanged."""
    def postprocess(text, example=None, is_target=False):
        if not is_target:
            return text
        if example is None or "inputs_pretokenized" not in example:
            raise UserError("GLEU's postprocessor needs the example's inputs_pretokenized "
                            "(the task's tokenize step must copy the pretokenized text).")
        source = example["inputs_pretokenized"]
        source = source.decode("utf-8") if isinstance(source, bytes) else str(source)
        if prefix and source.startswith(prefix):
            source = source[len(prefix):]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        refs = [r.strip() for r in text.split(separator)] if separator else [text]
        return {"source": source, "references": refs}
    return postprocess
