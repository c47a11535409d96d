"""`ssr-jax default-run`, shrunk to a few steps: teacher -> online SSR student -> eval -> HF."""
import json
import os

import pytest

from ssr_jax.cli import default_run
from ssr_jax.errors import UserError


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="must be >= 1"):
        default_run.main([f"--out_dir={tmp_path}", "--student_steps=0"])


@pytest.mark.slow
def test_shrunken_default_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert default_run.main([f"--out_dir={out}", "--teacher_steps=4", "--student_steps=4",
                             "--eval_batches=1"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    for name in ("teacher", "student"):
        assert os.path.isdir(os.path.join(summary[name], "checkpoints", "4", "params"))
        assert summary["eval"][name]["weight_sum"] > 0
        assert str(summary[name]) in printed
    # Training recorded each run's vocabulary next to its checkpoints.
    import tasks
    from ssr_jax import vocab as vocab_lib
    for name in ("teacher", "student"):
        record = json.loads((out / name / "checkpoints" / "vocab.json").read_text())
        assert record == vocab_lib.vocab_record(tasks.default_vocabulary())
        # Evaluated with eval.gin and no model gin file.
        assert (out / name / "eval_config.gin").is_file()
    ssr = json.loads((out / "student" / "ssr_summary.json").read_text())
    assert ssr["ssr/steps"] >= 4 and ssr["ssr/spans"] > 0
    hf = out / "student_hf"
    assert (hf / "config.json").is_file() and str(hf) in printed
    assert any(f.endswith((".safetensors", ".bin")) for f in os.listdir(hf))
    # Exported with no --vocab: the tokenizer is the recorded vocabulary.
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(hf))
    text = "Return a new sorted list."
    assert tok(text)["input_ids"] == list(tasks.default_vocabulary().encode(text)) + [1]
    assert "default run finished" in printed
