"""DiT conversion: parity with diffusers, the original .pt layout (its architecture read
off the tensors), checkpoints, bf16 and sharded safetensors, bad files.

Tests that need torch / diffusers (the `parity` extra) skip without them; the others
write the original key layout from numpy with the shapes of facebookresearch/DiT.
"""

import functools
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import dit as dit_configs
from erg_jax import checkpoint
from erg_jax.convert.dit import (
    convert_diffusers_dit,
    convert_dit_pt,
    infer_dit_config,
    load_dit_pt,
)
from erg_jax.models import dit, load_denoiser
from erg_jax.weights import read_state_dict
from launch.convert import convert

LAYERS, HEADS, HEAD_DIM, CLASSES = 2, 2, 16, 10


def _torch():
    torch = pytest.importorskip("torch", reason="parity tests need torch (the `parity` extra)")
    diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers")
    return torch, diffusers


def _original_tensors(
    sample_size=8, patch=2, hidden=32, layers=LAYERS, mlp_ratio=4, classes=CLASSES, seed=0
) -> dict[str, np.ndarray]:
    """Random float32 tensors with the keys and torch shapes of facebookresearch/DiT."""
    d, c_in, c_out, mlp = hidden, 4, 8, mlp_ratio * hidden
    shapes = {
        "x_embedder.proj.weight": (d, c_in, patch, patch),
        "x_embedder.proj.bias": (d,),
        "pos_embed": (1, (sample_size // patch) ** 2, d),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
        "final_layer.linear.weight": (patch * patch * c_out, d),
        "final_layer.linear.bias": (patch * patch * c_out,),
    }
    if classes:
        shapes["y_embedder.embedding_table.weight"] = (classes + 1, d)
    for i in range(layers):
        for name, (out, inp) in {
            "adaLN_modulation.1": (6 * d, d),
            "attn.qkv": (3 * d, d),
            "attn.proj": (d, d),
            "mlp.fc1": (mlp, d),
            "mlp.fc2": (d, mlp),
        }.items():
            shapes[f"blocks.{i}.{name}.weight"] = (out, inp)
            shapes[f"blocks.{i}.{name}.bias"] = (out,)
    rng = np.random.default_rng(seed)
    return {k: (0.2 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def _write(tmp_path, name, tensors) -> str:
    path = str(tmp_path / name)
    save_file(tensors, path)
    return path


def _outputs(params, config, seed=0):
    n, b = config["sample_size"], 3
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, n, n, config["in_channels"])).astype(np.float32)
    t = np.array([0.1, 0.5, 0.9], np.float32) * (999 if config["time"] == "ddpm" else 1)
    y = np.array([0, 5, CLASSES], np.int32)
    return np.asarray(jax.jit(dit.make_denoiser(config, params))(x, t, y))


@pytest.mark.parametrize("sample_size", [8, 16])
def test_architecture_is_read_off_the_tensors(tmp_path, sample_size):
    path = _write(tmp_path, "dit.safetensors", _original_tensors(sample_size))
    params, config = load_dit_pt(path)
    explicit = dit.dit_config("tiny/2", sample_size=sample_size)
    assert config == explicit
    want = _outputs(convert_dit_pt(path, explicit), explicit)
    np.testing.assert_array_equal(_outputs(params, config), want)
    scanned, scan_config = load_dit_pt(path, scan_blocks=True)
    assert "blocks" in scanned and "blocks_0" not in scanned
    np.testing.assert_allclose(_outputs(scanned, scan_config), want, rtol=1e-5, atol=1e-5)
    # The same through the launcher, with no size flags, and with the right ones.
    convert("dit-pt", path, str(tmp_path / "a"))
    convert("dit-pt", path, str(tmp_path / "b"), model="tiny/2", sample_size=sample_size)
    for out in ("a", "b"):
        assert checkpoint.restore(str(tmp_path / out))[1]["sample_size"] == sample_size


def test_depth_width_mlp_and_classes_outside_the_presets(tmp_path):
    tensors = _original_tensors(layers=3, mlp_ratio=2, classes=0)
    with pytest.raises(ValueError, match="no DiT preset has num_layers 3 and hidden_size 32"):
        infer_dit_config(tensors)
    config = infer_dit_config(tensors, num_heads=4)
    assert (config["num_layers"], config["mlp_ratio"], config["num_classes"]) == (3, 2.0, 0)
    assert config["num_heads"] == 4 and config["learned_sigma"]
    params, _ = load_dit_pt(_write(tmp_path, "u.safetensors", tensors), num_heads=4)
    assert "class_embed" not in params and "blocks_2" in params


def test_sit_family_keeps_the_network_and_takes_sit_conventions(tmp_path):
    path = _write(tmp_path, "sit.safetensors", _original_tensors())
    dit_params, dit_config = load_dit_pt(path)
    sit_params, sit_config = load_dit_pt(path, family="SiT")
    assert (sit_config["prediction"], sit_config["time"]) == ("velocity", "sit")
    assert not sit_config["learned_sigma"] and sit_config["out_channels"] == 8
    assert (dit_config["prediction"], dit_config["time"]) == ("eps", "ddpm")
    for model in ("SiT", "SiT-tiny/2"):
        assert convert("dit-pt", path, str(tmp_path / "c"), model=model) == sit_config
    # The same network: SiT returns the first C of the 2C channels at the same raw t.
    x = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    t, y = np.array([0.25, 0.75], np.float32), np.array([1, 2], np.int32)
    sit_out = dit.make_denoiser(sit_config, sit_params)(x, t, y)
    dit_out = dit.make_denoiser(dit_config, dit_params)(x, t, y)
    assert sit_out.shape == (2, 8, 8, 4)
    np.testing.assert_allclose(sit_out, dit_out[..., :4], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sample_size=16), "sample_size: 16 given, the checkpoint has 8"),
        (dict(model="XL/2"), "model: 'XL/2' has num_layers 28, the checkpoint 2"),
        (dict(model="SiT-B/2"), "model: 'SiT-B/2' has num_layers 12, the checkpoint 2"),
        (dict(model="tiny/4"), "model: 'tiny/4' has patch_size 4, the checkpoint 2"),
        (dict(model="XXL/2"), "unknown DiT model 'XXL/2'"),
    ],
)
def test_a_model_or_size_that_disagrees_with_the_file_is_refused(tmp_path, kwargs, message):
    path = _write(tmp_path, "dit.safetensors", _original_tensors(8))
    with pytest.raises(ValueError, match=message):
        convert("dit-pt", path, str(tmp_path / "out"), **kwargs)
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(ValueError, match="hidden_size: 64 given, the checkpoint has 32"):
        load_dit_pt(path, hidden_size=64)


