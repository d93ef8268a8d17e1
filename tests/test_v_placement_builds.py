"""A DualPipeV-placed model builds on CPU before any schedule runs it, through the same builder as
``megatron-dsv3 train``.

Two processes, P = 2, four stages of a dsv3-tiny with 8 layers: rank 0 holds stage 0 (embedding,
layers 1-2) and stage 3 (layers 7-8, final norm, output head, loss, MTP with its own embedding copy
equal to the embedding); rank 1 holds stages 1 and 2.  Layers are numbered globally, so the
checkpoint of a single-process model loads into the V chunks; a forward through the V, stage by
stage, gives the single-process loss (the independent reference).
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_dsv3.model.presets import get_preset
from megatron_dsv3.parallel import ParallelLayout
from megatron_dsv3.testing import parallel
from megatron_dsv3.testing.distributed import run_distributed

PRESET = get_preset("dsv3-tiny").with_overrides(num_layers=8)
V = ParallelLayout(pp=2, schedule="dualpipev")


def _keys(chunks) -> set[str]:
    return {item.key for item in parallel._sharded_state_dict(chunks).values() if hasattr(item, "key")}


def _reference(workdir: str) -> dict:
    parallel.init_parallel(ParallelLayout(), preset=PRESET)
    _, _, chunks = parallel.build_chunks(PRESET, ParallelLayout(), ddp=False)
    parallel.save_weights(chunks, os.path.join(workdir, "weights"))
    batch = next(parallel._microbatches(parallel.fixed_tokens(PRESET, 2, seed=5), 2))
    with torch.no_grad():
        loss = chunks[0](batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return {"loss": float(loss.float().mean()), "keys": _keys(chunks)}


def _describe(model) -> dict:
    return {
        "pre_process": model.pre_process,
        "post_process": model.post_process,
        "mtp": getattr(model, "mtp_process", False),
        "layers": [layer.layer_number for layer in model.decoder.layers],
        "output_layer": hasattr(model, "output_layer"),
        "final_norm": model.decoder.final_layernorm is not None,
    }


def _v(workdir: str) -> dict:
    from megatron.core import parallel_state

    parallel.init_parallel(V, preset=PRESET)
    config, _, chunks = parallel.build_chunks(PRESET, V, ddp=False)
    described = [_describe(c) for c in chunks]
    embeddings = [c.embedding.word_embeddings.weight.detach().clone() for c in chunks if hasattr(c, "embedding")]
    parallel.load_weights(chunks, os.path.join(workdir, "weights"))
    batch = next(parallel._microbatches(parallel.fixed_tokens(PRESET, 2, seed=5), 2))
    with torch.no_grad():
        loss = parallel.pipeline_forward(chunks, config, batch)
    return {
        "rank": parallel_state.get_pipeline_model_parallel_rank(),
        "chunks": described,
        "embeddings_equal": all(torch.equal(e, embeddings[0]) for e in embeddings),
        "embedding_copies": len(embeddings),
        "loss": None if loss is None else float(loss.float().mean()),
        "keys": _keys(chunks),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("v-placement"))
    reference = run_distributed(_reference, 1, workdir)[0]
    return reference, run_distributed(_v, 2, workdir)


def test_dualpipev_rank0_holds_the_embedding_head_loss_and_mtp(runs):
    _, (rank0, rank1) = runs
    first, last = rank0["chunks"]
    assert first["pre_process"] and not first["post_process"] and first["layers"] == [1, 2]
    assert last["post_process"] and last["mtp"] and last["output_layer"] and last["final_norm"]
    assert last["layers"] == [7, 8] and not last["pre_process"]
    # MTP's embedding copy starts equal to the embedding: shared on the rank, no cross-rank all-reduce.
    assert rank0["embedding_copies"] == 2 and rank0["embeddings_equal"]
    assert [c["layers"] for c in rank1["chunks"]] == [[3, 4], [5, 6]]
    assert not any(c["pre_process"] or c["post_process"] or c["mtp"] or c["output_layer"] for c in rank1["chunks"])
    assert rank1["embedding_copies"] == 0


def test_dualpipev_chunks_keep_the_single_process_checkpoint_keys(runs):
    reference, (rank0, rank1) = runs
    assert rank0["keys"] | rank1["keys"] == reference["keys"]


def test_forward_through_the_v_gives_the_single_process_loss(runs):
    reference, (rank0, rank1) = runs
    assert rank1["loss"] is None  # the loss lives on rank 0
    assert rank0["loss"] == pytest.approx(reference["loss"], rel=1e-6)
