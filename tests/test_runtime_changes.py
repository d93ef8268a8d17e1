"""Every run-time change to Megatron is registered, documented, idempotent and still has a target."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_dsv3.runtime import catalog, registry

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)

CHANGES = catalog.all_changes()


@pytest.mark.parametrize("change", CHANGES, ids=[c.name for c in CHANGES])
def test_every_patched_target_still_exists(change):
    """If Megatron renames or removes a target, this fails and names the change to revisit."""
    for target in change.targets:
        if target.startswith("environment "):
            continue  # an environment variable, not an attribute
        if target.startswith("logging.getLogger("):
            import megatron.core.tensor_parallel.random as random_module

            assert "CPU RNG state changed within GPU RNG context" in inspect.getsource(random_module)
            continue
        owner, attr = registry.resolve(target)
        assert hasattr(owner, attr), f"{change.name}: {target} no longer exists"


@pytest.mark.parametrize("change", CHANGES, ids=[c.name for c in CHANGES])
def test_every_change_says_why_which_versions_and_how_to_tell_it_was_fixed(change):
    assert len(change.reason) > 80
    assert "megatron-core" in change.versions
    assert change.fixed_upstream_when
    assert change.group in ("launch", "model", "cpu", "train")


def test_changes_doc_is_generated_from_the_registry():
    doc = Path(__file__).resolve().parents[1] / "docs" / "megatron-changes.md"
    assert doc.read_text() == catalog.render_markdown(), (
        "docs/megatron-changes.md is stale: run `megatron-dsv3 changes --markdown > docs/megatron-changes.md`"
    )


_TWICE = """
import megatron_dsv3.cpu as cpu, torch
from megatron_dsv3.runtime.catalog import apply_group, all_changes
cpu.enable_cpu_mode()
for group in ("launch", "model", "train"):
    apply_group(group)
before = {t: __import__('megatron_dsv3.runtime.registry', fromlist=['x']).resolve(t) for c in all_changes()
          for t in c.targets if not t.startswith(('logging', 'environment'))}
before = {t: getattr(o, a) for t, (o, a) in before.items()}
for group in ("launch", "model", "cpu", "train"):
    apply_group(group)
for c in all_changes():
    c.applied = False  # force a second application of every change
for group in ("launch", "model", "cpu", "train"):
    apply_group(group)
from megatron_dsv3.runtime.registry import resolve
after = {t: getattr(*resolve(t)) for t in before}
changed = [t for t in before if before[t] is not after[t]]
print("CHANGED", changed)
rewrapped = [t for t in before if getattr(after[t], '__wrapped_original__', None) is not None
             and getattr(after[t].__wrapped_original__, '__wrapped_original__', None) is not None]
print("REWRAPPED", rewrapped)
print(torch.zeros(1, device="cuda").device)
"""


def test_applying_every_change_twice_is_harmless():
    out = subprocess.run([sys.executable, "-c", _TWICE], capture_output=True, text=True, check=True).stdout
    assert "REWRAPPED []" in out
    assert "CHANGED []" in out  # the second application put nothing new in place
    assert out.strip().endswith("cpu")


def test_changes_command_lists_every_change():
    out = subprocess.run(
        [sys.executable, "-m", "megatron_dsv3.cli", "changes"], capture_output=True, text=True, check=True
    ).stdout
    for change in CHANGES:
        assert change.name in out
