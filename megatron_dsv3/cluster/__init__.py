"""Cluster jobs from a recipe: a Slurm batch script (``megatron-dsv3 slurm``), a Kubernetes JobSet
(``megatron-dsv3 k8s``), and the checks they run.

* :mod:`.request` checks what the user asked for (nodes, processes per node, partition, account,
  time limit, container image) against the recipe, before anything is written or submitted;
* :mod:`.slurm` writes the batch script: one ``torchrun`` per node under ``srun`` (c10d rendezvous
  on the first node), ``--requeue``, and a signal before the time limit that makes Megatron save
  a checkpoint and stop (``--exit-signal-handler``), so the requeued job resumes;
* :mod:`.k8s` writes the same job as a Kubernetes JobSet (``megatron-dsv3 k8s``);
* :mod:`.preflight` runs inside the job, on its own machine: the allocation Slurm gave against the
  recipe, then ``megatron-dsv3 check`` at the job's world size and the GPU's memory;
* :mod:`.commands` holds the subcommands (parsers and handlers), registered by :mod:`megatron_dsv3.cli`.

``docs/cluster.md`` shows the commands.
"""
