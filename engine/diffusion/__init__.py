"""What the model learns: EDM preconditioning and loss, the initial-step model's loss, and the randomness of a training
step."""
