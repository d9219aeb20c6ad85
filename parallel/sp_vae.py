"""The Wan VAE (2.1 and 2.2) split by rows over the ranks, exact: diffusers' ``AutoencoderKLWan``
with halo exchange.

Every rank holds a contiguous band of the video's rows at every scale: at the latent resolution rank
r holds rows ``[start_r, start_r + count_r)`` of ``split_rows(latent_height, world)`` (counts differ by
at most one, so any height >= world works); at a scale ``s`` times finer it holds those rows times
``s``. diffusers' code runs on the band; four kinds of layer would see past its edges, and the
forward of each (replaced on the instance, as sp_wan replaces attention processors) is given
exactly what the single-process layer sees:

* ``WanCausalConv3d`` with a spatial kernel (3x3x3): its forward builds the padded input as
  diffusers' does (cache frames, zero frames before them, zero columns), in one buffer whose ``p``
  rows above and below hold the neighbours' rows (zeros at the image's true top and bottom: the
  conv's own padding there).
* The 2D convs of ``WanResample``: the upsampling conv (3x3, padding 1, after the row-local
  nearest-exact x2 upsample) runs as it is, then its first and last output rows are recomputed
  from three rows with the neighbour's row in place of the zero padding; the downsampling
  ``ZeroPad2d((0, 1, 0, 1))`` takes its bottom row from the rank below (zeros at the true bottom).
  Bands start on even rows and hold an even number of rows at every scale the encoder halves
  (latent rows times 2, 4, 8), so the stride-2 grid is the global one.
* ``WanAttentionBlock`` (mid-block: per-frame self-attention over every position): its input is
  all-gathered over the rows, the block runs on the whole frame, each rank keeps its band. It runs at
  the latent resolution, where a frame is small.

Two more replacements are for speed and memory only: ``WanRMS_norm`` and ``WanUpsample`` run in the
compute dtype (diffusers up-casts the activation to fp32 for both; see their docstrings).

Everything else is local to a row or a 2x2 group of rows that never straddles a band edge: the
RMS norms (over channels), SiLU, 1x1x1 convs, the temporal convs (kernel (3, 1, 1)), nearest
upsampling, Wan 2.2's patchify/unpatchify (2x2), ``AvgDown3D`` / ``DupUp3D`` shortcuts (2x2), the
final clamp. The causal cache (``feat_cache``) holds each rank's own rows: every rank runs the same
temporal chunk schedule (diffusers': one latent frame per decoder call; one frame, then four per
encoder call; ComfyUI's decoder takes two latent frames per call, the same causal result), so the
cache works unchanged. The result equals the single-process decode up to float summation order
(tests, fp32: <= 3.7e-6 max relative error against the single-process diffusers VAE, <= 5.1e-6
against ComfyUI's own modules), not a tiled decode with blended seams.

Not xfuser / DistVAE: xfuser cannot be imported without a GPU, and DistVAE (xdit-project) adapts
the 2D ``Conv2d``/``GroupNorm`` of diffusers' image ``AutoencoderKL``; it has no causal 3D conv, no
temporal cache and no Wan modules. The halos are plain ``torch.distributed`` point-to-point ops
(``batch_isend_irecv``; gloo on the CPU, NCCL on GPUs) on the default process group.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def split_rows(rows: int, world: int) -> list[tuple[int, int]]:
    """[(start, count)] of each rank's latent rows: `rows` split into `world` contiguous bands whose
    counts differ by at most one (the first rows % world ranks get one more)."""
    if rows < world:
        raise ValueError(f"a latent {rows} rows high cannot be split over {world} ranks (at least one row each)")
    base, extra = divmod(rows, world)
    out, start = [], 0
    for r in range(world):
        n = base + (1 if r < extra else 0)
        out.append((start, n))
        start += n
    return out


class RowHalo:
    """Halo rows (dim -2) between neighbouring ranks of the default process group."""

    def __init__(self):
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def swap(self, first: torch.Tensor, last: torch.Tensor, top: int, bottom: int
             ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Send `first` (this band's first `bottom` rows) up and `last` (its last `top` rows) down;
        returns (the `top` rows of the rank above, the `bottom` rows of the rank below), None where
        there is no neighbour (the image's border)."""
        up, down = self.rank - 1, self.rank + 1
        new = lambda t: torch.empty(t.shape, dtype=t.dtype, device=t.device)  # noqa: E731 (contiguous, for NCCL)
        above = new(last) if top and up >= 0 else None
        below = new(first) if bottom and down < self.world else None
        ops = []
        if above is not None:
            ops.append(dist.P2POp(dist.irecv, above, up))
        if top and down < self.world:
            ops.append(dist.P2POp(dist.isend, last.contiguous(), down))
        if below is not None:
            ops.append(dist.P2POp(dist.irecv, below, down))
        if bottom and up >= 0:
            ops.append(dist.P2POp(dist.isend, first.contiguous(), up))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return above, below

    def fill(self, buf: torch.Tensor, top: int, bottom: int):
        """In place: `buf`'s first `top` and last `bottom` rows (zeros on entry) become the
        neighbours' rows next to this band, which is `buf`'s rows [top, len - bottom)."""
        end = buf.shape[-2] - bottom
        above, below = self.swap(buf[..., top:top + bottom, :], buf[..., end - top:end, :], top, bottom)
        if above is not None:
            buf[..., :top, :] = above
        if below is not None:
            buf[..., end:, :] = below

    def gather(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every rank's rows (dim -2) in rank order; `counts`: each rank's row count (uneven is fine)."""
        if self.world == 1:
            return x
        most = max(counts)
        pad = x.new_zeros(*x.shape[:-2], most - x.shape[-2], x.shape[-1])
        mine = torch.cat([x, pad], dim=-2).contiguous() if most > x.shape[-2] else x.contiguous()
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine)
        return torch.cat([p[..., :n, :] for p, n in zip(parts, counts)], dim=-2)


class SequenceParallelVAE:
    """diffusers' ``AutoencoderKLWan`` on this rank's band of rows (see the module docstring).

    Changes `vae` in place (this instance then only runs split); with one rank the halos are the
    zero padding and the result is the plain decode. No layer holds more activation memory than in
    one process: the padded input a 3D conv builds is built once, halos included; the upsampling
    conv runs as it is and only its first and last output rows are recomputed from a few rows."""

    def __init__(self, vae: torch.nn.Module):
        from diffusers.models.autoencoders.autoencoder_kl_wan import (
            WanAttentionBlock, WanCausalConv3d, WanResample, WanRMS_norm, WanUpsample,
        )

        self.vae = vae
        self.halo = RowHalo()
        self.counts: Optional[list[int]] = None  # latent rows of every rank in the current call
        self.latent_rows = 0  # this rank's
        cfg = vae.config
        self.spatial = cfg.scale_factor_spatial or 8
        for m in vae.modules():
            if isinstance(m, WanCausalConv3d) and m._padding[2]:
                m.forward = self._causal_conv3d(m)
            elif isinstance(m, WanResample) and m.mode in ("upsample2d", "upsample3d"):
                conv = m.resample[1]
                conv.forward = self._edge_rows_conv2d(conv)
            elif isinstance(m, WanResample) and m.mode in ("downsample2d", "downsample3d"):
                pad = m.resample[0]  # ZeroPad2d((left, right, top, bottom)) = (0, 1, 0, 1)
                pad.forward = self._zero_pad2d(pad)
            elif isinstance(m, WanAttentionBlock):
                m.forward = self._whole_frame(m.forward)
            elif isinstance(m, WanRMS_norm):
                m.forward = self._rms_norm(m)
            elif isinstance(m, WanUpsample):
                m.forward = self._upsample(m)

    # ---- layer replacements -------------------------------------------------------------------------
    def _causal_conv3d(self, m):
        """diffusers' WanCausalConv3d.forward (cache frames first, zero frames before them, zero
        columns left and right), with the padded input built in one buffer whose height padding
        holds the neighbours' rows (of the cache frames too). Only the padding is zeroed (the
        buffer is not filled twice). When the leading zero frames feed a single output frame (the
        first chunks, as ComfyUI's ``causal_zero`` fast path) they are not built at all: the conv
        runs with the kernel's last taps only, the same sum without its zero terms."""
        wl, wr, p, _, tpad, tafter = m._padding
        kt = m.kernel_size[0]
        assert tafter == 0 and p == m._padding[3] and m.stride[0] == 1 and tpad == kt - 1, (m._padding, m.stride)

        def forward(x, cache_x=None):
            parts = [x]
            front = tpad
            if cache_x is not None and tpad > 0:
                parts = [cache_x.to(x.device), x]
                front = tpad - cache_x.shape[2]
            b, c, _, h, w = x.shape
            frames = sum(q.shape[2] for q in parts)
            weight = m.weight
            if front and frames + front == kt:  # one output frame: drop the taps that see zero frames
                weight, front = weight[:, :, front:], 0
            buf = x.new_empty(b, c, front + frames, h + 2 * p, wl + w + wr)
            if front:
                buf[:, :, :front].zero_()
            if p:
                buf[:, :, front:, :p].zero_()
                buf[:, :, front:, p + h:].zero_()
            if wl:
                buf[:, :, front:, p:p + h, :wl].zero_()
            if wr:
                buf[:, :, front:, p:p + h, wl + w:].zero_()
            t = front
            for q in parts:
                buf[:, :, t:t + q.shape[2], p:p + h, wl:wl + w] = q
                t += q.shape[2]
            self.halo.fill(buf[..., wl:wl + w], p, p)
            if weight is m.weight:
                return torch.nn.Conv3d.forward(m, buf)
            return torch.nn.functional.conv3d(buf, weight, m.bias, m.stride, 0, m.dilation, m.groups)

        return forward

    def _edge_rows_conv2d(self, conv):
        """The upsampling 3x3 conv (padding 1) as it is, then its first and last output rows
        recomputed with the neighbours' rows in place of the zero padding."""
        p, pw = conv.padding

        def forward(x):
            out = torch.nn.Conv2d.forward(conv, x)
            if self.halo.world == 1:
                return out
            h = x.shape[-2]
            assert h >= 2 * p, f"a band of {h} rows is too thin for a halo of {p}"
            above, below = self.halo.swap(x[..., :p, :], x[..., -p:, :], p, p)
            edge = lambda rows: torch.nn.functional.conv2d(  # noqa: E731
                rows, conv.weight, conv.bias, conv.stride, (0, pw), conv.dilation, conv.groups)
            if above is not None:
                out[..., :p, :] = edge(torch.cat([above, x[..., :2 * p, :]], dim=-2))
            if below is not None:
                out[..., h - p:, :] = edge(torch.cat([x[..., h - 2 * p:, :], below], dim=-2))
            return out

        return forward

    def _zero_pad2d(self, pad):
        """ZeroPad2d before the stride-2 conv, its bottom rows taken from the rank below."""
        left, right, top, bottom = pad.padding
        assert top == 0, pad.padding

        def forward(x):
            h, w = x.shape[-2:]
            buf = x.new_zeros(*x.shape[:-2], h + bottom, left + w + right)
            buf[..., :h, left:left + w] = x
            self.halo.fill(buf[..., left:left + w], 0, bottom)
            return buf

        return forward

    @staticmethod
    def _rms_norm(m):
        """WanRMS_norm in the compute dtype, without diffusers' fp32 copy of the activation (two
        full-size fp32 temporaries per norm in bf16: the largest transient of the decode at the
        full-resolution end). F.normalize's math, as ComfyUI's RMS_norm: the norm reduces with fp32
        accumulation, the division rounds once; then one in-place multiply by gamma * sqrt(dim)
        (taken in fp32, rounded to the compute dtype) and the bias where there is one. fp32: the
        same ops as diffusers' but the two scalings folded (differences of an ulp)."""
        dim = 1 if m.channel_first else -1

        def forward(x):
            denom = torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min_(1e-12)  # F.normalize's eps
            y = x / denom
            y.mul_((m.gamma.float() * m.scale).to(y.dtype))  # same dtype: no full-size cast buffer
            if isinstance(m.bias, torch.Tensor):
                y.add_(m.bias)
            return y

        return forward

    @staticmethod
    def _upsample(m):
        """WanUpsample (nearest-exact x2) in the compute dtype: diffusers upsamples an fp32 copy and
        casts back, a copy and a 4x fp32 tensor for what is a gather of values (bit-identical)."""

        def forward(x):
            return torch.nn.Upsample.forward(m, x)

        return forward

    def _whole_frame(self, forward):
        def run(x):
            scale = x.shape[-2] // self.latent_rows  # 1: the mid-blocks run at the latent resolution
            counts = [n * scale for n in self.counts]
            start = sum(counts[:self.halo.rank])
            return forward(self.halo.gather(x, counts))[..., start:start + x.shape[-2], :].contiguous()

        return run

    # ---- the two entry points -------------------------------------------------------------------------
    def _band(self, latent_height: int) -> tuple[int, int]:
        bands = split_rows(latent_height, self.halo.world)
        self.counts = [n for _, n in bands]
        start, n = bands[self.halo.rank]
        self.latent_rows = n
        return start, n

    @torch.no_grad()
    def decode(self, z_local: torch.Tensor, latent_height: int, sink=None) -> Optional[torch.Tensor]:
        """This rank's latent rows [B, z, T, rows, W] -> its pixel rows [B, C, 1 + 4(T-1), rows*s, W*s]
        in [-1, 1] (the decoder's clamp).

        diffusers' ``AutoencoderKLWan._decode`` (one latent frame per decoder call, the causal
        cache between calls), with each call's frames handed on as they come: ``sink(frame, x)``
        gets the frames [frame, frame + x.shape[2]) and the decode returns None, so the whole
        video is never held on the device (diffusers grows it by ``torch.cat`` per call, two copies
        at its end); without a sink they are concatenated once and returned."""
        start, n = self._band(latent_height)
        if z_local.shape[-2] != n:
            raise ValueError(f"rank {self.halo.rank} holds {n} latent rows, got {z_local.shape[-2]}")
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        vae = self.vae
        patch = vae.config.patch_size
        chunks, frame = [], 0
        vae.clear_cache()
        try:
            x = vae.post_quant_conv(z_local)
            for i in range(x.shape[2]):
                vae._conv_idx = [0]
                out = vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=i == 0)
                if patch is not None:
                    out = unpatchify(out, patch_size=patch)
                out = out.clamp_(-1.0, 1.0)
                if sink is None:
                    chunks.append(out)
                else:
                    sink(frame, out)
                frame += out.shape[2]
                del out
        finally:
            vae.clear_cache()
        return torch.cat(chunks, dim=2) if sink is None else None

    @torch.no_grad()
    def encode(self, x_local: torch.Tensor, latent_height: int) -> torch.Tensor:
        """This rank's pixel rows [B, C, F, rows*s, W*s] -> the posterior mean of its latent rows
        [B, z, 1 + (F-1)//4, rows, W] (what ComfyUI's Wan VAE encode returns)."""
        start, n = self._band(latent_height)
        if x_local.shape[-2] != n * self.spatial:
            raise ValueError(f"rank {self.halo.rank} holds {n * self.spatial} pixel rows, got {x_local.shape[-2]}")
        h = self.vae.encode(x_local, return_dict=False)[0]
        return h.mode()


