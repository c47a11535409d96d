"""SeqIO data sources over the user's own files, validated line by line.

Formats:
  'text'        one document per line (blank lines ignored);
  'paragraphs'  documents separated by blank lines (lines of a document joined by newlines);
  'jsonl'       one JSON object per line; `fields` maps output feature -> JSON field;
  'tsv'         tab-separated columns, no quoting; `fields` maps output feature -> column,
                a header name (header=True: the first line names the columns) or a 0-based
                index;
  'parallel'    a pair of files (source, target), line i of one with line i of the other:
                output features 'inputs' and 'targets'; files of different line counts are
                refused, naming both counts (the alignment would be lost);
  'tfrecord'    tf.train.Example records; `fields` maps output feature -> bytes feature.

`line_filter` (text, paragraphs, jsonl, tsv): a regular expression; non-blank lines it
matches (re.search) are dropped before parsing, e.g. r"^(#|=+ .* =+$)" for comments and
wiki headings. A regex rather than a callable because it is part of the conversion cache's
key (a callable has no stable identity across processes). Blank lines are never matched: they
are ignored, or separate documents in 'paragraphs'. Dropped lines are counted ("filtered" in
the report), not reported as bad.

Bad input never turns into a silent wrong example: an empty file is skipped with a warning
naming it; a line that is not UTF-8, not valid JSON, or lacks a field (or has a non-string
one) is skipped and reported as `file:line: reason` (first 20 per file in the log, all in the
summary `<cache>.report.json`); `strict=True` raises UserError at the first one instead. A
split with no usable example raises UserError naming its files.

Text, JSONL, TSV and parallel files are converted once into validated TFRecords under `cache_dir`
($SSR_JAX_DATA_DIR/user_files or ~/.cache/ssr_jax/user_files), keyed by the file's path,
size and mtime, so later runs (and other processes) reuse them. TFRecord inputs are scanned
once and read in place, with bad records filtered out by index.
"""
import hashlib
import json
import logging
import os
import itertools
import random
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import seqio
import tensorflow as tf

from ssr_jax.errors import UserError

FORMATS = ("text", "paragraphs", "jsonl", "tsv", "parallel", "tfrecord")
_MAX_LOGGED = 20
_CACHE_VERSION = 2  # 2: line_filter, TSV and parallel options in the key; "filtered" count
Column = Union[str, int]


def default_cache_dir() -> str:
    base = os.environ.get("SSR_JAX_DATA_DIR")
    return os.path.expanduser(os.path.join(base, "user_files") if base
                              else "~/.cache/ssr_jax/user_files")


def expand_patterns(patterns: Union[str, Sequence[str]], what: str) -> List[str]:
    """Sorted files matched by glob patterns; UserError when nothing matches."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files = []
    for p in patterns:
        matched = tf.io.gfile.glob(os.path.expanduser(p))
        if not matched:
            raise UserError(f"{what}: no file matches {p!r}; check the path.")
        files.extend(matched)
    return sorted(set(files))


class _Report:
    def __init__(self, path: str, strict: bool):
        self.path, self.strict, self.bad, self.count, self.filtered = path, strict, [], 0, 0

    def bad_line(self, lineno: int, reason: str, unit: str = "line",
                 path: Optional[str] = None):
        msg = f"{path or self.path}:{lineno}: {reason}"
        if self.strict:
            raise UserError(f"bad input {msg} ({unit} {lineno}); fix it or drop strict=True "
                            "to skip such lines.")
        if len(self.bad) < _MAX_LOGGED:
            logging.warning("skipping %s %s", unit, msg)
        self.bad.append(msg)

    def to_json(self) -> Dict:
        return {"file": self.path, "examples": self.count, "skipped": len(self.bad),
                "filtered": self.filtered, "bad": self.bad}


def _iter_lines(path: str) -> Iterable[Tuple[int, bytes]]:
    with tf.io.gfile.GFile(path, "rb") as f:
        for i, line in enumerate(f, start=1):
            yield i, line.rstrip(b"\r\n")


def _decode(raw: bytes, lineno: int, report: _Report, path: Optional[str] = None
            ) -> Optional[str]:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        report.bad_line(lineno, f"not UTF-8 ({e.reason} at byte {e.start})", path=path)
        return None


def _dropped(line: str, line_filter: Optional["re.Pattern"], report: _Report) -> bool:
    """True for a non-blank line the user's line_filter matches (counted, not reported)."""
    if line_filter is not None and line.strip() and line_filter.search(line):
        report.filtered += 1
        return True
    return False


