"""Start-up hook of megatron-dsv3, run by ``megatron-dsv3.pth`` in every Python process.

It must cost next to nothing in a process that never touches Megatron: it imports nothing but
``os`` and ``sys`` (both already loaded), and adds one entry to ``sys.meta_path`` that compares
module names.  When ``megatron.training`` finishes importing, it calls
``megatron_dsv3.launch.activate()``, which makes ``--spec dsv3`` and the plugin's options work in
stock Megatron-LM.  ``MEGATRON_DSV3_HOOK=0`` turns it off.  Any failure becomes a warning: the hook
never breaks the interpreter or Megatron's own behaviour.
"""

import os
import sys

_TRIGGER = "megatron.training"
_OFF = ("0", "false", "no", "off")


class _MegatronTrainingWatcher:
    """A meta-path finder that only watches for ``megatron.training`` and finds nothing itself."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != _TRIGGER:
            return None
        _remove()
        try:
            for finder in list(sys.meta_path):  # the finders that would have found it
                find_spec = getattr(finder, "find_spec", None)
                spec = find_spec(name, path, target) if find_spec else None
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


def _remove():
    try:
        sys.meta_path.remove(_MegatronTrainingWatcher)
    except ValueError:
        pass


def install():
    if os.environ.get("MEGATRON_DSV3_HOOK", "1").strip().lower() in _OFF:
        return
    if _TRIGGER in sys.modules:  # already imported (e.g. the hook was installed mid-process)
        return
    if _MegatronTrainingWatcher not in sys.meta_path:
        sys.meta_path.insert(0, _MegatronTrainingWatcher)


try:
    install()
except Exception as _err:  # never break the interpreter
    _warn(_err)
