"""The anchor: the HF Diffusion Models Course (unit 1) training loop, with diffusers' UNet2DModel.

As the course notebook trains: a shuffled DataLoader, images to [-1, 1], ``DDPMScheduler.add_noise``
(squaredcos_cap_v2, 1000 steps), the UNet predicts the noise, MSE, AdamW, ``loss.item()`` every step.
The data is the same uint8 array the project's loop reads (already decoded and resized), so neither
loop pays for image decoding. Benchmark only: diffusers is the ``bench`` extra.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def course_unet(channels: int, resolution: int, base_channels: int, channel_mults, blocks_per_level: int,
                attention_resolutions, attention_heads: int):
    """diffusers' UNet2DModel in the same layout as ``ddpm.unet.UNet`` with these arguments."""
    from diffusers import UNet2DModel

    levels = [resolution // 2**i for i in range(len(channel_mults))]
    with_attn = [r in attention_resolutions for r in levels]
    widths = tuple(base_channels * m for m in channel_mults)
    return UNet2DModel(
        sample_size=resolution, in_channels=channels, out_channels=channels, layers_per_block=blocks_per_level,
        block_out_channels=widths,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in with_attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attn)),
        attention_head_dim=widths[-1] // attention_heads,
    )


class CourseLoop:
    """``run(steps)`` trains ``steps`` steps the course's way and returns the losses."""

    def __init__(self, unet, images: np.ndarray, batch_size: int, device: torch.device,
                 amp_dtype: torch.dtype | None = None, seed: int = 0):
        from diffusers import DDPMScheduler

        torch.manual_seed(seed)
        self.unet, self.device, self.amp_dtype = unet.to(device).train(), device, amp_dtype
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=4e-4)
        dataset = torch.utils.data.TensorDataset(torch.from_numpy(np.asarray(images)))
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
        self._batches = iter(self.loader)

    def _next(self) -> torch.Tensor:
        try:
            return next(self._batches)[0]
        except StopIteration:
            self._batches = iter(self.loader)
            return next(self._batches)[0]

    def run(self, steps: int) -> list[float]:
        losses = []
        for _ in range(steps):
            clean = self._next().to(self.device).float().div(127.5).sub(1)
            noise = torch.randn(clean.shape, device=self.device)
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (clean.shape[0],),
                                      device=self.device).long()
            noisy = self.scheduler.add_noise(clean, noise, timesteps)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                pred = self.unet(noisy, timesteps, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise)
            loss.backward()
            losses.append(loss.item())
            self.opt.step()
            self.opt.zero_grad()
        return losses
