"""A small hybrid language model in PyTorch: Phalanx mixers interleaved with causal attention.

Token embedding -> ``depth`` pre-norm residual blocks (every ``attn_every``-th block mixes with
causal softmax attention, the others with :class:`~swr_array.adapters.torch.Phalanx`) -> final norm
-> LM head. Trained for a few steps on one fixed batch of random tokens, so the loss visibly falls.

Run ``python examples/torch_hybrid.py --steps 20`` (add ``--device cuda`` on a GPU, ``--compile``
for ``torch.compile(fullgraph=True)``). On the CPU the recurrence runs the NumPy reference, on CUDA
the Numba kernels, on torch's current stream.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from swr_array.adapters.torch import Phalanx
from torch import nn


class CausalAttention(nn.Module):
    """Multi-head causal self-attention (global: the long-range half of the hybrid)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, dim = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, dim // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.out(y.transpose(1, 2).reshape(B, L, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.up = nn.Linear(dim, mult * dim, bias=False)
        self.down = nn.Linear(mult * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, mixer: nn.Module):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim)
        self.mixer = mixer
        self.norm2 = nn.RMSNorm(dim)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HybridLM(nn.Module):
    """tokens (B, L) int64 -> logits (B, L, vocab_size)."""

    def __init__(
        self,
        vocab_size: int = 64,
        dim: int = 32,
        depth: int = 4,
        attn_every: int = 4,
        attn_heads: int = 4,
        head_dim: int = 8,
        kv_heads: int = 2,
        block_len: int = 8,
        hops: int = 1,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList()
        for i in range(depth):
            if (i + 1) % attn_every == 0:
                mixer: nn.Module = CausalAttention(dim, attn_heads)
            else:
                # drop-in for a causal sliding-window attention block with a window of about
                # (hops + 1/2) * block_len tokens
                mixer = Phalanx(
                    dim, head_dim=head_dim, kv_heads=kv_heads, block_len=block_len, hops=hops
                )
            self.blocks.append(Block(dim, mixer))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def train(
    steps: int = 20,
    *,
    batch: int = 4,
    length: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    device: str = "cpu",
    compile: bool = False,
    **model_kwargs,
) -> list[float]:
    """Train a fresh HybridLM on one fixed batch of random tokens; returns the loss per step."""
    torch.manual_seed(seed)
    model = HybridLM(**model_kwargs).to(device)
    step_model = torch.compile(model, fullgraph=True) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    vocab = model.lm_head.out_features
    tokens = torch.randint(vocab, (batch, length + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    losses = []
    for step in range(steps):
        logits = step_model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 5 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    train(args.steps, device=args.device, compile=args.compile)
