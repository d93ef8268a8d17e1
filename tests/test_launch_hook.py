"""The start-up hook in fresh interpreters: `--spec dsv3` through Megatron's own argument parsing.

Each test starts a new Python process, as `torchrun pretrain_gpt.py` would, so that what the
installed ``megatron-dsv3.pth`` does at start-up is what is tested.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_dsv3.launch import hook

pytestmark = pytest.mark.skipif(
    not hook.status()["installed"],
    reason="the start-up hook is not installed in this environment: run `megatron-dsv3 hook install`",
)

# What pretrain_gpt.py does with its arguments (megatron-core 0.19): parse, validate, build the
# model config; the spec is imported in gpt_config_from_args.
_PRETRAIN_GPT_ARGS = textwrap.dedent(
    """
    import contextlib, io, sys
    from megatron_dsv3.args.compose import megatron_argv
    spec = sys.argv[1:]
    argv = megatron_argv("dsv3-tiny", cpu=True)
    assert argv[:2] == ["--spec", "dsv3"]
    sys.argv = ["pretrain_gpt.py", "--spec", *spec] + argv[2:] + [
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--train-iters", "1", "--global-batch-size", "1"]
    from megatron.training.arguments import parse_and_validate_args
    from megatron.training.argument_utils import gpt_config_from_args
    with contextlib.redirect_stdout(io.StringIO()):
        args = parse_and_validate_args()
    config = gpt_config_from_args(args)
    import megatron_dsv3, megatron_dsv3.launch
    print("RESOLVED", config.transformer_layer_spec is megatron_dsv3.dsv3)
    print("ACTIVATED-BY", megatron_dsv3.launch.activated_by())
    print("BACKEND", args.transformer_impl)
    """
)


def _python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, WORLD_SIZE="1", RANK="0", TORCHDYNAMO_DISABLE="1", **(env or {}))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=full_env, timeout=300)


@pytest.mark.parametrize("spec", [["dsv3"], ["megatron_dsv3", "dsv3"]], ids=["one-token", "module-name-pair"])
def test_megatron_argument_parsing_resolves_spec_to_dsv3(spec):
    out = _python(_PRETRAIN_GPT_ARGS, *spec)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RESOLVED True" in out.stdout
    assert "ACTIVATED-BY start-up hook" in out.stdout
    assert "BACKEND local" in out.stdout  # --dsv3-backend local from the plugin's argument group


def test_unknown_spec_name_is_an_error_listing_the_registered_specs():
    out = _python(_PRETRAIN_GPT_ARGS, "dsv4")
    assert out.returncode != 0
    assert "unknown spec 'dsv4'" in out.stderr
    assert "registered specs (dsv3)" in out.stderr and "did you mean 'dsv3'" in out.stderr


def test_failed_module_import_is_an_error_not_a_silent_fallback():
    out = _python(_PRETRAIN_GPT_ARGS, "no_such_module", "dsv3")
    assert out.returncode != 0
    assert "cannot import module 'no_such_module'" in out.stderr


def test_environment_switch_turns_the_hook_off():
    code = textwrap.dedent(
        """
        import sys
        import megatron.training.arguments as a
        import argparse
        parser = a.add_megatron_arguments(argparse.ArgumentParser())
        print("OPTIONS", any(x.dest == "dsv3_backend" for x in parser._actions))
        print("IMPORTED", "megatron_dsv3" in sys.modules)
        """
    )
    on = _python(code)
    off = _python(code, env={"MEGATRON_DSV3_HOOK": "0"})
    assert "OPTIONS True" in on.stdout and "IMPORTED True" in on.stdout
    assert "OPTIONS False" in off.stdout and "IMPORTED False" in off.stdout


@pytest.mark.quick
def test_the_installed_pth_file_is_the_hooks_line():
    assert hook.pth_path().read_text() == hook.pth_line()
    repo_copy = Path(__file__).resolve().parents[1] / "megatron-dsv3.pth"
    assert repo_copy.read_text() == hook.pth_line()  # what setup.py ships


def test_a_process_that_never_imports_megatron_does_not_import_the_plugin():
    out = _python(
        "import sys; print(sorted(m for m in sys.modules if ('dsv3' in m or m.startswith(('torch', 'megatron')))"
        " and not m.startswith('__editable__')))"  # an editable install's own path finder
    )
    assert out.stdout.strip() == "[]"  # the .pth line only registers a watcher on sys.meta_path


@pytest.mark.parametrize("first", ["megatron_dsv3.model.build", "megatron_dsv3.testing.parallel",
                                   "megatron_dsv3.pipeline.runner", "megatron.training"])
def test_the_hook_activates_whichever_module_imports_megatron_training_first(first):
    """The hook fires while megatron.training is first imported, which may be from inside one of
    our own modules (a spawned worker's first import): activating must not need that module."""
    out = _python(f"import {first}, megatron.training, megatron_dsv3.launch as l; print('ACTIVATED', l.activated_by())")
    assert "could not activate" not in out.stderr, out.stderr[-2000:]
    assert "ACTIVATED start-up hook" in out.stdout


def test_a_broken_plugin_only_warns_and_megatron_still_imports():
    # Make the plugin's activation fail: its launch module cannot be imported.
    code = textwrap.dedent(
        """
        import sys
        class Broken:
            @staticmethod
            def find_spec(name, path=None, target=None):
                if name == "megatron_dsv3.launch":
                    raise ImportError("boom")
        sys.meta_path.insert(0, Broken)
        import megatron.training
        print("MEGATRON OK")
        """
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MEGATRON OK" in out.stdout
    assert "megatron-dsv3: the start-up hook could not activate (ImportError: boom)" in out.stderr


@pytest.mark.quick
def test_patch_for_megatron_lm_checkouts_calls_the_same_activation():
    patch = Path(__file__).resolve().parents[1] / "patches" / "megatron-lm-core_r0.19.x-pretrain_gpt.patch"
    added = [line[1:] for line in patch.read_text().splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert "import megatron_dsv3.launch" in added
    assert any(line.startswith("megatron_dsv3.launch.activate(") for line in added)
    removed = [line for line in patch.read_text().splitlines() if line.startswith("-") and not line.startswith("---")]
    assert removed == []  # the patch only adds the activation
