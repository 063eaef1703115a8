"""Networks split by noise level (Luhman & Luhman 2022, section 4.1): expert i denoises noise levels
boundaries[i] <= sigma < boundaries[i-1], expert 0 the highest. Every model evaluation picks its expert by its own
sigma, Heun's correction step included, so each expert is only ever asked about noise levels it was trained on
(diffusion.sigma_range, engine/training/experts.py)."""
from __future__ import annotations

import torch.nn as nn


class ExpertSwitch(nn.Module):
    """The experts of one pair (or more), highest noise first, and the noise levels where each hands over."""

    def __init__(self, experts: list[nn.Module], boundaries: list[float]):
        super().__init__()
        if len(boundaries) != len(experts) - 1 or any(a <= b for a, b in zip(boundaries, boundaries[1:])):
            raise ValueError(f"{len(experts)} experts need {len(experts) - 1} descending boundaries, got {boundaries}")
        self.experts = nn.ModuleList(experts)
        self.boundaries = list(boundaries)
        self.cfg = experts[0].cfg  # the experts share the image shape the sampler reads

    def at(self, sigma: float) -> nn.Module:
        """The expert of noise level sigma."""
        for expert, boundary in zip(self.experts, self.boundaries):
            if sigma >= boundary:
                return expert
        return self.experts[-1]
