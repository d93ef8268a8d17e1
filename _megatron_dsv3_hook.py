"""Start-up hook of megatron-dsv3: activates the plugin when Megatron's training code is imported.

``megatron-dsv3.pth`` (installed into site-packages) runs one line, ``PTH_LINE`` below, in every
Python process.  To cost almost nothing in a process that never touches Megatron, that line only
puts a tiny watcher on ``sys.meta_path`` (a class made with ``type()``, no import): it looks at
each imported module's name and, for ``megatron.training`` alone, imports this module and calls
:func:`find_spec`.  That finds Megatron's real module, wraps its loader, and after
``megatron.training`` has run calls ``megatron_dsv3.launch.activate()``, which makes
``--spec dsv3`` and the plugin's options work in stock Megatron-LM.

``MEGATRON_DSV3_HOOK=0`` turns the hook off.  Any failure becomes a warning: the hook never
breaks the interpreter or Megatron's own behaviour.
"""

import sys

TRIGGER = "megatron.training"
WATCHER = "_MegatronDSV3Watcher"

# The single line of megatron-dsv3.pth (site runs .pth lines that start with "import").
# Some environments process the same site-packages twice (a venv's lib64 -> lib link): one watcher.
PTH_LINE = (
    "import os, sys; os.environ.get('MEGATRON_DSV3_HOOK', '1').strip().lower() in ('0', 'false', 'no',"
    " 'off') or 'megatron.training' in sys.modules or any(getattr(f, '__name__', '') == '" + WATCHER +
    "' for f in sys.meta_path) or sys.meta_path.insert(0, type('" + WATCHER + "',"
    " (), {'find_spec': staticmethod(lambda name, path=None, target=None: __import__("
    "'_megatron_dsv3_hook').find_spec(name, path, target) if name == 'megatron.training' else None)}))\n"
)


def find_spec(name, path=None, target=None):
    """The spec of ``megatron.training`` with a loader that activates the plugin afterwards."""
    _remove_watchers()
    if name != TRIGGER:
        return None
    try:
        for finder in list(sys.meta_path):  # the finders that would have found it
            finder_find_spec = getattr(finder, "find_spec", None)
            spec = finder_find_spec(name, path, target) if finder_find_spec else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ActivatingLoader(spec.loader)
                return spec
    except Exception as err:  # fall back to the normal import machinery
        _warn(err)
    return None


class _ActivatingLoader:
    """Wraps the real loader of ``megatron.training``; activates the plugin after it has run."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            import megatron_dsv3.launch as launch

            launch.activate(source="start-up hook")
        except Exception as err:
            _warn(err)


def _warn(err):
    import warnings

    warnings.warn(
        f"megatron-dsv3: the start-up hook could not activate ({type(err).__name__}: {err}); "
        "`--spec dsv3` will not be available. Set MEGATRON_DSV3_HOOK=0 to silence this, or "
        "call megatron_dsv3.launch.activate() yourself.",
        RuntimeWarning,
        stacklevel=2,
    )


def _remove_watchers():
    sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "__name__", None) != WATCHER]
