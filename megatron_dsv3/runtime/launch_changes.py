"""Run-time changes applied when Megatron's training code is imported (group ``launch``)."""
