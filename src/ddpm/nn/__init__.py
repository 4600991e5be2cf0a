"""The networks. They know nothing of noise schedules."""

from ddpm.nn.unet import UNet, timestep_embedding

__all__ = ["UNet", "timestep_embedding"]
