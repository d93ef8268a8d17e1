"""Test and benchmark harness: multi-process gloo runs and Megatron training steps on CPU."""
