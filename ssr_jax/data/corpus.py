"""The embedded default corpus: English text that ships with every Python installation.

Documents come from three places, all read as files (nothing is imported or executed):
  * `pydoc_data/topics.py`: the language reference topics behind `help()` (~465k chars),
    read with `ast.literal_eval` of its `topics` dict;
  * the docstrings of the standard-library sources (`ast.parse`, never imported), one
    document per docstring;
  * the comments of the same sources (`tokenize`; whole-line comments on consecutive lines
    form a paragraph), one document per file, all in the 'comments' split: never pre-trained on,
    they only add sentences to the GEC task (a student that sees 1,449 or 3,246 distinct
    sentences memorises them instead of learning to rewrite; docs/COMPARE.md).
Paragraphs are whitespace-normalised; doctest and code-like paragraphs are dropped;
duplicate documents are dropped. Each document's split is fixed by the MD5 of its text
mod 20: 0 -> 'validation' (~5%), 1..10 -> 'downstream' (~50%), else 'train' (~45%), so the
split is the same on every machine with the same Python version (the stdlib text changes
between Python releases, so the builder config is named after the Python version).
Pre-training reads 'train' (and 'validation' for held-out loss) and never 'downstream' or
'comments'.

The downstream tasks are carved from the 'downstream' pool only, by another hash
(`task_split_of`: MD5 of a salted key mod 10: 0 -> 'validation', 1 -> 'test', else
'train'), and keep nothing that also occurs in pre-training text:
  * `summary_examples`: body -> summary of the pool's documents with a non-empty body,
    split by the summary's hash (documents sharing a summary share a split); a summary
    that occurs anywhere in pre-training text is left out (a body may: ~7% do, verbatim);
  * `gec_sentences`: the prose sentences (`sentences.is_prose`, 6-40 words) of the pool
    and of the 'comments' split, each kept once, split by its own hash, none that occurs
    anywhere in pre-training text;
    `gec_examples` corrupts them with `synthetic_errors` (GEC_TRAIN_VERSIONS corruptions
    of each train sentence, one of each validation/test sentence).
`DownstreamSource` serves them to seqio from the TFDS build (reading it takes a second;
parsing the stdlib again would take several).

`SsrDefaultCorpus` is a TFDS builder, so the default run goes through the same
TFDS -> SeqIO path as C4. `ensure_built()` prepares it (a few seconds) under
`$SSR_JAX_DATA_DIR` or `~/.cache/ssr_jax/tensorflow_datasets`, once, under a file lock so
that several processes on one machine may call it together.

Features: 'text' (the document, paragraphs joined by newlines), 'summary' (its first
paragraph), 'body' (the rest, maybe empty), 'source' (module path or pydoc topic).

The shipped vocabulary tasks/assets/default_spm.model was made from the train split of
version 1.0.0, before the 'downstream' pool was held out: it was learned on text that
includes the pool, which is kept (it only tokenises; models pre-trained on 1.1.0 or later
never see the pool's text). It was made with
    python -m ssr_jax.data.corpus --write_text /tmp/ssr_default_train.txt
    python -m ssr_jax.cli build-vocab --input /tmp/ssr_default_train.txt \
        --model_prefix tasks/assets/default_spm --vocab_size 4000
"""
import ast
import contextlib
import fcntl
import functools
import hashlib
import io
import os
import random
import re
import sys
import sysconfig
import tokenize
from typing import Dict, Iterator, List, Optional, Tuple

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from ssr_jax.data import sentences, synthetic_errors

CORPUS_NAME = "ssr_default_corpus"
CORPUS_VERSION = "1.2.0"
_RELEASE_NOTES = {
    "1.0.0": "pydoc topics + stdlib docstrings, md5 split.",
    "1.1.0": "'downstream' split (md5 % 20 in 1..5) held out of 'train' for the downstream "
             "tasks.",
    "1.2.0": "'downstream' pool doubled (md5 % 20 in 1..10) and a 'comments' split (the "
             "stdlib's comments, for the GEC task only): the GEC task's 1,449 training "
             "sentences were memorised rather than learnt from; its errors now scale with "
             "sentence length (synthetic_errors.ERROR_RATE), 8 corruptions of each train "
             "sentence."}
