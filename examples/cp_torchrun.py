"""Context parallelism with torchrun: one sequence split along L over the ranks.

    torchrun --nproc_per_node=2 examples/cp_torchrun.py            # CPU: gloo
    torchrun --nproc_per_node=4 examples/cp_torchrun.py --cuda     # one GPU per rank: NCCL

Every rank builds the same Phalanx layer and the same full input (same seed), keeps its own
contiguous slice of the sequence (ragged on purpose: rank r holds more tokens than rank r - 1),
runs the layer with ``cp_group`` and a backward, and checks its output shard and its input
gradient against the single-process layer on the whole sequence; the weight gradients are summed
over the group (each rank holds its share) and checked too.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from swr_array.adapters.torch import Phalanx


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cuda", action="store_true", help="NCCL, one GPU per rank")
    parser.add_argument("--length", type=int, default=1000, help="tokens in the whole sequence")
    parser.add_argument("--hops", default="1", help="carrier hops, or 'none' (exact)")
    args = parser.parse_args()
    hops = None if args.hops.lower() == "none" else int(args.hops)

    backend = "nccl" if args.cuda else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if args.cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    dtype = torch.float32 if args.cuda else torch.float64

    torch.manual_seed(0)
    layer = Phalanx(64, heads=4, kv_heads=2, hops=hops, block_len=16, dtype=dtype, device=device)
    x = torch.randn(2, args.length, 64, dtype=dtype, device=device)
    dout = torch.randn_like(x)

    # ragged shards: rank r gets a share proportional to r + 1
    weights = [r + 1 for r in range(world)]
    lengths = [args.length * w // sum(weights) for w in weights]
    lengths[-1] += args.length - sum(lengths)
    start = sum(lengths[:rank])
    sl = slice(start, start + lengths[rank])

    xs = x[:, sl].clone().requires_grad_()
    out = layer(xs, cp_group=dist.group.WORLD)
    out.backward(dout[:, sl])
    shard_grads = [p.grad.clone() for p in layer.parameters()]
    for g in shard_grads:  # each rank holds its share of the weight gradients
        dist.all_reduce(g)

    # the single-process reference on the whole sequence
    layer.zero_grad()
    xf = x.clone().requires_grad_()
    ref = layer(xf)
    ref.backward(dout)
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    errors = {
        "out": (out - ref[:, sl]).abs().max().item(),
        "dx": (xs.grad - xf.grad[:, sl]).abs().max().item(),
        "dweights": max((g - p.grad).abs().max().item()
                        for g, p in zip(shard_grads, layer.parameters())),
    }
    ok = all(e <= tol * 10 for e in errors.values())
    print(f"rank {rank}/{world}: tokens [{sl.start}, {sl.stop}) max errors "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()) + (" ok" if ok else " MISMATCH"))
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
