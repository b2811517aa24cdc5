"""A DDPM UNet (Ho et al. 2020, appendix B; Dhariwal & Nichol 2021 layout).

Residual blocks (GroupNorm, SiLU, 3x3 convs) with the timestep embedding added
in every block, self-attention at chosen resolutions, one down/up-sampling per
level boundary. Level i works at ``resolution / 2**i``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017, sec. 3.5) of timesteps t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.dropout = _norm(c_out), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention channels {channels} not divisible by attention_heads={heads}")
        self.heads, self.norm = heads, _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3 * self.heads, C // self.heads, H * W)  # (B, 3*nh, hs, HW)
        # one copy to (B, 3*nh, HW, hs): each head's rows are then dense, which the fused SDPA kernels
        # (flash, memory-efficient) require; strided views fall back to the slower math kernel
        q, k, v = qkv.transpose(-1, -2).contiguous().chunk(3, dim=1)  # each (B, nh, HW, hs)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, nh, HW, hs)
        return x + self.out(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    def __init__(
        self,
        channels: int,
        resolution: int,
        base_channels: int = 64,
        channel_mults: tuple[int, ...] = (1, 2, 2, 4),
        blocks_per_level: int = 2,
        attention_resolutions: tuple[int, ...] = (8, 4),
        attention_heads: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        levels = len(channel_mults)
        factor = 2 ** (levels - 1)
        if channels not in (1, 3):
            raise ValueError(f"channels={channels} is not supported; choose 1 or 3")
        if resolution % factor or resolution < factor:
            raise ValueError(
                f"resolution {resolution} is not supported by {levels} levels: it must be a positive "
                f"multiple of 2**(levels-1) = {factor} (for example {factor * 4}, {factor * 8})"
            )
        level_res = [resolution // 2**i for i in range(levels)]
        unused = sorted(set(attention_resolutions) - set(level_res))
        if unused:
            raise ValueError(f"attention_resolutions {unused} match no level; level resolutions are {level_res}")
        self.config = dict(
            channels=channels, resolution=resolution, base_channels=base_channels,
            channel_mults=list(channel_mults), blocks_per_level=blocks_per_level,
            attention_resolutions=list(attention_resolutions), attention_heads=attention_heads, dropout=dropout,
        )
        emb_dim = 4 * base_channels
        self.base_channels = base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(channels, base_channels, 3, padding=1)

        def attn(c: int, res: int) -> nn.Module:
            return Attention(c, attention_heads) if res in attention_resolutions else nn.Identity()

        self.down = nn.ModuleList()
        skips, c = [base_channels], base_channels
        for i, mult in enumerate(channel_mults):
            for _ in range(blocks_per_level):
                self.down.append(nn.ModuleList([ResBlock(c, base_channels * mult, emb_dim, dropout),
                                                attn(base_channels * mult, level_res[i])]))
                c = base_channels * mult
                skips.append(c)
            if i < levels - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout), Attention(c, attention_heads),
                                  ResBlock(c, c, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(blocks_per_level + 1):
                self.up.append(nn.ModuleList([ResBlock(c + skips.pop(), base_channels * mult, emb_dim, dropout),
                                              attn(base_channels * mult, level_res[i])]))
                c = base_channels * mult
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)))
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) in [-1, 1] scale; t: (B,) integer timesteps -> (B, C, H, W)."""
        emb = self.time_mlp(timestep_embedding(t, self.base_channels).to(x.dtype))  # (B, 4*base)
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, nn.ModuleList):
                block, attn = layer
                h = attn(block(h, emb))
            else:
                h = layer(h)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                block, attn = layer
                h = attn(block(torch.cat([h, hs.pop()], dim=1), emb))
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_unet(model_cfg, channels: int, resolution: int) -> UNet:
    """A UNet from the ``model`` section of params.yaml."""
    return UNet(
        channels=channels, resolution=resolution, base_channels=model_cfg.base_channels,
        channel_mults=tuple(model_cfg.channel_mults), blocks_per_level=model_cfg.blocks_per_level,
        attention_resolutions=model_cfg.attention_resolutions(resolution),
        attention_heads=model_cfg.attention_heads, dropout=model_cfg.dropout,
    )
