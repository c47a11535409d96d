"""Sentences of English prose (pure python, no TF): splitting, a prose filter, and the
trivial baselines a downstream score must beat.

`split` cuts a paragraph after '.', '!' or '?' followed by whitespace and a capital letter,
a quote or a parenthesis, except after common abbreviations ('e.g.', 'i.e.', 'etc.') and
single initials ('A.'); each line of the text is a paragraph.

`trivial_predictions` gives, for a task's raw inputs (its input prefix stripped), what a
model that learned nothing would output: the input itself ('copy_input', the floor of a
rewrite task such as GEC) and the input's first sentence ('first_sentence', the lead
baseline of summarization). Score them with the task's metric functions.
"""
import re
from typing import Dict, List, Sequence

_BOUNDARY = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "approx.", "resp.", "Mr.", "Dr.",
                  "No.", "ie.")
_INITIAL = re.compile(r"(?:^|\s)[A-Z]\.$")
# A prose word: letters or digits (versions such as 3.11), inner hyphens or apostrophes,
# maybe inside quotes or parentheses, maybe followed by punctuation.
_WORD = re.compile(r"^[(\"']*(?:[A-Za-z]+|\d+(?:\.\d+)*)(?:[-'\u2019][A-Za-z0-9]+)*"
                   r"[,;:.!?)\"']*$")
_CODE_CHARS = re.compile(r"[`_=<>{}\[\]\\|#@$^~*/]")
BASELINES = ("copy_input", "first_sentence")


def split(text: str) -> List[str]:
    """The sentences of `text`, in order (each line a paragraph; blank lines skipped)."""
    out = []
    for paragraph in text.split("\n"):
        paragraph = " ".join(paragraph.split())
        current = ""
        for piece in _BOUNDARY.split(paragraph):
            current = f"{current} {piece}" if current else piece
            if not (current.endswith(_ABBREVIATIONS) or _INITIAL.search(current)):
                out.append(current)
                current = ""
        if current:
            out.append(current)
    return out


def is_prose(sentence: str, min_words: int = 6, max_words: int = 40) -> bool:
    """A sentence of plain words (no code: no identifiers, operators or markup) that starts
    with a capital letter, ends with '.', '!' or '?' and has min_words..max_words words."""
    words = sentence.split()
    return (min_words <= len(words) <= max_words and sentence[:1].isupper()
            and sentence[-1:] in ".!?" and not _CODE_CHARS.search(sentence)
            and all(_WORD.match(w) for w in words))


def strip_prefix(text: str, prefix: str) -> str:
    return text[len(prefix):] if prefix and text.startswith(prefix) else text


def trivial_predictions(inputs: Sequence[str], prefix: str = "") -> Dict[str, List[str]]:
    """{'copy_input': each input less `prefix`, 'first_sentence': its first sentence}."""
    texts = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in inputs]
    copies = [strip_prefix(t, prefix).strip() for t in texts]
    firsts = [next(iter(split(c)), "") for c in copies]
    return {"copy_input": copies, "first_sentence": firsts}
