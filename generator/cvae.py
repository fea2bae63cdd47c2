"""The conditional VAE over flat, normalised LoRA vectors.

Shapes: B = batch, D = LoRA vector length, K = number of chunks (LoRA matrices), M = largest chunk, C = condition
size, H = hidden size, Z = latent size, E = chunk embedding size, R = per-chunk basis rank.

The vector is cut into K chunks of different sizes, padded to M. The encoder reads every chunk with one shared
linear map (plus its chunk embedding) and pools; the decoder turns (z, c) into one task code, then each chunk's
values come from a shared head (task code + chunk embedding -> M values) plus a small chunk-specific basis of rank
R. Parameter count grows with M * H + D * R rather than D * H, which keeps generators for deep models small.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from generator.config import CVAEConfig


class CVAE(nn.Module):
    """``with_encoder=False`` builds the decoder alone: all that generation needs (a packaged generator ships without
    the encoder, which only reconstruction training uses)."""

    pad_index: torch.Tensor
    valid: torch.Tensor

    def __init__(self, config: CVAEConfig, with_encoder: bool = True) -> None:
        super().__init__()
        self.config = config
        sizes = torch.tensor(config.chunk_sizes)
        k, m = len(config.chunk_sizes), int(sizes.max())
        h, e, z, c = config.hidden_dim, config.chunk_embedding_dim, config.latent_dim, config.cond_dim
        self.num_chunks, self.max_chunk = k, m
        # gather index: padded [K, M] position -> flat position (D means "padding", read from an appended zero)
        offsets = torch.cumsum(sizes, 0) - sizes
        cols = torch.arange(m)
        index = torch.where(cols < sizes[:, None], offsets[:, None] + cols, torch.full_like(cols, config.lora_dim))
        self.register_buffer("pad_index", index, persistent=False)  # [K, M]
        self.register_buffer("valid", cols < sizes[:, None], persistent=False)  # [K, M]

        self.chunk_embedding = nn.Embedding(k, e)
        self.cond_proj = nn.Sequential(nn.Linear(c, h), nn.SiLU(), nn.Linear(h, h))
        # encoder q(z | x, c)
        self.enc_chunk = nn.Linear(m + e, h) if with_encoder else None
        self.enc_out = nn.Sequential(nn.Linear(2 * h, h), nn.SiLU(), nn.Linear(h, 2 * z)) if with_encoder else None
        # decoder p(x | z, c)
        self.dec_task = nn.Sequential(nn.Linear(z + h, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU())
        self.dec_chunk = nn.Sequential(nn.Linear(h + e, h), nn.SiLU())
        self.dec_shared = nn.Linear(h, m)
        rank = config.basis_rank
        self.dec_coeff = nn.Linear(h, k * rank) if rank > 0 else None
        self.basis = nn.Parameter(torch.zeros(k, rank, m)) if rank > 0 else None  # zero: starts as the shared head

    def to_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D] -> [B, K, M], zeros in the padding."""
        padded = F.pad(x, (0, 1))  # [B, D + 1], the last column is the zero read by padding positions
        return padded[:, self.pad_index]

    def from_chunks(self, chunks: torch.Tensor) -> torch.Tensor:
        """[B, K, M] -> [B, D]."""
        return chunks[:, self.valid]

    def encode(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, D], cond [B, C] -> mu, logvar [B, Z]."""
        if self.enc_chunk is None or self.enc_out is None:
            raise RuntimeError("this CVAE was built without its encoder (a packaged generator): it can only decode")
        chunks = self.to_chunks(x)  # [B, K, M]
        emb = self.chunk_embedding.weight.expand(x.shape[0], -1, -1)  # [B, K, E]
        per_chunk = F.silu(self.enc_chunk(torch.cat([chunks, emb], dim=-1)))  # [B, K, H]
        pooled = per_chunk.mean(dim=1)  # [B, H]
        mu, logvar = self.enc_out(torch.cat([pooled, self.cond_proj(cond)], dim=-1)).chunk(2, dim=-1)
        return mu, logvar.clamp(-12.0, 6.0)

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """z [B, Z], cond [B, C] -> normalised LoRA vectors [B, D]."""
        task = self.dec_task(torch.cat([z, self.cond_proj(cond)], dim=-1))  # [B, H]
        b = task.shape[0]
        emb = self.chunk_embedding.weight.expand(b, -1, -1)  # [B, K, E]
        per_chunk = self.dec_chunk(torch.cat([task[:, None, :].expand(-1, self.num_chunks, -1), emb], dim=-1))
        chunks = self.dec_shared(per_chunk)  # [B, K, M]
        if self.dec_coeff is not None and self.basis is not None:
            coeff = self.dec_coeff(task).view(b, self.num_chunks, -1)  # [B, K, R]
            chunks = chunks + torch.einsum("bkr,krm->bkm", coeff, self.basis)
        return self.from_chunks(chunks)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x, cond)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z, cond), mu, logvar


def cvae_loss(
    recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, kl_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean squared reconstruction error per element + ``kl_weight`` * KL(q(z|x,c) || N(0, I)) per latent unit."""
    recon_loss = F.mse_loss(recon, target)
    kl = -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())
    return recon_loss + kl_weight * kl, recon_loss, kl
