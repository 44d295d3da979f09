"""CLIP's towers and CLIP score: parity with transformers' CLIPModel, CLIPImageProcessor's
PIL path and torchmetrics' clip_score, on a tiny random CLIPModel folder."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from metric_models import MAX_POSITIONS, make_clip_folder

from erg_jax.metrics.clip import Preprocess, clip_score_from_embeddings, load_clip

PROMPTS = [
    "a photo of a cat",
    "red car",
    "an astronaut riding a horse on the mat " * 3,  # longer than MAX_POSITIONS
]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return make_clip_folder(tmp_path_factory.mktemp("clip"))


def reference_model(folder):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(folder, local_files_only=True).eval()


def features(out):
    """transformers 5 returns get_*_features in an output object; 4 returned the tensor."""
    return getattr(out, "pooler_output", out)


def relative_error(got, want):
    return np.max(np.abs(got - want)) / np.max(np.abs(want))


def random_images(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parity
@pytest.mark.parametrize(
    "settings",
    [
        dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        # resized smaller than the crop: the crop pads with zeros around the centre
        dict(size={"shortest_edge": 23}, crop_size={"height": 32, "width": 32}),
        dict(size={"height": 40, "width": 36}, crop_size={"height": 33, "width": 31}),
        dict(size={"shortest_edge": 35}, crop_size={"height": 32, "width": 30}, resample=2),
    ],
)
def test_prepare_matches_clip_image_processor(settings, tmp_path):
    tf = pytest.importorskip("transformers", reason="the reference is CLIPImageProcessor")
    processor = tf.CLIPImageProcessorPil(**settings)  # the PIL path, no torchvision
    processor.save_pretrained(tmp_path)
    with open(tmp_path / "preprocessor_config.json") as f:
        prepare = Preprocess.from_config(json.load(f), "test")
    for i, (h, w) in enumerate([(40, 50), (50, 40), (17, 23), (32, 32), (64, 33)]):
        images = random_images(2, h, w, seed=i)
        want = processor(images=list(images), return_tensors="np")["pixel_values"]
        got = prepare(images)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), rtol=0, atol=1e-6)


@pytest.mark.parity
def test_image_embeddings_match_get_image_features(clip_folder):
    import torch

    scorer = load_clip(clip_folder)
    model = reference_model(clip_folder)
    images = random_images(3, 45, 37)
    pixels = scorer.image.prepare(images)
    with torch.no_grad():
        want = features(model.get_image_features(torch.from_numpy(pixels.transpose(0, 3, 1, 2))))
    want = want.numpy()
    got = scorer.image(images, batch_size=2)
    assert got.shape == (3, 16) and got.dtype == np.float32
    assert relative_error(got, want) < 1e-4

    low = load_clip(clip_folder, dtype="bfloat16")
    assert all(p.dtype == np.float32 for p in jax.tree_util.tree_leaves(low.image.params))
    got = low.image(images)
    assert got.dtype == np.float32
    assert 0 < relative_error(got, want) < 5e-2  # computed in bfloat16, close to float32


@pytest.mark.parity
@pytest.mark.parametrize("legacy_eos", [False, True])
def test_text_embeddings_match_get_text_features(legacy_eos, tmp_path):
    import torch
    from transformers import AutoTokenizer

    folder = make_clip_folder(tmp_path, legacy_eos=legacy_eos)
    scorer = load_clip(folder)
    assert scorer.max_positions == MAX_POSITIONS
    model = reference_model(folder)
    # torchmetrics' way: pad to the longest prompt, then cut ids and mask to the positions
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    batch = tok(PROMPTS, padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[1] > MAX_POSITIONS
    ids, mask = (batch[k][:, :MAX_POSITIONS] for k in ("input_ids", "attention_mask"))
    with torch.no_grad():
        want = features(model.get_text_features(input_ids=ids, attention_mask=mask)).numpy()
    got = scorer.encode_text(PROMPTS, batch_size=2)
    assert got.shape == (3, 16) and got.dtype == np.float32
    assert relative_error(got, want) < 1e-4


@pytest.mark.parity
def test_clip_score_matches_torchmetrics(clip_folder):
    torch = pytest.importorskip("torch")
    tm = pytest.importorskip("torchmetrics.functional.multimodal.clip_score", reason="reference")
    import transformers as tf

    class FeaturesAsTensors(torch.nn.Module):
        """CLIPModel whose get_*_features return the tensor torchmetrics 1.9 expects."""

        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kwargs):
            return features(self.model.get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return features(self.model.get_text_features(*args, **kwargs))

    def model_and_processor():
        processor = tf.CLIPProcessor(
            image_processor=tf.CLIPImageProcessorPil.from_pretrained(clip_folder),
            tokenizer=tf.AutoTokenizer.from_pretrained(clip_folder, local_files_only=True),
        )
        return FeaturesAsTensors(reference_model(clip_folder)), processor

    images = random_images(3, 45, 37, seed=3)
    chw = [torch.from_numpy(x.transpose(2, 0, 1).copy()) for x in images]  # uint8 (3, H, W)
    with pytest.warns(UserWarning, match="longer than"), torch.no_grad():
        want = float(tm.clip_score(chw, PROMPTS, model_name_or_path=model_and_processor))

    scorer = load_clip(clip_folder)
    got = scorer.score(images, PROMPTS)
    assert got.shape == (3,) and got.dtype == np.float64
    # torchmetrics clips the mean of 100 cos; with no negative cosine that is our mean
    assert np.all(got > 0)
    np.testing.assert_allclose(got.mean(), want, rtol=1e-5)
    emb = scorer.image(images), scorer.encode_text(PROMPTS)
    np.testing.assert_allclose(clip_score_from_embeddings(*emb), got, rtol=1e-12)


def test_clip_score_is_a_clipped_scaled_cosine():
    image = np.array([[3.0, 0.0], [1.0, 1.0], [0.0, 2.0], [1.0, 2.0]])
    text = np.array([[1.0, 1.0], [-2.0, -1.0], [0.0, 0.5], [-2.0, 1.0]])
    cos = np.array([1 / np.sqrt(2), -3 / np.sqrt(10), 1.0, 0.0])
    np.testing.assert_allclose(
        clip_score_from_embeddings(image, text), [100 / np.sqrt(2), 0.0, 100.0, 0.0], atol=1e-12
    )
    np.testing.assert_allclose(
        clip_score_from_embeddings(image, text, clip_at_zero=False), 100 * cos, atol=1e-12
    )
    with pytest.raises(ValueError, match=r"must both be \(n, d\), got \(4, 2\) and \(3, 2\)"):
        clip_score_from_embeddings(image, text[:3])


@pytest.mark.parity
def test_refuses_other_folders_and_unpaired_inputs(clip_folder, tmp_path):
    from transformers import CLIPTextModel

    text_only = tmp_path / "text_only"
    CLIPTextModel.from_pretrained(clip_folder, local_files_only=True).save_pretrained(text_only)
    with pytest.raises(ValueError, match="not a transformers CLIPModel folder") as e:
        load_clip(text_only)
    for name in ("model_type 'clip'", "'vision_config'", "'visual_projection.weight'"):
        assert name in str(e.value)

    no_processor = tmp_path / "no_processor"
    shutil.copytree(clip_folder, no_processor)
    os.remove(no_processor / "preprocessor_config.json")
    with pytest.raises(ValueError, match="missing preprocessor_config.json"):
        load_clip(no_processor)

    small_crop = tmp_path / "small_crop"
    shutil.copytree(clip_folder, small_crop)
    with open(small_crop / "preprocessor_config.json") as f:
        settings = json.load(f)
    settings["crop_size"] = {"height": 28, "width": 28}
    with open(small_crop / "preprocessor_config.json", "w") as f:
        json.dump(settings, f)
    with pytest.raises(ValueError, match=r"come out \(28, 28\), the image tower takes 32x32"):
        load_clip(small_crop)

    scorer = load_clip(clip_folder)
    with pytest.raises(ValueError, match="got 3 images and 2 prompts"):
        scorer.score(random_images(3, 32, 32), PROMPTS[:2])