def _text_examples(path: str, fmt: str, report: _Report, feature: str,
                   line_filter: Optional["re.Pattern"] = None):
    doc: List[str] = []
    for lineno, raw in _iter_lines(path):
        line = _decode(raw, lineno, report)
        if line is None or _dropped(line, line_filter, report):
            continue
        if fmt == "text":
            if line.strip():
                yield {feature: line.strip()}
        elif line.strip():
            doc.append(line.strip())
        elif doc:
            yield {feature: "\n".join(doc)}
            doc = []
    if doc:
        yield {feature: "\n".join(doc)}


def _jsonl_examples(path: str, fields: Mapping[str, str], report: _Report,
                    line_filter: Optional["re.Pattern"] = None):
    for lineno, raw in _iter_lines(path):
        if not raw.strip():
            continue
        line = _decode(raw, lineno, report)
        if line is None or _dropped(line, line_filter, report):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            report.bad_line(lineno, f"invalid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            report.bad_line(lineno, "not a JSON object")
            continue
        ex = {}
        for out_key, field in fields.items():
            value = obj.get(field)
            if field not in obj:
                report.bad_line(lineno, f"missing field {field!r}")
                break
            if not isinstance(value, str):
                report.bad_line(lineno, f"field {field!r} is {type(value).__name__}, "
                                        "not a string")
                break
            ex[out_key] = value
        else:
            yield ex


def _tsv_examples(path: str, fields: Mapping[str, Column], header: bool, report: _Report,
                  line_filter: Optional["re.Pattern"] = None):
    lines = _iter_lines(path)
    index = {out: col for out, col in fields.items() if isinstance(col, int)}
    if header:
        first = next(lines, None)
        header_line = b"" if first is None else first[1]
        names = header_line.decode("utf-8", "replace").lstrip("\ufeff").split("\t")
        for out, col in fields.items():
            if isinstance(col, str):
                if col not in names:
                    raise UserError(f"{path}:1: the TSV header has no column {col!r}; it has "
                                    f"{names}. Name one of them, or give a 0-based index.")
                index[out] = names.index(col)
    for lineno, raw in lines:
        if not raw.strip():
            continue
        line = _decode(raw, lineno, report)
        if line is None or _dropped(line, line_filter, report):
            continue
        cols = line.split("\t")
        short = [out for out, i in index.items() if i >= len(cols)]
        if short:
            col = fields[short[0]]
            name = f"{col!r} (column {index[short[0]] + 1})" if isinstance(col, str) else \
                f"{col} (0-based)"
            report.bad_line(lineno, f"{len(cols)} tab-separated columns, no column {name}")
            continue
        yield {out: cols[i] for out, i in index.items()}


def _parallel_examples(source: str, target: str, report: _Report):
    """{'inputs': source line i, 'targets': target line i}; refuses unequal line counts.
    Pairs with a blank side are dropped (nothing to learn); bad UTF-8 on either side drops
    the pair, reported against that file."""
    pairs = itertools.zip_longest(_iter_lines(source), _iter_lines(target))
    for n, (src, tgt) in enumerate(pairs, start=1):
        if src is None or tgt is None:
            counts = n + sum(1 for _ in pairs)
            ended = n - 1
            n_src, n_tgt = (ended, counts) if src is None else (counts, ended)
            raise UserError(f"parallel files differ in length: {source} has {n_src} lines, "
                            f"{target} has {n_tgt}; line i of one must pair with line i of "
                            "the other.")
        inputs = _decode(src[1], n, report)
        targets = _decode(tgt[1], n, report, path=target)
        if inputs is None or targets is None or not inputs.strip() or not targets.strip():
            continue
        yield {"inputs": inputs.strip(), "targets": targets.strip()}


def _cache_key(paths: Sequence[str], fmt: str, fields: Mapping[str, Column],
               options: Mapping) -> str:
    key = [_CACHE_VERSION, fmt, sorted(fields.items()), sorted(options.items())]
    for path in paths:
        st = tf.io.gfile.stat(path)
        key += [os.path.abspath(path), st.length, st.mtime_nsec]
    return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:20]