# One config per Python version: the stdlib's docstrings are the data.
CONFIG_NAME = "py{}_{}_{}".format(*sys.version_info[:3])
TFDS_NAME = f"{CORPUS_NAME}/{CONFIG_NAME}:{CORPUS_VERSION}"
DATA_DIR_ENV = "SSR_JAX_DATA_DIR"
VALIDATION_MODULUS = 20  # md5(text) % 20 == 0 -> validation (~5%)
DOWNSTREAM_RESIDUES = tuple(range(1, 11))  # md5(text) % 20 in these -> downstream (~50%)
COMMENTS = "comments"  # the split of the stdlib's comments (GEC sentences only)
SPLITS = ("train", "validation", "downstream", COMMENTS)
PRETRAINING_SPLITS = ("train", "validation")
TASK_SPLITS = ("train", "validation", "test")
TASK_SPLIT_MODULUS = 10  # md5(salted key) % 10: 0 -> validation, 1 -> test, else train
GEC_MIN_WORDS, GEC_MAX_WORDS = 6, 40
GEC_SEED = 0
GEC_TRAIN_VERSIONS = 8  # corruptions of each train sentence (validation/test: one)
DOWNSTREAM_TASKS = ("summary", "gec")

# Directories of the stdlib that hold tests, vendored or generated text, or tooling.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
              "__pycache__", "turtledemo", "pydoc_data", "ensurepip", "venv", "config-3"}
_MIN_PARAGRAPH_CHARS = 30
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.\s|\$ |#|[{}\[\]()]\s*$)")


def data_dir() -> str:
    """Where the corpus is built: $SSR_JAX_DATA_DIR, else ~/.cache/ssr_jax/tensorflow_datasets."""
    return os.path.expanduser(os.environ.get(DATA_DIR_ENV)
                              or "~/.cache/ssr_jax/tensorflow_datasets")


def _paragraphs(text: str) -> List[str]:
    """Whitespace-normalised prose paragraphs of a docstring; code-like ones are dropped."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if not lines:
            continue
        code = sum(1 for ln in lines if _CODE_LINE.match(ln))
        if code * 2 >= len(lines):
            continue
        para = " ".join(block.split())
        if len(para) >= _MIN_PARAGRAPH_CHARS and sum(map(str.isalpha, para)) > len(para) // 2:
            out.append(para)
    return out


def _stdlib_files(stdlib: str) -> List[str]:
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        files.extend(os.path.join(root, n) for n in sorted(names) if n.endswith(".py"))
    return files


def _docstring_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Modules, classes and functions in source order, visiting statements only (fast)."""
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        yield node
    for field in ("body", "orelse", "handlers", "finalbody", "cases"):
        for child in getattr(node, field, None) or ():
            if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                yield from _docstring_nodes(child)


def _docstring_documents(stdlib: str) -> Iterator[Tuple[str, List[str]]]:
    for path in _stdlib_files(stdlib):
        rel = os.path.relpath(path, stdlib)
        try:
            with open(path, "rb") as f:
                tree = ast.parse(f.read(), filename=rel)
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue  # e.g. deliberately broken test fixtures
        for node in _docstring_nodes(tree):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield rel, _paragraphs(doc)


