"""Context-parallel scaling of the Phalanx layer (forward + backward) over NCCL.

    torchrun --nproc_per_node=N benchmarks/cp_scaling.py --mode weak     # 32K tokens per GPU
    torchrun --nproc_per_node=N benchmarks/cp_scaling.py --mode strong   # 256K tokens in all

Run it for N = 1, 2, 4 (N = 1 is the single-GPU baseline: the plain layer, no cp_group). Rank 0
prints one markdown row: mode, GPUs, tokens per GPU, median milliseconds of a forward + backward
step (after warm-up, CUDA events around the step, the slowest rank's time) and tokens per second.
Efficiency: weak, t(1) / t(N); strong, t(1) / (N t(N)).
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist
from swr_array.adapters.torch import Phalanx


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("weak", "strong"), default="weak")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hops", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    per_gpu = 32768 if args.mode == "weak" else 262144 // world
    torch.manual_seed(0)
    layer = Phalanx(args.dim, head_dim=16, hops=args.hops, block_len=16, dtype=torch.bfloat16,
                    device=device)
    x = torch.randn(args.batch, per_gpu, args.dim, dtype=torch.bfloat16, device=device,
                    requires_grad=True)
    dout = torch.randn_like(x)
    group = dist.group.WORLD if world > 1 else None

    def step():
        out = layer(x, cp_group=group)
        out.backward(dout)

    for _ in range(3):
        step()
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        t = torch.tensor([start.elapsed_time(end)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(t.item())
    ms = statistics.median(times)
    if rank == 0:
        tokens = per_gpu * world * args.batch
        print(f"| {args.mode} | {world} | {per_gpu} | {ms:.3f} | {tokens / ms * 1e3:.3e} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
