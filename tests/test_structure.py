"""The package's edges: one import direction, one builder, one argument composer, specs from providers.

* No import cycle between the package's modules, counting imports inside functions (an edge goes
  to the module an import statement names; ``from pkg import name`` to ``pkg.name`` when that is
  a module).  No production module imports the test harness.
* The wheel holds every sub-package (discovery is automatic) and the shipped data.
* ``megatron-dsv3 args RECIPE`` and the tests' builder give the same Megatron configuration.
* A spec build changes nothing; every Linear of the spec comes from its provider; with Transformer
  Engine's provider the spec is Megatron's own TE MLA layer.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import pathlib
import re
import shutil
import subprocess
import sys
import warnings
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_dsv3"


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(module: str, path: pathlib.Path, modules: dict) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for name in names:
            while name and name not in modules and "." in name:
                name = name.rpartition(".")[0]
            if name in modules and name != module:
                targets.add(name)
    return targets


@functools.cache
def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycle(graph) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.quick
def test_no_import_cycle_between_the_packages_modules_counting_imports_inside_functions():
    graph = _graph()
    assert len(graph) > 40 and "megatron_dsv3.parallel.placement" in graph["megatron_dsv3.model.spec"]
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.quick
def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.quick
def test_no_production_module_imports_the_test_harness():
    offenders = {m: sorted(d for d in deps if d.startswith("megatron_dsv3.testing"))
                 for m, deps in _graph().items() if not m.startswith("megatron_dsv3.testing")}
    assert {m: d for m, d in offenders.items() if d} == {}


# The layers, bottom to top (docs/architecture.md says what each owns and why this order): a module
# imports its own folder or a lower one, never a higher one, imports inside functions included.  The
# package root is the `--spec` entry point (`megatron_dsv3.dsv3`), beside the command line at the top.
LAYERS = ("errors", "data", "parallel", "model", "fp8", "pipeline", "recipe", "args", "runtime", "cpu",
          "convert", "launch", "train", "cluster", "cli", "", "testing")


def _layer(module: str) -> int:
    folder = module.split(".")[1] if "." in module else ""
    if folder not in LAYERS:
        raise AssertionError(f"{module}: the folder {folder!r} has no place in LAYERS (tests/test_structure.py)"
                             " and docs/architecture.md; add it where its imports put it")
    return LAYERS.index(folder) if folder != "cli" else LAYERS.index("")  # the two entry points share a layer


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if _layer(d) > _layer(m))


@pytest.mark.quick
def test_every_import_points_down_the_layers_counting_imports_inside_functions():
    assert _upward(_graph()) == []


@pytest.mark.quick
def test_the_layer_check_catches_an_upward_import():
    graph = {"megatron_dsv3.model.spec": {"megatron_dsv3.parallel.placement"},
             "megatron_dsv3.parallel.placement": {"megatron_dsv3.errors"}, "megatron_dsv3.errors": set()}
    assert _upward(graph) == []
    graph["megatron_dsv3.model.spec"].add("megatron_dsv3.fp8.linear")  # the model must know no FP8
    assert _upward(graph) == ["megatron_dsv3.model.spec -> megatron_dsv3.fp8.linear"]


@pytest.mark.quick
def test_the_architecture_page_lists_the_layers_in_this_order():
    text = (ROOT / "docs" / "architecture.md").read_text()
    paragraph = text[text.index("Layers, bottom to top:"):].split("\n\n")[0]
    assert re.findall(r"`([a-z0-9_]+)`", paragraph) == [name or "megatron_dsv3" for name in LAYERS]


def _says_lazy(lines: list[str], i: int) -> bool:
    """A ``# lazy:`` comment on line ``i`` or among the comments and imports right above it (one
    comment serves a block of imports)."""
    while i >= 0:
        text = lines[i].strip()
        if "# lazy:" in text:
            return True
        if not (text.startswith(("#", "from ", "import ")) or text.endswith((",", "(")) or text == ")"):
            return False
        i -= 1
    return False


def _function_level_imports() -> list[tuple[str, int, str]]:
    """``(file, line, text)`` of every import of the package inside a function, without a
    ``# lazy: <reason>`` comment on its line or the line above."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else (
                    [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                if not any(n == "megatron_dsv3" or n.startswith("megatron_dsv3.") for n in names):
                    continue
                if not _says_lazy(lines, node.lineno - 1):
                    found.append((path.relative_to(ROOT).as_posix(), node.lineno, lines[node.lineno - 1].strip()))
    return sorted(set(found))


@pytest.mark.quick
def test_imports_of_the_package_inside_functions_say_why_they_are_lazy():
    """Lazy loading is the only reason to import the package inside a function (a cycle is not)."""
    assert [f"{f}:{n}: {t}" for f, n, t in _function_level_imports()] == []


@pytest.mark.quick
def test_no_module_is_over_400_lines():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 400} == {}


