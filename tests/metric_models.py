"""Feature networks with random weights, written as their published files are: an
Inception-v3 weight file as torch-fidelity writes it and a CLIPModel folder (with torch
and transformers, the writers of the real files), a Dinov2Model folder (safetensors
written directly, in the names transformers writes)."""

import collections
import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file


def random_state_dict(net, seed=0):
    """Random values for every tensor of a torch Inception, BatchNorm statistics included.

    He-scaled convolutions and near-unit BatchNorm factors keep the activations of the
    ninety-odd layers of order one, so the features do not all vanish.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    uniform = lambda shape, lo, hi: lo + (hi - lo) * torch.rand(shape, generator=gen)
    out = collections.OrderedDict()
    for key, value in net.state_dict().items():
        shape = value.shape
        if key.endswith("conv.weight"):
            out[key] = torch.randn(shape, generator=gen) * (2 / shape[1:].numel()) ** 0.5
        elif key.endswith("running_var"):
            out[key] = uniform(shape, 0.5, 2.0)
        elif key.endswith("bn.weight"):
            out[key] = uniform(shape, 0.6, 1.4)
        elif key.endswith(("bn.bias", "running_mean")):
            out[key] = 0.2 * torch.randn(shape, generator=gen)
        elif key.startswith("fc."):
            out[key] = 0.01 * torch.randn(shape, generator=gen)
        else:
            out[key] = value.clone()  # num_batches_tracked
    return out


def inception_file(folder, seed: int = 0) -> str:
    """Random Inception-v3 weights in torch-fidelity's weight file layout; returns the path."""
    import torch
    from references import module

    fidelity = module("torch_fidelity", "feature_extractor_inceptionv3")
    Net = fidelity.FeatureExtractorInceptionV3
    # Build it once without weights (it downloads them when given no path) to learn its
    # tensors, then write random ones as torch-fidelity's converter writes the released
    # file: every tensor but BatchNorm's num_batches_tracked.
    with pytest.MonkeyPatch.context() as m:
        m.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(Net, "load_state_dict", lambda self, state_dict: None)
        skeleton = Net("inception-v3-compat", ["2048"])
    state = random_state_dict(skeleton, seed)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = os.path.join(os.fspath(folder), "weights-inception-random.pth")
    torch.save(state, path)
    return path


MAX_POSITIONS = 12  # below the tokenizer's 77, so a long prompt is cut by the model's limit


def make_clip_folder(folder, legacy_eos: bool = False, seed: int = 0) -> str:
    """A CLIPModel (hidden 32, 2 layers, 2 heads, 32x32 images in 8x8 patches, projection
    16) with every parameter moved off its init, its tokenizer and a CLIPImageProcessor
    config (shortest edge 32, crop 32), saved as transformers saves a published one.

    legacy_eos: text_config.eos_token_id = 2, as the openai/clip-vit-* configs say (pool
    at the largest id); otherwise the tokenizer's end token id (pool at its first place).
    """
    torch = pytest.importorskip("torch", reason="the reference is transformers' CLIPModel")
    tf = pytest.importorskip("transformers", reason="the reference is transformers' CLIPModel")
    from pipelines import write_clip_files

    folder = os.fspath(folder)
    write_clip_files(folder)
    tok = tf.CLIPTokenizer.from_pretrained(
        folder, pad_token="<|endoftext|>", model_max_length=77, local_files_only=True
    )
    block = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(
        block,
        vocab_size=len(tok),
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tok.bos_token_id,
        eos_token_id=2 if legacy_eos else tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    # gelu in the image tower, quick_gelu (the default) in the text tower
    vision = dict(block, image_size=32, patch_size=8, hidden_act="gelu")
    config = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.CLIPModel(config).eval()
        with torch.no_grad():  # unit LayerNorms and zero biases would hide a missing one
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    processor = tf.CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor.save_pretrained(folder)
    return folder


def clip_folder(folder) -> str:
    """A tiny random CLIPModel folder under folder/clip."""
    os.makedirs(os.path.join(os.fspath(folder), "clip"), exist_ok=True)
    return make_clip_folder(os.path.join(os.fspath(folder), "clip"))


# Position embeddings for a 4 x 4 grid, resampled to the 16 x 16 grid of a 224 input; an
# epsilon far from the default, so that a LayerNorm ignoring the config's shows.
TINY_DINOV2 = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=56,
    patch_size=14,
    layer_norm_eps=0.05,
)
# FeatureExtractorDinoV2's normalisation, written out here rather than taken from the module


def tiny_dinov2_config(**overrides) -> dict:
    return dict(model_type="dinov2", mlp_ratio=4, **TINY_DINOV2) | overrides


def dinov2_state_dict(config: dict, seed: int = 0) -> dict:
    """A Dinov2Model state dict in the names transformers writes, random everywhere."""
    rng = np.random.default_rng(seed)
    d, p = config["hidden_size"], config["patch_size"]
    m = config["image_size"] // p
    f = int(d * config["mlp_ratio"])
    f2 = (int(f * 2 / 3) + 7) // 8 * 8

    def w(*shape):  # fan-in scaled, so that every layer moves the output
        return (rng.normal(size=shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    def v(*shape, mean=0.0, std=0.2):
        return (mean + std * rng.normal(size=shape)).astype(np.float32)

    t = {
        "embeddings.cls_token": v(1, 1, d, std=0.5),
        "embeddings.mask_token": v(1, d),
        "embeddings.position_embeddings": v(1, 1 + m * m, d, std=0.5),
        "embeddings.patch_embeddings.projection.weight": w(d, 3, p, p),
        "embeddings.patch_embeddings.projection.bias": v(d),
        "layernorm.weight": v(d, mean=1.0),
        "layernorm.bias": v(d),
    }
    ffn = (
        {"weights_in": (2 * f2, d), "weights_out": (d, f2)}
        if config.get("use_swiglu_ffn")
        else {"fc1": (f, d), "fc2": (d, f)}
    )
    for i in range(config["num_hidden_layers"]):
        pre = f"encoder.layer.{i}."
        shapes = {f"attention.attention.{n}": (d, d) for n in ("query", "key", "value")}
        shapes |= {"attention.output.dense": (d, d)} | {f"mlp.{n}": s for n, s in ffn.items()}
        for name, shape in shapes.items():
            t[f"{pre}{name}.weight"], t[f"{pre}{name}.bias"] = w(*shape), v(shape[0])
        for name in ("norm1", "norm2"):
            t[f"{pre}{name}.weight"], t[f"{pre}{name}.bias"] = v(d, mean=1.0), v(d)
        for name in ("layer_scale1", "layer_scale2"):
            t[f"{pre}{name}.lambda1"] = rng.uniform(0.3, 1.5, d).astype(np.float32)
    return t


def write_dinov2_folder(path, config: dict, tensors: dict):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))
    return path


def dinov2_folder(folder) -> str:
    """A tiny random Dinov2Model folder under folder/dinov2 (no torch needed)."""
    import pathlib

    config = tiny_dinov2_config()
    path = pathlib.Path(os.fspath(folder)) / "dinov2"
    return str(write_dinov2_folder(path, config, dinov2_state_dict(config)))
