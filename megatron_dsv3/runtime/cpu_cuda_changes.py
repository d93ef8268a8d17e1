"""Run-time changes of CPU mode (group ``cpu``): CPU stand-ins for the CUDA runtime calls Megatron makes.

Streams, events, device queries, memory statistics and NVTX ranges, which Megatron-Core 0.19 calls
without asking ``torch.cuda.is_available()``.  The stand-ins keep CUDA's contract (a stream is
refused where CUDA needs one, there is no communication stream until ``set_streams``), so that a
CPU test fails where a GPU run would.  Applied with the rest of the group by
:func:`megatron_dsv3.runtime.cpu_mode.enable_cpu_mode`; the tensor, RNG and Megatron-function
changes are in :mod:`megatron_dsv3.runtime.cpu_changes`.
"""

from __future__ import annotations

import contextlib
import time
import types

from megatron_dsv3.runtime.registry import megatron_change, replace


def _expect(value, kind: type, what: str):
    """``value`` if it is a ``kind``; else the error CUDA would give (it fails on a non-stream too)."""
    if not isinstance(value, kind):
        raise TypeError(f"expected a torch.cuda.{what}, got {type(value).__name__} (CUDA fails here too)")
    return value


class CpuStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is already ordered, so waits do nothing.

    The contract is CUDA's: streams and events are checked where CUDA needs them, and
    ``torch.cuda.stream(s)`` makes ``s`` the current stream (``torch.cuda.current_stream()`` answers
    the same object until it ends), so code that compares streams takes the branches it takes on a GPU.
    """

    def __init__(self, device=None, priority=0, **kwargs):
        self.priority = priority

    @staticmethod
    def priority_range():
        return (0, -1)  # (lowest, highest), as CUDA orders them

    def wait_stream(self, stream):
        _expect(stream, CpuStream, "Stream")

    def wait_event(self, event):
        _expect(event, CpuEvent, "Event")

    def record_event(self, event=None):
        event = CpuEvent() if event is None else _expect(event, CpuEvent, "Event")
        event.record(self)
        return event

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        _STREAMS.append(self)
        return self

    def __exit__(self, *exc):
        _STREAMS.pop()
        return False


_DEFAULT_STREAM = CpuStream()
_STREAMS = [_DEFAULT_STREAM]  # the current stream is the last


@contextlib.contextmanager
def _stream(stream):
    """``torch.cuda.stream``: ``stream`` is current inside; None changes nothing (as in CUDA)."""
    if stream is None:
        yield
        return
    with _expect(stream, CpuStream, "Stream"):
        yield


def _set_stream(stream) -> None:
    if stream is not None:
        _STREAMS[-1] = _expect(stream, CpuStream, "Stream")


class CpuEvent:
    """Stands in for ``torch.cuda.Event``; ``elapsed_time`` reports wall-clock milliseconds, and
    refuses what CUDA refuses (events made without ``enable_timing``, or not recorded)."""

    def __init__(self, enable_timing=False, *args, **kwargs):
        self._timing = enable_timing
        self._time = None

    def record(self, stream=None):
        if stream is not None:
            _expect(stream, CpuStream, "Stream")
        self._time = time.perf_counter()

    def wait(self, stream=None):
        if stream is not None:
            _expect(stream, CpuStream, "Stream")

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end):
        if not (self._timing and end._timing):
            raise RuntimeError("Both events must be created with argument 'enable_timing=True'.")
        if self._time is None or end._time is None:
            raise RuntimeError("Both events must be recorded before calculating elapsed time.")
        return 1000.0 * (end._time - self._time)


def _noop(*args, **kwargs):
    return None


def _zero(*args, **kwargs):
    return 0


_NO_DEVICE = types.SimpleNamespace(
    name="cpu (megatron-dsv3 CPU mode)", major=0, minor=0, total_memory=0, multi_processor_count=0
)

_CUDA_STAND_INS = {
    "device_count": lambda *a, **k: 1,
    "get_device_properties": lambda *a, **k: _NO_DEVICE,
    "get_device_capability": lambda *a, **k: (0, 0),
    "get_device_name": lambda *a, **k: _NO_DEVICE.name,
    "current_device": _zero,
    "set_device": _noop,
    "synchronize": _noop,
    "empty_cache": _noop,
    "Stream": CpuStream,
    "Event": CpuEvent,
    "current_stream": lambda *a, **k: _STREAMS[-1],
    "default_stream": lambda *a, **k: _DEFAULT_STREAM,
    "stream": _stream,
    "set_stream": _set_stream,
    "is_current_stream_capturing": lambda: False,
    "memory_allocated": _zero,
    "max_memory_allocated": _zero,
    "memory_reserved": _zero,
    "max_memory_reserved": _zero,
    "reset_peak_memory_stats": _noop,
    "reset_max_memory_allocated": _noop,
    "memory_stats": lambda *a, **k: {},
    "nvtx.range_push": _noop,
    "nvtx.range_pop": _noop,
    "nvtx.range": lambda *a, **k: contextlib.nullcontext(),
    "nvtx.mark": _noop,
}


@megatron_change(
    targets=[f"torch.cuda.{name}" for name in _CUDA_STAND_INS],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="Megatron-Core guards its stream, event, NVTX and memory-statistics calls "
    "with torch.cuda.is_available()",
)
def cuda_runtime_calls_become_cpu_no_ops():
    """CUDA runtime calls that have no meaning on a CPU become no-ops or CPU stand-ins.

    Each process sees one device: ``torch.cuda.device_count()`` answers 1 (Megatron's training
    loop only builds its parallel groups and seeds its model-parallel RNG when it is positive) and
    ``torch.cuda.current_device()`` answers 0 (which the tensor factories then map to the CPU);
    device properties describe a device of compute capability 0.0 with no memory,
    ``set_device``/``synchronize``/``empty_cache`` do nothing, ``Stream`` and ``Event`` are CPU
    stand-ins (events time with the wall clock), NVTX ranges are empty and memory statistics read
    0.  The token dispatchers, the combined-1F1B overlap schedule and the training loop call
    these unconditionally.  ``torch.cuda.is_available()`` still answers False.

    Streams keep CUDA's contract, so that a CPU test fails where a GPU run would: the current
    stream is one object until ``torch.cuda.stream(s)``/``set_stream(s)`` makes ``s`` current,
    a stream or event is refused where CUDA needs one (``wait_stream(None)``), and events refuse
    ``elapsed_time`` without ``enable_timing`` or a record.
    """
    _STREAMS[:] = [_DEFAULT_STREAM]
    for name, stand_in in _CUDA_STAND_INS.items():
        replace(f"torch.cuda.{name}", stand_in)


_MEGATRON_STREAMS = (
    "megatron.core.pipeline_parallel.utils._COMM_STREAM",
    "megatron.core.transformer.moe.token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream",
    "megatron.core.transformer.moe.shared_experts.SharedExpertMLP.stream",
)


@megatron_change(
    targets=list(_MEGATRON_STREAMS),
    versions="megatron-core 0.19.x",
    fixed_upstream_when="(not a fix) needed while CPU mode stands in for CUDA streams",
)
def megatron_streams_made_in_cpu_mode_end_with_it():
    """The streams Megatron keeps for the whole process are unset when CPU mode starts and ends.

    Megatron makes some streams once and keeps them in module or class attributes: the
    communication stream of its overlapped schedules (``set_streams``; ``get_comm_stream()`` is
    None until then), the token dispatcher's device-to-host stream, the shared experts' stream.
    Made in CPU mode they are CPU stand-ins; they are put back to what they were (None without a
    GPU), so none outlives CPU mode and each CPU-mode run starts as a GPU process starts.
    """
    for path in _MEGATRON_STREAMS:
        replace(path, None)
