"""Train the embedded tokenizer, ``megatron_dsv3/data/tokenizer.model``, on the embedded corpus.

A SentencePiece BPE model with 4096 pieces, the ``dsv3-tiny`` preset's vocabulary size: 4096 is a
multiple of 128, so Megatron's padding (``--make-vocab-size-divisible-by 128`` times the tensor
parallel size, up to TP 32) leaves it at exactly 4096.

Choices, and why:

* ``byte_fallback``: a character outside the vocabulary becomes its UTF-8 bytes (256 pieces), so
  no text maps to ``<unk>``.
* ``normalization_rule_name=identity`` and no whitespace trimming, and ``"\\n"`` as a
  user-defined piece: decoding gives back the document exactly, newlines and double spaces
  included (the corpus is hard-wrapped docstring text).
* ``eos_id=2`` (``</s>``) is the end-of-document token: Megatron's ``GPTSentencePieceTokenizer``
  reports ``eod`` as the model's ``eos_id`` (see ``megatron_dsv3.data.TOKENIZER_TYPE``).
  ``pad_id=-1`` (none), which is also what Megatron's GPT dataset uses when there is no pad.
* Deterministic: one thread, every sentence used in file order (no sampling, no shuffling), a
  fixed random seed, and the corpus fed through an iterator so that no local path is stored
  in the model's trainer spec.  Training twice gives byte-identical models.

Usage (a developer step; the output is committed)::

    python tools/train_tokenizer.py [--corpus corpus.jsonl.gz] [--out tokenizer.model]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import time
from pathlib import Path

VOCAB_SIZE = 4096
SEED = 1234
# Whole documents are training "sentences"; the longest help-topic section is about 20 KB.
MAX_SENTENCE_BYTES = 1 << 16

TRAINER_OPTIONS = dict(
    model_type="bpe",
    vocab_size=VOCAB_SIZE,
    character_coverage=1.0,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    user_defined_symbols=["\n"],
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    max_sentence_length=MAX_SENTENCE_BYTES,
    minloglevel=1,
)


def train(documents: list[str]) -> bytes:
    """The serialised SentencePiece model trained on ``documents``."""
    import sentencepiece as spm

    too_long = [i for i, d in enumerate(documents) if len(d.encode()) > MAX_SENTENCE_BYTES]
    if too_long:
        raise ValueError(
            f"documents {too_long[:5]} are longer than {MAX_SENTENCE_BYTES} bytes, which SentencePiece "
            "would silently skip. Fix: raise MAX_SENTENCE_BYTES in tools/train_tokenizer.py"
        )
    spm.set_random_generator_seed(SEED)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(documents), model_writer=model, **TRAINER_OPTIONS
    )
    return model.getvalue()


def main(argv: list[str] | None = None) -> int:
    from megatron_dsv3.data import corpus_path, iter_documents, tokenizer_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=corpus_path(), help="a corpus.jsonl.gz")
    parser.add_argument("--out", type=Path, default=tokenizer_path())
    args = parser.parse_args(argv)
    documents = list(iter_documents(args.corpus))
    start = time.perf_counter()
    model = train(documents)
    seconds = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(model)
    print(f"trained on {len(documents)} documents in {seconds:.1f} s: {len(model)} bytes, "
          f"sha256 {hashlib.sha256(model).hexdigest()[:16]} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
