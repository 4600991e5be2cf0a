"""torch.compile for a network, for training or for sampling: an option, off by default.

On a GPU, Inductor fuses the elementwise work between the convolutions (group norm, swish, dropout, the
residual sums) into generated kernels. For sampling on CUDA the compiled network also runs as a CUDA graph
(mode "reduce-overhead"): one launch replays every kernel of a network call, one graph per input shape. On the
CPU our own kernels (Winograd convolutions, the fused group-norm kernel) already do that work; inside a compiled
graph they step aside for torch's operators, which Inductor then compiles, and it does not pay there: the
CIFAR-10 network trained at 0.72x and sampled at 0.75x of its eager speed after three minutes of compilation
on 2 cores (benchmarks/RESULTS.md).

The parameters stay the network's own: the state dict keeps its keys, and the EMA, the checkpoints and the
optimizer see the plain module.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

# torch.compile's backend: Inductor, unless DDPM_COMPILE_BACKEND names another ("aot_eager": the same tracing
# without code generation, seconds instead of minutes; the tests use it, torchrun'd ones through the variable)
BACKEND = os.environ.get("DDPM_COMPILE_BACKEND", "inductor")


def compile_network(net: nn.Module, *, sampling: bool = False) -> Callable[..., torch.Tensor]:
    """`net` compiled by torch.compile, called as `net` is (a DistributedDataParallel wrapper included).

    sampling=True on CUDA: mode "reduce-overhead" (CUDA graphs). A graph writes its outputs into memory that
    its next replay writes again, so each output is cloned before it is returned: a sampler may keep one
    step's prediction while it calls the network for the next."""
    param = next(net.parameters(), None)
    cuda_graphs = sampling and param is not None and param.device.type == "cuda" and BACKEND == "inductor"
    compiled = torch.compile(net, backend=BACKEND, mode="reduce-overhead" if cuda_graphs else None)
    if not cuda_graphs:
        return compiled

    def call(*args, **kwargs) -> torch.Tensor:
        return compiled(*args, **kwargs).clone()

    return call