def _comment_paragraphs(source: str) -> List[str]:
    """Paragraphs of the comments of python `source`: runs of whole-line comments on
    consecutive lines ('#' and surrounding space stripped), whitespace-normalised; an empty
    comment line ends a paragraph; comments after code (mostly fragments) are left out.
    Raises tokenize.TokenError / SyntaxError on a file that does not tokenize."""
    paragraphs, current, last_line = [], [], None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT or not tok.line.lstrip().startswith("#"):
            continue
        words = tok.string.lstrip("#").split()
        if not (words and current and tok.start[0] == last_line + 1):
            paragraphs.append(" ".join(current))
            current = []
        current.extend(words)
        last_line = tok.start[0]
    paragraphs.append(" ".join(current))
    return [p for p in paragraphs if p]


def _comment_documents(stdlib: str) -> Iterator[Tuple[str, List[str]]]:
    for path in _stdlib_files(stdlib):
        rel = os.path.relpath(path, stdlib)
        try:
            with open(path, "rb") as f:
                paragraphs = _comment_paragraphs(f.read().decode("utf-8"))
        except (SyntaxError, tokenize.TokenError, UnicodeDecodeError, OSError):
            continue
        yield f"comments:{rel}", [p for p in paragraphs if len(p) >= _MIN_PARAGRAPH_CHARS
                                  and sum(map(str.isalpha, p)) > len(p) // 2]


def _pydoc_documents(stdlib: str) -> Iterator[Tuple[str, List[str]]]:
    path = os.path.join(stdlib, "pydoc_data", "topics.py")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == "topics"):
            topics = ast.literal_eval(node.value)
            for name in sorted(topics):
                yield f"pydoc:{name}", _paragraphs(topics[name])


def _md5(text: str) -> int:
    return int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16)


def split_of(text: str) -> str:
    """'validation', 'downstream' or 'train' for a document's text."""
    residue = _md5(text) % VALIDATION_MODULUS
    if residue == 0:
        return "validation"
    return "downstream" if residue in DOWNSTREAM_RESIDUES else "train"


@functools.lru_cache(maxsize=2)
def corpus_documents(stdlib: Optional[str] = None) -> Dict[str, List[Dict[str, str]]]:
    """All documents by split, in a fixed order: {'train', 'validation', 'downstream',
    'comments'} (a comment document has no summary or body).

    Each document is {'text', 'summary', 'body', 'source'}; identical texts are kept once.
    Cached per process (parsing the stdlib takes seconds); treat the result as read-only.
    """
    stdlib = stdlib or sysconfig.get_paths()["stdlib"]
    out = {split: [] for split in SPLITS}
    seen = set()
    for gen in (_pydoc_documents, _docstring_documents, _comment_documents):
        for source, paras in gen(stdlib):
            if not paras:
                continue
            text = "\n".join(paras)
            if text in seen:
                continue
            seen.add(text)
            if gen is _comment_documents:
                out[COMMENTS].append({"text": text, "summary": "", "body": "",
                                      "source": source})
            else:
                out[split_of(text)].append({"text": text, "summary": paras[0],
                                            "body": "\n".join(paras[1:]), "source": source})
    return out


class SsrDefaultCorpus(tfds.core.GeneratorBasedBuilder):
    """Python's own documentation as an English corpus (see the module docstring)."""

    VERSION = tfds.core.Version(CORPUS_VERSION)
    RELEASE_NOTES = _RELEASE_NOTES
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(
        name=CONFIG_NAME, description=f"text of Python {sys.version.split()[0]}")]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(), "summary": tfds.features.Text(),
                "body": tfds.features.Text(), "source": tfds.features.Text()}),
            homepage="https://docs.python.org/3/",
        )

    def _split_generators(self, dl_manager):
        docs = corpus_documents()
        return {split: self._generate_examples(items) for split, items in docs.items()}

    def _generate_examples(self, items):
        for doc in items:
            yield hashlib.md5(doc["text"].encode("utf-8")).hexdigest(), doc


@contextlib.contextmanager
def _file_lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_built(directory: Optional[str] = None) -> str:
    """Builds the corpus under `directory` (default `data_dir()`) if needed; returns it."""
    directory = directory or data_dir()
    builder = tfds.builder(TFDS_NAME, data_dir=directory)
    if not builder.data_path.exists():
        with _file_lock(os.path.join(directory, f".{CORPUS_NAME}.lock")):
            builder = tfds.builder(TFDS_NAME, data_dir=directory)
            if not builder.data_path.exists():
                builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                    try_download_gcs=False,
                    compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return directory


