"""Wiring into unmodified Megatron-LM: ``--spec dsv3``, the plugin's options, the start-up hook."""
