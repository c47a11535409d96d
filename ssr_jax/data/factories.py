"""Task factories: register a SeqIO task for an objective over TFDS data or the user's files.

Objectives:
  'span_corruption'  text -> T5 span corruption {'inputs', 'targets'};
  'ssr_masked'       text -> SSR mask {'inputs' (teacher input), 'targets' (student
                     target), 'num_spans', 'masked_length'} for the online SSR stage;
  'seq2seq'          {'inputs', 'targets'} text pairs (fine-tuning), with an optional input
                     prefix such as 'summarize: '; inputs longer than the inputs length are
                     truncated keeping their EOS (T5's convention). Each example carries its
                     untrimmed token counts (`<feature>_untrimmed_length`, EOS included) so
                     InputPipeline can say how many were truncated (once per task and split).

Files: register_text_task (plain text), register_jsonl_task, register_tsv_task (columns of a
TSV file), register_parallel_files_task (source/target files, line i with line i),
register_tfrecord_task. Text, JSONL and TSV take `line_filter`, a regex: non-blank lines it
matches are dropped before parsing (headings, comments), e.g. r"^=+ .* =+$".

Every factory takes the task's vocabulary explicitly (the library ships no task module).
Example (a user's text file, one document per line):
    from ssr_jax import vocab
    from ssr_jax.data import factories
    factories.register_text_task("my_ssr", {"train": "/data/train.txt",
                                            "validation": "/data/valid.txt"},
                                 vocab.get_vocabulary("/data/spm.model"),
                                 objective="ssr_masked")
Put such calls in a module (my_tasks.py) and pass it with
--gin.MIXTURE_OR_TASK_MODULE="'my_tasks'"; its directory must be on PYTHONPATH.
"""
import functools
from typing import Callable, Mapping, Optional, Sequence, Union

import seqio
import tensorflow as tf

from ssr_jax.data import span_corruption as sc
from ssr_jax.data import ssr_preprocessors as ssr
from ssr_jax.data import user_files
from ssr_jax.errors import UserError

OBJECTIVES = ("span_corruption", "ssr_masked", "seq2seq")
DEFAULT_SHUFFLE_BUFFER = 1000  # seqio's default, as T5
Patterns = Union[str, Sequence[str]]
UNTRIMMED_SUFFIX = "_untrimmed_length"
UNTRIMMED_LENGTH_KEYS = tuple(k + UNTRIMMED_SUFFIX for k in ("inputs", "targets"))


def output_features(vocabulary: seqio.Vocabulary, objective: str) -> Mapping[str, seqio.Feature]:
    feats = {"inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
             "targets": seqio.Feature(vocabulary, add_eos=True)}
    if objective == "ssr_masked":
        feats["num_spans"] = ssr.scalar_feature()
        feats["masked_length"] = ssr.scalar_feature()
    return feats


def drop_empty_pairs(dataset):
    """Drops seq2seq examples whose inputs or targets are empty or blank."""
    def nonblank(ex):
        return tf.logical_and(tf.strings.length(tf.strings.strip(ex["inputs"])) > 0,
                              tf.strings.length(tf.strings.strip(ex["targets"])) > 0)
    return dataset.filter(nonblank)


@seqio.map_over_dataset
def _add_prefix(ex, prefix: str):
    out = dict(ex)
    out["inputs"] = prefix + ex["inputs"]
    return out


def record_untrimmed_lengths(dataset, output_features):
    """Adds `<feature>_untrimmed_length` (tokens + the EOS to come) for inputs and targets,
    before append_eos_after_trim cuts them: the exact count of truncated examples costs one
    scalar per example, read (and removed) by InputPipeline."""
    def add(ex):
        out = dict(ex)
        for key in ("inputs", "targets"):
            if key in ex:
                eos = int(output_features[key].add_eos)
                out[key + UNTRIMMED_SUFFIX] = tf.size(ex[key], out_type=tf.int32) + eos
        return out
    return dataset.map(add, num_parallel_calls=tf.data.AUTOTUNE)