def test_xl2_512_and_xl2_256_differ_in_latent_size_only():
    big, small = (dit_configs.get_config(v).to_dict() for v in ("xl2_512", "xl2_256"))

    def flat(d, pre=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {pre + k: v})
        return out

    big, small = flat(big), flat(small)
    assert (big["model.sample_size"], small["model.sample_size"]) == (64, 32)
    assert {k for k in big if big[k] != small[k]} == {"model.sample_size"}
    assert dit_configs.get_config("sit_xl2_256").model.sample_size == 32
    assert dit_configs.get_config("tiny").model.sample_size == 0  # the preset's


@pytest.mark.parametrize("scan_blocks", [False, True])
def test_bf16_safetensors_are_memory_mapped_and_convert_like_float32(tmp_path, scan_blocks):
    f32 = _original_tensors()
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in f32.items()}
    read = read_state_dict(_write(tmp_path, "bf16.safetensors", bf16))
    for key, value in read.items():
        assert value.dtype == ml_dtypes.bfloat16 and isinstance(value, np.memmap), key
        np.testing.assert_array_equal(value, bf16[key])
    kw = dict(param_dtype="bfloat16", scan_blocks=scan_blocks)
    got, config = load_dit_pt(str(tmp_path / "bf16.safetensors"), **kw)
    want, _ = load_dit_pt(_write(tmp_path, "f32.safetensors", f32), **kw)
    assert config["param_dtype"] == "bfloat16" and ("blocks" in got) == scan_blocks
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert a.dtype == b.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(a, b)


