"""The stages of `ssr-jax compare` (the protocol: ssr_jax/cli/compare.py). Each stage's result
is MODEL_DIR/stages/<name>.json, written when the stage is done; a rerun reads it instead of
running the stage again, and refuses one recorded with other settings (use another
MODEL_DIR or delete the stage's record and directory)."""
import hashlib
import json
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ssr_jax.cli.compare_spec import ARM_FILES, BASELINE, OFFLINE_ARMS, CompareSpec
from ssr_jax.errors import UserError


def _train(files: Sequence[str], bindings: Sequence[str]) -> float:
    """One run of the normal trainer (`ssr-jax train`); returns its wall seconds."""
    from ssr_jax.cli.train import main as train_main  # pylint: disable=import-outside-toplevel
    argv = [f"--gin_file={f}" for f in files] + [f"--gin.{b}" for b in bindings]
    start = time.time()
    code = train_main(argv)
    if code != 0:
        raise UserError(f"a compare stage's training stopped (exit {code}): ssr-jax train "
                        + " ".join(argv))
    return time.time() - start


def _generate_spans(arm_file: str, bindings: Sequence[str], steps: int) -> float:
    """`ssr-jax generate-spans` of an offline arm: `steps` steps of rewritten examples (the
    arm trains them from its init's step on); returns its wall seconds."""
    from ssr_jax.cli.generate_spans import main as generate  # pylint: disable=C0415
    argv = [f"--gin_file={arm_file}"] + [f"--gin.{b}" for b in bindings]
    argv.append(f"--gin.ssr_offline.num_steps={steps}")  # TRAIN_STEPS is the arm's total
    start = time.time()
    if generate(argv) != 0:
        raise UserError("compare: generate-spans of the offline arm failed: ssr-jax "
                        "generate-spans " + " ".join(argv))
    return time.time() - start


def _q(value: Any) -> str:
    """A gin literal."""
    return repr(value)


def latest_step(model_dir: str) -> int:
    from ssr_jax.train import checkpoints  # pylint: disable=import-outside-toplevel
    return int(os.path.basename(checkpoints.resolve_step_dir(model_dir)))


def saved_steps(model_dir: str) -> List[int]:
    root = os.path.join(model_dir, "checkpoints")
    return sorted(int(d) for d in os.listdir(root) if d.isdigit()
                  and os.path.isdir(os.path.join(root, d, "params")))


def model_of(checkpoint: str):
    # pylint: disable=import-outside-toplevel
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel
    from ssr_jax.train import checkpoints
    config = checkpoints.load_model_config(checkpoint)
    if not config:
        raise UserError(f"{checkpoint} has no model_config.json: compare needs checkpoints "
                        "written by ssr-jax train or ssr-jax import-hf.")
    return EncoderDecoderModel.from_config_dict(config, checkpoint)


def non_embedding_params(model) -> int:
    """Parameters besides the token embedding and the output layer (the paper's size)."""
    import jax  # pylint: disable=import-outside-toplevel
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(model.abstract_params())[0]:
        name = jax.tree_util.keystr(path)
        if "token_embedder" not in name and "logits_dense" not in name:
            total += math.prod(leaf.shape)
    return int(total)