def _serialize(ex: Mapping[str, str]) -> bytes:
    feats = {k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode("utf-8")]))
             for k, v in ex.items()}
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def prepare_file(path: Union[str, Tuple[str, str]], fmt: str, fields: Mapping[str, Column],
                 cache_dir: str, strict: bool = False, line_filter: Optional[str] = None,
                 header: bool = False) -> Tuple[str, Dict]:
    """Validated TFRecord for one text/JSONL/TSV file, or a (source, target) pair of
    parallel files: (record path, report dict); cached."""
    paths = (path,) if isinstance(path, str) else tuple(path)
    options = {"line_filter": line_filter, "header": header}
    out = os.path.join(cache_dir, f"{os.path.basename(paths[0])}."
                                  f"{_cache_key(paths, fmt, fields, options)}")
    path = paths[0]
    record, report_path = out + ".tfrecord", out + ".report.json"
    if tf.io.gfile.exists(record) and tf.io.gfile.exists(report_path):
        with tf.io.gfile.GFile(report_path) as f:
            summary = json.load(f)
        if summary["skipped"]:
            logging.warning("%s: %d bad lines skipped (listed in %s)", path,
                            summary["skipped"], report_path)
        return record, summary
    tf.io.gfile.makedirs(cache_dir)
    report = _Report(path, strict)
    pattern = re.compile(line_filter) if line_filter else None
    if fmt == "jsonl":
        examples = _jsonl_examples(path, fields, report, pattern)
    elif fmt == "tsv":
        examples = _tsv_examples(path, fields, header, report, pattern)
    elif fmt == "parallel":
        examples = _parallel_examples(paths[0], paths[1], report)
    else:
        examples = _text_examples(path, fmt, report, next(iter(fields)), pattern)
    tmp = f"{record}.tmp{os.getpid()}"
    try:
        with tf.io.TFRecordWriter(tmp) as w:
            for ex in examples:
                w.write(_serialize(ex))
                report.count += 1
    except UserError:
        tf.io.gfile.remove(tmp)
        raise
    with tf.io.gfile.GFile(report_path + f".tmp{os.getpid()}", "w") as f:
        json.dump(report.to_json(), f, indent=1)
    # Rename the data before the report: the report's presence marks a complete cache.
    tf.io.gfile.rename(tmp, record, overwrite=True)
    tf.io.gfile.rename(report_path + f".tmp{os.getpid()}", report_path, overwrite=True)
    if report.bad:
        logging.warning("%s: %d bad lines skipped (listed in %s)", path, len(report.bad),
                        report_path)
    return record, report.to_json()


def scan_tfrecord(path: str, fields: Mapping[str, str], strict: bool = False
                  ) -> Tuple[List[int], int]:
    """(indices of bad records, number of good ones) of a user TFRecord of tf.Examples."""
    report = _Report(path, strict)
    bad = []
    index = -1
    for index, raw in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
        try:
            ex = tf.train.Example.FromString(raw)
        except Exception:  # protobuf's DecodeError is not exported stably
            bad.append(index)
            report.bad_line(index, "not a tf.train.Example", "record")
            continue
        for feature in fields.values():
            value = ex.features.feature.get(feature)
            if value is None or len(value.bytes_list.value) != 1:
                bad.append(index)
                report.bad_line(index, f"feature {feature!r} missing or not one bytes value",
                                "record")
                break
            try:
                value.bytes_list.value[0].decode("utf-8")
            except UnicodeDecodeError:
                bad.append(index)
                report.bad_line(index, f"feature {feature!r} is not UTF-8", "record")
                break
    return bad, index + 1 - len(bad)


def _pairs(split: str, value) -> List[Tuple[str, str]]:
    """(source, target) pairs of a 'parallel' split: one pair or a list of pairs."""
    if isinstance(value, str):
        pairs = []
    else:
        value = list(value)
        pairs = [value] if len(value) == 2 and all(isinstance(v, str) for v in value) else value
    if not pairs or any(len(p) != 2 or not all(isinstance(v, str) for v in p) for p in pairs):
        raise UserError(f"split {split!r}: parallel files are given as (source file, target "
                        f"file) or a list of such pairs, not {value!r}.")
    return [tuple(p) for p in pairs]


def _one_file(pattern: str, what: str) -> str:
    files = expand_patterns(pattern, what)
    if len(files) != 1:
        raise UserError(f"{what}: {pattern!r} matches {len(files)} files; a parallel pair "
                        "names one source and one target file.")
    return files[0]


