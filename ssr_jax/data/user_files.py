"""SeqIO data sources over the user's own files, validated line by line.

Formats:
  'text'        one document per line (blank lines ignored);
  'paragraphs'  documents separated by blank lines (lines of a document joined by newlines);
  'jsonl'       one JSON object per line; `fields` maps output feature -> JSON field;
  'tfrecord'    tf.train.Example records; `fields` maps output feature -> bytes feature.

Bad input never turns into a silent wrong example: an empty file is skipped with a warning
naming it; a line that is not UTF-8, not valid JSON, or lacks a field (or has a non-string
one) is skipped and reported as `file:line: reason` (first 20 per file in the log, all in the
summary `<cache>.report.json`); `strict=True` raises UserError at the first one instead. A
split with no usable example raises UserError naming its files.

Text and JSONL files are converted once into validated TFRecords under `cache_dir`
($SSR_JAX_DATA_DIR/user_files or ~/.cache/ssr_jax/user_files), keyed by the file's path,
size and mtime, so later runs (and other processes) reuse them. TFRecord inputs are scanned
once and read in place, with bad records filtered out by index.
"""
import hashlib
import json
import logging
import os
import random
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import seqio
import tensorflow as tf

from ssr_jax.errors import UserError

FORMATS = ("text", "paragraphs", "jsonl", "tfrecord")
_MAX_LOGGED = 20
_CACHE_VERSION = 1


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
        self.path, self.strict, self.bad, self.count = path, strict, [], 0

    def bad_line(self, lineno: int, reason: str, unit: str = "line"):
        msg = f"{self.path}:{lineno}: {reason}"
        if self.strict:
            raise UserError(f"bad input {msg} ({unit} {lineno}); fix it or drop strict=True "
                            "to skip such lines.")
        if len(self.bad) < _MAX_LOGGED:
            logging.warning("skipping %s %s", unit, msg)
        self.bad.append(msg)

    def to_json(self) -> Dict:
        return {"file": self.path, "examples": self.count, "skipped": len(self.bad),
                "bad": self.bad}


def _iter_lines(path: str) -> Iterable[Tuple[int, bytes]]:
    with tf.io.gfile.GFile(path, "rb") as f:
        for i, line in enumerate(f, start=1):
            yield i, line.rstrip(b"\r\n")


def _decode(raw: bytes, lineno: int, report: _Report) -> Optional[str]:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        report.bad_line(lineno, f"not UTF-8 ({e.reason} at byte {e.start})")
        return None


def _text_examples(path: str, fmt: str, report: _Report, feature: str):
    doc: List[str] = []
    for lineno, raw in _iter_lines(path):
        line = _decode(raw, lineno, report)
        if line is None:
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


def _jsonl_examples(path: str, fields: Mapping[str, str], report: _Report):
    for lineno, raw in _iter_lines(path):
        if not raw.strip():
            continue
        line = _decode(raw, lineno, report)
        if line is None:
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


def _cache_key(path: str, fmt: str, fields: Mapping[str, str]) -> str:
    st = tf.io.gfile.stat(path)
    key = json.dumps([_CACHE_VERSION, os.path.abspath(path), st.length, st.mtime_nsec, fmt,
                      sorted(fields.items())])
    return hashlib.sha1(key.encode()).hexdigest()[:20]


def _serialize(ex: Mapping[str, str]) -> bytes:
    feats = {k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode("utf-8")]))
             for k, v in ex.items()}
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def prepare_file(path: str, fmt: str, fields: Mapping[str, str], cache_dir: str,
                 strict: bool = False) -> Tuple[str, Dict]:
    """Validated TFRecord for one text/JSONL file: (record path, report dict); cached."""
    out = os.path.join(cache_dir, f"{os.path.basename(path)}.{_cache_key(path, fmt, fields)}")
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
    if fmt == "jsonl":
        examples = _jsonl_examples(path, fields, report)
    else:
        examples = _text_examples(path, fmt, report, next(iter(fields)))
    tmp = f"{record}.tmp{os.getpid()}"
    with tf.io.TFRecordWriter(tmp) as w:
        for ex in examples:
            w.write(_serialize(ex))
            report.count += 1
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


class UserFileSource(seqio.DataSource):
    """A seqio.DataSource over validated user files; outputs tf.string features.

    Args:
      split_to_patterns: {split: glob pattern(s)}.
      fmt: one of FORMATS.
      fields: {output feature: input field}; text formats use {'text': 'text'}.
      cache_dir: where converted files go (default `default_cache_dir()`).
      strict: raise on the first bad line instead of skipping it.
    """

    def __init__(self, split_to_patterns: Mapping[str, Union[str, Sequence[str]]], fmt: str,
                 fields: Optional[Mapping[str, str]] = None, cache_dir: Optional[str] = None,
                 strict: bool = False):
        if fmt not in FORMATS:
            raise UserError(f"file format {fmt!r} is not one of {FORMATS}.")
        if fmt in ("jsonl", "tfrecord") and not fields:
            raise UserError(f"format {fmt!r} needs fields, e.g. {{'text': 'text'}}.")
        self._patterns = dict(split_to_patterns)
        self._fmt, self._strict = fmt, strict
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
        files = expand_patterns(self._patterns[split], f"split {split!r}")
        cache_dir = self._cache_dir or default_cache_dir()
        out, bad, total = [], {}, 0
        for path in files:
            if tf.io.gfile.stat(path).length == 0:
                logging.warning("skipping empty file %s", path)
                continue
            if self._fmt == "tfrecord":
                bad_idx, count = scan_tfrecord(path, self._fields, self._strict)
                bad[path] = bad_idx
                out.append(path)
            else:
                record, report = prepare_file(path, self._fmt, self._fields, cache_dir,
                                              self._strict)
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
