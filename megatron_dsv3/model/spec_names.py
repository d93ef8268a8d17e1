"""Named specs for ``--spec NAME``: one registry, open to other packages through entry points.

A package registers a spec by declaring an entry point in the group ``megatron_dsv3.specs``::

    [project.entry-points."megatron_dsv3.specs"]
    my-model = "my_package.specs:my_model_spec"

``--spec my-model`` then resolves to that object.  megatron-dsv3 registers ``dsv3`` the same way
(and knows it even when its own metadata is missing, e.g. running from a source checkout).
"""

from __future__ import annotations

import importlib

from megatron_dsv3.errors import ConfigError

ENTRY_POINT_GROUP = "megatron_dsv3.specs"
_BUILT_IN = {"dsv3": "megatron_dsv3:dsv3"}


def registered_specs() -> dict[str, str]:
    """``{name: "module:attribute"}`` for every registered spec."""
    from importlib.metadata import entry_points

    specs = dict(_BUILT_IN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        specs[ep.name] = ep.value
    return specs


def _load(target: str, *, what: str):
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"{what}: cannot import module '{module_name}' ({err})",
            fix="install the package that provides it, or correct the name",
            key="spec",
        ) from err
    try:
        return getattr(module, attribute) if attribute else module
    except AttributeError:
        raise ConfigError(
            f"{what}: module '{module_name}' has no attribute '{attribute}'",
            fix="check the function name (Megatron's --spec takes `<module> <name>`)",
            key="spec",
        ) from None


def resolve_spec(tokens) -> object:
    """What ``--spec`` names: a registered name (one token) or a ``<module> <name>`` pair.

    Stock Megatron accepts only the pair and, if the import fails, logs and silently falls back
    to its default spec; here every failure is an error that says what to do.
    """
    if isinstance(tokens, str):
        tokens = [tokens]
    tokens = list(tokens)
    names = registered_specs()
    if len(tokens) == 1:
        name = tokens[0]
        if name not in names:
            raise ConfigError(
                f"unknown spec '{name}'",
                fix=f"use one of the registered specs ({', '.join(sorted(names))}) or a"
                " `<module> <name>` pair",
                key="spec",
                value=name,
                choices=sorted(names),
            )
        return _load(names[name], what=f"spec '{name}'")
    if len(tokens) == 2:
        return _load(f"{tokens[0]}:{tokens[1]}", what=f"spec '{tokens[0]} {tokens[1]}'")
    raise ConfigError(
        f"--spec takes one registered name or a `<module> <name>` pair, got {len(tokens)} words:"
        f" {' '.join(tokens)}",
        fix=f"e.g. `--spec dsv3` or `--spec megatron_dsv3 dsv3` (registered: {', '.join(sorted(names))})",
        key="spec",
    )


def is_dsv3_spec(tokens) -> bool:
    """True when ``--spec`` names one of megatron-dsv3's own specs."""
    if not tokens:
        return False
    tokens = [tokens] if isinstance(tokens, str) else list(tokens)
    module = registered_specs().get(tokens[0], "").partition(":")[0] if len(tokens) == 1 else tokens[0]
    return _ours(module)


def is_dsv3_spec_object(spec) -> bool:
    """True when a resolved spec (what ``--spec`` named) is one of megatron-dsv3's own."""
    return _ours(getattr(spec, "__module__", None) or "")


def _ours(module: str) -> bool:
    return module == "megatron_dsv3" or module.startswith("megatron_dsv3.")
