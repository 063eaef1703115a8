"""How images come out of a trained model: samplers and classifier-free guidance."""
