"""The embedded default data set (``megatron_dsv3.data``), checked through Megatron's own readers.

Every check goes through the Megatron-Core 0.19 code that training uses: the tokenizer through
``megatron/core/tokenizers/utils/build_tokenizer.py``, the files through
``megatron/core/datasets/indexed_dataset.py`` and the samples through ``gpt_dataset.py``.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

from megatron_dsv3 import data
from megatron_dsv3.model.presets import get_preset

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)

EOD = 2  # `</s>` in tools/train_tokenizer.py; Megatron's GPTSentencePieceTokenizer eod is eos_id
SAMPLE = "Return a new list containing all items from the iterable in ascending order."


def file_states(prefix: str) -> list[tuple[int, int, int]]:
    """Inode, mtime and ctime of the .bin and .idx: any rewrite or replacement changes one."""
    return [
        (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        for st in (os.stat(prefix + ext) for ext in (".bin", ".idx"))
    ]


def megatron_tokenizer(tensor_model_parallel_size: int = 1):
    """The tokenizer as Megatron-LM's training loop builds it from ``default_data_args()``."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    args = argparse.Namespace(
        tokenizer_type=data.TOKENIZER_TYPE,
        tokenizer_model=str(data.tokenizer_path()),
        chat_template=None,
        tokenizer_sentencepiece_ignore_extra_whitespaces=True,
        tokenizer_sentencepiece_legacy=False,
        special_tokens=None,
        metadata_path=None,
        pad_vocab_size=True,
        padded_vocab_size=None,
        make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=tensor_model_parallel_size,
        rank=0,
    )
    return build_tokenizer(args), args


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return list(data.iter_documents())


@pytest.fixture(scope="module")
def prefix(tmp_path_factory) -> str:
    return data.prepare_dataset(tmp_path_factory.mktemp("cache"))


def test_module_import_loads_no_heavy_dependency():
    heavy = "{'torch', 'numpy', 'sentencepiece', 'megatron'}"
    code = f"import sys, megatron_dsv3.data; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_megatron_pads_tokenizer_vocab_to_dsv3_tiny_vocab_size(tp):
    tokenizer, args = megatron_tokenizer(tensor_model_parallel_size=tp)
    assert tokenizer.vocab_size == 4096
    assert args.padded_vocab_size == get_preset("dsv3-tiny").vocab_size == 4096


def test_megatron_tokenizer_eod_is_the_models_end_of_document_piece():
    tokenizer, _ = megatron_tokenizer()
    assert tokenizer.eod == EOD
    assert tokenizer.inv_vocab[tokenizer.eod] == "</s>"
    # No pad piece: Megatron's GPT dataset then masks nothing as padding (_PAD_TOKEN_ID = -1).
    assert tokenizer.pad == -1


def test_megatron_tokenizer_round_trips_a_sample_sentence():
    tokenizer, _ = megatron_tokenizer()
    ids = tokenizer.tokenize(SAMPLE)
    assert 5 < len(ids) < len(SAMPLE)  # BPE merges: fewer tokens than characters
    assert all(0 <= i < 4096 for i in ids)
    assert tokenizer.detokenize(ids) == SAMPLE


def test_byte_fallback_leaves_nothing_unknown():
    tokenizer, _ = megatron_tokenizer()
    text = "Caf\u00e9 \u2014 na\u00efve \u00fcber \u6f22\u5b57\ttab  two spaces\nnew line"
    ids = tokenizer.tokenize(text)
    assert tokenizer.unk not in ids
    assert tokenizer.detokenize(ids) == text


def test_corpus_is_thousands_of_distinct_english_prose_documents(documents):
    assert len(documents) > 2000
    assert len(set(documents)) == len(documents)
    assert 1_300_000 < sum(map(len, documents)) < 2_500_000
    assert all(len(d) >= 100 and d.isascii() for d in documents)
    # English prose, not code: the commonest words are English function words, and they make up
    # over a fifth of all words (27% here; the stdlib's .py files, docstrings included, have about
    # 15%, with `self`, `return` and `def` among their commonest words).
    words = collections.Counter(w.lower() for d in documents for w in re.findall(r"[A-Za-z]+", d))
    function_words = {"the", "a", "an", "of", "to", "is", "and", "in", "be", "if", "or", "it", "that"}
    assert {w for w, _ in words.most_common(5)} <= function_words
    assert sum(words[w] for w in function_words) / sum(words.values()) > 0.2


def test_prepared_dataset_holds_one_eod_terminated_sequence_per_document(prefix, documents):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokenizer, _ = megatron_tokenizer()
    dataset = IndexedDataset(prefix)
    # DType.optimal_dtype(4096), the width GPTDatasetConfig.token_dtype_code expects for it.
    assert dataset.index.dtype == np.uint16
    assert len(dataset) == len(documents)
    assert len(dataset.document_indices) == len(documents) + 1
    for sequence, document in zip(dataset, documents):
        assert sequence[-1] == tokenizer.eod
        assert np.count_nonzero(sequence == tokenizer.eod) == 1
        assert sequence.max() < 4096
        assert tokenizer.detokenize(sequence[:-1].tolist()) == document


