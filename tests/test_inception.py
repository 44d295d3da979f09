"""Inception-v3 for FID: parity with torch-fidelity's network and resize, clean-fid's resize,
the weight layouts of torch-fidelity and pytorch-fid, and the torch-free checkpoint reader.

The network tests run torch-fidelity's FeatureExtractorInceptionV3 and ours on the same
random weights (non-trivial BatchNorm statistics and affine parameters), on a few images.
"""

import collections
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from metric_models import inception_file

from erg_jax import weights
from erg_jax.metrics import inception
from erg_jax.metrics.resize import bilinear_tf1, clean_resize


def reference(package, name):
    from references import module

    return module(package, name)


def nchw(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


@pytest.mark.parity
@pytest.mark.parametrize(
    "size_in, size_out", [((37, 53), (299, 299)), ((300, 410), (64, 80)), ((10, 20), (15, 7))]
)
def test_bilinear_tf1_matches_torch_fidelity(size_in, size_out):
    tf1 = reference("torch_fidelity", "interpolate_compat_tensorflow")
    x = np.random.default_rng(0).uniform(-1, 1, (2, *size_in, 3)).astype(np.float32)
    want = tf1.interpolate_bilinear_2d_like_tensorflow1x(nchw(x), size_out, align_corners=False)
    got = np.asarray(bilinear_tf1(jnp.asarray(x), size_out))
    np.testing.assert_allclose(got, np.moveaxis(want.numpy(), 1, -1), rtol=0, atol=1e-5)


def test_bilinear_tf1_is_the_identity_at_the_input_size_and_keeps_constants():
    x = np.random.default_rng(1).uniform(0, 255, (1, 13, 17, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(bilinear_tf1(jnp.asarray(x), (13, 17))), x)
    flat = np.full((1, 13, 17, 3), 7.5, np.float32)
    np.testing.assert_allclose(np.asarray(bilinear_tf1(jnp.asarray(flat), (40, 9))), 7.5)


@pytest.mark.parity
@pytest.mark.parametrize("size_out", [(299, 299), (24, 40)])
def test_clean_resize_matches_clean_fid(size_out):
    resizer = reference("cleanfid", "resize").make_resizer(
        "PIL",
        False,
        "bicubic",
        size_out[::-1],  # clean-fid's sizes are PIL's (width, height)
    )
    images = np.random.default_rng(2).integers(0, 256, (2, 50, 70, 3), dtype=np.uint8)
    want = np.stack([resizer(image) for image in images])
    np.testing.assert_array_equal(clean_resize(images, size_out), want)


@pytest.fixture(scope="module")
def torch_fidelity(tmp_path_factory):
    """(torch-fidelity's network loaded from random weights, the file it read)."""
    path = inception_file(tmp_path_factory.mktemp("inception"))
    fidelity = reference("torch_fidelity", "feature_extractor_inceptionv3")
    return fidelity.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=path
    ), path


@pytest.fixture(scope="module")
def ours(torch_fidelity):
    return inception.load_inception(torch_fidelity[1])


def run_reference(net, images):
    import torch

    with torch.no_grad():
        (features,) = net(nchw(images))
    return features.numpy()


@pytest.mark.parity
@pytest.mark.parametrize("shape", [(2, 64, 80), (1, 299, 299)])
def test_features_match_torch_fidelity(torch_fidelity, ours, shape):
    images = np.random.default_rng(3).integers(0, 256, (*shape, 3), dtype=np.uint8)
    want = run_reference(torch_fidelity[0], images)
    got = ours(images)
    assert got.shape == (shape[0], 2048) and got.dtype == np.float32
    assert (want > 0).mean() > 0.3 and want.std() > 0.1  # the parity is not between zeros
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert ours.name == "inception" and ours.dim == 2048
    assert ours.settings["layout"] == "Inception3" and ours.settings["resize"] == "tf1"


def pytorch_fid_module(net):
    """pytorch-fid's InceptionV3 (output block 3) around the same layers: four
    nn.Sequential blocks, as its __init__ assembles them from an Inception3."""
    import torch.nn as nn

    wrapper = nn.Module()
    wrapper.blocks = nn.ModuleList(
        [
            nn.Sequential(
                net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, nn.MaxPool2d(3, 2)
            ),
            nn.Sequential(net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, nn.MaxPool2d(3, 2)),
            nn.Sequential(
                net.Mixed_5b,
                net.Mixed_5c,
                net.Mixed_5d,
                net.Mixed_6a,
                net.Mixed_6b,
                net.Mixed_6c,
                net.Mixed_6d,
                net.Mixed_6e,
            ),  # fmt: skip
            nn.Sequential(net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, nn.AdaptiveAvgPool2d(1)),
        ]
    )
    return wrapper


@pytest.mark.parity
def test_pytorch_fid_layouts_give_the_same_params(torch_fidelity, ours, tmp_path):
    import torch

    net, _ = torch_fidelity
    # pt_inception-2015-12-05-6726825d.pth: the state dict of torchvision's Inception3
    # built by fid_inception_v3() (aux_logits=False: no AuxLogits), BatchNorm's
    # num_batches_tracked included as a current torch writes it.
    inception3 = tmp_path / "pt_inception-random.pth"
    torch.save(net.state_dict(), inception3)
    # The state dict of pytorch-fid's InceptionV3 module: blocks.{i}.{j}..., no fc.
    wrapper = pytorch_fid_module(net)
    wrapped = tmp_path / "pytorch_fid_inceptionv3.pth"
    torch.save(wrapper.state_dict(), wrapped)
    assert "blocks.2.4.branch7x7dbl_5.bn.running_var" in wrapper.state_dict()
    for path, layout in ((inception3, "Inception3"), (wrapped, "pytorch-fid InceptionV3")):
        got = inception.load_inception(str(path))
        assert got.settings["layout"] == layout
        assert_same_tree(got.params, ours.params)


def assert_same_tree(a, b):
    from flax import traverse_util

    a, b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


@pytest.mark.parity
def test_clean_mode_resizes_on_the_host_and_normalises_like_tf1(torch_fidelity, ours):
    clean = inception.load_inception(torch_fidelity[1], resize="clean")
    images = np.random.default_rng(4).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)
    resizer = reference("cleanfid", "resize").make_resizer("PIL", False, "bicubic", (299, 299))
    np.testing.assert_array_equal(clean.prepare(images), np.stack([resizer(x) for x in images]))
    # At 299x299 both pipelines leave the pixels as they are: the same network follows.
    square = np.random.default_rng(5).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
    np.testing.assert_allclose(clean(square), ours(square), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="299"):
        clean.apply(clean.params, jnp.zeros((1, 64, 64, 3)))