def test_the_wheel_holds_every_sub_package_and_the_shipped_data(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "runs", "tests"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in PACKAGE.rglob("*.py"):
        assert path.relative_to(ROOT).as_posix() in names, f"{path} is missing from the wheel"
    for recipe in (ROOT / "recipes").glob("*.yaml"):
        assert f"megatron_dsv3/shipped_recipes/{recipe.name}" in names
    assert {"megatron-dsv3.pth", "_megatron_dsv3_hook.py", "megatron_dsv3/data/corpus.jsonl.gz",
            "megatron_dsv3/data/tokenizer.model"} <= names


# ---- one composer, one builder ----
SHIPPED = ["deepseek-v3-671b-h800-2048", "deepseek-v3-671b-h100-1024", "deepseek-v2-lite-8gpu",
           "dsv3-proxy-1gpu", "dsv3-tiny-cpu"]


def _config_fields(config) -> dict:
    skip = {"init_method", "output_layer_init_method", "embedding_init_method", "no_sync_func",
            "finalize_model_grads_func", "grad_sync_func", "param_sync_func", "timers"}
    out = {}
    for f in dataclasses.fields(config):
        if f.name in skip:
            continue
        value = getattr(config, f.name)
        out[f.name] = value if not callable(value) or isinstance(value, type) else getattr(value, "__name__", repr(value))
    return out


@pytest.mark.parametrize("name", SHIPPED)
def test_args_command_and_the_tests_builder_make_the_same_megatron_config(name, monkeypatch, tmp_path):
    """What ``megatron-dsv3 args`` prints (run as users run it) and what the test harness composes
    from the same recipe's model and layout parse into the same ``TransformerConfig``."""
    from megatron_dsv3.args.compose import megatron_argv
    from megatron_dsv3.args.settings import parse_megatron_args, transformer_config
    from megatron_dsv3.recipe import load_recipe, parallel_layout

    monkeypatch.setenv("MEGATRON_DSV3_CACHE", str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "megatron_dsv3.cli", "args", name, "--format", "lines"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    recipe = load_recipe(name)
    layout = parallel_layout(recipe)
    # Recompute and precision are training settings of the recipe; the harness takes them as extras.
    extra = [a for a in out if a in ("--bf16", "--use-distributed-optimizer")]
    if "--dsv3-fp8" in out:  # FP8 (an fp8: section) is a training setting too
        i = out.index("--dsv3-fp8")
        j = next((k for k in range(i + 1, len(out)) if out[k].startswith("--") and not out[k].startswith("--dsv3-fp8")), len(out))
        extra += out[i:j]
    if "--recompute-granularity" in out:
        i = out.index("--recompute-granularity")
        j = next((k for k in range(i + 1, len(out)) if out[k].startswith("--") and not out[k].startswith("--recompute")), len(out))
        extra += out[i:j]
    monkeypatch.setenv("WORLD_SIZE", str(layout.world_size))
    monkeypatch.setenv("RANK", "0")
    from conftest import gpu_machine

    with gpu_machine(monkeypatch, enabled=not recipe.is_cpu):
        harness = megatron_argv(recipe.preset, layout, backend=recipe.backend, cpu=recipe.is_cpu,
                                micro_batch_size=recipe.training.micro_batch_size)
        printed = transformer_config(parse_megatron_args(out[2:]))
        built = transformer_config(parse_megatron_args(harness[2:] + extra))
    assert _config_fields(printed) == _config_fields(built)


# ---- specs ----
def _tiny_config(experts: str = "auto", **overrides):
    from megatron_dsv3.args.compose import megatron_argv
    from megatron_dsv3.args.settings import parse_megatron_args, transformer_config
    from megatron_dsv3.model.presets import get_preset

    return transformer_config(parse_megatron_args(megatron_argv(get_preset("dsv3-tiny").with_overrides(**overrides),
                                                                cpu=True, experts=experts)))


@pytest.mark.quick
def test_building_a_spec_changes_nothing(megatron_single_process):
    from megatron.core.transformer import multi_latent_attention

    from megatron_dsv3 import dsv3
    from megatron_dsv3.runtime.catalog import all_changes

    config = _tiny_config()
    before = ({c.name: c.applied for c in all_changes()}, multi_latent_attention.Linear,
              multi_latent_attention.MLASelfAttention.__init__)
    dsv3(config)
    after = ({c.name: c.applied for c in all_changes()}, multi_latent_attention.Linear,
             multi_latent_attention.MLASelfAttention.__init__)
    assert before == after


@pytest.mark.parametrize("experts", ["sequential", "grouped"])
@pytest.mark.quick
def test_a_provider_swaps_every_linear_of_the_model(megatron_single_process, experts):
    """Attention (with MLA's down-projections), dense MLP, routed and shared experts and MTP's
    projection all come from the provider; only the output head, built by GPTModel, does not.
    Grouped routed experts are the provider's ``grouped_experts`` class, sequential ones
    ``SequentialMLP`` of the provider's linears."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_dsv3.model.grouped_experts import GroupedExperts
    from megatron_dsv3.model.linear import DuplicatedLinear
    from megatron_dsv3.model.providers import DSV3LocalSpecProvider
    from megatron_dsv3.model.spec import dsv3_block_spec

    class Grouped(GroupedExperts):
        pass

    class Column(ColumnParallelLinear):
        pass

    class Row(RowParallelLinear):
        pass

    class Replicated(DuplicatedLinear):
        pass

    class Recording(DSV3LocalSpecProvider):
        def column_parallel_linear(self):
            return Column

        def row_parallel_linear(self):
            return Row

        def linear(self):
            return Replicated

        grouped_experts = Grouped

    config = _tiny_config(experts)
    spec = dsv3_block_spec(config, pp_rank=0, provider=Recording())
    model = GPTModel(config=config, transformer_layer_spec=spec, mtp_block_spec=spec.mtp_block_spec,
                     vocab_size=4096, max_sequence_length=128, position_embedding_type="rope")
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, (ColumnParallelLinear, RowParallelLinear, DuplicatedLinear))}
    assert {n for n, m in linears.items() if not isinstance(m, (Column, Row, Replicated))} == {"output_layer"}
    kinds = {type(m).__name__ for m in linears.values()}
    assert kinds == {"Column", "Row", "Replicated", "ColumnParallelLinear"}
    names = " ".join(linears)
    routed = "local_experts.0.linear_fc1" if experts == "sequential" else "shared_experts.linear_fc1"
    for part in ("linear_q_down_proj", "linear_kv_down_proj", "linear_q_up_proj", "linear_kv_up_proj",
                 "linear_proj", "mlp.linear_fc1", routed, "shared_experts.linear_fc2", "mtp.layers.0.eh_proj"):
        assert part in names, part
    routed_experts = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    assert routed_experts and all(isinstance(m, Grouped) == (experts == "grouped") for m in routed_experts)


def _structure(spec):
    """A comparable tree of a spec: classes by identity, partials and specs by their parts."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(spec, ModuleSpec):
        return ("spec", id(spec.module), tuple(sorted(spec.params.items())), _structure(spec.submodules))
    if isinstance(spec, functools.partial):
        return ("partial", _structure(spec.func), tuple(_structure(a) for a in spec.args),
                tuple(sorted((k, _structure(v)) for k, v in spec.keywords.items())))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return (type(spec).__name__, tuple((f.name, _structure(getattr(spec, f.name))) for f in dataclasses.fields(spec)))
    if isinstance(spec, dict):
        return tuple(sorted((k, _structure(v)) for k, v in spec.items()))
    if hasattr(spec, "__func__") and hasattr(spec, "__self__"):  # a bound (class) method: made per lookup
        return ("method", id(spec.__func__), id(spec.__self__))
    return id(spec) if spec is not None else None


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_with_transformer_engines_provider_the_spec_is_megatrons_te_mla_layer(moe, monkeypatch):
    """Transformer Engine cannot be imported without a GPU; Megatron then stands its classes in with
    fixed placeholder objects, which is enough to compare the two trees leaf by leaf (the spec module
    only needs its provider name back, which it leaves unset without TE)."""
    from types import SimpleNamespace

    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_submodules

    from megatron_dsv3.model.spec import layer_spec

    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", TESpecProvider)

    config = SimpleNamespace(q_lora_rank=64, num_moe_experts=16, moe_grouped_gemm=True)
    ours = layer_spec(config, moe=moe, provider=TESpecProvider())
    megatron = get_gpt_layer_with_transformer_engine_submodules(
        num_experts=16 if moe else None, moe_grouped_gemm=True, qk_layernorm=True, multi_latent_attention=True)
    assert _structure(ours.submodules) == _structure(megatron)


@pytest.mark.quick
def test_auto_backend_names_the_import_error_of_a_broken_transformer_engine(monkeypatch):
    import importlib.util

    import torch

    from megatron_dsv3.model import backends

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "transformer_engine" else real_find_spec(name, *a))
    backends.transformer_engine_status.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert backends.resolve_backend("auto") == "local"
        text = " ".join(str(w.message) for w in caught)
        assert "installed but fails to import" in text and "No module named 'transformer_engine'" in text
        assert "--dsv3-backend local" in text
    finally:
        backends.transformer_engine_status.cache_clear()
