"""EDM (Karras et al. 2022) as MicroDiT trains it: log-normal sigma, preconditioned denoiser, and the per-patch loss on
the patches kept by deferred masking. Other prediction targets and loss weightings (engine/diffusion/targets.py) change
c_skip, c_out and the weight only; data average-pooled to a lower resolution, and the nested model's streams, are
engine/diffusion/nested.py's."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import DiffusionConfig
from engine.diffusion.lowres import Conditioned, lowres_image
from engine.diffusion.noise import StepNoise
from engine.diffusion.targets import loss_weight, skip_and_out


@dataclass(frozen=True)
class EDM:
    """Defaults are the config tree's (engine/config/__init__.py DiffusionConfig): one source of truth."""

    sigma_data: float = DiffusionConfig.sigma_data
    p_mean: float = DiffusionConfig.p_mean
    p_std: float = DiffusionConfig.p_std
    sigma_min: float = DiffusionConfig.sigma_min
    sigma_max: float = DiffusionConfig.sigma_max
    objective: str = DiffusionConfig.objective  # 'init_step': SingDiffusion's model (engine/diffusion/init_step.py)
    target: str = DiffusionConfig.target  # what F predicts: only c_skip and c_out depend on it
    weighting: str = DiffusionConfig.weighting  # the loss weight of the squared error of D
    sigma_range: tuple = ()  # (lo, hi), None = unbounded: training draws only lo <= sigma < hi
    resolutions: tuple = ()  # low to high; () = the data's own size
    resolution_loss_weights: tuple = ()  # () = 1 each
    schedule_shift_power: float = DiffusionConfig.schedule_shift_power
    lowres_condition: int = DiffusionConfig.lowres_condition  # conditioned on the image pooled to this side; 0 = off
    lowres_aug: float = DiffusionConfig.lowres_aug  # largest noise level added to that condition in training

    @classmethod
    def from_config(cls, d: DiffusionConfig) -> "EDM":
        return cls(sigma_data=d.sigma_data, p_mean=d.p_mean, p_std=d.p_std, sigma_min=d.sigma_min,
                   sigma_max=d.sigma_max, objective=d.objective, target=d.target, weighting=d.weighting,
                   sigma_range=tuple(d.sigma_range), resolutions=tuple(d.resolutions),
                   resolution_loss_weights=tuple(d.resolution_loss_weights),
                   schedule_shift_power=d.schedule_shift_power, lowres_condition=d.lowres_condition,
                   lowres_aug=d.lowres_aug)

    @property
    def nested(self) -> bool:
        """Two resolutions: the nested model's streams (engine/diffusion/nested.py)."""
        return len(self.resolutions) > 1

    def stream_sizes(self, image_size: int) -> list[int]:
        """The side of each stream the model denoises, low to high, for data of side `image_size`."""
        return list(self.resolutions) or [image_size]

    def precondition(self, sigma: torch.Tensor):
        """c_skip, c_out, c_in, c_noise for sigma of shape (B,); the first three broadcast over (B, ...)."""
        sd2, s2 = self.sigma_data**2, sigma**2
        if self.target == "edm":
            c_skip = sd2 / (s2 + sd2)
            c_out = sigma * self.sigma_data / (s2 + sd2).sqrt()
        else:
            c_skip, c_out = skip_and_out(self.target, sigma, self.sigma_data)
        c_in = 1 / (s2 + sd2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.weighting != "edm":
            return loss_weight(self.weighting, sigma, self.sigma_data)
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def denoise_tokens(self, model, x_noisy, sigma, y, y_mask, keep_idx=None):
        """D(x; sigma) on the kept tokens: returns (B, K, p²·C) denoised patch values."""
        c_skip, c_out, c_in, c_noise = self.precondition(sigma)
        f = model(x_noisy * c_in.view(-1, 1, 1, 1), c_noise, y, y_mask, keep_idx)  # (B, K, P)
        skip = model.patchify(x_noisy)  # (B, N, P)
        if keep_idx is not None:
            skip = model.gather_fn(skip, keep_idx)  # (B, K, P)
        return c_skip.view(-1, 1, 1) * skip + c_out.view(-1, 1, 1) * f.float()

    def denoise(self, model, x_noisy, sigma, y, y_mask):
        """D(x; sigma) as an image (B, C, H, W) (no masking: sampling needs every patch); a nested model's state is
        its streams packed into (B, D) (engine/diffusion/nested.py), and so is its D."""
        if self.nested:
            from engine.diffusion.nested import denoise_packed
            return denoise_packed(self, model, x_noisy, sigma, y, y_mask)
        return model.unpatchify(self.denoise_tokens(model, x_noisy, sigma, y, y_mask))

    def loss(self, model, x0, y, y_mask, noise: StepNoise) -> torch.Tensor:
        """Weighted squared error averaged over every value of every kept patch (= mean of per-patch losses)."""
        if self.objective == "init_step":
            from engine.diffusion.init_step import init_step_loss
            return init_step_loss(self, model, x0, y, y_mask, noise)
        if self.resolutions:
            from engine.diffusion.nested import multires_loss
            return multires_loss(self, model, x0, y, y_mask, noise)
        return self.stream_loss(model, x0, y, y_mask, noise)

    def stream_loss(self, model, x0, y, y_mask, noise: StepNoise) -> torch.Tensor:
        """The loss of one stream: x0 at the model's size, noise.noise and noise.sigma."""
        return self.loss_terms(model, x0, y, y_mask, noise)[0]

    def loss_terms(self, model, x0, y, y_mask, noise: StepNoise):
        """(loss, denoised, target) of one stream: the EDM loss and the (B, K, P) predicted and true values of the kept
        patches it compares, for losses over the same predictions (SADM's batch structure)."""
        sigma = noise.sigma
        if self.lowres_condition:  # a super-resolution stage: conditioned on x0's own pooled copy
            model = Conditioned(model, lowres_image(x0, self.lowres_condition, noise.cond_noise, noise.cond_level))
        x_noisy = x0 + noise.noise * sigma.view(-1, 1, 1, 1)
        denoised = self.denoise_tokens(model, x_noisy, sigma, y, y_mask, noise.keep_idx)  # (B, K, P)
        target = model.patchify(x0)
        if noise.keep_idx is not None:
            target = model.gather_fn(target, noise.keep_idx)  # loss only on kept patches
        err = (denoised - target.float()) ** 2
        return (self.loss_weight(sigma).view(-1, 1, 1) * err).mean(), denoised, target.float()
