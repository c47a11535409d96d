"""The embedded default corpus: English text that ships with every Python installation.

Documents come from two places, both read as files (nothing is imported or executed):
  * `pydoc_data/topics.py`: the language reference topics behind `help()` (~465k chars),
    read with `ast.literal_eval` of its `topics` dict;
  * the docstrings of the standard-library sources (`ast.parse`, never imported), one
    document per docstring.
Paragraphs are whitespace-normalised; doctest and code-like paragraphs are dropped;
duplicate documents are dropped. Each document lands in 'validation' when the MD5 of its
text is 0 mod 20 (about 5%), else in 'train', so the split is the same on every machine
with the same Python version (the stdlib text changes between Python releases, so the
builder config is named after the Python version).

`SsrDefaultCorpus` is a TFDS builder, so the default run goes through the same
TFDS -> SeqIO path as C4. `ensure_built()` prepares it (a few seconds) under
`$SSR_JAX_DATA_DIR` or `~/.cache/ssr_jax/tensorflow_datasets`, once, under a file lock so
that several processes on one machine may call it together.

Features: 'text' (the document, paragraphs joined by newlines), 'summary' (its first
paragraph), 'body' (the rest, maybe empty), 'source' (module path or pydoc topic).

The shipped vocabulary tasks/assets/default_spm.model was made from the train split with
    python -m ssr_jax.data.corpus --write_text /tmp/ssr_default_train.txt
    python -m ssr_jax.cli build-vocab --input /tmp/ssr_default_train.txt \
        --model_prefix tasks/assets/default_spm --vocab_size 4000
"""
import ast
import contextlib
import fcntl
import functools
import hashlib
import os
import re
import sys
import sysconfig
from typing import Dict, Iterator, List, Optional, Tuple

import seqio
import tensorflow_datasets as tfds

CORPUS_NAME = "ssr_default_corpus"
CORPUS_VERSION = "1.0.0"
# One config per Python version: the stdlib's docstrings are the data.
CONFIG_NAME = "py{}_{}_{}".format(*sys.version_info[:3])
TFDS_NAME = f"{CORPUS_NAME}/{CONFIG_NAME}:{CORPUS_VERSION}"
DATA_DIR_ENV = "SSR_JAX_DATA_DIR"
VALIDATION_MODULUS = 20  # md5(text) % 20 == 0 -> validation (~5%)

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


def split_of(text: str) -> str:
    digest = int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16)
    return "validation" if digest % VALIDATION_MODULUS == 0 else "train"


@functools.lru_cache(maxsize=2)
def corpus_documents(stdlib: Optional[str] = None) -> Dict[str, List[Dict[str, str]]]:
    """All documents by split, in a fixed order: {'train': [...], 'validation': [...]}.

    Each document is {'text', 'summary', 'body', 'source'}; identical texts are kept once.
    Cached per process (parsing the stdlib takes seconds); treat the result as read-only.
    """
    stdlib = stdlib or sysconfig.get_paths()["stdlib"]
    out = {"train": [], "validation": []}
    seen = set()
    for gen in (_pydoc_documents, _docstring_documents):
        for source, paras in gen(stdlib):
            if not paras:
                continue
            text = "\n".join(paras)
            if text in seen:
                continue
            seen.add(text)
            out[split_of(text)].append({"text": text, "summary": paras[0],
                                        "body": "\n".join(paras[1:]), "source": source})
    return out


class SsrDefaultCorpus(tfds.core.GeneratorBasedBuilder):
    """Python's own documentation as an English corpus (see the module docstring)."""

    VERSION = tfds.core.Version(CORPUS_VERSION)
    RELEASE_NOTES = {CORPUS_VERSION: "pydoc topics + stdlib docstrings, md5 split."}
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
