"""GPU checks of weight sharding and the memory plan on 2 GPUs (issue 11), with the real 1.3B shape:

    python3 benchmarks/check_sharding.py

  a. the CLI refuses a model that cannot fit (--memory-fraction 0.02), exit 2, before any worker;
  b. a group capped at 5 GB a GPU, fsdp, runs 480p, refuses a 720p forward before it runs, and
     runs 480p again (the group survives);
  c. a LoRA merged into the NCCL shards, then a strength change, then removed: the fsdp outputs
     equal the replicated ones (rel err 0) and the base comes back exactly.
Results go to $OUT/check11.json."""
import json, os, subprocess, sys, time
sys.path.insert(0, "benchmarks")
import _common  # noqa: F401  (binds the package)
from bench_scaling import write_checkpoint
import torch
from comfyui_xdit_usp.parallel import WorkerGroup, XDitUSPConfig, tiny, ConfigError
from comfyui_xdit_usp.parallel.protocol import ForwardInputs, WeightPatch

out = {}
path = write_checkpoint("1.3b", "/tmp/ckpt13")
# a. the CLI refuses a model that cannot fit, before any worker starts
t0 = time.time()
r = subprocess.run([sys.executable, "-m", "comfyui_xdit_usp", "run", "--gpus", "2", "--checkpoint", path, "--shard", "none",
                    "--memory-fraction", "0.02", "--frames", "81", "--height", "480", "--width", "832"],
                   capture_output=True, text=True)
out["cli_refusal"] = {"rc": r.returncode, "s": round(time.time() - t0, 2), "stderr": r.stderr[-1500:]}
print(json.dumps(out["cli_refusal"], indent=1), flush=True)
g = torch.Generator().manual_seed(1)
def inputs(f, h, w):
    return ForwardInputs(torch.randn(2, 16, f, h, w, generator=g), torch.tensor([700.0, 700.0]), torch.randn(2, 512, 4096, generator=g))
x480, x720 = inputs(21, 60, 104), inputs(21, 90, 160)
# b. a size that will not fit is refused before its forward; the group stays usable
cfg = XDitUSPConfig(world_size=2, device="cuda", dtype="bf16", weight_sharding="fsdp", gpu_memory_fraction=round(5.0 * 2**30 / torch.cuda.get_device_properties(0).total_memory, 4))
with WorkerGroup(cfg) as grp:
    info = grp.load("m", path)
    stats = {}
    grp.forward("m", x480, stats=stats)
    res = {"placement": info.placement, "param_gb": info.param_bytes / 2**30, "peak_480_gb": max(stats["peak_bytes"]) / 2**30}
    try:
        grp.forward("m", x720)
        res["720"] = "ran"
    except ConfigError as e:
        res["720"] = f"refused: {e}"
    grp.forward("m", x480)
    res["after"] = "480p ran again on the same group"
    out["forward_refusal"] = res
print(json.dumps(out["forward_refusal"], indent=1), flush=True)
# c. LoRA merged into NCCL shards equals the replicated merge
name = "blocks.3.ffn.net.0.proj.weight"  # [8960, 1536]
up, down = torch.randn(8960, 16, generator=g) * 0.05, torch.randn(16, 1536, generator=g) * 0.05
outs = {}
for shard in ("none", "fsdp"):
    with WorkerGroup(XDitUSPConfig(world_size=2, device="cuda", dtype="bf16", weight_sharding=shard)) as grp:
        grp.load("m", path)
        base = grp.forward("m", x480)
        grp.set_weight_patches("m", {name: [WeightPatch("lora", [up, down], 1.0)]})
        lora = grp.forward("m", x480)
        grp.set_weight_patches("m", {name: [WeightPatch("lora", [up, down], 0.5)]})
        half = grp.forward("m", x480)
        grp.set_weight_patches("m", {})
        back = grp.forward("m", x480)
        outs[shard] = (base, lora, half, back)
n, f = outs["none"], outs["fsdp"]
out["lora"] = {"fsdp_vs_none": [tiny.rel_err(a, b) for a, b in zip(f, n)], "lora_effect": tiny.rel_err(n[1], n[0]),
               "restored_equal": bool(torch.equal(f[3], f[0]))}
print(json.dumps(out["lora"], indent=1), flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "check11.json"), "w"), indent=1)