def _ssr_summary(model_dir: str) -> Dict[str, float]:
    from ssr_jax.ssr import stats  # pylint: disable=import-outside-toplevel
    path = os.path.join(model_dir, stats.SUMMARY_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def gin_digest(path: str) -> str:
    """sha256 (16 hex digits) of a gin file's text and its includes': a stage's record holds
    it, so a recipe edited in place is not taken as done before."""
    # pylint: disable=import-outside-toplevel
    from ssr_jax.cli import gin_registry
    from ssr_jax.cli.help import gin_file_closure
    digest = hashlib.sha256()
    for found in gin_file_closure(path, gin_registry.search_paths()):
        with open(found, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


class Stages:
    """The stages, sharing the spec and the per-stage records."""

    def __init__(self, spec: CompareSpec):
        self.spec = spec
        self.out = os.path.abspath(os.path.expanduser(spec.out_dir))
        os.makedirs(os.path.join(self.out, "stages"), exist_ok=True)
        _compile_cache(self.out)

    # --- records -------------------------------------------------------------------------
    def _record_path(self, name: str) -> str:
        return os.path.join(self.out, "stages", name.replace("/", "__") + ".json")

    def _done(self, name: str, inputs: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        path = self._record_path(name)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            record = json.load(f)
        if record.get("inputs") != json.loads(json.dumps(inputs)):
            raise UserError(f"compare stage {name!r} was done with other settings ({path}: "
                            f"{record.get('inputs')} vs now {inputs}); use another MODEL_DIR, "
                            "or delete that file and the stage's directory to redo it.")
        print(f"== {name}: done before ({path})", flush=True)
        return record["result"]

    def _finish(self, name: str, inputs: Mapping[str, Any], result: Dict[str, Any]):
        path = self._record_path(name)
        with open(path + ".tmp", "w") as f:
            json.dump({"inputs": inputs, "result": result}, f, indent=2, default=float)
        os.replace(path + ".tmp", path)
        return result

    @staticmethod
    def recipe(gin_file: str) -> Dict[str, str]:
        """The part of a stage's record that names its gin file and what the file (with its
        includes) says."""
        return {"gin": gin_file, "gin_sha": gin_digest(gin_file)}

    def _common(self) -> List[str]:
        return list(self.spec.bindings)

    def _pretrain(self) -> List[str]:
        """What every pre-training run shares, bound from the spec."""
        spec = self.spec
        return [f"TASK_FEATURE_LENGTHS={dict(spec.pretrain_lengths)}",
                f"BATCH_SIZE={spec.pretrain_batch_size}",
                f"MIXTURE_OR_TASK_MODULE={_q(spec.module)}"] + self._common()

    def _span_corruption(self) -> List[str]:
        return [f"MIXTURE_OR_TASK_NAME={_q(self.spec.pretrain_task)}"] + self._pretrain()

    # --- 1. teacher ----------------------------------------------------------------------
    def teacher(self) -> Dict[str, Any]:
        spec = self.spec
        inputs = {**self.recipe(spec.teacher_gin), "checkpoint": spec.teacher_checkpoint,
                  "steps": spec.teacher_steps, "extra": spec.teacher_extra_steps,
                  "max": spec.teacher_max_steps, "target": spec.min_valid_fills,
                  "examples": spec.fill_check_examples, "bindings": self._span_corruption(),
                  "ssr_task": spec.ssr_task,
                  "examples_per_row": spec.ssr_examples_per_row}
        done = self._done("teacher", inputs)
        if done is not None:
            return done
        seconds, history = 0.0, []
        if spec.teacher_checkpoint:
            directory = os.path.abspath(os.path.expanduser(spec.teacher_checkpoint))
            print(f"== teacher: given, {directory}", flush=True)
            history.append(self._fills(directory))
        else:
            directory = os.path.join(self.out, "teacher")
            steps = spec.teacher_steps
            while True:
                print(f"== teacher: span corruption to step {steps} -> {directory}", flush=True)
                seconds += _train([spec.teacher_gin], [f"MODEL_DIR={_q(directory)}",
                                                       f"TRAIN_STEPS={steps}"]
                                  + self._span_corruption())
                history.append(self._fills(directory))
                share = history[-1]["valid_nonempty_share"]
                print(f"   teacher at step {steps}: {share:.1%} of held-out spans get a valid "
                      f"non-empty fill (target {spec.min_valid_fills:.0%})", flush=True)
                if share >= spec.min_valid_fills or steps >= spec.teacher_max_steps:
                    break
                steps = min(spec.teacher_max_steps, steps + spec.teacher_extra_steps)
        model = model_of(directory)
        result = {"dir": directory, "step": latest_step(directory), "seconds": seconds,
                  "non_embedding_params": non_embedding_params(model),
                  "model": model.config_dict(), "fills": history[-1], "fill_history": history,
                  "reached_target": history[-1]["valid_nonempty_share"] >= spec.min_valid_fills}
        if not result["reached_target"]:
            print(f"WARNING: the teacher reached only {history[-1]['valid_nonempty_share']:.1%} "
                  f"valid non-empty fills by step {result['step']} (target "
                  f"{spec.min_valid_fills:.0%}); the report says so.", flush=True)
        return self._finish("teacher", inputs, result)

    def _fills(self, teacher_dir: str) -> Dict[str, Any]:
        """The teacher's fills of held-out masked examples, sampled as online SSR does."""
        # pylint: disable=import-outside-toplevel
        from ssr_jax.data.dataset import DatasetConfig
        from ssr_jax.partitioning import Partitioner
        from ssr_jax.ssr import fill_quality
        from ssr_jax.ssr.teacher import TeacherConfig
        from ssr_jax.ssr.stage import SsrStageConfig
        spec = self.spec
        # The student's rows and batch: the slots and the teacher batch online SSR uses.
        dataset = DatasetConfig(mixture_or_task_name=spec.ssr_task, module=spec.module,
                                task_feature_lengths=dict(spec.pretrain_lengths),
                                split="validation", batch_size=spec.pretrain_batch_size,
                                shuffle=False, pack=False)
        fills = fill_quality.measure_fills(
                TeacherConfig(checkpoint_path=teacher_dir), dataset, Partitioner(),
                spec.fill_check_examples,
                SsrStageConfig(examples_per_row=spec.ssr_examples_per_row))
        return {"step": latest_step(teacher_dir), **fills}

    # --- 2. shared init --------------------------------------------------------------------
    def init(self) -> Dict[str, Any]:
        spec = self.spec
        inputs = {**self.recipe(spec.init_gin), "checkpoint": spec.init_checkpoint,
                  "steps": spec.init_steps, "bindings": self._span_corruption()}
        done = self._done("init", inputs)
        if done is not None:
            return done
        seconds = 0.0
        if spec.init_checkpoint:
            directory = os.path.abspath(os.path.expanduser(spec.init_checkpoint))
        else:
            directory = os.path.join(self.out, "init")
            print(f"== student init: span corruption, {spec.init_steps} steps -> {directory}",
                  flush=True)
            seconds = _train([spec.init_gin], [f"MODEL_DIR={_q(directory)}",
                                               f"TRAIN_STEPS={spec.init_steps}"]
                             + self._span_corruption())
        model = model_of(directory)
        result = {"dir": directory, "step": latest_step(directory), "seconds": seconds,
                  "non_embedding_params": non_embedding_params(model),
                  "model": model.config_dict(), "eval": self._evaluate(directory)}
        return self._finish("init", inputs, result)

    def _evaluate(self, model_dir: str) -> Dict[str, float]:
        """Held-out span-corruption loss/accuracy (`ssr-jax eval`, the same examples for all)."""
        from ssr_jax.cli import gin_registry  # pylint: disable=import-outside-toplevel
        spec = self.spec
        argv = ["--gin_file=runs/eval.gin", f"--gin.MODEL_DIR={_q(model_dir)}",
                f"--gin.MIXTURE_OR_TASK_NAME={_q(spec.pretrain_task)}",
                f"--gin.TASK_FEATURE_LENGTHS={dict(spec.pretrain_lengths)}",
                "--gin.BATCH_SIZE=16", f"--gin.evaluate.num_batches={spec.eval_batches}"]
        results = []
        gin_registry.run_command("eval", argv,
                                 lambda: results.append(gin_registry.call("evaluate")) or 0)
        return {k: float(v) for k, v in results[0].items()}

    # --- 3. arms ---------------------------------------------------------------------------
    def arm(self, arm: str, init: Mapping[str, Any], teacher: Mapping[str, Any]
            ) -> Dict[str, Any]:
        spec = self.spec
        total = int(init["step"]) + spec.arm_steps
        ssr = arm in spec.ssr_arms
        inputs = {**self.recipe(ARM_FILES[arm]), "init": init["dir"], "init_step": init["step"],
                  "steps": spec.arm_steps, "teacher": teacher["dir"] if ssr else None,
                  "examples_per_row": spec.ssr_examples_per_row if ssr else None,
                  "tasks": [spec.pretrain_task, spec.ssr_task if ssr else None],
                  "bindings": self._pretrain()}
        done = self._done(f"arm/{arm}", inputs)
        if done is not None:
            return done
        directory = os.path.join(self.out, "arms", arm)
        print(f"== arm {arm}: steps {init['step']} -> {total} from {init['dir']}", flush=True)
        bindings = [f"MODEL_DIR={_q(directory)}", f"INITIAL_CHECKPOINT_PATH={_q(init['dir'])}",
                    f"TRAIN_STEPS={total}"]
        if ssr:
            bindings += [f"TEACHER_CHECKPOINT={_q(teacher['dir'])}",
                         f"SSR_EXAMPLES_PER_ROW={spec.ssr_examples_per_row}",
                         f"MIXTURE_OR_TASK_NAME={_q(spec.ssr_task)}",
                         f"SPAN_CORRUPTION_TASK={_q(spec.pretrain_task)}"] + self._pretrain()
        else:
            bindings += self._span_corruption()
        if arm == "ssr_curriculum":  # over the arm's steps (the stage counts from its start)
            bindings.append(f"SpanCurriculum.steps={spec.arm_steps}")
        generate_seconds = None
        if arm in OFFLINE_ARMS:
            spans = os.path.join(self.out, "offline_spans", arm)
            bindings.append(f"OUTPUT_DIR={_q(spans)}")
            generate_seconds = _generate_spans(ARM_FILES[arm], bindings, spec.arm_steps)
        seconds = _train([ARM_FILES[arm]], bindings)
        result = {"dir": directory, "step": latest_step(directory), "seconds": seconds,
                  "eval": self._evaluate(directory),
                  "metrics_file": os.path.join(directory, "train", "metrics.jsonl")}
        if ssr:
            result.update(self._teacher_cost(directory, teacher, seconds))
        if generate_seconds is not None:  # the teacher ran in generate-spans, not in training
            result["teacher_seconds"] = generate_seconds
            result["generate_spans_seconds"] = generate_seconds
        return self._finish(f"arm/{arm}", inputs, result)

    def _teacher_cost(self, arm_dir: str, teacher: Mapping[str, Any], seconds: float
                      ) -> Dict[str, Any]:
        """The teacher's share of an SSR arm: FLOPs of its sampling calls (every example
        decoding its whole budget: an upper bound) and seconds (its measured share of the
        step time x the arm's training time)."""
        summary = _ssr_summary(arm_dir)
        out: Dict[str, Any] = {"ssr_summary": summary}
        steps = summary.get("ssr/steps", 0.0)
        per_step = summary.get("ssr/examples_per_step", 0.0)
        # pylint: disable=import-outside-toplevel
        from ssr_jax.data.dataset import get_task
        from ssr_jax.data.ssr_preprocessors import task_mask_config
        from ssr_jax.ssr.teacher import static_decode_length
        slot = {k: v // self.spec.ssr_examples_per_row
                for k, v in self.spec.pretrain_lengths.items()}
        ratio = task_mask_config(get_task(self.spec.ssr_task, self.spec.module)).fill_ratio
        budget = static_decode_length(int(slot["inputs"]), int(slot["targets"]), ratio)
        flops = model_of(teacher["dir"]).generate_flops(int(per_step), int(slot["inputs"]),
                                                        budget) * steps
        out["teacher_flops"] = float(flops)
        share = summary.get("ssr/teacher_time_share")
        out["teacher_seconds"] = float(share * seconds) if share is not None else None
        return out

    # --- 4. downstream -----------------------------------------------------------------------
    def downstream(self, task: str, arms: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
        runs = {arm: [self._finetune(task, arm, info, seed) for seed in self.spec.seeds]
                for arm, info in arms.items()}
        return {"runs": runs}

    def _finetune(self, task: str, arm: str, arm_info: Mapping[str, Any], seed: int
                  ) -> Dict[str, Any]:
        spec = self.spec
        lengths = dict(spec.task_lengths[task])
        name = f"finetune/{task}/{arm}/seed{seed}"
        inputs = {**self.recipe(spec.finetune_gin), "from": arm_info["dir"],
                  "from_step": arm_info["step"],
                  "steps": spec.steps_of(task), "select_every": spec.select_every,
                  "lengths": lengths, "validation_batches": spec.validation_batches,
                  "test_batches": spec.test_batches, "decode_batch": spec.decode_batch_size,
                  "no_repeat_ngram_size": spec.no_repeat_ngram_size,
                  "decode_method": spec.decode_method,
                  **({"num_beams": spec.num_beams, "brevity_alpha": spec.brevity_alpha}
                     if spec.decode_method == "beam" else {}),
                  "bindings": self._common()}
        done = self._done(name, inputs)
        if done is not None:
            return done
        directory = os.path.join(self.out, "finetune", task, arm, f"seed{seed}")
        total = int(arm_info["step"]) + spec.steps_of(task)
        print(f"== fine-tune {arm} on {task}, seed {seed}: steps {arm_info['step']} -> {total}",
              flush=True)
        seconds = _train([spec.finetune_gin],
                         self.finetune_bindings(task, arm_info, seed, directory))
        selection = self._select(task, directory, lengths, int(arm_info["step"]))
        result = {"dir": directory, "seconds": seconds, **selection}
        return self._finish(name, inputs, result)

    def finetune_bindings(self, task: str, arm_info: Mapping[str, Any], seed: int,
                          directory: str) -> List[str]:
        """The fine-tuning run's gin bindings. TRAIN_STEPS counts from step 0 (the step
        travels with the params); FINETUNE_START_STEP and FINETUNE_STEPS let the recipe's
        schedule count the fine-tuning's own steps (compare/finetune.gin decays over them)."""
        spec, start = self.spec, int(arm_info["step"])
        return [f"MODEL_DIR={_q(directory)}", f"INITIAL_CHECKPOINT_PATH={_q(arm_info['dir'])}",
                f"TRAIN_STEPS={start + spec.steps_of(task)}", f"MIXTURE_OR_TASK_NAME={_q(task)}",
                f"MIXTURE_OR_TASK_MODULE={_q(spec.module)}",
                f"TASK_FEATURE_LENGTHS={dict(spec.task_lengths[task])}", f"SEED={seed}",
                f"FINETUNE_START_STEP={start}", f"FINETUNE_STEPS={spec.steps_of(task)}",
                f"CheckpointConfig.save_every={spec.select_every}",
                "CheckpointConfig.keep=None"] + self._common()

    def _select(self, task: str, directory: str, lengths: Mapping[str, int],
                start_step: int) -> Dict[str, Any]:
        """Greedy-decodes the validation split at every saved fine-tuning step, keeps the best
        by the task's primary metric, and decodes the test split with it."""
        from ssr_jax.train import infer as infer_lib  # pylint: disable=import-outside-toplevel
        spec = self.spec
        steps = [s for s in saved_steps(directory) if s > start_step]
        primary = spec.primary_metrics.get(task)
        model, validation = model_of(directory), {}
        for step in steps:
            metrics = self._infer(model, directory, step, task, "validation", lengths,
                                  spec.validation_batches)
            if primary is None:
                primary = next(iter(metrics), None)
            if primary not in metrics:
                raise UserError(f"task {task!r} has no metric {primary!r} (it gives "
                                f"{sorted(metrics)}); set compare.primary_metrics.")
            validation[step] = metrics
        best = max(steps, key=lambda s: (validation[s][primary], -s))
        split = test_split(task, spec.module)
        metrics = self._infer(model, directory, best, task, split, lengths, spec.test_batches)
        decode = self._decode_config(lengths)
        name = infer_lib.output_name(task, split, str(best), decode)
        return {"primary_metric": primary, "validation": {str(k): v for k, v in
                                                           validation.items()},
                "best_step": best, "test_split": split, "test_metrics": metrics,
                "test_file": os.path.join(directory, "inference", name + ".jsonl")}

    def _decode_config(self, lengths: Mapping[str, int]):
        from ssr_jax.models.base import DecodeConfig  # pylint: disable=import-outside-toplevel
        spec = self.spec
        kwargs = {"method": spec.decode_method, "max_decode_length": int(lengths["targets"])}
        if spec.decode_method == "beam":
            kwargs.update(num_beams=spec.num_beams, brevity_alpha=spec.brevity_alpha)
        if spec.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = spec.no_repeat_ngram_size
        return DecodeConfig(**kwargs)

    def _infer(self, model, directory: str, step: int, task: str, split: str,
               lengths: Mapping[str, int], num_batches: Optional[int]) -> Dict[str, float]:
        # pylint: disable=import-outside-toplevel
        from ssr_jax.data.dataset import DatasetConfig
        from ssr_jax.partitioning import Partitioner
        from ssr_jax.train import infer as infer_lib
        dataset = DatasetConfig(mixture_or_task_name=task, module=self.spec.module,
                                task_feature_lengths=dict(lengths), split=split,
                                batch_size=self.spec.decode_batch_size, shuffle=False,
                                pack=False)
        return infer_lib.infer(model=model, checkpoint_path=os.path.join(
                                   directory, "checkpoints", str(step)),
                               dataset=dataset, partitioner=Partitioner(), model_dir=directory,
                               decode=self._decode_config(lengths), num_batches=num_batches)

    # --- 5. scores and report ------------------------------------------------------------------
    def report(self, teacher, init, arms, tasks) -> Dict[str, Any]:
        from ssr_jax.cli import compare_report  # pylint: disable=import-outside-toplevel
        return compare_report.build_and_write(self.spec, self.out, teacher, init, arms, tasks)


def test_split(task: str, module: str) -> str:
    """'test', else 'validation' with a warning (the task has no test split)."""
    from ssr_jax.data.dataset import get_task  # pylint: disable=import-outside-toplevel
    splits = list(getattr(get_task(task, module), "splits", ()) or ())
    if "test" in splits:
        return "test"
    if "validation" not in splits:
        raise UserError(f"task {task!r} has neither a test nor a validation split ({splits}); "
                        "compare decodes one of them.")
    print(f"WARNING: task {task!r} has no test split: compare reports its validation split, "
          "the split that also chose the checkpoint (an optimistic score).", flush=True)
    return "validation"


def _compile_cache(out: str) -> None:
    """Fine-tuning runs compile the same programs: one persistent XLA cache for them all
    (unless the user set one)."""
    import jax  # pylint: disable=import-outside-toplevel
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR") and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(out, ".xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
