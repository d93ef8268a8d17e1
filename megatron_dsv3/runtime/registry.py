"""The one registry of every run-time change megatron-dsv3 makes to Megatron-Core or PyTorch.

Each change is a small named function registered with :func:`megatron_change`.  Its docstring says
what it changes and why; the decorator records which attributes it replaces (``targets``), which
Megatron versions need it and how to tell that upstream fixed it.  ``megatron-dsv3 changes`` and
``docs/megatron-changes.md`` are generated from the catalog, and a test asserts that every
target still exists in the installed Megatron.

Changes are grouped:

* ``launch``: what makes stock ``pretrain_gpt.py`` take ``--spec dsv3`` (applied when Megatron's
  training code is imported, see :mod:`megatron_dsv3.launch`);
* ``model``: fixes to Megatron-Core's modules that DeepSeek models need (applied when a ``dsv3``
  spec is built);
* ``cpu``: what lets Megatron-Core run without a GPU (applied by :func:`megatron_dsv3.runtime.cpu_mode.enable_cpu_mode`);
* ``train``: the progress reporting of ``megatron-dsv3 train`` (applied by its worker only).

This module only records and applies changes; :mod:`megatron_dsv3.runtime.catalog` is the one list
of the modules that define them (so the registry imports none of them, and they import only it).
Applying a change twice is harmless: :func:`replace` remembers what it put in place and does
nothing when the target already holds it.  ``cpu`` changes can be reverted (the CPU-mode context
manager does so) completely: attributes, the caches a change empties on revert (:func:`on_revert`),
and names that modules imported meanwhile bound to a replacement; the other groups stay for the
life of the process.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

_MARK = "__megatron_dsv3_change__"


@dataclass
class MegatronChange:
    """One named run-time change (see the module docstring)."""

    name: str
    targets: tuple[str, ...]
    versions: str
    fixed_upstream_when: str
    apply_fn: Callable[[], None]
    group: str = ""  # set by the catalog, from the module that defines the change
    applied: bool = False
    originals: list[tuple[Any, str, Any]] = field(default_factory=list)
    on_revert: list[Callable[[], None]] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return inspect.cleandoc(self.apply_fn.__doc__ or "").strip()


_CHANGES: dict[str, MegatronChange] = {}
_CURRENT: list[MegatronChange] = []


def megatron_change(*, targets: list[str], versions: str, fixed_upstream_when: str):
    """Register ``fn`` as a run-time change.  ``fn`` performs the change with :func:`replace`."""

    def register(fn: Callable[[], None]) -> Callable[[], None]:
        if not fn.__doc__:
            raise TypeError(f"run-time change {fn.__name__} needs a docstring saying why")
        _CHANGES[fn.__name__] = MegatronChange(
            name=fn.__name__,
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
    return original_of(getattr(owner, attr))


def original_of(obj: Any) -> Any:
    """What ``obj`` replaced, if megatron-dsv3 put it in place of something; else ``obj``."""
    return getattr(obj, "__wrapped_original__", obj)


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


def on_revert(action: Callable[[], None]) -> None:
    """Run ``action`` when the change being applied is reverted, after its attributes are restored
    (say, to empty a cache that may have been filled from the replaced objects)."""
    _CURRENT[-1].on_revert.append(action)


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


def apply_changes(changes: list[MegatronChange]) -> list[str]:
    """Apply every change in ``changes`` (in order); return their names."""
    for change in changes:
        apply(change.name)
    return [c.name for c in changes]


def revert_changes(changes: list[MegatronChange]) -> None:
    """Undo ``changes``: every replaced attribute gets its original back, the changes' revert
    actions run, and a module imported meanwhile that bound a replacement by name (``from torch
    import zeros``) gets the original under that name too."""
    put_back: dict[int, tuple[Any, Any]] = {}
    for change in reversed(changes):
        if change.applied:
            put_back.update(_undo(change))
            change.applied = False
    _rebind_imported_names(put_back)


def changes_in(module) -> list[MegatronChange]:
    """The changes a definition module registered, in definition order."""
    return [c for c in _CHANGES.values() if c.apply_fn.__module__ == module.__name__]


def is_applied(name: str) -> bool:
    change = _CHANGES.get(name)
    return bool(change and change.applied)


def _undo(change: MegatronChange) -> dict[int, tuple[Any, Any]]:
    """Restore ``change``'s attributes; ``{id(replacement): (replacement, original)}`` for the
    replacements that were marked (functions and classes)."""
    put_back = {}
    for owner, attr, value in reversed(change.originals):
        current = getattr(owner, attr, None)
        if getattr(current, _MARK, None) is not None:
            put_back[id(current)] = (current, value)
        setattr(owner, attr, value)
    change.originals.clear()
    for action in change.on_revert:
        action()
    change.on_revert.clear()
    return put_back


def _rebind_imported_names(put_back: dict[int, tuple[Any, Any]]) -> None:
    if not put_back:
        return
    for name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if name.split(".")[0] == "megatron_dsv3" or not isinstance(namespace, dict):
            continue  # the plugin's own modules define the replacements
        for key, value in list(namespace.items()):
            entry = put_back.get(id(value))
            if entry is not None and entry[0] is value:
                namespace[key] = entry[1]
