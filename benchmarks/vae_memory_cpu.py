"""Activation memory per rank of the parallel Wan VAE decode, on the CPU (no GPU needed).

    python3 benchmarks/vae_memory_cpu.py --gpus 1,2 --latent 2,30,32
    python3 benchmarks/vae_memory_cpu.py --gpus 1 --latent 3,16,32 --schedules 'diffusers;full1;comfy'

Each rank (gloo, spawned here) builds the real-size Wan 2.1 VAE (random weights, fp32), resets its
peak resident set (VmHWM, /proc/self/clear_refs) and decodes its band of a random latent; the
activation peak is VmHWM after the decode minus the resident set before it. glibc's malloc returns
every block of 1 MiB or more to the kernel when it is freed (MALLOC_MMAP_THRESHOLD_ is set), so the
resident set follows the live tensors. A proxy for torch.cuda.max_memory_allocated, which
bench_vae.py measures on GPUs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))  # before torch allocates anything

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402,F401  (binds this checkout as comfyui_xdit_usp)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024  # MiB
    raise KeyError(key)


def _rank(rank: int, world: int, port: int, z: torch.Tensor, schedule: str, queue):
    from comfyui_xdit_usp.parallel import sp_vae, tiny

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = tiny.real_vae_config("2.1")
    runner = sp_vae.VaeRunner(torch.device("cpu"))
    runner.load("k", cfg, tiny.build_vae("2.1", config=cfg).state_dict(), torch.float32)
    t, h, w = z.shape[2:]
    # the IMAGE the rank writes its rows of (the node's path): its pages count once written, as the
    # arena's would (a rank touches only its rows)
    out = torch.empty(1 + 4 * (t - 1), h * 8, w * 8, 3)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the resident set now
    before = _status("VmRSS")
    t0 = time.perf_counter()
    runner.run("k", False, z, out, image=True, schedule=schedule)
    queue.put((world, rank, _status("VmHWM") - before, time.perf_counter() - t0))
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", default="1,2", help="comma list of rank counts")
    p.add_argument("--latent", default="2,30,32", help="latent frames,rows,columns")
    p.add_argument("--schedules", default="", help="';'-separated decode schedules (sp_vae.DECODE_SCHEDULES); default: the default")
    a = p.parse_args()
    z = torch.randn(1, 16, *[int(x) for x in a.latent.split(",")], generator=torch.Generator().manual_seed(0))
    ctx = mp.get_context("spawn")
    first = None
    runs = [(w, s) for s in a.schedules.split(";") for w in (int(x) for x in a.gpus.split(","))]
    for i, (world, schedule) in enumerate(runs):
        queue = ctx.Queue()
        procs = [ctx.Process(target=_rank, args=(r, world, 29600 + i, z, schedule, queue)) for r in range(world)]
        for pr in procs:
            pr.start()
        rows = sorted(queue.get(timeout=3600) for _ in procs)
        for pr in procs:
            pr.join()
        peak = max(r[2] for r in rows)
        first = first or peak
        print(f"{schedule or 'default'}: {world} rank(s), latent {a.latent}: activation peak per rank "
              + ", ".join(f"{r[2]:.0f}" for r in rows) + f" MiB ({peak / first:.2f} of the first row), "
              f"decode {max(r[3] for r in rows):.1f} s", flush=True)


if __name__ == "__main__":
    main()
