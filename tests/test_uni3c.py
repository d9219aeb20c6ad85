"""Uni3C camera control on the worker group (parallel/uni3c.py): real torchrun + gloo groups on CPU,
fp32, a tiny Wan model and a tiny random Uni3C net, against the single-process reference
`tiny.uni3c_reference`, written from ComfyUI's comfy/ldm/wan/uni3c.py and WanUni3CCnetPatch (not
from parallel/uni3c.py): the control
net runs on the first cond's rows, its residual proj_out[i](hidden) * strength is added after
Wan block i, repeated over the other conds' rows.

Two launches: Ulysses 2 (replicated weights), and CFG split 2 with fsdp, whose batch-1 calls take
the ring-2 fallback layout; a padded token count (45 tokens on 2 ranks) in both.
"""
from __future__ import annotations

import torch

from comfyui_xdit_usp.parallel import WorkerGroup, XDitUSPConfig, tiny
from comfyui_xdit_usp.parallel.tiny import rel_err

TOL = 1e-5


def test_uni3c_matches_the_single_process_patch(checkpoints):
    import dataclasses

    path, model = checkpoints["i2v"]  # 36 input channels: the control takes x[:, :20] (noise + mask)
    sd = tiny.uni3c_state_dict(model.config.num_attention_heads * model.config.attention_head_dim)
    cases = []
    for batch, size, n, strength in ((2, (3, 6, 10), 1, 0.7), (1, (2, 8, 8), 1, -1.3), (2, (2, 8, 8), 2, 1.0)):
        kw = tiny.random_inputs("i2v", batch, *size, seed=11 + batch)
        g = torch.Generator().manual_seed(5)
        render = torch.randn(n, 16, *size, generator=g)
        control = torch.cat([kw.hidden_states[:n, :20], render], dim=1)
        plain = tiny.reference_forward(model, kw)
        ref = tiny.uni3c_reference(model, sd, kw, control, strength)
        assert rel_err(plain, ref) > 1e-3  # the control changes the output
        cases.append((kw, control, strength, ref))
    for u, r, c, sharding in ((2, 1, 1, "none"), (1, 1, 2, "fsdp")):
        config = XDitUSPConfig(world_size=2, ulysses_degree=u, ring_degree=r, cfg_degree=c, device="cpu", dtype="fp32",
                               weight_sharding=sharding, launch_timeout_s=120, forward_timeout_s=120)
        with WorkerGroup(config) as group:
            group.load("m", path)
            key = group.uni3c_load(sd)
            assert group.uni3c_load(sd) == key  # held: nothing crosses again
            for kw, control, strength, ref in cases:
                out = group.forward("m", dataclasses.replace(kw, uni3c_input=control,
                                                             uni3c={"key": key, "strength": strength}))
                err = rel_err(out, ref)
                assert err <= TOL, (u, r, c, kw.batch, err)
            assert rel_err(group.forward("m", cases[0][0]), tiny.reference_forward(model, cases[0][0])) <= TOL  # off again