@pytest.mark.parity
def test_bfloat16_features_are_close_to_float32(torch_fidelity, ours):
    images = np.random.default_rng(6).integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
    fast = inception.load_inception(torch_fidelity[1], dtype=jnp.bfloat16)
    got, want = fast(images), ours(images)
    assert got.dtype == np.float32 and fast.settings["dtype"] == "bfloat16"
    assert np.linalg.norm(got - want) < 5e-2 * np.linalg.norm(want)
    assert not np.array_equal(got, want)  # it did compute in bfloat16


@pytest.mark.parity
def test_incomplete_or_foreign_files_and_unknown_resize_are_refused(torch_fidelity, tmp_path):
    import torch

    state = torch.load(torch_fidelity[1])
    with pytest.raises(ValueError, match="resize must be one of .*'tf1', 'clean'.*'bicubic'"):
        inception.load_inception(torch_fidelity[1], resize="bicubic")

    def refused(tensors, match):
        path = tmp_path / "bad.pth"
        torch.save(tensors, path)
        with pytest.raises(ValueError, match=match) as caught:
            inception.load_inception(str(path))
        return str(caught.value)

    gone = ("Mixed_6c.branch7x7_2.conv.weight", "Conv2d_1a_3x3.bn.running_var")
    message = refused({k: v for k, v in state.items() if k not in gone}, "missing 2 tensors")
    assert all(key in message for key in gone)
    refused({"layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3)}, "missing 470 tensors")
    aux = {**state, "AuxLogits.fc.weight": torch.zeros(1000, 768)}  # torchvision's ImageNet net
    refused(aux, "unknown tensor.*AuxLogits.fc.weight")
    refused({**state, "fc.weight": torch.zeros(1000, 2048)}, "fc.weight.*shape")
    refused({**state, "Mixed_7c.branch1x1.bn.bias": torch.zeros(3)}, "branch1x1.bn.bias.*shape")


@pytest.mark.parity
def test_torch_free_reader_equals_torch_load(tmp_path, monkeypatch):
    import ml_dtypes
    import torch

    base = torch.arange(60, dtype=torch.float32).reshape(6, 10) / 7
    state = collections.OrderedDict(
        weight=base,
        transposed=base.t(),  # strided view of a shared storage
        rows=base[2:5],  # a storage offset
        strided=base[::2, 1::3],
        half=torch.randn(3, 4, dtype=torch.float16),
        brain=torch.randn(5, dtype=torch.bfloat16),
        num_batches_tracked=torch.tensor(17),
    )
    path = tmp_path / "state.pth"
    torch.save(state, path)
    got = weights.read_torch_zip(str(path))
    assert list(got) == list(state)
    for key, value in torch.load(path).items():
        want = weights._torch_to_numpy(value)
        assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
        np.testing.assert_array_equal(got[key], want, err_msg=key)
    assert got["brain"].dtype == ml_dtypes.bfloat16

    # read_state_dict falls back to it when torch is not installed
    monkeypatch.setitem(sys.modules, "torch", None)
    fallback = weights.read_state_dict(str(path))
    np.testing.assert_array_equal(fallback["transposed"], base.t().numpy())
    assert fallback["num_batches_tracked"].dtype == np.int64


@pytest.mark.parity
def test_torch_free_reader_refuses_other_objects(tmp_path):
    import torch

    path = tmp_path / "module.pth"
    torch.save({"w": torch.nn.Parameter(torch.ones(2)), "n": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="refusing the global torch._utils._rebuild_parameter"):
        weights.read_torch_zip(str(path))
    torch.save({"w": torch.ones(2, dtype=torch.float64)}, path)
    with pytest.raises(ValueError, match="refusing the global torch.DoubleStorage"):
        weights.read_torch_zip(str(path))
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="not a zip PyTorch checkpoint; reading it needs torch"):
        weights.read_torch_zip(str(path))