def objective_preprocessors(objective: str, text_key: str = "text",
                            ssr_config: Optional[ssr.SsrMaskConfig] = None,
                            noise_density: float = sc.NOISE_DENSITY,
                            mean_noise_span_length: float = sc.MEAN_NOISE_SPAN_LENGTH,
                            prefix: str = "") -> list:
    """The SeqIO preprocessor list for an objective, from raw text features."""
    if objective not in OBJECTIVES:
        raise UserError(f"objective {objective!r} is not one of {OBJECTIVES}.")
    if objective == "seq2seq":
        steps = [drop_empty_pairs]
        steps += [functools.partial(_add_prefix, prefix=prefix)] if prefix else []
        return steps + [seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                        record_untrimmed_lengths, seqio.preprocessors.append_eos_after_trim]
    steps = [functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
             seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder()]
    if objective == "span_corruption":
        steps.append(functools.partial(sc.span_corruption, noise_density=noise_density,
                                       mean_noise_span_length=mean_noise_span_length))
    else:
        steps.append(functools.partial(ssr.ssr_mask, config=ssr_config or ssr.SsrMaskConfig()))
    return steps + [seqio.preprocessors.append_eos_after_trim]


def add_task(name: str, overwrite: bool = False, **task_kwargs) -> seqio.Task:
    """seqio.TaskRegistry.add, refusing to replace a registered task unless overwrite."""
    if name in seqio.TaskRegistry.names():
        if not overwrite:
            raise UserError(f"task {name!r} is already registered; pick another name or "
                            "pass overwrite=True.")
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(name, **task_kwargs)


def register_task(name: str, source: seqio.DataSource, objective: str,
                  vocabulary: seqio.Vocabulary, *, text_key: str = "text",
                  ssr_config: Optional[ssr.SsrMaskConfig] = None, prefix: str = "",
                  metric_fns: Sequence[Callable] = (),
                  postprocess_fn: Optional[Callable] = None,
                  shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER,
                  overwrite: bool = False) -> seqio.Task:
    """Registers `name` (replacing an existing one only when overwrite) and returns it.
    postprocess_fn: seqio's target/prediction postprocessor (e.g.
    metrics.source_and_references(...) for GLEU)."""
    return add_task(
        name, overwrite, source=source, output_features=output_features(vocabulary, objective),
        preprocessors=objective_preprocessors(objective, text_key, ssr_config, prefix=prefix),
        metric_fns=list(metric_fns), postprocess_fn=postprocess_fn,
        shuffle_buffer_size=shuffle_buffer_size)


def register_text_task(name: str, split_files: Mapping[str, Patterns],
                       vocabulary: seqio.Vocabulary, objective: str = "span_corruption", *,
                       paragraphs: bool = False,
                       ssr_config: Optional[ssr.SsrMaskConfig] = None,
                       cache_dir: Optional[str] = None, strict: bool = False,
                       line_filter: Optional[str] = None,
                       overwrite: bool = False) -> seqio.Task:
    """A pre-training task over plain text files: one document per line, or (paragraphs)
    documents separated by blank lines. split_files: {split: glob pattern(s)}.
    line_filter: a regex; non-blank lines it matches are dropped (e.g. headings)."""
    if objective == "seq2seq":
        raise UserError("plain text has no inputs/targets pair; use register_jsonl_task, "
                        "register_tsv_task or register_parallel_files_task.")
    source = user_files.UserFileSource(split_files, "paragraphs" if paragraphs else "text",
                                       {"text": "text"}, cache_dir, strict, line_filter)
    return register_task(name, source, objective, vocabulary, ssr_config=ssr_config,
                         overwrite=overwrite)


