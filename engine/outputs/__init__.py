"""What a run writes for people to look at: images, grids, loss curves."""
