"""Wiring into unmodified Megatron-LM: the start-up hook and the public ``activate()``.

``megatron_dsv3.launch.activate()`` is the name the start-up hook (``_megatron_dsv3_hook.py``,
installed as ``megatron-dsv3.pth``) and the explicit patch in ``patches/`` call; it is
:func:`megatron_dsv3.runtime.activation.activate`, which applies the ``launch`` and ``model`` groups of
run-time changes.  :mod:`megatron_dsv3.launch.hook` installs, removes and inspects the hook.
"""

from __future__ import annotations

from megatron_dsv3.runtime.activation import activate, activated_by

__all__ = ["activate", "activated_by"]