def _fields(text_field, inputs_field, targets_field, what, kind="field"):
    given = lambda f: f is not None and f != ""  # noqa: E731  (TSV column 0 is a field)
    t, i, o = f"text_{kind}", f"inputs_{kind}", f"targets_{kind}"
    if given(text_field) and (given(inputs_field) or given(targets_field)):
        raise UserError(f"{what}: give {t}, or {i} and {o}, not both.")
    if given(text_field):
        return {"text": text_field}, None
    if given(inputs_field) and given(targets_field):
        return {"inputs": inputs_field, "targets": targets_field}, "seq2seq"
    raise UserError(f"{what}: give {t}, or both {i} and {o}.")


def _objective(name: str, objective: Optional[str], implied: Optional[str], fields,
               what: str) -> str:
    """The objective given (or implied by the fields: seq2seq for an inputs/targets pair)."""
    objective = objective or implied or "span_corruption"
    if (objective == "seq2seq") != (implied == "seq2seq"):
        raise UserError(f"task {name!r}: objective {objective!r} does not match the {what} "
                        f"given ({sorted(map(str, fields.values()))}).")
    return objective


def register_jsonl_task(name: str, split_files: Mapping[str, Patterns],
                        vocabulary: seqio.Vocabulary, *,
                        text_field: Optional[str] = None, inputs_field: Optional[str] = None,
                        targets_field: Optional[str] = None,
                        objective: Optional[str] = None, prefix: str = "",
                        metric_fns: Sequence[Callable] = (),
                        postprocess_fn: Optional[Callable] = None,
                        ssr_config: Optional[ssr.SsrMaskConfig] = None,
                        cache_dir: Optional[str] = None, strict: bool = False,
                        line_filter: Optional[str] = None,
                        overwrite: bool = False) -> seqio.Task:
    """A task over JSON-lines files: text_field for pre-training objectives, or
    inputs_field + targets_field for seq2seq (fine-tuning; e.g. metric_fns=[metrics.rouge]).
    line_filter: a regex; raw lines it matches are dropped before JSON parsing."""
    fields, implied = _fields(text_field, inputs_field, targets_field, f"task {name!r}")
    objective = _objective(name, objective, implied, fields, "fields")
    source = user_files.UserFileSource(split_files, "jsonl", fields, cache_dir, strict,
                                       line_filter)
    return register_task(name, source, objective, vocabulary, ssr_config=ssr_config,
                         prefix=prefix, metric_fns=metric_fns, postprocess_fn=postprocess_fn,
                         overwrite=overwrite)


def register_tsv_task(name: str, split_files: Mapping[str, Patterns],
                      vocabulary: seqio.Vocabulary, *,
                      inputs_column: Union[str, int, None] = None,
                      targets_column: Union[str, int, None] = None,
                      text_column: Union[str, int, None] = None, header: bool = True,
                      objective: Optional[str] = None, prefix: str = "",
                      metric_fns: Sequence[Callable] = (),
                      postprocess_fn: Optional[Callable] = None,
                      ssr_config: Optional[ssr.SsrMaskConfig] = None,
                      cache_dir: Optional[str] = None, strict: bool = False,
                      line_filter: Optional[str] = None,
                      overwrite: bool = False) -> seqio.Task:
    """A task over tab-separated files (no quoting): inputs_column + targets_column for
    seq2seq, or text_column for pre-training. Columns are header names (header=True: the
    first line of each file names them) or 0-based indices. A line without the column is
    skipped and reported as `file:line: reason`; a header without the name is an error.
    line_filter: a regex; data lines it matches are dropped (the header is always read)."""
    fields, implied = _fields(text_column, inputs_column, targets_column, f"task {name!r}",
                              "column")
    objective = _objective(name, objective, implied, fields, "columns")
    source = user_files.UserFileSource(split_files, "tsv", fields, cache_dir, strict,
                                       line_filter, header=header)
    return register_task(name, source, objective, vocabulary, ssr_config=ssr_config,
                         prefix=prefix, metric_fns=metric_fns, postprocess_fn=postprocess_fn,
                         overwrite=overwrite)


