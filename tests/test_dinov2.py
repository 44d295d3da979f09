"""DINOv2 features: parity with transformers' Dinov2Model fed as torch-fidelity feeds it,
its position-embedding resampling (and torch hub's), the folders it refuses, bfloat16."""

import json

import numpy as np
import pytest
from metric_models import TINY_DINOV2 as TINY
from metric_models import dinov2_state_dict as random_state_dict
from metric_models import tiny_dinov2_config as tiny_config
from metric_models import write_dinov2_folder as write_folder
from safetensors.numpy import save_file

from erg_jax.metrics import dinov2

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def images(n=2, h=61, w=83, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def torch_model(folder, swiglu: bool):
    """transformers' Dinov2Model, every parameter random (LayerScales far from 1), saved."""
    torch = pytest.importorskip("torch", reason="the reference is PyTorch")
    transformers = pytest.importorskip("transformers", reason="the reference is transformers'")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(**TINY, use_swiglu_ffn=swiglu)
    model = transformers.Dinov2Model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):
                p.uniform_(0.3, 1.5)
            elif name.startswith("embeddings.") and p.ndim == 3:  # cls, positions
                p.normal_(0.0, 0.5)
            elif p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
            else:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    model.save_pretrained(folder)
    return model


def torch_fidelity_pixels(x: np.ndarray):
    """uint8 NHWC -> torch-fidelity's DINOv2 input: TF1 bilinear to 224, then normalised."""
    torch = pytest.importorskip("torch")
    from references import module

    tf1 = module("torch_fidelity", "interpolate_compat_tensorflow")
    t = torch.from_numpy(x).permute(0, 3, 1, 2).to(torch.float32)
    t = tf1.interpolate_bilinear_2d_like_tensorflow1x(t, size=(224, 224), align_corners=False)
    mean = torch.tensor(MEAN * 255, dtype=torch.float32)[:, None, None]
    std = torch.tensor(STD * 255, dtype=torch.float32)[:, None, None]
    return (t - mean) / std


