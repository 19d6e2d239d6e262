"""Generate with a small decoder LM: Phalanx and attention layers, prefill and a decode loop.

The model: token embedding -> ``depth`` pre-norm residual blocks (every ``attn_every``-th block
mixes with causal softmax attention over a static KV cache, the others with
:class:`~swr_array.adapters.torch.Phalanx`), each followed by a SwiGLU MLP, RMSNorm before every
sublayer -> final RMSNorm -> LM head. Weights are random (seeded) or a ``state_dict`` saved from
:class:`DecoderLM` (``--checkpoint``).

Generation prefills the prompt in one forward (``return_state=True`` for the Phalanx layers, the
prompt's keys and values written into the KV caches), then decodes greedily one token per step:
``Phalanx.step`` advances its fixed-size state in place and attention appends to its cache at the
position held on the device. On CUDA the whole step (every layer, the LM head and the argmax) is
captured once in a CUDA graph and replayed per token; on the CPU it runs eagerly.

    python examples/generate.py --device cuda --dtype bfloat16 --batch 8 --new-tokens 256
    python examples/generate.py                          # CPU, tiny, no graphs

Prints the generated token ids of the first row and the decode throughput in tokens/s.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from swr_array.adapters.torch import Phalanx
from torch import nn


class Attention(nn.Module):
    """Causal multi-head attention with a static KV cache ``(B, heads, max_len, head_dim)``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def _qkv(self, x):
        B, L, dim = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, dim // self.heads).unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, cache=None):
        """Full causal attention over x; with ``cache`` its keys and values are written into
        positions ``[0, L)`` of the cache (prefill)."""
        B, L, dim = x.shape
        q, k, v = self._qkv(x)
        if cache is not None:
            cache[0][:, :, :L] = k
            cache[1][:, :, :L] = v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, L, dim))

    def new_cache(self, batch, max_len, like):
        shape = (batch, self.heads, max_len, like.shape[0] // (3 * self.heads))
        return (torch.zeros(shape, dtype=like.dtype, device=like.device),
                torch.zeros(shape, dtype=like.dtype, device=like.device))  # fmt: skip

    def step(self, x_t, cache, pos):
        """One token ``x_t (B, dim)`` at the device position ``pos`` (0-d int64): its key and
        value go into the cache at ``pos``; it attends to positions ``<= pos``."""
        B, dim = x_t.shape
        q, k, v = self._qkv(x_t[:, None])
        cache[0].index_copy_(2, pos.view(1), k)
        cache[1].index_copy_(2, pos.view(1), v)
        seen = (torch.arange(cache[0].shape[2], device=x_t.device) <= pos).view(1, 1, 1, -1)
        y = F.scaled_dot_product_attention(q, cache[0], cache[1], attn_mask=seen)
        return self.out(y.reshape(B, dim))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, dim: int, mixer: nn.Module, hidden: int):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim)
        self.mixer = mixer
        self.norm2 = nn.RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden)


