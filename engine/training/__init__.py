"""The training loop's parts: step, optimizer, EMA, checkpoints, FSDP2 parallelism, metrics, seeding."""
