"""All-reduce bandwidth between processes, for docs/multinode.md's model of step time against node count.

    torchrun --nproc_per_node 2 bench/allreduce.py            (one machine; gloo on CPU, nccl on GPUs)
    torchrun --nnodes 2 --nproc_per_node 8 ... bench/allreduce.py   (the links between nodes)

Prints, per message size, the time of one all-reduce and the bus bandwidth, 2(n-1)/n x bytes / time (the
figure NCCL's own tests report, comparable across process counts). The baseline is the same collective on
the smallest message: its time is the latency term of the model.
"""

import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    if rank == 0:
        print(f"{backend}, {world} processes; size, time per all-reduce, bus bandwidth")
    for mib in (0.004, 1, 4, 16, 64, 256):
        x = torch.ones(int(mib * 2**20) // 4, device=device)
        for _ in range(2):
            dist.all_reduce(x)
        repeats = 5 if mib >= 64 else 20
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            dist.all_reduce(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / repeats
        bus = 2 * (world - 1) / world * x.numel() * 4 / seconds
        if rank == 0:
            print(f"{mib:>8g} MiB  {seconds * 1e3:9.2f} ms  {bus / 1e9:7.2f} GB/s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
