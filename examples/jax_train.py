"""A jitted training step for a tiny Phalanx model with Flax NNX and optax.

The task suits a sliding window recurrence: predict the sum of the last 8 values of the first input
channel. Run ``python examples/jax_train.py --steps 100``; on a CUDA GPU the Phalanx layer and its
gradient run in the front's fused kernels (``swr_array.phalanx`` / ``phalanx_vjp``) inside the
compiled step, on the CPU the recurrence runs in the NumPy reference.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from swr_array.adapters.jax import Phalanx


class TinyModel(nnx.Module):
    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.mixer = Phalanx(dim, head_dim=8, kv_heads=1, block_len=8, hops=1, rngs=rngs)
        self.head = nnx.Linear(dim, 1, rngs=rngs)

    def __call__(self, x):  # (B, L, dim) -> (B, L)
        return self.head(x + self.mixer(self.norm(x)))[..., 0]


def make_batch(key, batch=8, length=64, dim=16, window=8):
    x = jax.random.normal(key, (batch, length, dim))
    c = jnp.cumsum(x[..., 0], axis=1)
    target = c - jnp.pad(c, ((0, 0), (window, 0)))[:, :length]  # sum of the last `window` values
    return x, target


def main(steps: int = 100, dim: int = 16, lr: float = 1e-2, seed: int = 0) -> list[float]:
    model = TinyModel(dim, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)  # the functional view: a static graph + a pytree
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, x, y):
        def loss_fn(params):
            return jnp.mean((nnx.merge(graphdef, params)(x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    x, y = make_batch(jax.random.key(seed + 1), dim=dim)  # one fixed batch: watch it fit
    losses = []
    for step in range(steps):
        params, opt_state, loss = train_step(params, opt_state, x, y)
        losses.append(float(loss))
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}")
    nnx.update(model, params)  # back into the module, e.g. for inference
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    main(parser.parse_args().steps)
