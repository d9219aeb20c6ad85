"""The link probe and the cost model that lets `auto` choose the layout by measurement.

At the first load every rank runs `probe` (after the process groups exist, ~50 ms on GPUs): an
all-to-all and a ring send/receive of `PROBE_BYTES` a rank over all ranks, a small all-to-all for
the per-call latency, a device copy, a GEMM and the attention kernel. The timings are max-reduced
over the ranks, so every rank holds the same numbers and makes the same choices (a process-group
collective then follows on every rank in the same order). `Loaded.link` reports them.

`predict` is a pure function: seconds of one forward of a Wan transformer in a `Layout`, from the
probe and the model's shape, at a batch and token count. Every layout of a world does the same
arithmetic per rank (batch rows / cfg x tokens / sp), so the layouts differ by what their exchange
leaves exposed:

  per block, q-sized bytes Q = rows * tokens_per_rank * dim * itemsize
  attention  A = 4 * rows * tokens_per_rank * tokens * dim / attn_rate   (self-attention, per block)
  eta        the probe's `overlap`: the share of a transfer that hides behind attention kernels
             running at the same time (measured, 0..1: links whose transfers compete with the
             kernels, e.g. through host memory, hide less)
  Ulysses u  C_u = 4 Q (u-1)/u / a2a_rate + 2 G latency (q/k/v in, output back);
             exposed C_u - eta (G-1)/G min(C_u, A) with overlap (head-group pipeline: all but the
             first group's input and the last group's output can hide), C_u without;
             + PACK_PASSES Q / copy_rate (packing)
  ring r     per step C_r = 2 Q / p2p_rate + latency (a ring block's k and v are Q each);
             exposed per step C_r - eta min(C_r, A/r); with overlap (pure ring) step 1's transfer
             also hides behind the other head groups' step-1 attention: A/r (2G-1)/G;
             + merges: (r-1) MERGE_PASSES fp32 output bytes / copy_rate
  cfg        no exchange at all (each CFG group computes its own rows)

`choose` takes the fastest candidate (ties within 1% go to the larger CFG split, then the larger
Ulysses degree). What it does not model: NCCL's kernels competing with attention for SMs, and
padding. BENCHMARKS.md compares its choices with the measured fastest layout.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from .config import Layout, divisors

PROBE_BYTES = {"cuda": 32 << 20, "cpu": 256 << 10}  # per rank: a 480p 1.3B q shard is ~50 MB; CPU runs are tests
LATENCY_BYTES = 16 << 10
TIE = 0.01  # relative: predictions this close count as equal
# Memory passes over a q-sized tensor that the exchange adds per block, at the probe's copy rate:
PACK_PASSES = 16  # Ulysses: q/k/v packed and unpacked, the output packed and landed (read + write each)
MERGE_PASSES = 6  # ring: one fp32 merge of a partial output (read out, block out, lse; write out, lse)
# comm_overlap "auto": the overlapped exchange where the link probe's faster transfer is below this rate (overlap_for)
OVERLAP_BELOW_GBPS = 40.0


@dataclass(frozen=True)
class LinkProbe:
    """What one worker group measured at its first load (every rank holds the same values)."""

    world: int
    a2a_gbps: float  # all-to-all over all ranks: bytes a rank sends (its (N-1)/N) per second, 1e9
    p2p_gbps: float  # ring exchange (send to the next rank, receive from the previous), likewise
    latency_us: float  # one small all-to-all
    overlap: float  # 0..1: how much of the all-to-all hid behind attention kernels run at the same time
    copy_gbps: float  # a device-to-device copy: bytes read + written per second
    matmul_tflops: float  # a square GEMM in the compute dtype
    attn_tflops: float  # the attention kernel at 4 heads x 4096 tokens (CUDA)
    ms: float  # the probe's own time

    def as_dict(self) -> dict:
        return asdict(self)


def _timed(fn, sync, reps: int) -> float:
    fn()  # warm-up (and the communicator's first use)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def probe(device, dtype, backend) -> LinkProbe:
    """Measure the link and the device on every rank (a collective call; see the module docstring)."""
    import torch
    import torch.distributed as dist

    t_start = time.perf_counter()
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    reps = 3
    n = PROBE_BYTES["cuda" if cuda else "cpu"]
    item = torch.empty((), dtype=dtype).element_size()
    n = n // item // world * world * item  # all-to-all chunks of equal size
    x = torch.ones(n // item, dtype=dtype, device=device)
    times = {}
    y = torch.empty_like(x)  # the probe's buffers are freed when it returns
    if world > 1:
        times["a2a"] = _timed(lambda: dist.all_to_all_single(y, x), sync, reps)
        m_small = LATENCY_BYTES // item // world * world
        small, small_out = x[:m_small], torch.empty(m_small, dtype=dtype, device=device)
        times["lat"] = _timed(lambda: dist.all_to_all_single(small_out, small), sync, reps)

        def ring():
            ops = [dist.P2POp(dist.isend, x, (rank + 1) % world), dist.P2POp(dist.irecv, y, (rank - 1) % world)]
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        times["p2p"] = _timed(ring, sync, reps)
    times["copy"] = _timed(lambda: y.copy_(x), sync, reps)
    m = 4096 if cuda else 128
    a = torch.randn(m, m, dtype=dtype, device=device)
    times["mm"] = _timed(lambda: a @ a, sync, reps)
    s, h, d = (4096, 4, 128) if cuda else (128, 2, 64)
    q = torch.randn(1, s, h, d, dtype=dtype, device=device)
    times["attn"] = _timed(lambda: backend.plain(q, q, q, 1.0 / math.sqrt(d)), sync, reps)
    if world > 1:
        # The all-to-all started asynchronously, then as many attention kernels as take about as long
        # (the pipelined exchange's situation): how much of the shorter of the two disappears.
        n_attn = max(1, round(times["a2a"] / times["attn"]))

        def both():
            work = dist.all_to_all_single(y, x, async_op=True)
            for _ in range(n_attn):
                backend.plain(q, q, q, 1.0 / math.sqrt(d))
            work.wait()
        t_both = _timed(both, sync, reps)
        alone = times["a2a"], n_attn * times["attn"]
        times["hidden"] = max(0.0, sum(alone) - t_both) / min(alone)
    keys = sorted(times)
    if world > 1:  # every rank takes the slowest rank's figures (the least overlap): the same choices everywhere
        t = torch.tensor([-times[k] if k == "hidden" else times[k] for k in keys], dtype=torch.float64,
                         device=device if cuda else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times = {k: -v if k == "hidden" else v for k, v in zip(keys, t.tolist())}
    sent = n * (world - 1) / world

    def sig(x: float) -> float:  # four significant digits
        return float(f"{x:.4g}")
    return LinkProbe(
        world=world,
        a2a_gbps=sig(sent / times["a2a"] / 1e9) if world > 1 else 0.0,
        p2p_gbps=sig(n / times["p2p"] / 1e9) if world > 1 else 0.0,
        latency_us=sig(times["lat"] * 1e6) if world > 1 else 0.0,
        overlap=round(min(1.0, times["hidden"]), 3) if world > 1 else 0.0,
        copy_gbps=sig(2 * n / times["copy"] / 1e9),
        matmul_tflops=sig(2 * m ** 3 / times["mm"] / 1e12),
        attn_tflops=sig(4 * h * s * s * d / times["attn"] / 1e12),
        ms=sig((time.perf_counter() - t_start) * 1e3),
    )


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a Wan transformer."""

    dim: int
    heads: int
    ffn_dim: int
    layers: int

    @classmethod
    def of(cls, config) -> "ModelShape":
        """From diffusers' config of a Wan transformer (a FrozenDict or a dict)."""
        heads = config["num_attention_heads"]
        return cls(dim=heads * config["attention_head_dim"], heads=heads, ffn_dim=config["ffn_dim"],
                   layers=config["num_layers"])


