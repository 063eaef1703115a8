"""What the model learns: EDM preconditioning and loss, and the randomness of a training step."""
