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
temporal schedule, so the cache works unchanged. The encoder runs diffusers' (one frame, then four
per call). The decoder (``decode``) takes one latent frame per call, as diffusers' ``_decode``, and
after the upsamplers goes on in pieces of frames (DECODE_SCHEDULES; by default one or two frames at
a time at the full resolution, by the band's size, where diffusers carries the call's four frames
and ComfyUI's ``Decoder3d.run_up`` two-frame pieces): the same causal result, with a quarter or half
of diffusers' activations at the full resolution. Its residual blocks and head write the norm and
SiLU straight into the causal conv's padded input. The result equals the single-process decode up
to float summation order
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
        self.pieces: Optional[tuple[int, ...]] = None  # the current decode's schedule (decode_pieces)
        self._head_one = False  # its head sees one frame at a time (the partial-sum cache, `_head`)
        cfg = vae.config
        self.spatial = cfg.scale_factor_spatial or 8
        if not isinstance(vae.decoder.nonlinearity, torch.nn.SiLU):  # _norm_conv applies SiLU itself
            raise ValueError(f"the Wan VAE's decoder uses SiLU; this one uses {vae.decoder.nonlinearity!r}")
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
        columns left and right), with the padded input built in one buffer (`_padded`) whose height
        padding holds the neighbours' rows (of the cache frames too)."""
        def forward(x, cache_x=None):
            buf, new, weight = self._padded(m, cache_x, x)
            new.copy_(x)
            return self._conv_padded(m, buf, weight)

        return forward

    def _padded(self, m, cache_x: Optional[torch.Tensor], x: torch.Tensor):
        """The padded input of the causal 3D conv `m` for the frames of `x` after `cache_x`:
        (buffer, the view of it that the frames of `x` go to (not written yet), weight). Only the
        padding is zeroed (the buffer is not filled twice). When the leading zero frames feed a
        single output frame (the first chunks, as ComfyUI's ``causal_zero`` fast path) they are not
        built at all: the conv runs with the kernel's last taps only, the same sum without its zero
        terms."""
        wl, wr, p, _, tpad, tafter = m._padding
        kt = m.kernel_size[0]
        assert tafter == 0 and p == m._padding[3] and m.stride[0] == 1 and tpad == kt - 1, (m._padding, m.stride)
        cached = cache_x.shape[2] if cache_x is not None and tpad > 0 else 0
        front = tpad - cached
        b, c, t, h, w = x.shape
        frames = cached + t
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
        if cached:
            buf[:, :, front:front + cached, p:p + h, wl:wl + w] = cache_x.to(x.device)
        return buf, buf[:, :, front + cached:, p:p + h, wl:wl + w], weight

    def _conv_padded(self, m, buf: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The conv on a buffer from `_padded` once its frames are in: the halo rows, then the conv.
        One output frame (the first call's convs, every conv of a one-frame piece): a 2D conv over
        the buffer's channels x frames, the kernel's taps as input channels (the same sum; cuDNN's
        and oneDNN's 2D kernels, where a depth-1 3D conv takes slower paths, on the CPU im2col with
        27x the input)."""
        wl, wr, p = m._padding[:3]
        self.halo.fill(buf[..., wl:buf.shape[-1] - wr], p, p)
        b, c, t = buf.shape[:3]
        if t == weight.shape[2] and m.groups == 1 and m.dilation[0] == 1:
            w2 = weight.reshape(weight.shape[0], c * t, *weight.shape[3:])
            out = torch.nn.functional.conv2d(buf.view(b, c * t, *buf.shape[3:]), w2, m.bias, m.stride[1:], 0,
                                             m.dilation[1:])
            return out.unsqueeze(2)
        if weight is m.weight:
            return torch.nn.Conv3d.forward(m, buf)
        return torch.nn.functional.conv3d(buf, weight, m.bias, m.stride, 0, m.dilation, m.groups)

    def _norm_conv(self, conv, norm, box: list, cache: list, idx: list) -> torch.Tensor:
        """conv(SiLU(norm(x))) with the conv's cache entry, as diffusers' WanResidualBlock and
        decoder head run it, the norm and SiLU written straight into the conv's padded input (no
        separate normalised, activated or concatenated copies). The cache keeps the conv input's
        last two frames: a two-frame entry and a one-frame input (every call but the first two of a
        one-frame-at-a-time decode) shift in place, nothing allocated. `box`: [x], emptied here (x
        is freed once it is in the buffer, where the caller holds no other reference)."""
        x = box.pop()
        i = idx[0]
        idx[0] += 1
        old = cache[i]
        buf, new, weight = self._padded(conv, old, x)
        _rms_norm_into(norm, x, new)
        del x
        torch.nn.functional.silu(new, inplace=True)
        if old is not None and old.shape[2] == CACHE_T and new.shape[2] == 1:
            old[:, :, 0].copy_(old[:, :, 1])
            old[:, :, 1].copy_(new[:, :, 0])
        else:
            cache[i] = _cache_entry(new, old)
        return self._conv_padded(conv, buf, weight)

    def _head(self, box: list, cache: list, idx: list) -> torch.Tensor:
        """The decoder head, conv_out(SiLU(norm_out(x))), on one frame, its causal cache held as
        partial sums: conv_out maps 96 (Wan 2.1) channels to 3, so instead of its input's last two
        frames (the largest cache entry there is, at the full resolution) the entry is what those
        frames add to the next two outputs, 3 channels each. One conv of the frame with the three
        temporal taps stacked as output channels gives its share of this output and of the next
        two; the sums in fp32, rounded once. Where the schedule's last pieces hold more than one
        frame, or the head has more output than input channels: `_norm_conv` (the kind is fixed for
        a decode, so one cache entry never changes kind)."""
        dec = self.vae.decoder
        conv = dec.conv_out
        kt, cout = conv.kernel_size[0], conv.out_channels
        if not self._head_one or cout * kt > conv.in_channels or conv._padding[4] != kt - 1:
            return self._norm_conv(conv, dec.norm_out, box, cache, idx)
        assert box[0].shape[2] == 1, box[0].shape  # `_up` hands the head one frame at a time
        x = box.pop()
        i = idx[0]
        idx[0] += 1
        buf, new, weight = self._padded(conv, None, x)  # one frame, no zero frames: the last tap alone
        _rms_norm_into(dec.norm_out, x, new)
        del x
        torch.nn.functional.silu(new, inplace=True)
        wl, wr, p = conv._padding[:3]
        self.halo.fill(buf[..., wl:buf.shape[-1] - wr], p, p)
        taps = conv.weight.permute(2, 0, 1, 3, 4).reshape(kt * cout, conv.in_channels, *conv.kernel_size[1:])
        part = torch.nn.functional.conv2d(buf.squeeze(2), taps).float().unsqueeze(2)  # [b, kt * cout, 1, h, w]
        del buf, new
        part = part.unflatten(1, (kt, cout))  # tap k of the frame: its term in output t + (kt - 1 - k)
        out = part[:, kt - 1].clone()
        sums = cache[i]  # sums[j]: what the earlier frames add to output t + j (j = 0 .. kt - 2)
        if sums is not None:
            out += sums[0]
        if conv.bias is not None:
            out += conv.bias.float().view(1, cout, 1, 1, 1)
        nxt = [part[:, kt - 2 - j].clone() for j in range(kt - 1)]
        if sums is not None:
            for j in range(kt - 2):
                nxt[j] += sums[j + 1]
        cache[i] = nxt
        return out.to(weight.dtype)

    def _resnet(self, r, box: list, cache: list, idx: list) -> torch.Tensor:
        """diffusers' WanResidualBlock.forward (eval: no dropout) on `_norm_conv`: shortcut, then
        conv1(SiLU(norm1(x))), conv2(SiLU(norm2(.))), the sum in place. `box`: [x], emptied."""
        x = box.pop()
        h = r.conv_shortcut(x)
        box = [x]
        del x
        y = self._norm_conv(r.conv1, r.norm1, box, cache, idx)
        box = [y]
        del y
        return self._norm_conv(r.conv2, r.norm2, box, cache, idx).add_(h)

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
        def forward(x):
            denom = _rms_denom(m, x)
            return _rms_scale(m, torch.div(x, denom))

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
    def decode(self, z_local: torch.Tensor, latent_height: int, sink=None, schedule: str = "") -> Optional[torch.Tensor]:
        """This rank's latent rows [B, z, T, rows, W] -> its pixel rows [B, C, 1 + 4(T-1), rows*s, W*s]
        in [-1, 1] (the decoder's clamp).

        One latent frame per decoder call (diffusers' ``_decode``), the causal cache between calls;
        inside a call the frames go on through the finer scales in the pieces `schedule` names
        (DECODE_SCHEDULES; "" is DECODE_SCHEDULE; see `_up`), every schedule the same result. Each
        piece's frames are handed on as they come: ``sink(frame, x)`` gets the frames
        [frame, frame + x.shape[2]) and the decode returns None, so the whole video is never held
        on the device; without a sink they are concatenated once and returned."""
        start, n = self._band(latent_height)
        if z_local.shape[-2] != n:
            raise ValueError(f"rank {self.halo.rank} holds {n} latent rows, got {z_local.shape[-2]}")
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        vae = self.vae
        dec = vae.decoder
        ups = [b for b, blk in enumerate(dec.up_blocks) if _upsampler(blk) is not None]
        # a frame of the largest band at the finest scale: every rank makes the same choice (the halos pair up)
        finest = max(self.counts) * z_local.shape[-1] * 4 ** len(ups)
        self.pieces = decode_pieces(schedule, len(dec.up_blocks), finest)
        self._head_one = self.pieces is not None and bool(ups) and self.pieces[ups[-1]] == 1
        patch = vae.config.patch_size
        chunks, frame = [], [0]

        def emit(out):
            if patch is not None:
                out = unpatchify(out, patch_size=patch)
            out = out.clamp_(-1.0, 1.0)
            if sink is None:
                chunks.append(out)
            else:
                sink(frame[0], out)
            frame[0] += out.shape[2]

        vae.clear_cache()
        try:
            x = vae.post_quant_conv(z_local)
            cache = vae._feat_map
            for i in range(x.shape[2]):
                if self.pieces is None:  # diffusers' own decoder, as AutoencoderKLWan._decode runs it
                    vae._conv_idx = [0]
                    emit(dec(x[:, :, i:i + 1], feat_cache=cache, feat_idx=vae._conv_idx, first_chunk=i == 0))
                    continue
                idx = [0]
                y = _cached(dec.conv_in, x[:, :, i:i + 1], cache, idx)
                mid = dec.mid_block
                y = self._resnet(mid.resnets[0], [y], cache, idx)
                for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
                    if attn is not None:
                        y = attn(y)
                    y = self._resnet(resnet, [y], cache, idx)
                box = [y]
                del y
                self._up(0, box, cache, idx, i == 0, emit)
        finally:
            vae.clear_cache()
        return torch.cat(chunks, dim=2) if sink is None else None

    def _up(self, b: int, box: list, cache: list, idx: list, first: bool, emit):
        """Up block `b` of the decoder (then the next ones, then the head) on `x`: diffusers'
        ``WanUpBlock`` / ``WanResidualUpBlock`` and head with the causal cache, except that the
        frames an upsampler makes go on in pieces of ``self.pieces[b]`` frames (0: all of them, as
        diffusers): the upsampler's time conv runs on `x`, then its 2D part (nearest x2 and the
        3x3 conv, per frame) and everything after it run piece by piece, each piece reading and
        updating the same cache entries (`idx` copied), as ComfyUI's ``Decoder3d.run_up`` does with
        two-frame pieces. The causal convs see the same inputs (their cache holds the previous two
        frames either way), so the result is the one-call result; only the size of each call
        changes. `box`: [x], emptied (every tensor is held only as long as it is needed)."""
        dec = self.vae.decoder
        if b == len(dec.up_blocks):
            emit(self._head(box, cache, idx))
            return
        block = dec.up_blocks[b]
        up = _upsampler(block)
        # Wan 2.2's WanResidualUpBlock adds a DupUp3D shortcut of its input (WanUpBlock has none)
        skip = box[0] if getattr(block, "avg_shortcut", None) is not None else None
        for resnet in block.resnets:
            box = [self._resnet(resnet, box, cache, idx)]
        if up is None:
            self._up(b + 1, box, cache, idx, first, emit)
            return
        x = _time_upsample(up, box.pop(), cache, idx)
        frames = x.shape[2]
        step = self.pieces[b] or frames
        if step >= frames:  # one piece: x and the shortcut's input go before the finer scales run
            box = [self._piece(block, up, x, skip, 0, frames, first)]
            del x, skip
            self._up(b + 1, box, cache, idx, first, emit)
            return
        for t in range(0, frames, step):
            last = t + step >= frames
            self._up(b + 1, [self._piece(block, up, x, skip, t, min(step, frames - t), first)], cache,
                     idx if last else list(idx), first, emit)

    @staticmethod
    def _piece(block, up, x: torch.Tensor, skip: Optional[torch.Tensor], t: int, n: int, first: bool
               ) -> torch.Tensor:
        """Frames [t, t + n) of the up block's output: the upsampler's 2D half on those frames of
        its time half `x`, plus (Wan 2.2's residual up block) the DupUp3D shortcut's frames, each
        made from the one input frame it repeats (its first call drops the first factor_t - 1)."""
        y = _spatial_resample(up, x[:, :, t:t + n])
        if skip is None:
            return y
        if t == 0 and n == x.shape[2]:
            return y + block.avg_shortcut(skip, first_chunk=first)
        ft = block.avg_shortcut.factor_t
        parts = []
        for f in range(t, t + n):
            g = f + (ft - 1 if first else 0)
            parts.append(block.avg_shortcut(skip[:, :, g // ft:g // ft + 1])[:, :, g % ft:g % ft + 1])
        return y + (parts[0] if n == 1 else torch.cat(parts, dim=2))

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

    def run(self, key: str, encode: bool, full_input: torch.Tensor, out: torch.Tensor, image: bool = False,
            schedule: str = "") -> slice:
        """This rank's share of a decode (`full_input`: the whole latent) or an encode (the whole
        video), read from `full_input` and written into its rows of `out` (views of the arena are
        fine; `out` fp32 on the CPU). Returns those rows, as a slice of the output's height.

        A decode writes each decoder call's frames as they come (`_HostSink`): converted on the
        device, then copied to the host on a side stream while the next call computes, so neither
        the video nor an fp32 copy of it is ever whole on the device. `image`: `out` is ComfyUI's
        IMAGE, [B * frames, H, W, C] in [0, 1] (the Wan VAE's process_output: (x + 1) / 2 clamped,
        taken in fp32 on the device), else the video [B, C, frames, H, W] in [-1, 1]. `schedule`:
        the decode's (DECODE_SCHEDULES)."""
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
            sp.decode(x, latent_h, sink=sink, schedule=schedule)
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


# How the decoder's frames go through the finer scales (SequenceParallelVAE.decode): for each up
# block, the frames per piece after its upsampler (0: all of the block's frames, as diffusers), or None
# for diffusers' own WanDecoder3d. One latent frame per decoder call in all; every schedule gives the
# same result (the causal cache carries across pieces); they differ in activation memory and in how
# many (smaller) kernels run. Per latent frame, frames at the latent / 2x / 4x / 8x scales:
DECODE_SCHEDULES: dict[str, Optional[tuple[int, ...]]] = {
    "diffusers": None,       # 1 / 2 / 4 / 4, diffusers' modules as they are
    "whole": (0, 0, 0),      # 1 / 2 / 4 / 4 on this module's blocks (norms written into the convs' inputs)
    "full1": (0, 0, 1),      # 1 / 2 / 4 / 1: the full resolution one frame at a time
    "full2": (0, 0, 2),      # 1 / 2 / 4 / 2
    "comfy": (2, 2, 2),      # 1 / 2 / 2 / 2: ComfyUI's Decoder3d.run_up (two-frame pieces)
    "frame": (1, 1, 1),      # 1 / 1 / 1 / 1
}
# "auto" (the default): full1 where the largest band's frame at the decoder's finest scale has at least
# AUTO_FULL1_PIXELS pixels, else full2. Measured on 4x H200 (BENCHMARKS.md, "decode schedules"): full1
# takes 6% longer than diffusers' schedule at 720p on 2 GPUs (461k pixels a band) for 0.63 of its peak,
# but 26% longer at 480p on 2 (200k) and 58% at 480p on 4 (100k), where full2 takes 10-12% longer and
# holds 0.76-0.78 of diffusers' peak. Below the threshold the per-piece costs (a halo exchange and a
# few small kernels per conv) outweigh the work of a piece.
DECODE_SCHEDULE = "auto"
AUTO_FULL1_PIXELS = 1 << 18


def decode_pieces(schedule: str, blocks: int, band_pixels: int = 0) -> Optional[tuple[int, ...]]:
    """The pieces of `schedule` (a DECODE_SCHEDULES name, "auto" or "" for the default, or frames
    per piece after each up block's upsampler, comma-separated: "0,0,1") for a decoder of `blocks`
    up blocks (blocks past the list: 0). `band_pixels`: one frame of the largest band at the
    decoder's finest scale (what "auto" chooses by; the same on every rank)."""
    name = schedule or DECODE_SCHEDULE
    if name == "auto":
        name = "full1" if band_pixels >= AUTO_FULL1_PIXELS else "full2"
    if name in DECODE_SCHEDULES:
        pieces = DECODE_SCHEDULES[name]
    else:
        try:
            pieces = tuple(int(p) for p in name.split(","))
        except ValueError:
            pieces = (-1,)
        if any(p < 0 for p in pieces):
            raise ValueError(f"VAE decode schedule must be 'auto', one of {sorted(DECODE_SCHEDULES)} or frames per "
                             f"piece after each up block (e.g. '0,0,1'), got {schedule!r}")
    return None if pieces is None else (pieces + (0,) * blocks)[:blocks]


def schedule_name(pieces: Optional[tuple[int, ...]]) -> str:
    """The DECODE_SCHEDULES name of `pieces` (trailing zeros ignored), else the pieces as "0,1,1"."""
    def strip(p: tuple) -> tuple:
        while p and not p[-1]:
            p = p[:-1]
        return p

    if pieces is None:
        return "diffusers"
    for name, known in DECODE_SCHEDULES.items():
        if known is not None and strip(known) == strip(tuple(pieces)):
            return name
    return ",".join(str(p) for p in strip(tuple(pieces)))


def _upsampler(block):
    """The upsampler of a decoder up block (WanUpBlock or Wan 2.2's WanResidualUpBlock), or None."""
    if not hasattr(block, "upsamplers"):
        return block.upsampler
    return block.upsamplers[0] if block.upsamplers is not None else None


CACHE_T = 2  # frames a causal conv keeps of its input between calls (diffusers' and ComfyUI's CACHE_T)


def _cache_entry(x: torch.Tensor, old: Optional[torch.Tensor]) -> torch.Tensor:
    """The cache entry a causal conv leaves after input `x` (the entry before: `old`): the last
    CACHE_T frames of `x`, contiguous, with `old`'s last frame first when `x` has fewer."""
    keep = x[:, :, -CACHE_T:].clone(memory_format=torch.contiguous_format)
    if keep.shape[2] < CACHE_T and old is not None:
        keep = torch.cat([old[:, :, -1:].to(keep.device), keep], dim=2)
    return keep


def _cached(conv, x: torch.Tensor, cache: list, idx: list) -> torch.Tensor:
    """A causal conv of the decoder with its cache entry, as diffusers' WanDecoder3d runs
    ``conv_in`` / ``conv_out`` (and WanResidualBlock its convs): the new cache is the input's last
    two frames (the previous call's last frame first when the input has one)."""
    i = idx[0]
    keep = _cache_entry(x, cache[i])
    x = conv(x, cache[i])
    cache[i] = keep
    idx[0] += 1
    return x


def _time_upsample(up, x: torch.Tensor, cache: list, idx: list) -> torch.Tensor:
    """The temporal half of diffusers' ``WanResample.forward`` for 'upsample3d' (the time conv
    with its cache, 'Rep' on the first call, frames doubled by interleaving); other modes: `x`."""
    if up.mode != "upsample3d":
        return x
    b, c, t, h, w = x.shape
    i = idx[0]
    idx[0] += 1
    if cache[i] is None:  # the first call: no time conv, one frame stays one
        cache[i] = "Rep"
        return x
    rep = isinstance(cache[i], str)  # after 'Rep' the frame before is a zero frame
    keep = _cache_entry(x, torch.zeros_like(x[:, :, :1]) if rep else cache[i])
    x = up.time_conv(x) if rep else up.time_conv(x, cache[i])
    cache[i] = keep
    x = x.reshape(b, 2, c, t, h, w)
    return torch.stack((x[:, 0], x[:, 1]), 3).reshape(b, c, t * 2, h, w)


def _spatial_resample(up, x: torch.Tensor) -> torch.Tensor:
    """The 2D half of diffusers' ``WanResample.forward`` (upsample modes): per frame."""
    b, c, t, h, w = x.shape
    y = up.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    return y.view(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)


def _rms_denom(m, x: torch.Tensor) -> torch.Tensor:
    dim = 1 if m.channel_first else -1
    return torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min_(1e-12)  # F.normalize's eps


def _rms_scale(m, y: torch.Tensor) -> torch.Tensor:
    y.mul_((m.gamma.float() * m.scale).to(y.dtype))  # same dtype: no full-size cast buffer
    if isinstance(m.bias, torch.Tensor):
        y.add_(m.bias)
    return y


def _rms_norm_into(m, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """SequenceParallelVAE._rms_norm's math written into `out` (a view: the conv's padded input)."""
    return _rms_scale(m, torch.div(x, _rms_denom(m, x), out=out))
