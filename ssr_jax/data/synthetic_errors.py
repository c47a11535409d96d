"""Seeded synthetic grammatical errors: the inputs of a GEC-style rewrite task whose target
is the clean sentence (pure python, no TF).

`corrupt(sentence, seed, version)` applies errors to the whitespace tokens of a sentence,
as many as in learner text of ERROR_RATE errors per word: Binomial(words, ERROR_RATE), at
least one (`error_count`). A fixed count per sentence (version 1.1 of the corpus drew 1-3
whatever the length) leaves a 30-word sentence almost clean, so the copy-the-input floor
measured mostly long sentences that need no rewriting. Each error is one of KINDS, drawn
uniformly among the kinds that apply to the sentence:
  drop_word     a function word ('the', 'of', 'is', ...) is removed (any plain word when
                the sentence has none);
  repeat_word   a word is written twice in a row;
  swap_words    two adjacent words trade places;
  inflection    is/are, was/were, has/have, do/does, this/these, or a suffix swap:
                -ing -> -ed/-s, -ed -> -ing/-s, -ies -> -y, -s dropped, -s added;
  article       a/an/the replaced by another of them;
  preposition   one of PREPOSITIONS replaced by another;
  typo          inside a word of 4+ letters (its first letter kept): two adjacent letters
                swapped, a letter dropped or a letter doubled;
  casing        the sentence's first letter lowered, or a lower-case word capitalised.
Errors never touch a token an earlier error made or moved, so each edit stays what it claims;
every corrupted sentence differs from its target. Most errors are fixable from the sentence
alone (a doubled word, a/an before a vowel, is/are agreement, casing, a misspelt word);
some are not (which preposition, which dropped word), so copying the input scores well below
a perfect rewrite without the task being trivial.

Deterministic: the random stream of (sentence, seed, version) is seeded from the MD5 of the
three, so results do not depend on PYTHONHASHSEED, the process or the order of calls.
"""
import dataclasses
import hashlib
import random
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

KINDS = ("drop_word", "repeat_word", "swap_words", "inflection", "article", "preposition",
         "typo", "casing")
# Errors per word. At 0.13 copying the input scores GLEU ~40 on the embedded corpus's GEC
# test split, as on the real learner GEC set of docs/COMPARE.md (0.405); 1-3 errors per
# sentence gave ~50 with most of the floor from long, nearly clean sentences.
ERROR_RATE = 0.13
TYPO_OPS = ("swap", "drop", "duplicate")
ARTICLES = ("a", "an", "the")
PREPOSITIONS = ("in", "on", "at", "of", "for", "to", "from", "with", "by", "into", "about",
                "over")
# Dropped words: frequent, and recoverable from the words around them.
DROPPABLE = ("the", "a", "an", "of", "to", "is", "are", "be", "that", "it", "and", "in",
             "for", "with", "by", "on", "as", "or", "was", "which")
INFLECTION_PAIRS = {"is": "are", "are": "is", "was": "were", "were": "was", "has": "have",
                    "have": "has", "does": "do", "do": "does", "this": "these",
                    "these": "this"}
# Closed-class words and words whose ending is not an inflection: no suffix swap on them.
_NO_SUFFIX = frozenset(
    DROPPABLE + PREPOSITIONS + tuple(INFLECTION_PAIRS) + (
        "not", "no", "its", "his", "her", "their", "them", "they", "then", "than", "there",
        "here", "when", "what", "where", "while", "will", "would", "should", "could", "must",
        "shall", "also", "only", "such", "each", "some", "more", "most", "very", "been",
        "being", "other", "those", "your", "none", "true", "false", "always", "perhaps",
        "whereas", "sometimes", "besides", "towards", "afterwards", "thus", "unless", "yes",
        "news", "string", "thing", "nothing", "something", "anything", "everything", "during",
        "bring", "spring", "ring", "king", "many", "much", "both", "either", "neither",
        "every", "any", "all", "if", "else", "can", "may", "might", "one", "two", "same",
        "whether", "because", "after", "before", "until", "since", "under", "above",
        "below", "between", "through", "without", "within", "against", "upon", "onto"))
_TOKEN = re.compile(r"^([(\"'\u201c]*)(.*?)([,;:.!?)\"'\u201d]*)$", re.S)


