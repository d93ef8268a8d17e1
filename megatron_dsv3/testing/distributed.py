"""Run a function in N CPU processes joined by gloo, as torchrun would, and collect the results.

Used by the parallel-equivalence tests and benchmarks.  ``fn`` must be importable (a module-level
function); it runs with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` set, and its return value (anything ``torch.save`` can store) comes back in rank
order.  A failure on any rank raises with that rank's traceback.
"""

from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.multiprocessing as mp

from megatron_dsv3.train.processes import free_port


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn, args, kwargs) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHDYNAMO_DISABLE="1",
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        result = fn(*args, **kwargs)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise SystemExit(1)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 900, **kwargs) -> list:
    """``fn(*args, **kwargs)`` on ``world_size`` spawned processes; their results in rank order."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="dsv3-dist-") as out_dir:
        procs = [
            ctx.Process(target=_entry, args=(rank, world_size, port, out_dir, fn, args, kwargs))
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        results, errors = [], []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {rank}: no result (exit code {procs[rank].exitcode}, timeout {timeout}s)")
                results.append(None)
                continue
            record = torch.load(path, weights_only=False)
            if record["ok"]:
                results.append(record["result"])
            else:
                errors.append(f"rank {rank}:\n{record['error']}")
                results.append(None)
        if errors:
            raise RuntimeError("distributed run failed\n" + "\n".join(errors))
        return results


def join_one_rank_world(backend: str, seed: int = 1234) -> None:
    """This process as a one-rank world (``backend``: gloo on CPU, nccl on a GPU), with Megatron's
    parallel state at TP = PP = EP = 1 and its model-parallel RNG seeded; what is already set up is kept."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not torch.distributed.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
        torch.distributed.init_process_group(backend, rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(seed)
