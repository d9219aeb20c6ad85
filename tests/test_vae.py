"""The parallel Wan VAE on CPU: real torchrun + gloo groups of 2 and 4 ranks against the
single-process diffusers VAE, decode and encode, Wan 2.1 and 2.2, at a latent height (5 rows) that
neither 2 nor 4 divides (4 ranks hold 2/1/1/1 rows: a one-row band needs its halo from both
sides). Against ComfyUI's own VAE code: tests/test_vae_comfyui.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch

from comfyui_xdit_usp import wan_to_xdit_mapping as M
from comfyui_xdit_usp.parallel import WorkerError, WorkerGroup, XDitUSPConfig, tiny
from comfyui_xdit_usp.parallel.launcher import vae_key
from comfyui_xdit_usp.parallel.sp_vae import AUTO_FULL1_PIXELS, DECODE_SCHEDULES, decode_pieces, split_rows
from procs import shm_segments, wait_gone
from workflow_utils import CLI

TOL = 1e-5
LATENT = (2, 5, 6)  # latent frames, rows, columns: 5 frames of video
VERSIONS = tiny.VAE_VERSIONS


def cpu_config(world: int) -> XDitUSPConfig:
    return XDitUSPConfig(world_size=world, device="cpu", dtype="fp32", launch_timeout_s=120, forward_timeout_s=120)


@pytest.fixture(scope="module")
def vaes():
    return {v: tiny.build_vae(v, seed=3) for v in VERSIONS}


@pytest.fixture(scope="module")
def cases(vaes):
    """{(version, encode): (input, single-process output)}."""
    out = {}
    g = torch.Generator().manual_seed(5)
    for v, vae in vaes.items():
        s = 16 if v == "2.2" else 8
        z = torch.randn(1, vae.config.z_dim, *LATENT, generator=g)
        x = torch.rand(1, 3, 1 + 4 * (LATENT[0] - 1), LATENT[1] * s, LATENT[2] * s, generator=g) * 2 - 1
        out[v, False] = (z, tiny.vae_reference(vae, z, encode=False))
        out[v, True] = (x, tiny.vae_reference(vae, x, encode=True))
    return out


# ---- no workers -----------------------------------------------------------------------------------------
def test_split_rows():
    assert split_rows(5, 2) == [(0, 3), (3, 2)]
    assert split_rows(5, 4) == [(0, 2), (2, 1), (3, 1), (4, 1)]
    assert split_rows(8, 4) == [(0, 2), (2, 2), (4, 2), (6, 2)]
    with pytest.raises(ValueError, match="3 rows high cannot be split over 4"):
        split_rows(3, 4)


@pytest.mark.parametrize("version", VERSIONS)
def test_key_table_round_trip(vaes, version):
    sd = vaes[version].state_dict()
    comfy = tiny.vae_comfy_state_dict(vaes[version], version)
    assert not set(comfy) & set(sd) - {"encoder.conv_in.weight"}  # ComfyUI's names, not diffusers'
    back, info = M.vae_to_diffusers(comfy)
    assert info.version == version and info.z_dim == vaes[version].config.z_dim
    assert set(back) == set(sd) and all(back[k] is comfy[M.vae_key_to_original(k, version)] for k in back)
    cfg = tiny.tiny_vae_config(version)
    assert {k: info.diffusers_config[k] for k in cfg if k not in ("latents_mean", "latents_std")} == \
        {k: v for k, v in cfg.items() if k not in ("latents_mean", "latents_std")}


def test_decode_schedules():
    """auto: one frame at a time at the finest scale for a big band (Wan 2.1, 720p on 2 ranks: 45 x
    160 latent rows x columns), two for a small one (480p on 2: 30 x 104); bad names fail."""
    assert decode_pieces("", 4, 45 * 160 * 64) == DECODE_SCHEDULES["full1"] + (0,) == (0, 0, 1, 0)
    assert decode_pieces("auto", 4, 30 * 104 * 64) == (0, 0, 2, 0) and 30 * 104 * 64 < AUTO_FULL1_PIXELS
    assert decode_pieces("diffusers", 4) is None and decode_pieces("2,1", 4) == (2, 1, 0, 0)
    for bad in ("fastest", "1,-1", "1,x"):
        with pytest.raises(ValueError, match="VAE decode schedule must be 'auto', one of"):
            decode_pieces(bad, 4)


@pytest.mark.parametrize("version", VERSIONS)
def test_one_rank_in_process_is_the_plain_vae(vaes, cases, version):
    """No process group: the layer replacements alone (the halos are the zero padding) change
    nothing but float rounding (the norm's two scalings folded into one, the first frames' convs
    without their zero taps): the path of a one-GPU config. Every decode schedule (pieces of
    frames through the finer scales) gives the same video."""
    import copy

    from comfyui_xdit_usp.parallel.sp_vae import SequenceParallelVAE

    sp = SequenceParallelVAE(copy.deepcopy(vaes[version]))
    for encode in (False, True):
        x, ref = cases[version, encode]
        out = sp.encode(x, LATENT[1]) if encode else sp.decode(x, LATENT[1])
        assert tiny.rel_err(out, ref) <= TOL
    x, ref = cases[version, False]
    for schedule in [*DECODE_SCHEDULES, "2,1,0", "1,0,2"]:
        assert tiny.rel_err(sp.decode(x, LATENT[1], schedule=schedule), ref) <= TOL, schedule


def test_not_a_wan_vae_fails_before_anything_starts(vaes):
    group = WorkerGroup(cpu_config(2))
    with pytest.raises(M.CheckpointError, match="not a Wan VAE"):
        group.vae_load({"decoder.conv_in.weight": torch.zeros(1)}, "fp32")
    comfy = tiny.vae_comfy_state_dict(vaes["2.1"], "2.1")
    comfy["decoder.head.2.weight"] = comfy["decoder.head.2.weight"][:, :4]
    with pytest.raises(M.CheckpointError, match=r"shapes: decoder.head.2.weight is \(3, 4, 3, 3, 3\), expected \(3, 8, 3, 3, 3\)$"):
        group.vae_load(comfy, "fp32")
    with pytest.raises(ValueError, match="VAE dtype"):
        group.vae_load(tiny.vae_comfy_state_dict(vaes["2.1"], "2.1"), "fp8")
    assert group.proc is None


# ---- worker groups ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def group(request):
    with WorkerGroup(cpu_config(request.param)) as g:
        yield g


@pytest.mark.parametrize("version,encode", [(v, e) for v in VERSIONS for e in (False, True)],
                         ids=lambda p: {False: "decode", True: "encode"}.get(p, p) if isinstance(p, bool) else p)
def test_parity_with_single_process(group, vaes, cases, version, encode):
    comfy = tiny.vae_comfy_state_dict(vaes[version], version)
    key = group.vae_load(comfy, "fp32")
    x, ref = cases[version, encode]
    stats = {}
    out = (group.vae_encode if encode else group.vae_decode)(key, x, stats=stats)
    assert out.shape == ref.shape and out.dtype == torch.float32
    err = tiny.rel_err(out, ref)
    print(f"\n{group.config.world_size} ranks, Wan {version} {'encode' if encode else 'decode'}: max_rel_err {err:.2e}")
    assert err <= TOL
    s = 16 if version == "2.2" else 8
    bands = split_rows(LATENT[1], group.config.world_size)
    scale = 1 if encode else s
    assert stats["rows"] == [[a * scale, (a + n) * scale] for a, n in bands]  # every rank wrote its own band
    if not encode:  # the IMAGE the node takes, made on the ranks: ComfyUI's process_output and layout
        image = group.vae_decode(key, x, image=True)
        want = ref.add(1.0).div_(2.0).clamp_(0.0, 1.0).movedim(1, -1).reshape(-1, *ref.shape[-2:], ref.shape[1])
        assert image.shape == want.shape and image.dtype == torch.float32
        assert tiny.rel_err(image, want) <= TOL
        # the other decode schedules, split: the halos and the causal cache across pieces of frames
        for schedule in ("diffusers", "full1", "comfy", "frame"):
            assert tiny.rel_err(group.vae_decode(key, x, schedule=schedule), ref) <= TOL, schedule


def test_auto_schedule_is_one_choice_when_bands_straddle_its_threshold(group, vaes):
    """A latent so wide that the largest band's frame is past AUTO_FULL1_PIXELS at the finest
    scale and the smallest one's is not (2 ranks: 3/2 rows, 4 ranks: 2/1/1/1): every rank runs
    the largest band's choice (one frame at a time), so the halos pair up, and the video is bit
    for bit the one of full1 named on every rank (whose parity the tests above check at small
    sizes; a single-process reference at this width takes ~40 s)."""
    vae = vaes["2.1"]
    world = group.config.world_size
    width = 1400 if world == 2 else 2100
    most, least = max(n for _, n in split_rows(LATENT[1], world)), min(n for _, n in split_rows(LATENT[1], world))
    assert least * width * 64 < AUTO_FULL1_PIXELS <= most * width * 64
    z = torch.randn(1, vae.config.z_dim, LATENT[0], LATENT[1], width, generator=torch.Generator().manual_seed(7))
    key = group.vae_load(tiny.vae_comfy_state_dict(vae, "2.1"), "fp32")
    stats = {}
    out = group.vae_decode(key, z, stats=stats)
    assert stats["schedule"] == ["full1"] * world
    assert torch.equal(out, group.vae_decode(key, z, schedule="full1"))


def test_weights_cross_once_per_content(group, vaes):
    comfy = tiny.vae_comfy_state_dict(vaes["2.1"], "2.1")
    key = group.vae_load(comfy, "fp32")
    held = group.vae[2]
    assert group.vae_load({k: v.clone() for k, v in comfy.items()}, "fp32") == key  # same content: not sent
    assert group.vae[2] is held
    assert key == vae_key(M.vae_to_diffusers(comfy)[0], "fp32")
    assert group.vae_load(comfy, "fp32", key=key) == key and group.vae[2] is held
    changed = dict(comfy, **{"decoder.head.2.bias": comfy["decoder.head.2.bias"] + 1})
    assert group.vae_load(changed, "fp32") != key and group.vae[2] is not held


def test_bad_inputs_are_refused_before_any_rank_runs(group, vaes):
    key = group.vae_load(tiny.vae_comfy_state_dict(vaes["2.1"], "2.1"), "fp32")
    with pytest.raises(ValueError, match="decodes 16-channel latents, got 48"):
        group.vae_decode(key, torch.zeros(1, 48, 2, 5, 6))
    with pytest.raises(ValueError, match="multiples of 8"):
        group.vae_encode(key, torch.zeros(1, 3, 5, 44, 48))
    with pytest.raises(ValueError, match=f"cannot be split over {group.config.world_size}"):
        group.vae_decode(key, torch.zeros(1, 16, 2, 1, 6))
    with pytest.raises(KeyError, match="not loaded"):
        group.vae_decode("vae-nothing", torch.zeros(1, 16, 2, 5, 6))
    with pytest.raises(ValueError, match="VAE decode schedule must be"):
        group.vae_decode(key, torch.zeros(1, 16, 2, 5, 6), schedule="fastest")
    assert group.alive


def test_a_rank_failing_mid_decode_fails_the_call_in_seconds(vaes):
    """Rank 1 raises before its decode while rank 0 waits for its halo rows: the call fails naming
    rank 1 within seconds (not at the timeout), and the group, its processes and its shared memory
    are gone."""
    group = WorkerGroup(cpu_config(2), env={"XDIT_USP_FAULT": "vae_raise@1"})
    key = group.vae_load(tiny.vae_comfy_state_dict(vaes["2.1"], "2.1"), "fp32")
    log_dir, arena = group.log_dir, group.arena.name
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as e:
        group.vae_decode(key, torch.zeros(1, 16, *LATENT))
    assert time.monotonic() - t0 < 15
    assert e.value.rank == 1 and str(e.value).startswith("rank 1 failed in 'vaedecode': RuntimeError: injected fault")
    assert group.proc is None and wait_gone(log_dir) == []
    assert arena not in shm_segments(os.getpid())


# ---- the command line ------------------------------------------------------------------------------------
def test_cli_vae_encode():
    """The default size: 11 latent rows, which no N in 2..8 divides (2 ranks: 6/5)."""
    r = subprocess.run(CLI + ["vae", "--gpus", "2", "--device", "cpu", "--encode", "--frames", "1", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["latent"] == [1, 11, 12] and out["latent_rows_per_rank"] == [6, 5]
    assert out["max_rel_err"] <= TOL and out["ms"] > 0 and len(out["peak_rss_per_rank"]) == 2
    assert out["mode"] == "encode" and "rows split 6/5" in r.stdout


def test_cli_vae_usage_errors():
    r = subprocess.run(CLI + ["vae", "--device", "cpu", "--vae", "wan2.2", "--height", "88"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "must be a multiple of 16 for the Wan 2.2 VAE" in r.stderr