class UserFileSource(seqio.DataSource):
    """A seqio.DataSource over validated user files; outputs tf.string features.

    Args:
      split_to_patterns: {split: glob pattern(s)}; for 'parallel', {split: (source file,
        target file)} or a list of such pairs.
      fmt: one of FORMATS.
      fields: {output feature: input field}; text formats use {'text': 'text'}; 'tsv' maps
        to header names or 0-based column indices; 'parallel' needs none.
      cache_dir: where converted files go (default `default_cache_dir()`).
      strict: raise on the first bad line instead of skipping it.
      line_filter: a regex; non-blank lines it matches are dropped (see the module doc).
      header: 'tsv' only: the first line of each file names the columns.
    """

    def __init__(self, split_to_patterns: Mapping[str, Union[str, Sequence[str]]], fmt: str,
                 fields: Optional[Mapping[str, Column]] = None,
                 cache_dir: Optional[str] = None, strict: bool = False,
                 line_filter: Optional[str] = None, header: bool = False):
        if fmt not in FORMATS:
            raise UserError(f"file format {fmt!r} is not one of {FORMATS}.")
        if fmt in ("jsonl", "tsv", "tfrecord") and not fields:
            raise UserError(f"format {fmt!r} needs fields, e.g. {{'text': 'text'}}.")
        if line_filter is not None and fmt in ("parallel", "tfrecord"):
            raise UserError(f"line_filter does not apply to format {fmt!r} (it would break "
                            "the pairing of lines or has no lines); filter the files first.")
        if line_filter is not None:
            try:
                re.compile(line_filter)
            except (re.error, TypeError) as e:
                raise UserError(f"line_filter {line_filter!r} is not a regular expression "
                                f"({e}).") from e
        if fmt == "tsv":
            for out, col in fields.items():
                if isinstance(col, str) and not header:
                    raise UserError(f"TSV column {col!r} for {out!r} is a name, but "
                                    "header=False: give a 0-based index or header=True.")
                if not isinstance(col, (str, int)) or isinstance(col, int) and col < 0:
                    raise UserError(f"TSV column {col!r} for {out!r}: give a header name or "
                                    "a 0-based index.")
        self._patterns = dict(split_to_patterns)
        if fmt == "parallel":
            self._patterns = {split: _pairs(split, v) for split, v in self._patterns.items()}
            fields = {"inputs": "source", "targets": "target"}
        self._fmt, self._strict = fmt, strict
        self._line_filter, self._header = line_filter, header
        self._fields = dict(fields or {"text": "text"})
        self._cache_dir = cache_dir
        self._prepared: Dict[str, Tuple[List[str], Dict[str, List[int]], int]] = {}
        super().__init__(splits=tuple(self._patterns), caching_permitted=True)

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    def _prepare(self, split: str):
        if split in self._prepared:
            return self._prepared[split]
        if split not in self._patterns:
            raise UserError(f"split {split!r} not registered; have {sorted(self._patterns)}.")
        if self._fmt == "parallel":
            files = [tuple(_one_file(p, f"split {split!r}") for p in pair)
                     for pair in self._patterns[split]]
        else:
            files = expand_patterns(self._patterns[split], f"split {split!r}")
        cache_dir = self._cache_dir or default_cache_dir()
        out, bad, total = [], {}, 0
        for path in files:
            if self._fmt != "parallel" and tf.io.gfile.stat(path).length == 0:
                logging.warning("skipping empty file %s", path)
                continue
            if self._fmt == "tfrecord":
                bad_idx, count = scan_tfrecord(path, self._fields, self._strict)
                bad[path] = bad_idx
                out.append(path)
            else:
                record, report = prepare_file(path, self._fmt, self._fields, cache_dir,
                                              self._strict, self._line_filter, self._header)
                count = report["examples"]
                if count:
                    out.append(record)
                else:
                    logging.warning("no document in %s; skipped", path)
            total += count
        if not total:
            raise UserError(f"split {split!r}: no usable example in {files} (empty files or "
                            "every line bad; see the warnings above).")
        self._prepared[split] = (out, bad, total)
        return self._prepared[split]

    def list_shards(self, split: str) -> Sequence[str]:
        return self._prepare(split)[0]

    def num_input_examples(self, split: str) -> int:
        return self._prepare(split)[2]

    def _read(self, path: str, bad: Mapping[str, List[int]]) -> tf.data.Dataset:
        ds = tf.data.TFRecordDataset(path)
        skip = bad.get(path)
        if skip:
            skip_t = tf.constant(sorted(skip), tf.int64)
            ds = ds.enumerate().filter(
                lambda i, _: tf.logical_not(tf.reduce_any(tf.equal(skip_t, i))))
            ds = ds.map(lambda _, r: r)
        return self._parse(ds)

    def _parse(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        spec = {feature: tf.io.FixedLenFeature([], tf.string)
                for feature in self._fields.values()}
        renames = {feature: out for out, feature in self._fields.items()}
        if self._fmt != "tfrecord":  # converted files already use the output names
            spec = {out: tf.io.FixedLenFeature([], tf.string) for out in self._fields}
            renames = {out: out for out in self._fields}
        return ds.map(lambda r: {renames[k]: v for k, v in
                                 tf.io.parse_single_example(r, spec).items()})

    def get_dataset(self, split: str = "train", shuffle: bool = True,
                    seed: Optional[int] = None,
                    shard_info: Optional[seqio.ShardInfo] = None,
                    *, sequence_length=None, use_cached=False, num_epochs=1
                    ) -> tf.data.Dataset:
        files, bad, _ = self._prepare(split)
        if shard_info:
            files = files[shard_info.index::shard_info.num_shards]
        files = list(files)
        if shuffle and len(files) > 1:
            # Deterministic file order for a seed (tf.random would differ per process).
            random.Random(seed).shuffle(files)
        if not any(bad.get(f) for f in files):
            return self._parse(tf.data.TFRecordDataset(files))
        ds = None
        for f in files:
            part = self._read(f, bad)
            ds = part if ds is None else ds.concatenate(part)
        return ds
