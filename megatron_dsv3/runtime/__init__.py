"""Every run-time change megatron-dsv3 makes to Megatron-Core and PyTorch lives in this package.

:mod:`megatron_dsv3.runtime.registry` records and applies changes; the definitions are in
``launch_changes`` (with ``ddp_changes``), ``model_changes``, ``cpu_changes`` (with ``cpu_cuda_changes``, ``cpu_gloo_changes``) and ``train_changes``
(with ``metrics_changes``), by group,
listed once in :mod:`megatron_dsv3.runtime.catalog`.
"""