def candidates(world: int, heads: int, batch: int, ring_ok: bool = True) -> list[Layout]:
    """Every layout of `world` ranks this batch can run: CFG split 1 or 2 (dividing the batch),
    a Ulysses degree that divides the head count, ring for the rest (only when `ring_ok`: the
    attention kernel returns a log-sum-exp)."""
    out = []
    for cfg in (2, 1):
        if world % cfg or batch % cfg:
            continue
        sp = world // cfg
        for u in sorted(divisors(sp), reverse=True):
            if heads % u == 0 and (ring_ok or u == sp):
                out.append(Layout(cfg=cfg, ulysses=u, ring=sp // u))
    return out


def predict(layout: Layout, shape: ModelShape, probe: LinkProbe, batch: int, tokens: int, itemsize: int = 2,
            overlap: bool = True, head_groups=None) -> float:
    """Predicted seconds of one forward (the module docstring's model). `head_groups(heads)`: the
    number of head groups the exchange uses for that many heads a rank attends to."""
    from .attention import CommOptions

    groups = head_groups or CommOptions(overlap=overlap).groups
    rows = batch // layout.cfg
    sp, u, r = layout.sp, layout.ulysses, layout.ring
    padded = -(-tokens // sp) * sp
    per_rank = padded // sp
    dim = shape.dim
    linear = 2 * rows * per_rank  # one block's Linear FLOPs on this rank (+ attention below) * (6 * dim * dim + 2 * dim * shape.ffn_dim)
    attn = 4 * rows * per_rank * padded * dim
    A = attn / (probe.attn_tflops * 1e12)  # one block's self-attention on this rank
    compute = shape.layers * (linear / (probe.matmul_tflops * 1e12) + A)
    q_bytes = rows * per_rank * dim * itemsize
    lat = probe.latency_us * 1e-6
    copy = probe.copy_gbps * 1e9
    eta = probe.overlap  # the share of an overlappable transfer that really hides (measured)
    block = 0.0
    if r > 1:
        G = groups(shape.heads) if u == 1 else 1
        step = 2 * q_bytes / (probe.p2p_gbps * 1e9) + lat * G
        a_step = A / r
        if overlap and u == 1:  # step 1's transfer also hides behind the other head groups' step-1 attention
            block += step - eta * min(step, a_step * (2 * G - 1) / G) + (r - 2) * (step - eta * min(step, a_step))
        else:
            block += (r - 1) * (step - eta * min(step, a_step))
        block += (r - 1) * MERGE_PASSES * rows * per_rank * dim * 4 / copy  # merging fp32 partial outputs
    if u > 1:
        G = groups(shape.heads // u)
        c = 4 * q_bytes * (u - 1) / u / (probe.a2a_gbps * 1e9) + (2 * G if overlap else 4) * lat
        block += c - (eta * min(c, A) * (G - 1) / G if overlap else 0.0)
        block += PACK_PASSES * q_bytes / copy  # packing and unpacking
    return compute + shape.layers * block


def choose(shape: ModelShape, probe: LinkProbe, batch: int, tokens: int, ring_ok: bool = True, itemsize: int = 2,
           overlap: bool = True) -> tuple[Layout, dict[str, float]]:
    """The fastest predicted layout for this batch and token count, and every candidate's prediction
    ({str(layout): seconds}). Ties (within TIE) go to the larger CFG split, then Ulysses."""
    costs = {lay: predict(lay, shape, probe, batch, tokens, itemsize, overlap)
             for lay in candidates(probe.world, shape.heads, batch, ring_ok)}
    best = min(costs.values())
    chosen = next(lay for lay in costs if costs[lay] <= best * (1 + TIE))  # candidates() lists cfg, then Ulysses, first
    return chosen, {str(lay): round(t, 4) for lay, t in costs.items()}


def overlap_for(config, link: "LinkProbe | None") -> bool:
    """Whether the exchange is pipelined with attention by head groups (config.comm_overlap).

    "auto" follows the link: on where the faster of the probe's two transfers (all-to-all, ring
    send/receive) runs below OVERLAP_BELOW_GBPS, off on faster links. Measured (BENCHMARKS.md, 1.3B
    480p×81 batch 1, 2×H200 and 2×H100): with NCCL_P2P_DISABLE=1 (both transfers 11–23 GB/s) the
    overlap takes Ulysses 2 from 1.37–1.41× to 1.49–1.57× and ring 2 from 1.38× to 1.70×; on NVLink
    (all-to-all 64–111 GB/s, ring 130–210) there is little to hide and the one-head attention calls
    cost more than they hide (Ulysses 1.80× → 1.70×, ring 1.84–1.89× → 1.75–1.78×). The faster of the
    two, because one slow all-to-all reading (19.6 GB/s once on NVLink, its ring at 184) must not
    turn the overlap on; the probe's `overlap` figure is too noisy at its size to weigh this (0.0 to
    0.75 on one NVLink machine). Before the probe, and on the CPU (tests: the overlapped path is the
    one to check), "auto" is on."""
    mode = config.comm_overlap
    if mode != "auto":
        return mode == "on"
    if link is None or link.world < 2 or config.device != "cuda":
        return True
    return max(link.a2a_gbps, link.p2p_gbps) < OVERLAP_BELOW_GBPS


def tokens_of(latent: tuple, patch_size) -> int:
    """Video tokens of a (frames, height, width) latent."""
    return math.prod(n // p for n, p in zip(latent, patch_size))


def by_probe(config) -> bool:
    """Whether `auto` chooses the layout with the cost model: every degree automatic, on GPUs
    (on the CPU the static rule stays, so the CPU tests' layouts do not depend on timings), and no
    tensor or pipeline split (the cost model knows the sequence layouts only; with those splits the
    static rule fills the CFG, Ulysses and ring degrees)."""
    return (config.device == "cuda" and not (config.ulysses_degree or config.ring_degree or config.cfg_degree)
            and config.tensor_parallel_degree == 1 and config.pipeline_parallel_degree == 1)
