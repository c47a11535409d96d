"""Text metrics for downstream tasks, as seqio metric functions fn(targets, predictions).

ROUGE uses Google's `rouge-score` (rouge1, rouge2, rougeLsum over sentences split at
'. ', stemming on, F-measure x 100, as T5 reports it); BLEU uses `sacrebleu`'s corpus BLEU
with T5's settings (exp smoothing, 'intl' tokenizer). Both packages are imported
lazily: a missing one raises UserError saying what to install.
"""
import re
from typing import Dict, Sequence

import numpy as np

from ssr_jax.errors import UserError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _need(module: str, package: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise UserError(f"this task's metric needs `{package}`: pip install {package}") from e


def rouge(targets: Sequence[str], predictions: Sequence[str],
          score_keys: Sequence[str] = ("rouge1", "rouge2", "rougeLsum")) -> Dict[str, float]:
    """Mean ROUGE F-measure x 100 over examples."""
    rouge_scorer = _need("rouge_score.rouge_scorer", "rouge-score")
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
    scorer = rouge_scorer.RougeScorer(list(score_keys), use_stemmer=True, split_summaries=False)
    totals = {k: [] for k in score_keys}
    for t, p in zip(targets, predictions):
        scores = scorer.score(_lines(t), _lines(p))
        for k in score_keys:
            totals[k].append(scores[k].fmeasure)
    return {k: 100.0 * float(np.mean(v)) if v else 0.0 for k, v in totals.items()}


def _lines(text: str) -> str:
    """One sentence per line, which rougeLsum needs (no nltk data download)."""
    return _SENTENCE_END.sub("\n", str(text).strip())


def bleu(targets: Sequence[str], predictions: Sequence[str]) -> Dict[str, float]:
    """Corpus BLEU (sacrebleu, T5's settings). targets: one reference per example."""
    sacrebleu = _need("sacrebleu", "sacrebleu")
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
    refs = [[t if isinstance(t, str) else t[0] for t in targets]]
    score = sacrebleu.corpus_bleu(list(predictions), refs, smooth_method="exp",
                                  smooth_value=0.0, force=False, lowercase=False,
                                  tokenize="intl", use_effective_order=False)
    return {"bleu": float(score.score)}


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> Dict[str, float]:
    """Percentage of predictions equal to their target after stripping whitespace."""
    if not targets:
        return {"exact_match": 0.0}
    same = [str(t).strip() == str(p).strip() for t, p in zip(targets, predictions)]
    return {"exact_match": 100.0 * float(np.mean(same))}