class DecoderLM(nn.Module):
    """tokens (B, L) int64 -> logits (B, L, vocab_size); :meth:`prefill` and :meth:`step`
    decode with per-layer caches (Phalanx states and attention KV caches).

    Block ``i`` (from 0) mixes with attention when ``attn_every > 0`` and ``(i + 1) %
    attn_every == 0`` (1: every block, 4: one in four), else with Phalanx (``attn_every=0``: no
    attention). ``phalanx_factory(dim)``, when given, builds the Phalanx blocks' mixers instead of
    :class:`~swr_array.adapters.torch.Phalanx` (another implementation of the layer, forward only:
    :meth:`prefill` and :meth:`step` need ours). benchmarks/hybrid_bench.py trains this model."""

    def __init__(self, vocab_size=256, dim=64, depth=4, attn_every=4, attn_heads=4, head_dim=16,
                 kv_heads=None, block_len=16, hops=1, mlp_mult=3,
                 phalanx_factory=None):  # fmt: skip
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList()
        for i in range(depth):
            if attn_every > 0 and (i + 1) % attn_every == 0:
                mixer: nn.Module = Attention(dim, attn_heads)
            elif phalanx_factory is not None:
                mixer = phalanx_factory(dim)
            else:
                mixer = Phalanx(dim, head_dim=head_dim, kv_heads=kv_heads, block_len=block_len,
                                hops=hops)  # fmt: skip
            self.blocks.append(Block(dim, mixer, mlp_mult * dim))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, tokens, caches=None):
        """The full forward; with ``caches`` (from :meth:`new_caches`) the prompt fills them."""
        x = self.embed(tokens)
        for i, blk in enumerate(self.blocks):
            h = blk.norm1(x)
            if caches is None:
                x = x + blk.mixer(h)
            elif isinstance(blk.mixer, Phalanx):
                out, state = blk.mixer(h, return_state=True)
                caches[i] = state
                x = x + out
            else:
                x = x + blk.mixer(h, cache=caches[i])
            x = x + blk.mlp(blk.norm2(x))
        return self.lm_head(self.norm(x))

    def new_caches(self, batch, max_len):
        like = next(b.mixer.qkv.weight for b in self.blocks if isinstance(b.mixer, Attention)) \
            if any(isinstance(b.mixer, Attention) for b in self.blocks) else None
        return [None if isinstance(b.mixer, Phalanx) else b.mixer.new_cache(batch, max_len, like)
                for b in self.blocks]  # fmt: skip

    def prefill(self, prompt, max_len):
        """``(logits (B, L, V), caches, pos)``: pos is the next position, a 0-d device tensor."""
        caches = self.new_caches(prompt.shape[0], max_len)
        logits = self(prompt, caches)
        pos = torch.tensor(prompt.shape[1], device=prompt.device)
        return logits, caches, pos

    def step(self, token, caches, pos):
        """Logits ``(B, V)`` of one token ``(B,)`` at ``pos``; caches and pos advance in place."""
        x = self.embed(token)
        for blk, cache in zip(self.blocks, caches):
            h = blk.norm1(x)
            if isinstance(blk.mixer, Phalanx):
                x = x + blk.mixer.step(h, cache)[0]
            else:
                x = x + blk.mixer.step(h, cache, pos)
            x = x + blk.mlp(blk.norm2(x))
        pos += 1
        return self.lm_head(self.norm(x))


@torch.no_grad()
def generate(model, prompt, new_tokens, *, graph=None):
    """Greedy decoding: ``(tokens (B, P + new_tokens), step_logits (B, new_tokens, V),
    seconds of the decode loop)``. step_logits[:, i] are the logits that chose token P + i.
    ``graph`` (default: on CUDA) captures one decode step in a CUDA graph and replays it."""
    graph = prompt.is_cuda if graph is None else graph
    P = prompt.shape[1]
    logits, caches, pos = model.prefill(prompt, P + new_tokens)
    token = logits[:, -1].argmax(-1)
    step_logits = [logits[:, -1]]
    tokens = [prompt, token[:, None].clone()]

    def one():
        lg = model.step(token, caches, pos)
        token.copy_(lg.argmax(-1))
        return lg

    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            lg = one()  # warm-up: prepares every launch (a real step)
        torch.cuda.current_stream().wait_stream(side)
        step_logits.append(lg.clone())
        tokens.append(token[:, None].clone())
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):  # records one step (capture runs nothing)
            lg_static = one()
    torch.cuda.synchronize() if prompt.is_cuda else None
    start = time.perf_counter()
    while len(step_logits) < new_tokens:
        if graph:
            g.replay()
            lg = lg_static
        else:
            lg = one()
        step_logits.append(lg.clone())
        tokens.append(token[:, None].clone())
    torch.cuda.synchronize() if prompt.is_cuda else None
    seconds = time.perf_counter() - start
    return torch.cat(tokens, 1)[:, : P + new_tokens], torch.stack(step_logits, 1), seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--checkpoint", default=None, help="a DecoderLM state_dict (torch.save)")
    ap.add_argument("--no-graph", action="store_true", help="decode eagerly on CUDA too")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    model = DecoderLM(vocab_size=args.vocab, dim=args.dim, depth=args.depth)
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu"))
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    prompt = torch.randint(args.vocab, (args.batch, args.prompt_len), device=args.device)
    graph = args.device.startswith("cuda") and not args.no_graph
    tokens, _, seconds = generate(model, prompt, args.new_tokens, graph=graph)
    steps = args.new_tokens - (2 if graph else 1)
    print("row 0:", tokens[0, args.prompt_len:].tolist())
    print(f"decode: {steps} steps x batch {args.batch} in {seconds * 1e3:.1f} ms = "
          f"{steps * args.batch / max(seconds, 1e-9):.0f} tokens/s "
          f"({'CUDA graph' if graph else 'eager'}, {args.device}, {args.dtype})")  # fmt: skip


if __name__ == "__main__":
    main()