@pytest.mark.parity
@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
def test_features_match_transformers_dinov2_on_torch_fidelity_input(tmp_path, swiglu):
    torch = pytest.importorskip("torch")
    model = torch_model(tmp_path, swiglu)
    x = images()
    with torch.no_grad():
        want = model(pixel_values=torch_fidelity_pixels(x)).pooler_output.numpy()
    net = dinov2.load_dinov2(tmp_path, interpolate_offset=0.0)  # transformers' resampling
    got = net(x)
    assert (net.name, net.dim, got.dtype, got.shape) == ("dinov2", 32, np.float32, (2, 32))
    # float32 on both sides agrees to 1e-6; tanh GELU for the exact one moves it by 1e-4
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parity
@pytest.mark.parametrize(
    "config_size, grid",
    [(56, (7, 11)), (126, (4, 5)), (84, (4, 9)), (70, (5, 5))],
    ids=["up", "down", "as-many", "same"],
)
def test_position_embeddings_match_transformers_interpolation(config_size, grid):
    torch = pytest.importorskip("torch", reason="the reference is PyTorch")
    transformers = pytest.importorskip("transformers", reason="the reference is transformers'")
    config = transformers.Dinov2Config(**(TINY | dict(image_size=config_size)))
    embeddings = transformers.models.dinov2.modeling_dinov2.Dinov2Embeddings(config)
    with torch.no_grad():
        embeddings.position_embeddings.normal_()
        tokens = torch.zeros(1, 1 + grid[0] * grid[1], config.hidden_size)
        want = embeddings.interpolate_pos_encoding(tokens, 14 * grid[0], 14 * grid[1]).numpy()
    got = dinov2.interpolate_position_embeddings(
        embeddings.position_embeddings.detach().numpy(), grid
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def torch_hub_interpolation(pos: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """torch hub dinov2's interpolate_pos_encoding (interpolate_offset 0.1, no antialias)."""
    torch = pytest.importorskip("torch", reason="the reference is PyTorch")
    n, d = pos.shape[1] - 1, pos.shape[2]
    m = int(np.sqrt(n))
    if grid[0] * grid[1] == n and grid[0] == grid[1]:
        return pos
    patches = torch.from_numpy(pos[:, 1:]).reshape(1, m, m, d).permute(0, 3, 1, 2)
    scale = tuple((g + 0.1) / m for g in grid)
    out = torch.nn.functional.interpolate(patches, scale_factor=scale, mode="bicubic")
    return np.concatenate([pos[:, :1], out.permute(0, 2, 3, 1).reshape(1, -1, d).numpy()], 1)


@pytest.mark.parity
@pytest.mark.parametrize("m, grid", [(37, (16, 16)), (5, (7, 11)), (9, (4, 6)), (5, (5, 5))])
def test_offset_position_embeddings_match_torch_hub_arithmetic(m, grid):
    """torch hub's dinov2 hands torch the scale factors (g + 0.1) / m, not the size."""
    pos = np.random.default_rng(m).normal(size=(1, 1 + m * m, 8)).astype(np.float32)
    got = dinov2.interpolate_position_embeddings(pos, grid, offset=0.1)
    np.testing.assert_allclose(got, torch_hub_interpolation(pos, grid), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
@pytest.mark.parametrize("layout", ["prefixed", "in-memory names"])
def test_prefixed_and_renamed_checkpoints_give_the_same_features(tmp_path, swiglu, layout):
    config = tiny_config(use_swiglu_ffn=swiglu)
    tensors = random_state_dict(config)
    if layout == "prefixed":  # Dinov2ForImageClassification: the model and a head
        other = {f"dinov2.{k}": v for k, v in tensors.items()}
        other["classifier.weight"] = np.zeros((10, 64), np.float32)
    else:  # transformers 5's module names (its state_dict(), saved as is)
        other = {}
        for key, value in tensors.items():
            for new, old in dinov2.RENAMES:
                key = key.replace(old, new)
            if ".mlp.weights_in." in key:
                gate, up = np.split(value, 2)
                other[key.replace("weights_in", "gate_proj")] = gate
                other[key.replace("weights_in", "up_proj")] = up
            else:
                other[key] = value
    x = images(seed=1)
    want = dinov2.load_dinov2(write_folder(tmp_path / "a", config, tensors))(x)
    got = dinov2.load_dinov2(write_folder(tmp_path / "b", config, other))(x)
    np.testing.assert_array_equal(got, want)


def _drop(key):
    return lambda config, tensors: tensors.pop(key)


@pytest.mark.parametrize(
    "spoil, match",
    [
        (lambda c, t: c.update(model_type="dinov2_with_registers"), "model_type must be 'dinov2'"),
        (lambda c, t: c.update(num_channels=4), "num_channels must be 3"),
        (lambda c, t: c.update(hidden_act="relu6"), "unsupported activation 'relu6'"),
        (lambda c, t: c.update(num_hidden_layers=3), "missing tensor 'encoder.layer.2.norm1"),
        (_drop("encoder.layer.1.layer_scale2.lambda1"), "missing tensor 'encoder.layer.1.layer"),
        (_drop("embeddings.patch_embeddings.projection.weight"), "not a transformers Dinov2"),
        (lambda c, t: t.update(x=t["layernorm.bias"]), r"unknown tensor\(s\) \['x'\]"),
        (lambda c, t: c.update(hidden_size=48), "'embeddings.position_embeddings' has shape"),
    ],
    ids=["registers", "channels", "activation", "layers", "tensor", "not-dinov2", "extra", "width"],
)
def test_a_folder_that_is_not_a_dinov2_model_is_refused(tmp_path, spoil, match):
    config = tiny_config()
    tensors = random_state_dict(config)
    spoil(config, tensors)
    with pytest.raises(ValueError, match=match):
        dinov2.load_dinov2(write_folder(tmp_path, config, tensors))


def test_missing_files_and_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="missing config.json"):
        dinov2.load_dinov2(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    with pytest.raises(ValueError, match="no weights in"):
        dinov2.load_dinov2(tmp_path)
    save_file(random_state_dict(tiny_config()), str(tmp_path / "model.safetensors"))
    for size in (100, 0, 7, 224.0):
        with pytest.raises(ValueError, match="image_size must be a positive multiple of the"):
            dinov2.load_dinov2(tmp_path, image_size=size)
    with pytest.raises(ValueError, match="dtype must be one of"):
        dinov2.load_dinov2(tmp_path, dtype="int8")
    with pytest.raises(ValueError, match=r"interpolate_offset must be in \[0, 1\)"):
        dinov2.load_dinov2(tmp_path, interpolate_offset=-0.1)


def test_bfloat16_features_are_close_to_float32_ones(tmp_path):
    config = tiny_config(use_swiglu_ffn=True)
    folder = write_folder(tmp_path, config, random_state_dict(config))
    x = images(n=3, h=230, w=190, seed=2)
    want = dinov2.load_dinov2(folder)(x)
    got = dinov2.load_dinov2(folder, dtype="bfloat16")(x)
    assert got.dtype == np.float32
    error = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 0 < error < 3e-2  # computed in bfloat16 (not zero), and close