class EmbeddedCorpusSource(seqio.TfdsDataSource):
    """seqio source for the embedded corpus: builds it on first use, reads it via TFDS.

    The data directory is resolved at first use (not at registration), so setting
    $SSR_JAX_DATA_DIR any time before reading takes effect.
    """

    def __init__(self):
        super().__init__(tfds_name=TFDS_NAME, splits=("train", "validation"), read_only=True)
        self._ready = False

    def _ensure(self):
        if not self._ready:
            self.tfds_dataset.override_data_dir(ensure_built())
            self._ready = True

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **kwargs):
        self._ensure()
        return super().get_dataset(split=split, shuffle=shuffle, seed=seed,
                                   shard_info=shard_info, **kwargs)

    def num_input_examples(self, split: str) -> Optional[int]:
        self._ensure()
        return super().num_input_examples(split)

    def list_shards(self, split: str):
        self._ensure()
        return super().list_shards(split)


# ---- the downstream tasks, carved from the 'downstream' pool ---------------------------

def task_split_of(key: str) -> str:
    """'train', 'validation' or 'test' of a downstream example, from its key (a summary or a
    sentence); salted, so it is independent of the residue that put the document in the pool."""
    residue = _md5("downstream\x00" + key) % TASK_SPLIT_MODULUS
    return "validation" if residue == 0 else "test" if residue == 1 else "train"


def _pool(docs: Dict[str, List[Dict[str, str]]]) -> List[Dict[str, str]]:
    """The pool in a canonical order (by MD5 of the text), however the documents were read."""
    return _canonical(docs["downstream"])


def _canonical(items: List[Dict[str, str]]) -> List[Dict[str, str]]:
    return sorted(items, key=lambda d: (_md5(d["text"]), d["text"]))


class _TextIndex:
    """`key in text` for many single-spaced keys: a key whose inner words (all but its
    first and last, which may be parts of words of the text) are not consecutive words of
    the text cannot occur in it, which a set of word trigrams rules out quickly."""

    def __init__(self, text: str):
        words = text.split()
        self._text, self._trigrams = text, set(zip(words, words[1:], words[2:]))

    def __contains__(self, key: str) -> bool:
        inner = key.split()[1:-1]
        if any(g not in self._trigrams for g in zip(inner, inner[1:], inner[2:])):
            return False
        return key in self._text


def _pretraining_text(docs: Dict[str, List[Dict[str, str]]]) -> _TextIndex:
    return _TextIndex("\n".join(d["text"] for split in PRETRAINING_SPLITS for d in docs[split]))


def summary_examples(docs: Dict[str, List[Dict[str, str]]]) -> Dict[str, List[Dict[str, str]]]:
    """{split: [{'inputs': body, 'targets': summary}]} of the pool's documents with a body;
    a summary that occurs anywhere in pre-training text is left out."""
    pretraining = _pretraining_text(docs)
    out = {split: [] for split in TASK_SPLITS}
    for doc in _pool(docs):
        if doc["body"].strip() and doc["summary"] not in pretraining:
            out[task_split_of(doc["summary"])].append({"inputs": doc["body"],
                                                       "targets": doc["summary"]})
    return out


def gec_sentences(docs: Dict[str, List[Dict[str, str]]], min_words: int = GEC_MIN_WORDS,
                  max_words: int = GEC_MAX_WORDS) -> Dict[str, List[str]]:
    """{split: [clean sentence]}: the prose sentences of the pool and of the comments, each
    once, none that occurs anywhere in pre-training text, split by the sentence's hash."""
    pretraining = _pretraining_text(docs)
    seen = set()
    out = {split: [] for split in TASK_SPLITS}
    for doc in _pool(docs) + _canonical(docs[COMMENTS]):
        for sentence in sentences.split(doc["text"]):
            if (sentence not in seen and sentences.is_prose(sentence, min_words, max_words)
                    and sentence not in pretraining):
                seen.add(sentence)
                out[task_split_of(sentence)].append(sentence)
    return out


