"""The one argument composer (recipe -> Megatron arguments) and what the plugin's options imply."""
