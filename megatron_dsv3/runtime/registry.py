"""The one registry of every run-time change megatron-dsv3 makes to Megatron-Core or PyTorch.

Each change is a small named function registered with :func:`megatron_change`.  Its docstring says
what it changes and why; the decorator records which attributes it replaces (``targets``), which
Megatron versions need it and how to tell that upstream fixed it.  ``megatron-dsv3 changes`` and
``docs/megatron-changes.md`` are generated from this registry, and a test asserts that every
target still exists in the installed Megatron.

Changes are grouped:

* ``launch``: what makes stock ``pretrain_gpt.py`` take ``--spec dsv3`` (applied when Megatron's
  training code is imported, see :mod:`megatron_dsv3.launch`);
* ``model``: fixes to Megatron-Core's modules that DeepSeek models need (applied when a ``dsv3``
  spec is built);
* ``cpu``: what lets Megatron-Core run without a GPU (applied by :func:`megatron_dsv3.cpu.enable_cpu_mode`);
* ``train``: the progress reporting of ``megatron-dsv3 train`` (applied by its worker only).

Applying a change twice is harmless: :func:`replace` remembers what it put in place and does
nothing when the target already holds it.  ``cpu`` changes can be reverted (the CPU-mode context
manager does so); the other groups stay for the life of the process.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

_MARK = "__megatron_dsv3_change__"


@dataclass
class MegatronChange:
    """One named run-time change (see the module docstring)."""

    name: str
    group: str
    targets: tuple[str, ...]
    versions: str
    fixed_upstream_when: str
    apply_fn: Callable[[], None]
    applied: bool = False
    originals: list[tuple[Any, str, Any]] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return inspect.cleandoc(self.apply_fn.__doc__ or "").strip()


_CHANGES: dict[str, MegatronChange] = {}
_CURRENT: list[MegatronChange] = []


def megatron_change(*, group: str, targets: list[str], versions: str, fixed_upstream_when: str):
    """Register ``fn`` as a run-time change.  ``fn`` performs the change with :func:`replace`."""

    def register(fn: Callable[[], None]) -> Callable[[], None]:
        if not fn.__doc__:
            raise TypeError(f"run-time change {fn.__name__} needs a docstring saying why")
        _CHANGES[fn.__name__] = MegatronChange(
            name=fn.__name__,
            group=group,
            targets=tuple(targets),
            versions=versions,
            fixed_upstream_when=fixed_upstream_when,
            apply_fn=fn,
        )
        return fn

    return register


def resolve(path: str) -> tuple[Any, str]:
    """Return ``(owner, attribute)`` for a dotted path such as ``torch.cuda.current_device``.

    The longest importable module prefix is imported; the rest is walked with ``getattr``.
    """
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:-1]:
            owner = getattr(owner, name)
        return owner, parts[-1]
    raise ImportError(f"cannot import any module prefix of {path!r}")


def original(path: str) -> Any:
    """The object at ``path`` before megatron-dsv3 replaced it (the current one if unchanged)."""
    owner, attr = resolve(path)
    current = getattr(owner, attr)
    return getattr(current, "__wrapped_original__", current)


def replace(path: str, new: Any) -> Any:
    """Put ``new`` at ``path`` on behalf of the change being applied; return the original.

    ``new`` may be a function; it is marked so that a second application is a no-op and so that
    :func:`original` can find what it replaced.
    """
    owner, attr = resolve(path)
    return replace_attribute(owner, attr, new, label=path)


def replace_attribute(owner: Any, attr: str, new: Any, *, label: str) -> Any:
    """:func:`replace` for an object that has no import path (``label`` names it)."""
    current = getattr(owner, attr)
    if getattr(current, _MARK, None) == label:
        return current.__wrapped_original__
    if getattr(new, _MARK, label) != label:  # the same callable already stands in elsewhere
        new = _alias(new)
    try:
        setattr(new, _MARK, label)
        setattr(new, "__wrapped_original__", current)
    except (AttributeError, TypeError):  # e.g. a bound method or a builtin: cannot be marked
        pass
    setattr(owner, attr, new)
    if _CURRENT:
        _CURRENT[-1].originals.append((owner, attr, current))
    return current


class _Environment:
    """``os.environ`` seen as attributes (None = unset), so variables go through replace_attribute."""

    def __getattr__(self, name: str):
        import os

        return os.environ.get(name)

    def __setattr__(self, name: str, value) -> None:
        import os

        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


ENVIRONMENT = _Environment()


def set_environment(name: str, value: str) -> None:
    """Set an environment variable on behalf of the change being applied (undone on revert)."""
    replace_attribute(ENVIRONMENT, name, value, label=f"environment {name}")


def _alias(fn: Callable) -> Callable:
    def alias(*args, **kwargs):
        return fn(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = getattr(fn, "__name__", "alias")
    alias.__doc__ = fn.__doc__
    return alias


def apply(name: str) -> None:
    change = _CHANGES[name]
    if change.applied:
        return
    _CURRENT.append(change)
    try:
        change.apply_fn()
    except BaseException:
        _undo(change)
        raise
    finally:
        _CURRENT.pop()
    change.applied = True


def apply_group(group: str) -> list[str]:
    """Apply every change of ``group`` (importing the module that defines them); return the names."""
    _load_definitions()
    names = [c.name for c in _CHANGES.values() if c.group == group]
    for name in names:
        apply(name)
    return names


def revert_group(group: str) -> None:
    for change in reversed(list(_CHANGES.values())):
        if change.group == group and change.applied:
            _undo(change)
            change.applied = False


def _undo(change: MegatronChange) -> None:
    for owner, attr, value in reversed(change.originals):
        setattr(owner, attr, value)
    change.originals.clear()


def all_changes() -> list[MegatronChange]:
    _load_definitions()
    return list(_CHANGES.values())


def _load_definitions() -> None:
    # The definitions import nothing heavy at module level; Megatron is imported when applied.
    from megatron_dsv3.runtime import cpu_changes, launch_changes, model_changes, train_changes  # noqa: F401


def render_markdown() -> str:
    """The page ``docs/megatron-changes.md`` (kept in sync by a test)."""
    lines = [
        "# Run-time changes megatron-dsv3 makes to Megatron-Core and PyTorch",
        "",
        "Generated by `megatron-dsv3 changes --markdown` from `megatron_dsv3/runtime/`;"
        " do not edit by hand.",
        "",
        "`launch` changes are applied when Megatron's training code is imported (the start-up hook,"
        " or the explicit `patches/` for Megatron-LM); `model` changes when a `dsv3` spec is built;"
        " `cpu` changes only inside CPU mode (`megatron_dsv3.cpu.enable_cpu_mode`), never on a GPU"
        " run; `train` changes only by `megatron-dsv3 train`.",
        "",
    ]
    for group in ("launch", "model", "cpu", "train"):
        changes = [c for c in all_changes() if c.group == group]
        lines += [f"## `{group}` ({len(changes)} changes)", ""]
        for c in changes:
            lines += [
                f"### `{c.name}`",
                "",
                c.reason,
                "",
                "- Replaces: " + ", ".join(f"`{t}`" for t in c.targets),
                f"- Needed by: {c.versions}",
                f"- Upstream fixed when: {c.fixed_upstream_when}",
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"