class VaeRunner:
    """One rank's VAE: the weights of at most one VAE (a new load replaces it), and its runs.

    The owner sends the weights once, under a key that names their content and the compute dtype
    (launcher.vae_key), through the arena; the worker keeps them until another VAE comes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.key: Optional[str] = None
        self.sp: Optional[SequenceParallelVAE] = None
        self.param_bytes = 0

    def load(self, key: str, config: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> float:
        import diffusers
        from accelerate import init_empty_weights

        t0 = time.perf_counter()
        self.unload()
        with init_empty_weights():
            vae = diffusers.AutoencoderKLWan(**config)
        # copy=True: the arena is reused by the next request, the weights must not alias it
        state = {k: t.to(device=self.device, dtype=dtype, copy=True) for k, t in tensors.items()}
        vae.load_state_dict(state, strict=True, assign=True)
        vae.requires_grad_(False).eval()
        self.sp = SequenceParallelVAE(vae)
        self.key = key
        self.param_bytes = sum(p.numel() * p.element_size() for p in vae.parameters())
        return time.perf_counter() - t0

    def unload(self):
        self.key, self.sp, self.param_bytes = None, None, 0

    def _vae(self, key: str) -> SequenceParallelVAE:
        if self.sp is None or self.key != key:
            raise KeyError(f"VAE {key!r} is not loaded on this rank (loaded: {self.key!r})")
        return self.sp

    def run(self, key: str, encode: bool, full_input: torch.Tensor, out: torch.Tensor, image: bool = False) -> slice:
        """This rank's share of a decode (`full_input`: the whole latent) or an encode (the whole
        video), read from `full_input` and written into its rows of `out` (views of the arena are
        fine; `out` fp32 on the CPU). Returns those rows, as a slice of the output's height.

        A decode writes each decoder call's frames as they come (`_HostSink`): converted on the
        device, then copied to the host on a side stream while the next call computes, so neither
        the video nor an fp32 copy of it is ever whole on the device. `image`: `out` is ComfyUI's
        IMAGE, [B * frames, H, W, C] in [0, 1] (the Wan VAE's process_output: (x + 1) / 2 clamped,
        taken in fp32 on the device), else the video [B, C, frames, H, W] in [-1, 1]."""
        sp = self._vae(key)
        dtype = next(sp.vae.parameters()).dtype
        s = sp.spatial
        latent_h = full_input.shape[-2] // s if encode else full_input.shape[-2]
        start, n = split_rows(latent_h, sp.halo.world)[sp.halo.rank]
        rows = slice(start * s, (start + n) * s) if encode else slice(start, start + n)
        x = full_input[..., rows, :].to(self.device, dtype)
        if encode:
            out_rows = slice(start, start + n)
            out[..., out_rows, :].copy_(sp.encode(x, latent_h))  # the latent: small, converts to fp32
            return out_rows
        out_rows = slice(start * s, (start + n) * s)
        sink = _HostSink(out, out_rows, image, x.shape[0], self.device)
        try:
            sp.decode(x, latent_h, sink=sink)
        finally:
            sink.finish()
        return out_rows


class _HostSink:
    """Writes a decode's frames into this rank's rows of the host output as they come (see
    VaeRunner.run). On a GPU the conversion and the copies run on a side stream, after the frames
    are computed and alongside the next decoder call; every copy goes to a block of rows that is
    contiguous in the output (one per frame of an IMAGE; one per channel and frame of a video), so
    it is a plain device-to-host copy into the pinned arena, with no staging buffer."""

    def __init__(self, out: torch.Tensor, rows: slice, image: bool, batch: int, device: torch.device):
        self.out, self.rows, self.image, self.batch = out, rows, image, batch
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _convert(self, x: torch.Tensor) -> torch.Tensor:
        if self.image:  # VAE.process_output of the Wan VAE, as ComfyUI applies it to the fp32 output
            y = x.to(torch.float32, copy=True).add_(1.0).div_(2.0).clamp_(0.0, 1.0)
            return y.permute(0, 2, 3, 4, 1).contiguous()  # [B, f, rows, W, C]
        return x.float()

    def __call__(self, frame: int, x: torch.Tensor):
        if self.stream is None:
            self._write(frame, self._convert(x), False)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            y = self._convert(x)  # allocated on the side stream, freed in its order
            self._write(frame, y, True)
        x.record_stream(self.stream)

    def _write(self, frame: int, y: torch.Tensor, non_blocking: bool):
        if self.image:
            for i, dst in enumerate(self._image_targets(frame, y.shape[1])):
                _copy_blocks(dst, y[i], non_blocking)
        else:
            _copy_blocks(self.out[:, :, frame:frame + y.shape[2], self.rows], y, non_blocking)

    def _image_targets(self, frame: int, f: int):
        frames = self.out.shape[0] // self.batch  # the IMAGE holds the batch's videos one after another
        return [self.out[i * frames + frame:i * frames + frame + f, self.rows] for i in range(self.batch)]

    def finish(self):
        if self.stream is not None:
            self.stream.synchronize()


def _copy_blocks(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool):
    """dst <- src, one copy per contiguous block of `dst` (a device-to-host copy into a strided
    host view would go through a pageable staging tensor)."""
    if dst.is_contiguous() or src.device == dst.device:
        dst.copy_(src, non_blocking=non_blocking)
        return
    for d, s_ in zip(dst.unbind(0), src.unbind(0)):
        _copy_blocks(d, s_, non_blocking)
