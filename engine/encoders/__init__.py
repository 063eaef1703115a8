"""Text encoders and VAEs (transformers / diffusers, imported where used)."""