def gec_examples(docs: Dict[str, List[Dict[str, str]]], seed: int = GEC_SEED,
                 train_versions: int = GEC_TRAIN_VERSIONS) -> Dict[str, List[Dict[str, str]]]:
    """{split: [{'inputs': corrupted sentence, 'targets': the sentence}]}."""
    return {split: synthetic_errors.corrupted_pairs(
                items, train_versions if split == "train" else 1, seed)
            for split, items in gec_sentences(docs).items()}


@functools.lru_cache(maxsize=2)
def _built_documents(directory: str) -> Dict[str, List[Dict[str, str]]]:
    builder = tfds.builder(TFDS_NAME, data_dir=ensure_built(directory))
    out = {}
    for split in SPLITS:  # one batch per split: much faster than example by example
        columns = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        out[split] = [dict(zip(columns, (v.decode("utf-8") for v in row)))
                      for row in zip(*columns.values())]
    return out


def built_documents(directory: Optional[str] = None) -> Dict[str, List[Dict[str, str]]]:
    """The TFDS build's documents by split (as corpus_documents, in TFDS's order); built
    first if needed. Cached per process and directory; treat as read-only."""
    return _built_documents(directory or data_dir())


@functools.lru_cache(maxsize=4)
def _task_examples(task: str, directory: str) -> Dict[str, List[Dict[str, str]]]:
    docs = built_documents(directory)
    return summary_examples(docs) if task == "summary" else gec_examples(docs)


def downstream_examples(task: str, directory: Optional[str] = None
                        ) -> Dict[str, List[Dict[str, str]]]:
    """{split: [{'inputs', 'targets'}]} of a downstream task ('summary' or 'gec') from the
    TFDS build under `directory` (default data_dir()). Cached; treat as read-only."""
    if task not in DOWNSTREAM_TASKS:
        raise ValueError(f"downstream task {task!r} is not one of {DOWNSTREAM_TASKS}")
    return _task_examples(task, directory or data_dir())


class DownstreamSource(seqio.DataSource):
    """seqio source of a downstream task of the pool: {'inputs', 'targets'} strings for
    'train', 'validation' and 'test', derived from the TFDS build at first use (the data
    directory is resolved then, as for EmbeddedCorpusSource)."""

    def __init__(self, task: str):
        if task not in DOWNSTREAM_TASKS:
            raise ValueError(f"downstream task {task!r} is not one of {DOWNSTREAM_TASKS}")
        self._task = task
        super().__init__(splits=TASK_SPLITS, caching_permitted=True)

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False  # one shard per split: seqio shards its examples

    def examples(self, split: str) -> List[Dict[str, str]]:
        return downstream_examples(self._task)[split]

    def num_input_examples(self, split: str) -> int:
        return len(self.examples(split))

    def list_shards(self, split: str):
        return [split]

    def get_dataset(self, split: str = "train", shuffle: bool = True,
                    seed: Optional[int] = None, shard_info: Optional[seqio.ShardInfo] = None,
                    *, sequence_length=None, use_cached=False, num_epochs=1
                    ) -> tf.data.Dataset:
        del sequence_length, use_cached, num_epochs  # seqio repeats and trims
        rows = list(self.examples(split))
        if shard_info:
            rows = rows[shard_info.index::shard_info.num_shards]
        if shuffle:
            random.Random(seed).shuffle(rows)  # python's: the same order in every process
        return tf.data.Dataset.from_tensor_slices(
            {key: tf.constant([r[key] for r in rows], tf.string)
             for key in ("inputs", "targets")})
