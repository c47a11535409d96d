"""Vocabulary: T5's special ids, sentinel layout, and build-vocab's errors."""
import random

import pytest

from ssr_jax import cli, vocab as vocab_lib
from ssr_jax.errors import UserError


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    text = d / "corpus.txt"
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnoprstu") for _ in range(rng.randint(2, 7)))
             for _ in range(300)] + ["river", "stone"]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    text.write_text("\n".join(lines))
    return vocab_lib.train_sentencepiece([str(text)], str(d / "spm"), vocab_size=64)


def test_t5_special_ids_and_sentinels(spm_path):
    v = vocab_lib.get_vocabulary(spm_path)
    assert (v.pad_id, v.eos_id, v.unk_id) == (0, 1, 2)
    assert v.vocab_size == 64 + 100
    assert vocab_lib.sentinel_id(v, 0) == v.vocab_size - 1
    assert v.decode([vocab_lib.sentinel_id(v, 3)]) == "<extra_id_3>"
    assert vocab_lib.padded_vocab_size(v) == 256
    ids = v.encode("river stone")
    assert v.decode(ids) == "river stone"


def test_build_vocab_cli_reports_bad_input(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc = cli.main(["build-vocab", "--input", str(empty), "--model_prefix", str(tmp_path / "v")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty.txt" in err[0] and "empty" in err[0]
    with pytest.raises(UserError, match="does not exist"):
        vocab_lib.get_vocabulary(str(tmp_path / "missing.model"))