@dataclasses.dataclass(frozen=True)
class Edit:
    """One error. `index`: the first token it changed, in the token list right after it was
    made (a drop: the position the word had); `before`/`after`: the clean and corrupted
    tokens, space-joined ('' for none); `detail`: the typo's or casing's operation."""
    kind: str
    index: int
    before: str
    after: str
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Corruption:
    source: str   # the corrupted sentence (the task's input, before any prefix)
    target: str   # the clean sentence
    edits: Tuple[Edit, ...]


def rng_for(sentence: str, seed: int = 0, version: int = 0) -> random.Random:
    digest = hashlib.md5(f"{seed}\x00{version}\x00{sentence}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest, "big"))


def _parts(token: str) -> Tuple[str, str, str]:
    """(leading punctuation, the word, trailing punctuation)."""
    lead, core, trail = _TOKEN.match(token).groups()
    return lead, core, trail


def _plain(token: str) -> bool:
    """A bare word: letters only, no punctuation around it (safe to move or copy)."""
    return token.isalpha()


def match_case(word: str, model: str) -> str:
    """`word` in the case pattern of `model` (ALL CAPS, Capitalised or lower)."""
    if len(model) > 1 and model.isupper():
        return word.upper()
    if model[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _replace(tokens, touched, i, new, kind, detail=""):
    out = list(tokens)
    out[i] = new
    mark = list(touched)
    mark[i] = True
    return out, mark, Edit(kind, i, tokens[i], new, detail)


def _drop_word(tokens, touched, rng):
    inner = [i for i in range(1, len(tokens) - 1) if not touched[i] and _plain(tokens[i])]
    cands = [i for i in inner if tokens[i].lower() in DROPPABLE] or inner
    if not cands:
        return None
    i = rng.choice(cands)
    mark = touched[:i] + touched[i + 1:]
    mark[i - 1] = True  # the words either side of the gap stay as they are
    mark[i] = True
    return tokens[:i] + tokens[i + 1:], mark, Edit("drop_word", i, tokens[i], "")


def _repeat_word(tokens, touched, rng):
    cands = [i for i in range(len(tokens)) if not touched[i] and _plain(tokens[i])]
    if not cands:
        return None
    i = rng.choice(cands)
    out = tokens[:i + 1] + tokens[i:]
    mark = touched[:i] + [True, True] + touched[i + 1:]
    return out, mark, Edit("repeat_word", i, tokens[i], f"{tokens[i]} {tokens[i]}")


def _swap_words(tokens, touched, rng):
    cands = [i for i in range(1, len(tokens) - 1)
             if not (touched[i] or touched[i + 1]) and _plain(tokens[i])
             and _plain(tokens[i + 1]) and tokens[i].lower() != tokens[i + 1].lower()]
    if not cands:
        return None
    i = rng.choice(cands)
    out = list(tokens)
    out[i], out[i + 1] = tokens[i + 1], tokens[i]
    mark = list(touched)
    mark[i] = mark[i + 1] = True
    return out, mark, Edit("swap_words", i, f"{tokens[i]} {tokens[i + 1]}",
                           f"{tokens[i + 1]} {tokens[i]}")


def inflections(word: str) -> List[str]:
    """Wrong inflections of a lower-case word (empty when none applies)."""
    if word in INFLECTION_PAIRS:
        return [INFLECTION_PAIRS[word]]
    if not word.isalpha() or len(word) < 4 or word in _NO_SUFFIX:
        return []
    if word.endswith("ing") and len(word) >= 6:
        return [word[:-3] + "ed", word[:-3] + "s"]
    if word.endswith("ed") and len(word) >= 5:
        return [word[:-2] + "ing", word[:-2] + "s"]
    if word.endswith("ies") and len(word) >= 5:
        return [word[:-3] + "y"]
    if word.endswith("s"):
        return [] if word.endswith(("ss", "us", "is")) else [word[:-1]]
    return [word + "s"]


def _inflection(tokens, touched, rng):
    cands = [i for i in range(len(tokens))
             if not touched[i] and inflections(_parts(tokens[i])[1].lower())]
    if not cands:
        return None
    i = rng.choice(cands)
    lead, core, trail = _parts(tokens[i])
    new = match_case(rng.choice(inflections(core.lower())), core)
    return _replace(tokens, touched, i, lead + new + trail, "inflection")


def _swap_in_class(words: Sequence[str], kind: str):
    def error(tokens, touched, rng):
        cands = [i for i in range(len(tokens))
                 if not touched[i] and _parts(tokens[i])[1].lower() in words]
        if not cands:
            return None
        i = rng.choice(cands)
        lead, core, trail = _parts(tokens[i])
        new = rng.choice([w for w in words if w != core.lower()])
        return _replace(tokens, touched, i, lead + match_case(new, core) + trail, kind)
    return error


def typo(word: str, op: str, rng: random.Random) -> Optional[str]:
    """`word` with one typo (its first letter kept); None when `op` cannot change it."""
    if op == "swap":
        spots = [j for j in range(1, len(word) - 1) if word[j] != word[j + 1]]
        if not spots:
            return None
        j = rng.choice(spots)
        return word[:j] + word[j + 1] + word[j] + word[j + 2:]
    j = rng.randrange(1, len(word))
    return word[:j] + word[j + 1:] if op == "drop" else word[:j + 1] + word[j:]


def _typo(tokens, touched, rng):
    cands = [i for i in range(len(tokens)) if not touched[i]
             and _parts(tokens[i])[1].isalpha() and len(_parts(tokens[i])[1]) >= 4]
    if not cands:
        return None
    i = rng.choice(cands)
    lead, core, trail = _parts(tokens[i])
    for op in rng.sample(TYPO_OPS, len(TYPO_OPS)):
        new = typo(core, op, rng)
        if new is not None:
            return _replace(tokens, touched, i, lead + new + trail, "typo", op)
    return None


def _casing(tokens, touched, rng):
    options = []
    first = tokens[0]
    if (not touched[0] and first[:1].isupper() and first[:1].isalpha()
            and (len(first) == 1 or not first[1:2].isupper())):
        options.append("lower_first")
    inner = [i for i in range(1, len(tokens)) if not touched[i]
             and _plain(tokens[i]) and tokens[i].islower()]
    if inner:
        options.append("capitalize")
    if not options:
        return None
    if rng.choice(options) == "lower_first":
        return _replace(tokens, touched, 0, first[0].lower() + first[1:], "casing",
                        "lower_first")
    i = rng.choice(inner)
    return _replace(tokens, touched, i, tokens[i][0].upper() + tokens[i][1:], "casing",
                    "capitalize")


ERRORS: Dict[str, Callable] = {
    "drop_word": _drop_word, "repeat_word": _repeat_word, "swap_words": _swap_words,
    "inflection": _inflection, "article": _swap_in_class(ARTICLES, "article"),
    "preposition": _swap_in_class(PREPOSITIONS, "preposition"), "typo": _typo,
    "casing": _casing}


def apply_error(tokens: List[str], kind: str, rng: random.Random,
                touched: Optional[List[bool]] = None):
    """One error of `kind` on `tokens` (tokens in `touched` are left alone): (new tokens,
    new touched flags, Edit), or None when the kind does not apply."""
    if kind not in ERRORS:
        raise ValueError(f"error kind {kind!r} is not one of {KINDS}")
    return ERRORS[kind](list(tokens), list(touched or [False] * len(tokens)), rng)


def error_count(num_words: int, rng: random.Random, rate: float = ERROR_RATE) -> int:
    """How many errors a sentence of `num_words` words gets: Binomial(num_words, rate), at
    least one (every example needs a rewrite)."""
    return max(1, sum(rng.random() < rate for _ in range(num_words)))


def corrupt(sentence: str, seed: int = 0, version: int = 0,
            kinds: Sequence[str] = KINDS, num_errors: Optional[int] = None) -> Corruption:
    """`sentence` with seeded errors (`error_count` of them, or exactly `num_errors`; fewer
    when no kind applies any more); target: the sentence itself. Version v gives another
    corruption of the same sentence (a training copy)."""
    rng = rng_for(sentence, seed, version)
    tokens = sentence.split()
    touched = [False] * len(tokens)
    count = num_errors or error_count(len(tokens), rng)
    edits = []
    for _ in range(count):
        for kind in rng.sample(kinds, len(kinds)):  # the kinds that apply, equally likely
            out = apply_error(tokens, kind, rng, touched)
            if out is not None:
                tokens, touched, edit = out
                edits.append(edit)
                break
    return Corruption(" ".join(tokens), sentence, tuple(edits))


def corrupted_pairs(sentences: Sequence[str], versions: int = 1,
                    seed: int = 0) -> List[Dict[str, str]]:
    """{'inputs': corrupted, 'targets': clean} for `versions` corruptions of each sentence
    (identical corruptions kept once; a sentence no error changes is skipped)."""
    out = []
    for sentence in sentences:
        seen = {sentence}
        for version in range(versions):
            source = corrupt(sentence, seed, version).source
            if source not in seen:
                seen.add(source)
                out.append({"inputs": source, "targets": sentence})
    return out
