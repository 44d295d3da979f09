"""DiT conversion: parity with diffusers, the original .pt layout, checkpoints, bad files."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from erg_jax import checkpoint
from erg_jax.convert.dit import convert_diffusers_dit, convert_dit_pt
from erg_jax.models import dit, load_denoiser
from launch.convert import convert

torch = pytest.importorskip("torch", reason="parity tests need torch (the `parity` extra)")
diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers")

LAYERS, HEADS, HEAD_DIM, CLASSES = 2, 2, 16, 10


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny random diffusers DiT saved with save_pretrained, and the torch model."""
    torch.manual_seed(0)
    # num_embeds_ada_norm is diffusers' number of classes; the table has one more row.
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=8,
        num_layers=LAYERS,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=CLASSES,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():  # no zeros anywhere: every weight must map
            p.add_(0.05 * torch.randn_like(p))
        # Converted DiT checkpoints hold one embedder, copied into every block.
        emb0 = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(emb0)
    folder = str(tmp_path_factory.mktemp("dit") / "transformer")
    model.save_pretrained(folder)
    return model, folder


def _torch_forward(model, x, t, y):
    with torch.no_grad():
        out = model(
            torch.from_numpy(np.transpose(x, (0, 3, 1, 2))),
            timestep=torch.from_numpy(t),
            class_labels=torch.from_numpy(y),
        ).sample
    return np.transpose(out.numpy(), (0, 2, 3, 1))


@pytest.mark.parity
@pytest.mark.parametrize("scan_blocks", [False, True])
def test_diffusers_parity_through_launch_convert(reference, tmp_path, scan_blocks):
    model, folder = reference
    out_dir = str(tmp_path / "ckpt")
    convert("diffusers-dit", folder, out_dir, scan_blocks=scan_blocks)
    den = load_denoiser(out_dir)
    assert den.config["kind"] == "dit" and den.config["learned_sigma"]
    assert (den.config["prediction"], den.config["time"]) == ("eps", "ddpm")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 8, 8, 4)).astype(np.float32)
    t = np.array([0, 1, 250, 500, 999], np.int64)
    y = np.array([0, 3, 9, CLASSES, CLASSES], np.int64)  # the last two: null class
    want = _torch_forward(model, x, t, y)
    got = np.asarray(jax.jit(den)(x, t.astype(np.float32), y.astype(np.int32)))
    assert got.shape == want.shape == (5, 8, 8, 8)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _to_original_layout(model) -> dict:
    """The diffusers weights renamed to facebookresearch/DiT's keys (qkv fused)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    emb = "transformer_blocks.0.norm1.emb"
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "pos_embed": model.pos_embed.pos_embed.detach().clone(),
        "y_embedder.embedding_table.weight": sd[f"{emb}.class_embedder.embedding_table.weight"],
    }
    for w in ("weight", "bias"):
        out[f"t_embedder.mlp.0.{w}"] = sd[f"{emb}.timestep_embedder.linear_1.{w}"]
        out[f"t_embedder.mlp.2.{w}"] = sd[f"{emb}.timestep_embedder.linear_2.{w}"]
        out[f"final_layer.adaLN_modulation.1.{w}"] = sd[f"proj_out_1.{w}"]
        out[f"final_layer.linear.{w}"] = sd[f"proj_out_2.{w}"]
        for i in range(LAYERS):
            a, b = f"transformer_blocks.{i}", f"blocks.{i}"
            out[f"{b}.attn.qkv.{w}"] = torch.cat([sd[f"{a}.attn1.to_{n}.{w}"] for n in "qkv"])
            out[f"{b}.attn.proj.{w}"] = sd[f"{a}.attn1.to_out.0.{w}"]
            out[f"{b}.mlp.fc1.{w}"] = sd[f"{a}.ff.net.0.proj.{w}"]
            out[f"{b}.mlp.fc2.{w}"] = sd[f"{a}.ff.net.2.{w}"]
            out[f"{b}.adaLN_modulation.1.{w}"] = sd[f"{a}.norm1.linear.{w}"]
    return out


@pytest.mark.parity
def test_dit_pt_layout_converts_to_the_same_params(reference, tmp_path):
    model, folder = reference
    path = str(tmp_path / "DiT-tiny.pt")
    torch.save({"model": _to_original_layout(model)}, path)
    from_pt = convert_dit_pt(path, dit.dit_config("tiny/2"))
    from_diffusers, config = convert_diffusers_dit(folder)
    assert jax.tree_util.tree_structure(from_pt) == jax.tree_util.tree_structure(from_diffusers)
    for a, b in zip(
        jax.tree_util.tree_leaves(from_pt), jax.tree_util.tree_leaves(from_diffusers), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)  # pos_embed: float32 rounding
    # The diffusers model differs from DiT only in these two config fields.
    assert (config["time_freq_shift"], config["mlp_norm_eps"]) == (1, 1e-5)
    # launch.convert's dit-pt path writes a checkpoint with the same params.
    out_dir = str(tmp_path / "ckpt")
    convert("dit-pt", path, out_dir, model="tiny/2")
    params, stored = checkpoint.restore(out_dir)
    assert stored["time"] == "ddpm" and stored["num_layers"] == LAYERS
    for a, b in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(from_pt), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def _mangled(folder, tmp_path, edit):
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), bad / "config.json")
    tensors = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(bad / "diffusion_pytorch_model.safetensors"))
    return str(bad)


@pytest.mark.parity
@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.pop("transformer_blocks.1.attn1.to_k.weight"),
            "missing tensor 'transformer_blocks.1.attn1.to_k.weight'",
        ),
        (
            lambda t: t.update({"proj_out_2.weight": np.zeros((32, 33), np.float32)}),
            "'proj_out_2.weight' has shape",
        ),
        (lambda t: t.update({"extra.weight": np.zeros((2,), np.float32)}), "unknown tensor"),
        (
            lambda t: t["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"].__iadd__(
                1
            ),
            "differs from block 0's copy",
        ),
    ],
)
def test_mangled_diffusers_checkpoint_fails_naming_the_problem(reference, tmp_path, edit, message):
    bad = _mangled(reference[1], tmp_path, edit)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        convert_diffusers_dit(bad)


@pytest.mark.parity
def test_truncated_files_and_broken_checkpoints_fail(reference, tmp_path):
    bad = _mangled(reference[1], tmp_path, lambda t: None)
    path = os.path.join(bad, "diffusion_pytorch_model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match="cannot read safetensors"):
        convert_diffusers_dit(bad)
    with pytest.raises(ValueError, match="unknown --source 'dit'.*diffusers-dit"):
        convert("dit", bad, str(tmp_path / "x"))

    with pytest.raises(ValueError, match="checkpoint directory not found"):
        checkpoint.restore(str(tmp_path / "nowhere"))
    ckpt = str(tmp_path / "ckpt")
    config, params = dit.dit_config("tiny/2"), {"w": np.ones((2, 3), np.float32)}
    checkpoint.save(ckpt, params, config)
    restored, _ = checkpoint.restore(ckpt)
    np.testing.assert_array_equal(restored["w"], params["w"])
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        checkpoint.restore(ckpt)
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(config, f)
    shutil.rmtree(os.path.join(ckpt, "params", "d"))  # the array data
    with pytest.raises(ValueError, match="cannot restore"):
        checkpoint.restore(ckpt)