def test_sharded_safetensors_index(tmp_path):
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in _original_tensors().items()}
    keys = sorted(tensors)
    shards = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    for name, names in shards.items():
        _write(tmp_path, name, {k: tensors[k] for k in names})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    read = read_state_dict(str(index))
    assert sorted(read) == keys and all(isinstance(v, np.memmap) for v in read.values())
    for key in keys:
        np.testing.assert_array_equal(read[key], tensors[key])
    os.remove(tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match=r"missing checkpoint shard\(s\) \['b.safetensors'\]"):
        read_state_dict(str(index))


@functools.cache
def _reference(sample_size: int, root: str):
    """A tiny random diffusers DiT saved with save_pretrained, and the torch model."""
    torch, diffusers = _torch()
    torch.manual_seed(0)
    # num_embeds_ada_norm is diffusers' number of classes; the table has one more row.
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=8,
        num_layers=LAYERS,
        sample_size=sample_size,
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
    folder = os.path.join(root, f"transformer{sample_size}")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dit"))


@pytest.fixture
def reference(root):
    return _reference(8, root)


def _torch_forward(model, x, t, y):
    torch, _ = _torch()
    with torch.no_grad():
        out = model(
            torch.from_numpy(np.transpose(x, (0, 3, 1, 2))),
            timestep=torch.from_numpy(t),
            class_labels=torch.from_numpy(y),
        ).sample
    return np.transpose(out.numpy(), (0, 2, 3, 1))


def _inputs(sample_size):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, sample_size, sample_size, 4)).astype(np.float32)
    t = np.array([0, 1, 250, 500, 999], np.int64)
    y = np.array([0, 3, 9, CLASSES, CLASSES], np.int64)  # the last two: null class
    return x, t, y


@pytest.mark.parity
@pytest.mark.parametrize("scan_blocks", [False, True])
def test_diffusers_parity_through_launch_convert(reference, tmp_path, scan_blocks):
    model, folder = reference
    out_dir = str(tmp_path / "ckpt")
    convert("diffusers-dit", folder, out_dir, scan_blocks=scan_blocks)
    den = load_denoiser(out_dir)
    assert den.config["kind"] == "dit" and den.config["learned_sigma"]
    assert (den.config["prediction"], den.config["time"]) == ("eps", "ddpm")
    x, t, y = _inputs(8)
    want = _torch_forward(model, x, t, y)
    got = np.asarray(jax.jit(den)(x, t.astype(np.float32), y.astype(np.int32)))
    assert got.shape == want.shape == (5, 8, 8, 8)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _to_original_layout(model) -> dict:
    """The diffusers weights renamed to facebookresearch/DiT's keys (qkv fused)."""
    torch, _ = _torch()
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
    torch, _ = _torch()
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


@pytest.mark.parity
@pytest.mark.parametrize("sample_size", [8, 16])
def test_dit_pt_at_both_sizes_matches_diffusers_without_size_flags(root, tmp_path, sample_size):
    """The analogues of DiT's 256px and 512px files: nothing says which one a .pt is."""
    torch, _ = _torch()
    model, _ = _reference(sample_size, root)
    path = str(tmp_path / "DiT.pt")
    torch.save(_to_original_layout(model), path)
    convert("dit-pt", path, str(tmp_path / "ckpt"))
    params, config = checkpoint.restore(str(tmp_path / "ckpt"))
    assert config == dit.dit_config("tiny/2", sample_size=sample_size)
    # With diffusers' two conventions (see convert.dit) the outputs are diffusers'.
    den = dit.make_denoiser(dict(config, time_freq_shift=1, mlp_norm_eps=1e-5), params)
    x, t, y = _inputs(sample_size)
    want = _torch_forward(model, x, t, y)
    got = np.asarray(jax.jit(den)(x, t.astype(np.float32), y.astype(np.int32)))
    assert got.shape == want.shape == (5, sample_size, sample_size, 8)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    with pytest.raises(ValueError, match=f"sample_size: {24 - sample_size} given"):
        convert("dit-pt", path, str(tmp_path / "x"), sample_size=24 - sample_size)


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
