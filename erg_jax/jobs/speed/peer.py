"""The peer: the same DiT-S/2 weights in diffusers' DiTTransformer2DModel (PyTorch, CPU).

A diffusers DiT is built with random weights (every block's copy of the timestep / class
embedder tied to block 0's, as in released checkpoints), saved with ``save_pretrained``
and converted with ``erg_jax.convert.dit.convert_diffusers_dit``, so both frameworks run
the same network. Its CFG step is DiTPipeline's: the batch doubled (labels, then the null
class), one forward under ``torch.no_grad``, the guided eps, a DDIM update; torch uses
2 threads. Our CFG and ERG steps are timed in the same interleaved rounds. Needs the
``parity`` extra (torch, diffusers).
"""

from __future__ import annotations

import tempfile

import jax.numpy as jnp
import numpy as np

from erg_jax.jobs.speed import setups
from erg_jax.jobs.speed.timing import interleaved_medians


def _diffusers_dit(small: bool):
    import torch
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    kw = (
        dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, sample_size=8)
        if small
        else dict(num_attention_heads=6, attention_head_dim=64, num_layers=12, sample_size=32)
    )
    model = DiTTransformer2DModel(
        in_channels=4,
        out_channels=8,
        patch_size=2,
        num_embeds_ada_norm=10 if small else 1000,
        **kw,
    )
    blocks = model.transformer_blocks
    for block in blocks[1:]:
        block.norm1.emb.load_state_dict(blocks[0].norm1.emb.state_dict())
    # adaLN-Zero initialises the gates to zero; random gates make every block count.
    with torch.no_grad():
        for block in blocks:
            torch.nn.init.normal_(block.norm1.linear.weight, std=0.02)
    return model.eval()


def _torch_cfg_step(model, latents, labels, null, t, scale: float, abar, abar_prev):
    """DiTPipeline's guided step: doubled batch, guided eps, then a DDIM update."""
    import torch

    with torch.no_grad():
        latent_in = torch.cat([latents, latents])
        class_in = torch.cat([labels, null])
        t_in = torch.full((latent_in.shape[0],), t, dtype=torch.long)
        out = model(latent_in, timestep=t_in, class_labels=class_in, return_dict=False)[0]
        eps = out[:, : latents.shape[1]]
        cond, uncond = eps.chunk(2)
        eps = uncond + scale * (cond - uncond)
        x0 = (latents - (1 - abar) ** 0.5 * eps) / abar**0.5
        return abar_prev**0.5 * x0 + (1 - abar_prev) ** 0.5 * eps


def peer(small: bool = False, batch: int = 8, repeats: int = 5) -> dict:
    """Step times of diffusers' CFG against our CFG and ERG on the same weights."""
    import torch

    from erg_jax.convert.dit import convert_diffusers_dit

    torch.set_num_threads(2)
    model = _diffusers_dit(small)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        params, cfg = convert_diffusers_dit(folder)
    ours = setups.dit_from_params(cfg, params, small=small, batch=batch)
    keys, x = ours.noise()
    labels = ours.conds["cond"]

    # Same weights, same output: the parity of the converted model.
    t_mid = 500
    ref = model(
        torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()),
        timestep=torch.full((batch,), t_mid, dtype=torch.long),
        class_labels=torch.from_numpy(np.asarray(labels).astype(np.int64)),
        return_dict=False,
    )[0]
    mine = ours.den(x, jnp.full((batch,), float(t_mid)), labels)
    ref = ref.detach().numpy().transpose(0, 2, 3, 1)
    parity = float(np.max(np.abs(np.asarray(mine) - ref)) / np.max(np.abs(ref)))

    lat = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    lab = torch.from_numpy(np.asarray(labels).astype(np.int64))
    null = torch.full_like(lab, cfg["num_classes"])
    abar, abar_prev = 0.5, 0.52

    def torch_step():
        return _torch_cfg_step(model, lat, lab, null, t_mid, 4.0, abar, abar_prev)

    gs = setups.guiders(ours.num_layers)
    fns = {"diffusers_cfg": torch_step}
    for name in ("cfg", "erg"):
        fns[f"ours_{name}"] = setups.Stepper(*setups.jitted_step(ours, gs[name]), 50)
    secs = interleaved_medians(fns, repeats)
    return {
        "model": "DiT-tiny" if small else "DiT-S/2",
        "batch": batch,
        "torch_threads": torch.get_num_threads(),
        "step_ms": {k: 1e3 * v for k, v in secs.items()},
        "ours_cfg_over_diffusers_cfg": secs["ours_cfg"] / secs["diffusers_cfg"],
        "ours_erg_over_diffusers_cfg": secs["ours_erg"] / secs["diffusers_cfg"],
        "output_relative_difference": parity,
    }
