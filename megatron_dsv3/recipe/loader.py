"""YAML -> :class:`Recipe`, keeping the line of every key so that errors can say ``file:line``.

The YAML is composed into PyYAML's node tree (which knows line numbers) and converted key by key
against the dataclasses of :mod:`megatron_dsv3.recipe.schema`: unknown keys, wrong types and values
outside a key's choices are :class:`ConfigError` naming ``file:line``, the key path
(``parallel.ep``), the value and the fix.  Loading checks the schema only; whether the numbers fit
together (EP dividing the experts, a batch dividing the data-parallel ranks ...) is checked by
:func:`megatron_dsv3.recipe.check.validate_recipe`, which needs a world size.

YAML 1.1 (PyYAML) reads ``1e-4`` (no dot) as a string; float keys accept such strings.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import pathlib
import types
import typing

import yaml
from yaml.constructor import SafeConstructor

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.model.backends import EXPERTS
from megatron_dsv3.model.presets import ModelPreset
from megatron_dsv3.recipe.schema import (
    MOVED_SECTIONS,
    ModelSection,
    Recipe,
    RecomputeSection,
    schema_fields,
    yaml_name,
)

SHIPPED_PACKAGE = "megatron_dsv3.shipped_recipes"
_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def shipped_recipes() -> dict[str, pathlib.Path]:
    """The recipes installed with the package (``recipes/*.yaml``), by name (file stem)."""
    try:
        root = importlib.resources.files(SHIPPED_PACKAGE)
    except ModuleNotFoundError:  # running from a source checkout that is not installed
        root = pathlib.Path(__file__).resolve().parents[2] / "recipes"
    found = {}
    for entry in root.iterdir():
        if entry.name.endswith(".yaml"):
            found[entry.name[: -len(".yaml")]] = pathlib.Path(str(entry))
    return dict(sorted(found.items()))


def load_recipe(path_or_name: str | pathlib.Path, overrides: list[str] = ()) -> Recipe:
    """A recipe from a YAML file, or a shipped recipe by name (``deepseek-v3-671b-h800-2048``).

    ``overrides`` are ``key.path=value`` strings (``training.train_iters=50``) applied on top, with
    the same checks as the file; an error in one names the override.
    """
    path = pathlib.Path(path_or_name)
    if path.is_file():
        return loads_recipe(path.read_text(), source=str(path), default_name=path.stem,
                            overrides=overrides)
    shipped = shipped_recipes()
    name = str(path_or_name)
    if name in shipped:
        return load_recipe(shipped[name], overrides)
    if path.suffix in (".yaml", ".yml") or "/" in name:
        raise ConfigError(f"recipe file '{name}' does not exist",
                          fix="check the path, or give the name of a shipped recipe: " + ", ".join(shipped))
    raise ConfigError(
        f"'{name}' is neither a recipe file nor a shipped recipe",
        fix="give a path to a .yaml file or one of: " + ", ".join(shipped),
        value=name,
        choices=list(shipped),
    )


def loads_recipe(
    text: str, *, source: str = "<recipe>", default_name: str | None = None, overrides: list[str] = ()
) -> Recipe:
    """A recipe from YAML text; ``source`` names it in error messages."""
    root = _compose(text, source)
    builder = _Builder(source)
    if root is None:
        raise ConfigError("the recipe is empty", fix="write at least `model: {preset: NAME}`", where=source)
    for override in overrides:
        _splice(root, override, builder)
    recipe = builder.build_recipe(root)
    recipe.source, recipe.lines = source, builder.lines
    if recipe.name is None:
        recipe.name = default_name or "recipe"
    return recipe


def _compose(text: str, source: str):
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"not valid YAML: {err.problem or err}", fix="correct the YAML syntax",
                          where=where) from None
    _refuse_tags(root, source)
    return root


_YAML = "tag:yaml.org,2002:"
_PLAIN_TAGS = {_YAML + t for t in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp")}


def _refuse_tags(node, source: str) -> None:
    """A recipe is data: YAML tags (``!!python/object/apply:...``, ``!custom``) are refused outright.

    The file is only ever composed, never constructed, so a tag cannot run anything; refusing it
    says so plainly instead of reporting the tagged value as being of the wrong type.
    """
    if node is None:
        return
    if node.tag not in _PLAIN_TAGS:
        shown = "!!" + node.tag[len(_YAML):] if node.tag.startswith(_YAML) else node.tag
        raise ConfigError(f"YAML tags are not allowed in a recipe (found {shown})",
                          fix="write plain values: numbers, strings, true/false, lists and mappings",
                          where=f"{source}:{node.start_mark.line + 1}")
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            _refuse_tags(key_node, source)
            _refuse_tags(value_node, source)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_tags(item, source)


def _splice(root: yaml.Node, override: str, builder: "_Builder") -> None:
    """Put ``key.path=value`` into the composed tree, creating sections as needed."""
    where = f"override '{override}'"
    key_path, sep, value_text = override.partition("=")
    if not sep or not key_path.strip():
        raise ConfigError(f"{where} is not of the form key.path=value",
                          fix="write e.g. training.train_iters=50 or parallel.ep=2", where="command line")
    value = _compose(value_text or "null", where)
    if value is None:
        value = yaml.ScalarNode("tag:yaml.org,2002:null", "null")
    node = root
    names = key_path.strip().split(".")
    for depth, name in enumerate(names):
        last = depth == len(names) - 1
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"{where}: {'.'.join(names[:depth])} is not a section",
                              fix="override a key inside a section", where="command line")
        for index, (key_node, value_node) in enumerate(node.value):
            if key_node.value == name:
                if last:
                    node.value[index] = (key_node, value)
                    builder.origins[id(key_node)] = where
                elif _is_empty_section(value_node):  # `recompute: none`: the override goes into the empty section
                    mark = value_node.start_mark
                    value_node = yaml.MappingNode("tag:yaml.org,2002:map", [], mark, mark)
                    node.value[index] = (key_node, value_node)
                node = value_node
                break
        else:
            mark = value.start_mark
            child = value if last else yaml.MappingNode("tag:yaml.org,2002:map", [], mark, mark)
            key_node = yaml.ScalarNode("tag:yaml.org,2002:str", name, mark, mark)
            node.value.append((key_node, child))
            builder.origins[id(key_node)] = where
            node = child
    builder.origins[id(value)] = where


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _is_empty_section(node: yaml.Node) -> bool:
    """A section written as a shorthand for its defaults: null, or ``none`` (``recompute: none``)."""
    return _is_null(node) or (isinstance(node, yaml.ScalarNode) and node.tag == _YAML + "str" and node.value == "none")


class _Builder:
    """Converts composed YAML nodes into schema dataclasses, recording key lines."""

    def __init__(self, source: str):
        self.source = source
        self.lines: dict[str, int] = {}
        self.origins: dict[int, str] = {}  # nodes that came from command-line overrides
        self._scalars = SafeConstructor()

    def where(self, node: yaml.Node) -> str:
        if id(node) in self.origins:
            return self.origins[id(node)]
        return f"{self.source}:{node.start_mark.line + 1}"

    def fail(self, node, problem: str, fix: str, *, key: str, value=None, choices=None) -> ConfigError:
        return ConfigError(problem, fix=fix, key=key, where=self.where(node), value=value, choices=choices)

    # ---- mappings ----
    def _items(self, node: yaml.Node, path: str):
        """``(key, key_node, value_node)`` of a mapping node, with duplicate and type checks."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{path or 'the recipe'} must be a mapping of keys to values",
                            f"write {path or 'the recipe'} as `key: value` lines", key=path)
        seen = set()
        for key_node, value_node in node.value:
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            full = f"{path}.{name}" if path else str(name)
            if not isinstance(name, str) or not name:
                raise self.fail(key_node, f"keys must be plain words, got {name!r} in {path or 'the recipe'}",
                                "write the key as a name", key=path)
            if name in seen:
                raise self.fail(key_node, f"{full} is given twice", "keep one of them", key=full)
            seen.add(name)
            self.lines[full] = self.origins.get(id(key_node), key_node.start_mark.line + 1)
            yield name, key_node, value_node, full

    def build_recipe(self, root: yaml.Node) -> Recipe:
        for name, key_node, _, _ in self._items(root, ""):
            if name in MOVED_SECTIONS:
                what, keys, example = MOVED_SECTIONS[name]
                raise self.fail(key_node, f"{what} is not a top-level `{name}:` section: it is set by {keys}",
                                f"move it under `parallel:`, for example `{example}`", key=name)
        recipe = self.build_section(Recipe, root, "")
        if recipe.model.preset is None:
            raise ConfigError("the `model:` section is missing", fix="add `model: {preset: NAME}`",
                              key="model", where=self.source)
        return recipe

    def build_section(self, cls, node: yaml.Node, path: str):
        if cls is ModelSection:
            return self.build_model(node, path)
        if cls is RecomputeSection and _is_empty_section(node):
            return RecomputeSection()
        fields = {yaml_name(f): f for f in schema_fields(cls)}
        hints = typing.get_type_hints(cls)
        values = {}
        for name, key_node, value_node, full in self._items(node, path):
            if name not in fields:
                known = [f"{path}.{k}" if path else k for k in fields]
                raise self.fail(key_node, f"unknown key '{full}'",
                                f"use one of: {', '.join(known)}", key=full, value=full, choices=known)
            f = fields[name]
            values[f.name] = self.convert(hints[f.name], value_node, full, f.metadata.get("choices"))
        return cls(**values)

    def build_model(self, node: yaml.Node, path: str) -> ModelSection:
        known = {f.name for f in dataclasses.fields(ModelPreset)} - {"name", "description"}
        hints = typing.get_type_hints(ModelPreset)
        section = ModelSection()
        for name, key_node, value_node, full in self._items(node, path):
            if name == "preset":
                section.preset = self.convert(str, value_node, full, None)
            elif name == "experts":
                section.experts = self.convert(str, value_node, full, EXPERTS)
            elif name in known:
                section.overrides[name] = self.convert(hints[name], value_node, full, None)
            else:
                choices = [f"model.{k}" for k in sorted(known | {"preset", "experts"})]
                raise self.fail(key_node, f"unknown key '{full}'",
                                "use `preset`, `experts` or a ModelPreset field (megatron_dsv3/model/presets.py)",
                                key=full, value=full, choices=choices)
        if section.preset is None:
            raise self.fail(node, "model.preset is missing",
                            "name a preset, e.g. `preset: deepseek-v3`", key="model.preset")
        return section

    # ---- values ----
    def _scalar(self, node: yaml.Node):
        if isinstance(node, yaml.ScalarNode):
            return self._scalars.construct_object(node, deep=True)
        return node

    def convert(self, hint, node: yaml.Node, path: str, choices):
        """``node`` as a value of type ``hint`` (a class, ``X | None``, ``list[X]``, a section)."""
        if dataclasses.is_dataclass(hint):
            if _is_null(node) and hint is not ModelSection:
                return hint()
            return self.build_section(hint, node, path)
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if _is_null(node):
            if type(None) in options:
                return None
            raise self.type_error(node, path, None, hint)
        for option in options:
            if option is type(None):
                continue
            if typing.get_origin(option) is list:
                if isinstance(node, yaml.SequenceNode):
                    (item_hint,) = typing.get_args(option)
                    return [self.convert(item_hint, item, f"{path}[{i}]", choices)
                            for i, item in enumerate(node.value)]
                continue
            value = _as_type(self._scalar(node), option)
            if value is not _NO:
                if choices and value not in choices:
                    raise self.fail(node, f"{path}={value!r} is not one of {', '.join(map(str, choices))}",
                                    f"set {path} to one of: {', '.join(map(str, choices))}",
                                    key=path, value=str(value), choices=[str(c) for c in choices])
                return value
        raise self.type_error(node, path, self._scalar(node), hint)

    def type_error(self, node, path: str, value, hint) -> ConfigError:
        wanted = _describe(hint)
        shown = "a list" if isinstance(value, yaml.SequenceNode) else (
            "a mapping" if isinstance(value, yaml.MappingNode) else repr(value))
        return self.fail(node, f"{path}={shown} must be {wanted}",
                         f"write {path} as {wanted}", key=path)


_NO = object()


def _as_type(value, cls):
    """``value`` as an instance of the scalar type ``cls``, or ``_NO``."""
    if isinstance(value, yaml.Node):
        return _NO
    if cls is bool:
        return value if isinstance(value, bool) else _NO
    if isinstance(value, bool):
        return _NO
    if cls is int:
        return value if isinstance(value, int) else _NO
    if cls is float:
        if isinstance(value, (int, float)):
            return float(value)
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value) if isinstance(value, str) else _NO
        except ValueError:
            return _NO
    if cls is str:
        return str(value) if isinstance(value, (str, int, float)) else _NO
    return _NO


def _describe(hint) -> str:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    words = []
    for option in options:
        if option is type(None):
            words.append("null")
        elif typing.get_origin(option) is list:
            words.append(f"a list (each item {_describe(typing.get_args(option)[0])})")
        else:
            words.append(_TYPE_WORDS.get(option, getattr(option, "__name__", str(option))))
    return " or ".join(words)


__all__ = ["load_recipe", "loads_recipe", "shipped_recipes"]