def register_parallel_files_task(name: str, split_files: Mapping[str, Sequence],
                                 vocabulary: seqio.Vocabulary, *, prefix: str = "",
                                 metric_fns: Sequence[Callable] = (),
                                 postprocess_fn: Optional[Callable] = None,
                                 cache_dir: Optional[str] = None, strict: bool = False,
                                 overwrite: bool = False) -> seqio.Task:
    """A seq2seq task over parallel files (e.g. train.src / train.tgt of a translation or
    correction corpus): split_files = {split: (source file, target file)} or a list of such
    pairs; line i of the source is the input of line i of the target. Files of different
    line counts are refused with both names and counts; pairs with a blank side are
    dropped."""
    source = user_files.UserFileSource(split_files, "parallel", cache_dir=cache_dir,
                                       strict=strict)
    return register_task(name, source, "seq2seq", vocabulary, prefix=prefix,
                         metric_fns=metric_fns, postprocess_fn=postprocess_fn,
                         overwrite=overwrite)


def register_tfrecord_task(name: str, split_files: Mapping[str, Patterns],
                           vocabulary: seqio.Vocabulary, *,
                           text_field: Optional[str] = None,
                           inputs_field: Optional[str] = None,
                           targets_field: Optional[str] = None,
                           objective: Optional[str] = None, prefix: str = "",
                           metric_fns: Sequence[Callable] = (),
                           postprocess_fn: Optional[Callable] = None,
                           ssr_config: Optional[ssr.SsrMaskConfig] = None,
                           strict: bool = False, overwrite: bool = False) -> seqio.Task:
    """A task over TFRecord files of tf.train.Example with bytes features (field names)."""
    fields, implied = _fields(text_field, inputs_field, targets_field, f"task {name!r}")
    objective = _objective(name, objective, implied, fields, "fields")
    source = user_files.UserFileSource(split_files, "tfrecord", fields, strict=strict)
    return register_task(name, source, objective, vocabulary, ssr_config=ssr_config,
                         prefix=prefix, metric_fns=metric_fns, postprocess_fn=postprocess_fn,
                         overwrite=overwrite)


def register_tfds_text_task(name: str, tfds_name: str, objective: str,
                            vocabulary: seqio.Vocabulary, *, text_key: str = "text",
                            splits: Optional[Sequence[str]] = None,
                            tfds_data_dir: Optional[str] = None,
                            ssr_config: Optional[ssr.SsrMaskConfig] = None,
                            overwrite: bool = False) -> seqio.Task:
    """A pre-training task over a TFDS text dataset (e.g. 'c4/en:3.1.0')."""
    source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir,
                                  splits=splits or ("train", "validation"))
    return register_task(name, source, objective, vocabulary, text_key=text_key,
                         ssr_config=ssr_config, overwrite=overwrite)


def register_tfds_seq2seq_task(name: str, tfds_name: str, inputs_key: str, targets_key: str,
                               vocabulary: seqio.Vocabulary, *, prefix: str = "",
                               metric_fns: Sequence[Callable] = (),
                               postprocess_fn: Optional[Callable] = None,
                               splits: Optional[Sequence[str]] = None,
                               tfds_data_dir: Optional[str] = None,
                               source: Optional[seqio.DataSource] = None,
                               overwrite: bool = False) -> seqio.Task:
    """A fine-tuning task over a TFDS dataset's (inputs_key, targets_key) text features."""
    source = source or seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir,
                                            splits=splits or ("train", "validation"))
    steps = [functools.partial(seqio.preprocessors.rekey,
                               key_map={"inputs": inputs_key, "targets": targets_key})]
    steps += objective_preprocessors("seq2seq", prefix=prefix)
    return add_task(
        name, overwrite, source=source, output_features=output_features(vocabulary, "seq2seq"),
        preprocessors=steps, metric_fns=list(metric_fns), postprocess_fn=postprocess_fn,
        shuffle_buffer_size=DEFAULT_SHUFFLE_BUFFER)
