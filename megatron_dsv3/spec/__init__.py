"""The ``dsv3`` layer spec (Megatron ``ModuleSpec`` trees) and its two backends."""
