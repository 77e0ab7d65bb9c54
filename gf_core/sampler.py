"""The few-step flow-matching schedule of the chunk-wise causal Wan models and the loop of one chunk.

Self-Forcing, LongLive and Anchor Forcing denoise each chunk in four steps. Their timesteps
come from a 1000-entry shifted table, ``sigma'(u) = s u / (1 + (s - 1) u)`` with ``s = 5``,
indexed at ``1000 - [1000, 750, 500, 250]``; the model receives the fractional timesteps
``1000 * sigma`` (1000, 937.5, 833.33, 625). The table is built in float32 exactly as the
references build it, so every timestep and sigma is bit-identical to theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import BadInput

DENOISING_STEPS = (1000, 750, 500, 250)


def shifted_table(shift: float = 5.0, train_steps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps) of the shifted flow-matching table, float32 [train_steps] each."""
    sigmas = torch.linspace(1.0, 0.0, train_steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas, sigmas * train_steps


@dataclass(frozen=True)
class Schedule:
    """Timesteps and sigmas of the denoising steps (float32 [S] each) and the cache-pass timestep."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor
    context_timestep: float = 0.0

    @classmethod
    def few_step(
        cls, steps: tuple[int, ...] = DENOISING_STEPS, shift: float = 5.0, context_timestep: float = 0.0
    ) -> Schedule:
        if not steps or any(not 0 < s <= 1000 for s in steps):
            raise BadInput(f"denoising steps {steps} must be integers in (0, 1000]; the default is {DENOISING_STEPS}")
        sigmas, timesteps = shifted_table(shift)
        index = 1000 - torch.tensor(steps, dtype=torch.long)
        return cls(timesteps=timesteps[index], sigmas=sigmas[index], context_timestep=context_timestep)

    def __len__(self) -> int:
        return int(self.timesteps.numel())


def to_x0(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = x - sigma * v in float64, cast to the velocity's dtype (as the references do)."""
    return (x.double() - sigma.double() * velocity.double()).to(velocity.dtype)


def renoise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(1 - sigma) x0 + sigma eps computed in float32, cast to the noise dtype (as the references do)."""
    s = sigma.float()
    return ((1 - s) * x0.float() + s * eps.float()).to(eps.dtype)


def denoise_chunk(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    sigmas: torch.Tensor,
    draw_noise: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """The few-step loop of one chunk: from ``noise`` [B, C, F, H, W], for every step i the model's
    velocity at ``timesteps[i]`` gives x0 (:func:`to_x0`); every step but the last re-noises x0 to
    ``sigmas[i + 1]`` with a fresh draw (:func:`renoise`). Returns the last x0 [B, C, F, H, W].

    ``velocity(x, t)`` runs the model on x at the scalar timestep t; ``draw_noise()`` returns the
    next re-noise tensor in x's layout (the run's draw order decides where it comes from).
    """
    x = noise
    steps = timesteps.numel()
    for i in range(steps):
        x0 = to_x0(x, velocity(x, timesteps[i]), sigmas[i])
        if i + 1 < steps:
            x = renoise(x0, draw_noise(), sigmas[i + 1])
    return x0
