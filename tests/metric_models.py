"""Feature networks with random weights, written as their published files are: an
Inception-v3 weight file as torch-fidelity writes it, a CLIPModel folder (tests that use
them need torch and transformers, the writers of the real files)."""

import collections
import os

import pytest


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
