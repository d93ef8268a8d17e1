"""The embedded default data set: a small real-text corpus and its tokenizer.

``megatron-dsv3 train`` without a recipe trains ``dsv3-tiny`` on it, offline:

* ``corpus.jsonl.gz``: about 3,100 documents (1.5 MB) of English prose from the docstrings and
  help topics of Python's standard library (PSF licence); see ``CORPUS.md`` and
  ``tools/build_corpus.py``.
* ``tokenizer.model``: a SentencePiece BPE model with 4096 pieces trained on that corpus
  (``tools/train_tokenizer.py``); ``</s>`` (id 2) ends each document.

:func:`prepare_dataset` tokenizes the corpus once into Megatron's indexed format (``.bin`` +
``.idx``, as Megatron-LM's ``tools/preprocess_data.py --append-eod`` would) in a cache folder, and
:func:`default_data_args` gives the Megatron-LM arguments that read it.

Importing this module is cheap: numpy, torch, sentencepiece and Megatron are imported inside the
functions that need them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Megatron-Core 0.19 maps SentencePieceTokenizer, GPTSentencePieceTokenizer and Llama2Tokenizer to
# the same wrapper (megatron/core/tokenizers/utils/build_tokenizer.py), whose `eod` falls back to
# the model's eos_id (text/libraries/abstract_tokenizer.py) and whose vocab is the model's 4096
# pieces.  Megatron-LM's older tokenizer classes differ: "SentencePieceTokenizer" appends its own
# <CLS>/<SEP>/<EOD>/<MASK>... ids past the model's vocab (4096 would pad to 4224), while
# "GPTSentencePieceTokenizer" keeps the vocab and uses eos_id as eod.  So this is the type whose
# eod and vocab size agree with the data set written here under either implementation.
TOKENIZER_TYPE = "GPTSentencePieceTokenizer"
# Megatron's --split: train, validation and test shares of the documents, in order.
SPLIT = "949,50,1"
# Megatron-LM's preprocess_data.py names its output <prefix>_text_document; keep that convention.
DATASET_NAME = "corpus_text_document"
CACHE_ENV = "MEGATRON_DSV3_CACHE"
# Part of the cache key: bump it when the way documents become tokens changes.
_FORMAT_VERSION = b"megatron-dsv3 indexed corpus v1"

_HERE = Path(__file__).resolve().parent


def corpus_path() -> Path:
    """The embedded corpus: gzipped JSON lines, one ``{"text": ...}`` per document."""
    return _HERE / "corpus.jsonl.gz"


def tokenizer_path() -> Path:
    """The embedded SentencePiece model (what ``--tokenizer-model`` takes)."""
    return _HERE / "tokenizer.model"


def _require(path: Path) -> Path:
    if not path.is_file():
        builder = "build_corpus.py" if path.name.endswith(".gz") else "train_tokenizer.py"
        raise FileNotFoundError(
            f"{path}: the data file is missing. Fix: reinstall megatron-dsv3 with its package data "
            f"(pyproject's [tool.setuptools.package-data]), or rebuild it with `python tools/{builder}`"
        )
    return path


def iter_documents(path: Path | str | None = None) -> Iterator[str]:
    """The corpus documents, in file order (``path`` defaults to :func:`corpus_path`)."""
    path = _require(Path(path) if path is not None else corpus_path())
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            try:
                yield json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{path}:{number}: not a JSON object with a 'text' string ({err}). "
                    "Fix: rebuild the corpus with `python tools/build_corpus.py`"
                ) from err


def default_cache_dir() -> Path:
    """``$MEGATRON_DSV3_CACHE`` if set, else ``~/.cache/megatron-dsv3``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "megatron-dsv3"


def dataset_dir_name() -> str:
    """The cache sub-folder for this corpus and tokenizer: ``corpus-<hash of both files>``."""
    digest = hashlib.sha256(_FORMAT_VERSION)
    for path in (corpus_path(), tokenizer_path()):
        digest.update(_require(path).read_bytes())
    return f"corpus-{digest.hexdigest()[:12]}"


