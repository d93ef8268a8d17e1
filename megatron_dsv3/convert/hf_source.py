"""What an export keeps of the HuggingFace checkpoint a model came from: token ids and generation settings.

A Megatron checkpoint records no tokenizer ids.  ``hf-to-megatron`` writes the source's
``bos/eos/pad_token_id`` and its ``generation_config.json`` to :data:`FILE` in the Megatron save
folder; ``megatron-to-hf`` reads it back (from the folder given, or the save folder above a step
folder), so the export's ``config.json`` carries the source's ids and its ``generation_config.json``
is the source's.  A run that saves into another folder than it loaded from does not carry the file
(copy it along); without it the export takes the ids DeepSeek released for the model type, and says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

FILE = "hf_source.json"
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# DeepSeek's released config.json files (DeepSeek-V3 and V3-Base; DeepSeek-V2-Lite), as in tests/test_convert_hf.py;
# transformers' DeepseekV3Config has the same defaults (its DeepseekV2Config's are 1 and 2).
RELEASED = {"deepseek_v3": {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None},
            "deepseek_v2": {"bos_token_id": 100000, "eos_token_id": 100001, "pad_token_id": None}}


@dataclasses.dataclass
class HFSource:
    token_ids: dict
    generation_config: dict
    notes: list[str]


def generation_config(token_ids: dict) -> dict:
    """The ``generation_config.json`` transformers derives from a config with these ids
    (``GenerationConfig.from_model_config``: the ids, no sampling settings)."""
    return {"_from_model_config": True, **{k: v for k, v in token_ids.items() if v is not None}}


def write_hf_source(folder: Path, config: dict, hf_dir: Path) -> None:
    """Record ``config``'s token ids and ``hf_dir``'s ``generation_config.json`` in ``folder``."""
    path = hf_dir / "generation_config.json"
    try:
        generation = json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        generation = None  # not ours to judge: the export then derives one from the ids
    record = {"source": str(hf_dir.absolute()), "token_ids": {k: config.get(k) for k in TOKEN_IDS},
              "generation_config": generation if isinstance(generation, dict) else None}
    with open(folder / FILE, "w") as f:
        f.write(json.dumps(record, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_hf_source(path: Path, step_dir: Path, model_type: str) -> HFSource:
    """The token ids and generation config for an export of the checkpoint at ``path`` (a save folder or
    its ``step_dir``)."""
    for folder in dict.fromkeys((Path(path), Path(step_dir).parent)):
        file = folder / FILE
        if file.exists():
            record = json.loads(file.read_text())
            ids = {k: record.get("token_ids", {}).get(k) for k in TOKEN_IDS}
            return HFSource(ids, record.get("generation_config") or generation_config(ids), [])
    ids = dict(RELEASED[model_type])
    note = (f"{path} records no HF source ({FILE}, written by hf-to-megatron into the folder it converts to):"
            f" config.json and generation_config.json take DeepSeek's released {model_type} token ids (bos"
            f" {ids['bos_token_id']}, eos {ids['eos_token_id']}); edit them if the model's tokenizer differs")
    return HFSource(ids, generation_config(ids), [note])
