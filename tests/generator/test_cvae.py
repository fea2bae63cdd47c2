from __future__ import annotations

import torch

from generator.config import CVAEConfig
from generator.cvae import CVAE, cvae_loss


def _config(**kwargs: int) -> CVAEConfig:
    return CVAEConfig(lora_dim=3 + 5 + 2, cond_dim=6, chunk_sizes=(3, 5, 2), latent_dim=4, hidden_dim=32, **kwargs)


def test_chunks_round_trip_with_zero_padding() -> None:
    model = CVAE(_config())
    x = torch.arange(10, dtype=torch.float32).unsqueeze(0) + 1
    chunks = model.to_chunks(x)
    assert chunks.shape == (1, 3, 5)
    assert chunks[0, 0].tolist() == [1, 2, 3, 0, 0]
    assert chunks[0, 2].tolist() == [9, 10, 0, 0, 0]
    assert torch.equal(model.from_chunks(chunks), x)


def test_shapes_and_loss() -> None:
    model = CVAE(_config())
    x, c = torch.randn(7, 10), torch.randn(7, 6)
    recon, mu, logvar = model(x, c)
    assert recon.shape == (7, 10) and mu.shape == (7, 4) and logvar.shape == (7, 4)
    total, recon_loss, kl = cvae_loss(recon, x, mu, logvar, kl_weight=0.5)
    assert torch.isclose(total, recon_loss + 0.5 * kl)


def test_learns_a_conditional_mapping() -> None:
    torch.manual_seed(0)
    model = CVAE(_config(basis_rank=2))
    conds = torch.eye(6)[:4]
    targets = torch.randn(4, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        recon, mu, logvar = model(targets, conds)
        loss, _, _ = cvae_loss(recon, targets, mu, logvar, kl_weight=1e-3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        decoded = model.decode(torch.zeros(4, 4), conds)
    assert torch.nn.functional.mse_loss(decoded, targets) < 0.05 * targets.var()
    # the condition, not the latent, carries which target comes out
    assert (decoded[0] - targets[0]).norm() < (decoded[0] - targets[1]).norm()
