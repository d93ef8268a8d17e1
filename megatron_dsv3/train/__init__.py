"""The main job: ``megatron-dsv3 train`` on Megatron's own training loop."""