def prepare_dataset(cache_dir: Path | str | None = None) -> str:
    """Tokenize the corpus into Megatron's indexed format once; return the ``--data-path`` prefix.

    The files live in ``<cache_dir>/corpus-<hash>/``; a later call finds them and writes nothing.
    Safe when several processes (torchrun ranks, several jobs) call it at once: each builds in its
    own temporary folder next to the final one and renames it into place, which is atomic; a
    process that loses the race discards its copy.  The final folder therefore exists only when
    complete, and a temporary folder left by a killed process (``.corpus-<hash>.tmp-*``) is never
    read.  A prepared folder whose files do not agree with their own index (a truncated ``.bin``, a
    damaged ``.idx``) is rebuilt, with a note: it is this cache's own derived copy of the corpus.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = cache_dir / dataset_dir_name()
    prefix = final / DATASET_NAME
    if _is_complete(prefix):
        damage = dataset_damage(prefix)
        if damage is None:
            return str(prefix)
        _set_aside(final, damage)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
    try:
        write_indexed_dataset(staging / DATASET_NAME)
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700; the cache may be shared
        try:
            os.rename(staging, final)
        except OSError:
            # Another process renamed its copy first (the target is not empty): use that one.
            if not _is_complete(prefix):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(prefix)


def _is_complete(prefix: Path) -> bool:
    return prefix.with_suffix(".idx").is_file() and prefix.with_suffix(".bin").is_file()


_INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron/core/datasets/indexed_dataset.py, format version 1
_ITEM_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 8, 8: 2}  # DType codes -> bytes per token


def dataset_damage(prefix: Path | str) -> str | None:
    """Why ``prefix.idx``/``prefix.bin`` cannot be read as Megatron's indexed data set, or None.

    Reads the index as Megatron's ``_IndexReader`` does (header, version, dtype, sequence and
    document counts, lengths, pointers) and checks that the ``.bin`` file holds every sequence.
    """
    import struct

    import numpy as np

    prefix = Path(prefix)
    idx, bin_ = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
    data = idx.read_bytes()
    if len(data) < 34 or data[:9] != _INDEX_HEADER or struct.unpack_from("<Q", data, 9)[0] != 1:
        return f"{idx} does not start with Megatron's index header"
    code = data[17]
    if code not in _ITEM_SIZES:
        return f"{idx} names an unknown token type ({code})"
    sequences, documents = struct.unpack_from("<QQ", data, 18)
    need = 34 + sequences * 12 + documents * 8
    if len(data) < need:
        return f"{idx} has {len(data):,} bytes but its counts need {need:,} (truncated)"
    if sequences == 0:
        return None
    lengths = np.frombuffer(data, dtype=np.int32, count=sequences, offset=34)
    pointers = np.frombuffer(data, dtype=np.int64, count=sequences, offset=34 + lengths.nbytes)
    size = int(pointers[-1]) + int(lengths[-1]) * _ITEM_SIZES[code]
    if bin_.stat().st_size != size:
        return f"{bin_} has {bin_.stat().st_size:,} bytes but its index describes {size:,}"
    return None


def _set_aside(folder: Path, damage: str) -> None:
    """Move a damaged prepared folder out of the way (then remove it: it is derived data)."""
    import sys

    aside = folder.with_name(f".{folder.name}.damaged-{os.getpid()}")
    try:
        os.rename(folder, aside)
    except OSError:
        return  # another process is already replacing it
    print(f"megatron-dsv3: the prepared corpus in {folder} was damaged ({damage}); rebuilding it from the"
          " embedded corpus", file=sys.stderr)
    shutil.rmtree(aside, ignore_errors=True)


def write_indexed_dataset(prefix: Path | str) -> int:
    """Write ``prefix.bin``/``prefix.idx``: one sequence per document, each ending in eod.

    Uses Megatron's ``IndexedDatasetBuilder`` with ``DType.optimal_dtype`` of the vocabulary
    (uint16 for 4096 pieces, the width ``GPTDatasetConfig`` expects for it).  Returns the number of
    tokens written.
    """
    import numpy as np
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    processor = spm.SentencePieceProcessor(model_file=str(_require(tokenizer_path())))
    eod = processor.eos_id()
    if eod < 0:
        raise ValueError(
            f"{tokenizer_path()}: the SentencePiece model has no eos piece, which Megatron's "
            f"{TOKENIZER_TYPE} uses as end of document. "
            "Fix: retrain it with `python tools/train_tokenizer.py`"
        )
    dtype = DType.optimal_dtype(processor.get_piece_size())
    prefix = str(prefix)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    tokens = 0
    for ids in processor.encode(list(iter_documents()), out_type=int):
        ids.append(eod)
        builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
        tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return tokens


def default_data_args(cache_dir: Path | str | None = None) -> list[str]:
    """Megatron-LM arguments that train on the embedded corpus (prepared on first use).

    No ``--vocab-size``: Megatron reads it from the tokenizer (4096, already a multiple of 128).
    """
    return [
        "--data-path", prepare_dataset(cache_dir),
        "--tokenizer-type", TOKENIZER_TYPE,
        "--tokenizer-model", str(tokenizer_path()),
        "--split", SPLIT,
    ]  # fmt: skip
