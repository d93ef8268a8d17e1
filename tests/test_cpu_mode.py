"""CPU mode: one switch that lets Megatron-Core run without a GPU, and that a GPU run never sees."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import types

import pytest
import torch

import megatron_dsv3.cpu as cpu

_CONTEXT = """
import torch, megatron_dsv3.cpu as cpu
zeros = torch.zeros
with cpu.cpu_mode() as on:
    assert on and cpu.is_cpu_mode()
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu"
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed, get_cuda_rng_tracker
    model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    with get_cuda_rng_tracker().fork():
        a = torch.rand(3)
    b = torch.rand(3)
    assert not torch.equal(a, b)
assert not cpu.is_cpu_mode()
assert torch.zeros is zeros
try:
    torch.zeros(1, device="cuda")
except (RuntimeError, AssertionError):
    print("RESTORED")
"""


def test_cpu_mode_context_manager_redirects_cuda_and_restores_torch():
    out = subprocess.run([sys.executable, "-c", _CONTEXT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RESTORED" in out.stdout


_ON_GPU = """
import torch, megatron_dsv3.cpu as cpu, megatron_dsv3.runtime.cpu_mode as mode
mode.gpu_available = lambda: True  # what a GPU machine reports
zeros = torch.zeros
assert cpu.enable_cpu_mode() is False
assert torch.zeros is zeros and not cpu.is_cpu_mode()
from megatron_dsv3.runtime.catalog import all_changes
assert not any(c.applied for c in all_changes() if c.group == "cpu")
print("UNCHANGED")
"""


def test_cpu_mode_changes_nothing_when_a_gpu_is_present():
    out = subprocess.run([sys.executable, "-c", _ON_GPU], capture_output=True, text=True)
    assert "UNCHANGED" in out.stdout, out.stderr[-3000:]


# ---- CPU mode changes nothing beyond what it documents, and is undone completely (in this process) ----


@pytest.fixture
def cpu_mode_off():
    """CPU mode off when the test starts, and as it was again after (another test may have turned
    it on for the whole session)."""
    was_on = cpu.is_cpu_mode()
    cpu.disable_cpu_mode()
    yield
    cpu.disable_cpu_mode()
    if was_on:
        cpu.enable_cpu_mode()


def _made_on_meta() -> bool:
    made = [torch.tensor([1.0]), torch.zeros(2), torch.empty(2), torch.ones(1), torch.full((1,), 2.0),
            torch.arange(3), torch.randn(2), torch.as_tensor([1.0])]
    return all(t.is_meta for t in made)


def _forget_device_constructors(order: str) -> None:
    """PyTorch's cached set of factory functions, emptied; built again now if ``order`` says so."""
    from torch.utils import _device

    _device._device_constructors.cache_clear()
    if order == "cache_built_before":
        with torch.device("meta"):
            assert _made_on_meta()


ORDERS = ["cache_built_before", "cache_built_during"]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.quick
def test_meta_device_construction_works_during_and_after_cpu_mode(cpu_mode_off, order):
    """``with torch.device("meta")`` makes meta tensors in CPU mode and after it, whether PyTorch
    built its set of factory functions before CPU mode or during it (it used to hold CPU mode's
    wrappers from then on, and every factory made CPU tensors)."""
    _forget_device_constructors(order)
    with cpu.cpu_mode():
        with torch.device("meta"):
            assert _made_on_meta()
            assert torch.zeros(1, device="cuda").device.type == "cpu"  # what CPU mode is for
    with torch.device("meta"):
        assert _made_on_meta()


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.quick
def test_set_default_device_works_during_and_after_cpu_mode(cpu_mode_off, order):
    _forget_device_constructors(order)
    for on in (True, False):
        with cpu.cpu_mode() if on else contextlib.nullcontext():
            torch.set_default_device("meta")
            try:
                assert _made_on_meta()
            finally:
                torch.set_default_device(None)
            assert not torch.zeros(1).is_meta


@pytest.mark.quick
def test_disable_cpu_mode_puts_back_every_object_it_replaced(cpu_mode_off):
    """Every attribute a ``cpu`` change replaced holds its original again, a module imported during
    CPU mode that bound a stand-in by name (``from torch import zeros``) gets the original, and
    Megatron's streams made during CPU mode are gone (``get_comm_stream()`` is None again)."""
    from megatron.core.pipeline_parallel import utils as pipeline_utils

    from megatron_dsv3.runtime.catalog import group_changes
    from megatron_dsv3.runtime.registry import ENVIRONMENT, resolve

    originals = {"zeros": torch.zeros, "Stream": torch.cuda.Stream, "record_stream": torch.Tensor.record_stream}
    imported = types.ModuleType("imported_during_cpu_mode")
    with cpu.cpu_mode():
        replaced = [(owner, attr, value) for c in group_changes("cpu") for owner, attr, value in c.originals]
        slots = {(id(owner), attr) for owner, attr, _ in replaced}
        for change in group_changes("cpu"):
            for target in change.targets:
                if not target.startswith(("logging.", "environment ")):
                    owner, attr = resolve(target)
                    assert (id(owner), attr) in slots, f"{change.name}: {target} not recorded, so not undone"
        sys.modules[imported.__name__] = imported
        imported.zeros, imported.Stream = torch.zeros, torch.cuda.Stream
        imported.record_stream = torch.Tensor.record_stream
        assert imported.zeros is not originals["zeros"]
        pipeline_utils.set_streams()
        assert pipeline_utils.get_comm_stream() is not None
    del sys.modules[imported.__name__]
    for owner, attr, value in replaced:
        now = getattr(owner, attr)
        assert now == value if owner is ENVIRONMENT else now is value, (owner, attr)
    assert {name: getattr(imported, name) for name in originals} == originals
    assert pipeline_utils.get_comm_stream() is None