def test_second_prepare_call_reuses_files_without_rewriting(tmp_path, monkeypatch):
    prefix = data.prepare_dataset(tmp_path)
    before = file_states(prefix)

    def must_not_tokenize_again(staging_prefix):
        raise AssertionError("prepare_dataset tokenized the corpus again")

    monkeypatch.setattr(data, "write_indexed_dataset", must_not_tokenize_again)
    assert data.prepare_dataset(tmp_path) == prefix
    assert file_states(prefix) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [data.dataset_dir_name()]


def test_default_cache_dir_follows_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path))
    assert data.prepare_dataset().startswith(str(tmp_path / data.dataset_dir_name()))


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even ``finally`` clean-up (see below)."""


def test_run_killed_mid_write_leaves_nothing_taken_for_a_dataset(tmp_path, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    def write_half_then_die(staging_prefix):
        with open(f"{staging_prefix}.bin", "wb") as f:
            f.write(b"\x00" * 10)
        with open(f"{staging_prefix}.idx", "wb") as f:
            f.write(b"MMIDIDX")
        raise Killed

    monkeypatch.setattr(data, "write_indexed_dataset", write_half_then_die)
    monkeypatch.setattr(data.shutil, "rmtree", lambda *args, **kwargs: None)  # no clean-up
    with pytest.raises(Killed):
        data.prepare_dataset(tmp_path)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()), "the killed run should have left its half-written files"

    prefix = data.prepare_dataset(tmp_path)
    assert len(IndexedDataset(prefix)) == sum(1 for _ in data.iter_documents())


def test_process_that_loses_the_rename_race_uses_the_winners_files(tmp_path, monkeypatch):
    """Another rank finishes while this one is still writing: this one discards its copy."""
    real_write = data.write_indexed_dataset
    winner = {}

    def write_then_lose_race(staging_prefix):
        tokens = real_write(staging_prefix)
        monkeypatch.setattr(data, "write_indexed_dataset", real_write)
        winner["prefix"] = data.prepare_dataset(tmp_path)  # the other rank renames first
        winner["files"] = file_states(winner["prefix"])
        return tokens

    monkeypatch.setattr(data, "write_indexed_dataset", write_then_lose_race)
    prefix = data.prepare_dataset(tmp_path)
    assert prefix == winner["prefix"]
    assert file_states(prefix) == winner["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [data.dataset_dir_name()]


def test_concurrent_prepare_calls_return_one_complete_dataset(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    results, errors = [], []

    def call():
        try:
            results.append(data.prepare_dataset(tmp_path))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [data.dataset_dir_name()]
    assert len(IndexedDataset(results[0])) == sum(1 for _ in data.iter_documents())


def test_default_data_args_parse_with_megatron_argument_parser(tmp_path):
    from megatron.training.arguments import _add_data_args, _add_tokenizer_args

    argv = data.default_data_args(tmp_path)
    assert argv == [
        "--data-path", data.prepare_dataset(tmp_path),
        "--tokenizer-type", "GPTSentencePieceTokenizer",
        "--tokenizer-model", str(data.tokenizer_path()),
        "--split", "949,50,1",
    ]  # fmt: skip
    assert "--vocab-size" not in argv
    parser = _add_tokenizer_args(_add_data_args(argparse.ArgumentParser()))
    args, unknown = parser.parse_known_args(argv)
    assert unknown == []
    assert args.data_path == [data.prepare_dataset(tmp_path)]
    assert args.tokenizer_type == data.TOKENIZER_TYPE


def test_gpt_dataset_draws_128_token_samples_across_document_boundaries(prefix, tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    tokenizer, _ = megatron_tokenizer()
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=128,
        blend=([prefix], None),
        split=data.SPLIT,
        path_to_cache=str(tmp_path / "gpt_indices"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
    )
    train, valid, test = BlendedMegatronDatasetBuilder(
        GPTDataset, [64, 16, 4], lambda: True, config
    ).build()
    assert len(train) >= 64 and len(valid) >= 16 and len(test) >= 4
    eods = 0
    for i in range(64):
        sample = train[i]
        tokens, labels = sample["tokens"], sample["labels"]
        assert tokens.shape == labels.shape == (128,)
        # 129 consecutive tokens of the stream: labels are the tokens shifted by one.
        assert bool((tokens[1:] == labels[:-1]).all())
        assert int(tokens.max()) < 4096 and int(tokens.min()) >= 0
        assert float(sample["loss_mask"].sum()) == 128.0
        eods += int((tokens == tokenizer.eod).sum())
    assert eods > 0  # documents (about 140 tokens on average) are joined by eod in the stream
