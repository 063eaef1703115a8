"""How images come out of a trained model: solvers, noise-level schedules, start states and classifier-free guidance."""