_LOGITS = """
import sys, torch
from transformers import DeepseekV3ForCausalLM
model = DeepseekV3ForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def _tiny_deepseek_v3(directory) -> None:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1, q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(config).save_pretrained(directory)


def test_from_pretrained_after_megatron_built_a_model_in_cpu_mode_equals_a_fresh_process(
    tmp_path, megatron_single_process
):
    """transformers' ``from_pretrained`` (which builds on the meta device) in a process where
    Megatron built a model in CPU mode gives the logits a fresh process gets, in CPU mode and after
    it.  It used to leave RoPE's ``inv_freq`` uninitialised (logits off by up to 29, or NaN)."""
    from transformers import DeepseekV3ForCausalLM

    from megatron_dsv3.parallel import ParallelLayout
    from megatron_dsv3.testing import parallel

    _tiny_deepseek_v3(tmp_path / "hf")
    tokens = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, tmp_path / "tokens.pt")
    fresh = subprocess.run([sys.executable, "-c", _LOGITS, str(tmp_path / "hf"), str(tmp_path / "tokens.pt"),
                            str(tmp_path / "fresh.pt")], capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    expected = torch.load(tmp_path / "fresh.pt")

    def logits():
        with torch.no_grad():
            return DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf").eval()(tokens).logits

    parallel.build_chunks("dsv3-tiny", ParallelLayout(), ddp=False)
    assert cpu.is_cpu_mode()
    assert torch.equal(logits(), expected)
    cpu.disable_cpu_mode()
    try:
        assert torch.equal(logits(), expected)
    finally:
        cpu.enable_cpu_mode()  # as the session's other tests expect


@pytest.mark.quick
def test_cpu_stand_ins_refuse_what_cuda_refuses():
    """A CPU stand-in keeps the contract of what it replaces, so that a CPU test fails where a GPU
    run would: no stream where one is needed, timing without ``enable_timing``, bf16 ``grad`` in
    Megatron's gradient clipping."""
    from megatron.core.optimizer import clip_grads

    with cpu.cpu_mode():
        t = torch.zeros(2, device="cuda")
        t.record_stream(torch.cuda.current_stream())
        with pytest.raises(RuntimeError, match="unknown parameter type"):
            t.record_stream(None)  # what Megatron's schedule nodes do before set_streams
        with pytest.raises(TypeError):
            torch.cuda.current_stream().wait_stream(None)
        with pytest.raises(TypeError):
            torch.cuda.current_stream().wait_event(None)
        with pytest.raises(TypeError):
            with torch.cuda.stream("not a stream"):
                pass
        start, end = torch.cuda.Event(), torch.cuda.Event()
        start.record(), end.record()
        with pytest.raises(RuntimeError, match="enable_timing"):
            start.elapsed_time(end)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with pytest.raises(RuntimeError, match="recorded"):
            start.elapsed_time(end)
        start.record(), end.record()
        assert start.elapsed_time(end) >= 0.0
        p = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))  # a bf16 grad, as Megatron's bf16
        p.grad = torch.ones(2, dtype=torch.bfloat16)  # model params hold (it clips fp32 main grads)
        with pytest.raises(TypeError, match="grad"):
            clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
        pinned = t.pin_memory()
        assert torch.equal(pinned, t) and pinned.data_ptr() != t.data_ptr()


@pytest.mark.quick
def test_cpu_streams_are_current_as_cuda_streams_are():
    """The current stream is one object until ``torch.cuda.stream(s)`` makes ``s`` current (code
    that compares streams takes its GPU branch); Megatron's comm stream is None until
    ``set_streams``."""
    from megatron.core.pipeline_parallel import utils as pipeline_utils

    with cpu.cpu_mode():
        default = torch.cuda.current_stream()
        assert torch.cuda.current_stream() is default is torch.cuda.default_stream()
        side = torch.cuda.Stream(priority=torch.cuda.Stream.priority_range()[1])
        assert side != default
        with torch.cuda.stream(side):
            assert torch.cuda.current_stream() is side
            with torch.cuda.stream(None):  # a no-op, as in CUDA
                assert torch.cuda.current_stream() is side
        assert torch.cuda.current_stream() is default
        event = side.record_event()
        default.wait_event(event), default.wait_stream(side)
        saved = pipeline_utils._COMM_STREAM
        pipeline_utils._COMM_STREAM = None
        try:
            assert pipeline_utils.get_comm_stream() is None
            pipeline_utils.set_streams(high_priority=True)
            assert isinstance(pipeline_utils.get_comm_stream(), torch.cuda.Stream)
        finally:
            pipeline_utils._COMM_STREAM = saved


def _gather_uneven() -> list:
    """Each rank gathers pieces of 3 and 5 rows (rank r's rows hold r), as expert tensor parallelism does."""
    import os

    import megatron_dsv3.cpu as cpu_module

    rank = int(os.environ["RANK"])
    cpu_module.enable_cpu_mode()
    torch.distributed.init_process_group("gloo")
    sizes = [3, 5]
    piece = torch.full((sizes[rank], 2), float(rank))
    out = [torch.empty(n, 2) for n in sizes]
    torch.distributed.all_gather(out, piece)
    return out


def test_an_all_gather_of_uneven_pieces_on_gloo_gives_what_nccl_gives():
    """Megatron's ETP dispatcher gathers token pieces of different sizes; gloo alone refuses them."""
    from megatron_dsv3.testing.distributed import run_distributed

    for out in run_distributed(_gather_uneven, 2):
        assert [tuple(t.shape) for t in out] == [(3, 2), (5, 2)]
        assert torch.equal(out[0], torch.zeros(3, 2)) and torch.equal(out[1], torch.ones(5, 2))
