"""ddpm: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020) in PyTorch."""

from ddpm.diffusion import GaussianDiffusion, LossType, MeanType, VarType
from ddpm.schedule import beta_schedule

__all__ = ["beta_schedule", "GaussianDiffusion", "MeanType", "VarType", "LossType", "UNet", "load_run"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The network and the run loader import more (torch.nn modules, safetensors); load them on first use.
    if name == "UNet":
        from ddpm.nn import UNet

        return UNet
    if name == "load_run":
        from ddpm.run import load_run

        return load_run
    raise AttributeError(f"module 'ddpm' has no attribute {name!r}")
