"""The evaluation job end to end: a tiny SD3 job's workdir (COCO captions json as its
prompts) measured against a folder of real images, every number of its table recomputed
here from the saved features by other people's code; the same features on 1 and 8
devices; a killed run resumes to the same table; bad settings named."""

import hashlib
import json
import os
import shutil

import jax
import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from erg_jax import metrics
from erg_jax.jobs import evaluate as E
from erg_jax.jobs import output

pytestmark = pytest.mark.parity  # the feature networks' files are written with torch

CAPTIONS = [
    "a red bus on a street",
    "two dogs playing in the snow",
    "a plate of food with a fork",
    "a man riding a wave on a surfboard",
    "a kitchen with a white stove",
    "a cat sleeping on a sofa",
]


def _coco_json(path):
    """A COCO captions file: 6 images, some with 2 captions (the lower id is the image's)."""
    annotations, next_id = [], 100
    for image_id, caption in zip((42, 7, 13, 99, 5, 61), CAPTIONS, strict=True):
        annotations.append({"image_id": image_id, "id": next_id, "caption": caption})
        annotations.append({"image_id": image_id, "id": next_id + 50, "caption": "other words"})
        next_id += 1
    with open(path, "w") as f:
        json.dump({"images": [], "annotations": annotations[::-1]}, f)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A sampled workdir (2 methods x 6 samples), a reference folder and the networks."""
    from metric_models import clip_folder, dinov2_folder, inception_file

    from erg_jax.jobs.job import run_sampling

    root = tmp_path_factory.mktemp("evaluate")
    _coco_json(root / "captions.json")
    from configs import coco

    c = coco.get_config("tiny")
    c.output.progress = False
    c.output.num_samples = 6
    c.sampler.steps = 2
    c.guidance.methods = "cfg,erg"
    c.text.prompts_file = str(root / "captions.json")
    run_sampling(c, str(root / "job"))
    real = root / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(9):  # other sizes and aspect ratios: center-cropped, resized
        pixels = rng.integers(0, 256, size=(20 + 3 * i, 28, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(real / f"real_{i:02d}.png")
    return dict(
        root=root,
        workdir=str(root / "job"),
        settings=dict(
            inception=inception_file(root),
            dinov2=dinov2_folder(root),
            clip=clip_folder(root),
            reference=str(real),
            batch_size=8,
            shard_size=8,  # the reference in two shards, each method in one batch
            kid_subsets=5,
            kid_subset_size=6,
            precision_recall_k=2,
            nearest_k=3,
        ),
    )


@pytest.fixture(scope="module", autouse=True)
def _each_frechet_distance_once():
    """The Frechet distance of statistics it was given before, without computing it again.

    The matrix root of a 2048-d FID takes 10 to 30 s on 2 CPU cores. The function is
    deterministic, so a second call on the very same arrays (the same bytes) gets the
    first call's value; any other statistics are computed."""
    real, seen = metrics.frechet_distance_from_statistics, {}

    def once(*arrays, **kwargs):
        key = tuple((np.shape(a), hashlib.sha256(np.ascontiguousarray(a)).hexdigest())
                    for a in arrays) + tuple(sorted(kwargs.items()))  # fmt: skip
        if key not in seen:
            seen[key] = real(*arrays, **kwargs)
        return seen[key]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(metrics, "frechet_distance_from_statistics", once)
        yield


@pytest.fixture(scope="module")
def evaluated(job):
    """(workdir, table) of the evaluation with every network and the folder of images."""
    work = _copy(job, "full")
    return work, E.evaluate(work, job["settings"])


def _copy(job, name):
    """The sampled workdir without any evaluation, under a new name."""
    dest = str(job["root"] / name)
    shutil.copytree(job["workdir"], dest, ignore=shutil.ignore_patterns("evaluation"))
    return dest


def _features(workdir, network, source):
    folder = os.path.join(workdir, "evaluation", "features")
    (sub,) = [d for d in os.listdir(folder) if d.startswith(network + "-")]
    parts = sorted(os.listdir(os.path.join(folder, sub, source)))
    loaded = [np.load(os.path.join(folder, sub, source, p)) for p in parts]
    return {k: np.concatenate([f[k] for f in loaded]) for k in loaded[0].files}


def _reference_name(workdir, network):
    folder = os.path.join(workdir, "evaluation", "features")
    (sub,) = [d for d in os.listdir(folder) if d.startswith(network + "-")]
    (ref,) = [d for d in os.listdir(os.path.join(folder, sub)) if d.startswith("reference-")]
    return ref


def _pytorch_fid(a, b):
    """pytorch-fid's calculate_frechet_distance, on np.cov statistics."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset).dot(s2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def _low_rank_frechet(a, b):
    """The Frechet distance of few samples in many dimensions, without a d x d root: with
    centred rows A, B, the nonzero eigenvalues of S_a S_b are those of the small
    (A B^T)(B A^T) / ((n - 1)(m - 1)), so tr sqrtm(S_a S_b) is the sum of their roots."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    x, y = a - a.mean(0), b - b.mean(0)
    small = (x @ y.T) @ (y @ x.T) / ((len(a) - 1) * (len(b) - 1))
    roots = np.sqrt(np.clip(np.linalg.eigvals(small).real, 0, None)).sum()
    diff = a.mean(0) - b.mean(0)
    return diff @ diff + (x**2).sum() / (len(a) - 1) + (y**2).sum() / (len(b) - 1) - 2 * roots


def test_the_table_is_every_metric_of_the_saved_features(evaluated):
    import prdc
    import torch
    from references import module

    work, result = evaluated
    assert list(result["methods"]) == ["cfg", "erg"]
    kid = module("torch_fidelity", "metric_kid", unused=("utils",))
    ref = {n: _features(work, n, _reference_name(work, n)) for n in ("inception", "dinov2")}
    assert ref["inception"]["features"].shape == (9, 2048)
    prompts = {}
    for method, row in result["methods"].items():
        meta = output.read_metadata(work, method)
        prompts[method] = [m["condition"] for m in meta]
        inc = _features(work, "inception", method)
        assert list(inc["indices"]) == list(range(6)) and row["samples"] == 6
        real, fake = ref["inception"]["features"], inc["features"]
        np.testing.assert_allclose(row["fid"], _low_rank_frechet(fake, real), rtol=1e-6)
        want = kid.kid_features_to_metric(
            torch.from_numpy(real.astype(np.float64)), torch.from_numpy(fake.astype(np.float64)),
            kid_subsets=5, kid_subset_size=6, verbose=False, rng_seed=2020,
        )  # fmt: skip
        np.testing.assert_allclose(row["kid"], want["kernel_inception_distance_mean"], rtol=1e-9)
        pr = prdc.compute_prdc(real, fake, 2)
        dc = prdc.compute_prdc(real, fake, 3)
        assert row["precision"] == pytest.approx(pr["precision"])
        assert row["recall"] == pytest.approx(pr["recall"])
        assert row["density"] == pytest.approx(dc["density"])
        assert row["coverage"] == pytest.approx(dc["coverage"])
        dino = _features(work, "dinov2", method)["features"]
        np.testing.assert_allclose(
            row["fd_dinov2"], _pytorch_fid(dino, ref["dinov2"]["features"]), rtol=1e-6
        )
        clip = _features(work, "clip", method)
        img = torch.from_numpy(clip["features"]).double()
        txt = torch.from_numpy(clip["text"]).double()
        # torchmetrics' clip_score: normalise, 100 * dot, the mean clamped at 0
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        score = torch.clamp(100 * (img * txt).sum(-1).mean(), min=0).item()
        np.testing.assert_allclose(row["clip_score"], score, rtol=1e-9)
    # the prompts of CLIP score are the job's own, from a COCO captions json
    assert sorted(prompts["cfg"]) == sorted(CAPTIONS) and prompts["cfg"] == prompts["erg"]
    # the reference's statistics, saved for reuse
    saved = np.load(os.path.join(work, "evaluation", "reference_inception.npz"))
    np.testing.assert_allclose(saved["mu"], ref["inception"]["features"].mean(0), rtol=1e-6)
    table = open(os.path.join(work, "evaluation", "table.md")).read()
    assert "| cfg | 6 |" in table and "FD-DINOv2" in table and "CLIP score" in table
    page = open(os.path.join(work, "index.html")).read()
    assert 'id="evaluation"' in page and f"{result['methods']['erg']['fid']:.4g}" in page


def test_features_on_one_device_equal_eight_and_a_killed_run_resumes(job):
    # DINOv2 alone (32-d features: a 2048-d FID's matrix root takes seconds)
    settings = dict(job["settings"], inception="", clip="", prdc_features="dinov2", shard_size=4)
    one, killed = _copy(job, "one"), _copy(job, "killed")
    full = E.evaluate(one, settings, devices=jax.local_devices()[:1])
    with pytest.raises(KeyboardInterrupt):
        E.evaluate(killed, settings, stop_after=3)  # the reference's 3 shards, none of cfg
    stopped = os.path.join(killed, "evaluation", "features")
    assert not os.path.exists(os.path.join(killed, "evaluation", "metrics.json"))
    assert sum(len(files) for _, _, files in os.walk(stopped)) == 3
    resumed = E.evaluate(killed, settings)  # 8 devices
    for method, row in full["methods"].items():
        assert resumed["methods"][method] == pytest.approx(row, rel=1e-5), method
    for source in ("cfg", "erg"):
        a = _features(one, "dinov2", source)["features"]
        b = _features(killed, "dinov2", source)["features"]
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # a shard whose samples changed is extracted again, the others are kept
    os.remove(output.sample_path(killed, "erg", 5))
    again = E.evaluate(killed, settings)
    assert again["methods"]["erg"]["samples"] == 5
    assert list(_features(killed, "dinov2", "erg")["indices"]) == [0, 1, 2, 3, 4]


def test_statistics_only_reference_gives_fid_and_says_what_is_missing(job, evaluated, tmp_path):
    # The statistics of the folder of real images in pytorch-fid's layout (mu, sigma
    # only), from the features that the evaluation with the folder itself saved: the very
    # statistics of its FID, whose 2048-d matrix root is then not taken again.
    full, _ = evaluated
    real = _features(full, "inception", _reference_name(full, "inception"))["features"]
    x = np.asarray(real, np.float64)
    mu, sigma = x.mean(axis=0), np.cov(x, rowvar=False)
    work = _copy(job, "stats")
    stats = str(tmp_path / "stats.npz")
    np.savez(stats, mu=mu, sigma=sigma)
    settings = dict(job["settings"], dinov2="", clip="", reference=stats, methods="cfg")
    result = E.evaluate(work, settings)
    assert list(result["methods"]) == ["cfg"]
    fake = _features(work, "inception", "cfg")["features"]
    fid = result["methods"]["cfg"]["fid"]
    np.testing.assert_allclose(fid, _low_rank_frechet(fake, real), rtol=1e-6)
    assert "kid" not in result["methods"]["cfg"] and "precision" not in result["methods"]["cfg"]
    assert any("Inception statistics only" in n for n in result["notes"])
    with pytest.raises(ValueError, match="evaluation.dinov2: FD-DINOv2 needs real images"):
        E.evaluate(work, dict(settings, dinov2=job["settings"]["dinov2"]))
    # ADM's layout: the images as arr_0 beside their published statistics; FID from the
    # statistics, KID and precision / recall from the images' features
    images = np.random.default_rng(1).integers(0, 256, (8, 24, 24, 3), dtype=np.uint8)
    np.savez(stats, mu=mu, sigma=sigma, arr_0=images)
    result = E.evaluate(work, settings)
    np.testing.assert_allclose(result["methods"]["cfg"]["fid"], fid, rtol=1e-9)
    assert {"kid", "precision", "coverage"} <= set(result["methods"]["cfg"])
    assert result["reference"]["images"] == 8 and not result["notes"]


def test_bad_settings_are_named_before_any_work(job, tmp_path):
    work, s = job["workdir"], job["settings"]
    cases = [
        (dict(s, inception="", dinov2="", clip=""), "name at least one feature network"),
        (dict(s, inception=str(tmp_path / "none.pth")), "evaluation.inception: .* does not exist"),
        (dict(s, reference=""), "evaluation.reference: FID"),
        (dict(s, inception_resize="area"), "evaluation.inception_resize must be one of"),
        (dict(s, reference=job["settings"]["inception"]), "a folder of images or an .npz"),
        (dict(s, batch_size=0), "evaluation.batch_size must be >= 1"),
        (dict(s, batch_size=6), "multiple of the 8 devices"),
        (dict(s, methods="cfg,pag"), r"evaluation.methods: \['pag'\] not in the workdir"),
        (dict(s, prdc_features="clip"), "evaluation.prdc_features must be inception or dinov2"),
        (dict(s, colour="red"), r"evaluation: unknown fields \['colour'\]"),
    ]
    for settings, message in cases:
        with pytest.raises(ValueError, match=message):
            E.evaluate(work, settings)
    with pytest.raises(ValueError, match="has no manifest.json"):
        E.evaluate(str(tmp_path), s)
    assert not os.path.exists(os.path.join(work, "evaluation"))


def test_coco_captions_one_per_image_in_a_fixed_order(tmp_path):
    from erg_jax.loading import coco_captions

    _coco_json(tmp_path / "c.json")
    got = coco_captions(str(tmp_path / "c.json"))
    by_image = dict(zip((42, 7, 13, 99, 5, 61), CAPTIONS, strict=True))
    order = np.random.default_rng(0).permutation(6)
    assert got == [by_image[sorted(by_image)[i]] for i in order]
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="not a COCO captions json"):
        coco_captions(str(tmp_path / "bad.json"))


def test_hosts_divide_the_shards_and_together_write_each_once(tmp_path):
    """Process p of P extracts shards j = p mod P; two processes' files are one's."""
    import jax.numpy as jnp

    from erg_jax.metrics.features import FeatureExtractor, Sharded

    def apply(params, x):  # a per-image feature: the mean colour, scaled
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2)) * params["w"]

    net = FeatureExtractor("toy", 3, {"w": jnp.float32(2.0)}, apply)
    rng = np.random.default_rng(3)
    images = {i: rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for i in range(11)}
    source = E.Source("m", list(images), images.__getitem__)
    extractor = Sharded(net, 8)
    written = [E.extract_source(str(tmp_path), "toy", extractor, source, 3, process=(p, 2))
               for p in (0, 1)]  # fmt: skip
    assert written == [2, 2]  # shards 0, 2 and 1, 3 of [0-2] [3-5] [6-8] [9-10]
    got = E.read_features(str(tmp_path), "toy", source, 3)
    want = np.stack([images[i].mean(axis=(0, 1)) * 2 for i in range(11)])
    np.testing.assert_allclose(got["features"], want, rtol=1e-6)
    assert list(got["indices"]) == list(range(11))
    # a second pass finds every shard done; a shard whose samples changed is redone
    assert E.extract_source(str(tmp_path), "toy", extractor, source, 3) == 0
    source = E.Source("m", [i for i in images if i != 4], images.__getitem__)
    assert E.extract_source(str(tmp_path), "toy", extractor, source, 3) == 1


def test_clip_score_needs_a_text_model(job, tmp_path):
    work = _copy(job, "as_dit")
    path = os.path.join(work, "manifest.json")
    manifest = json.load(open(path))
    manifest["config"]["model"]["kind"] = "dit"
    json.dump(manifest, open(path, "w"))
    with pytest.raises(ValueError, match=r"evaluation.clip: .* class-conditional \(dit\)"):
        E.evaluate(work, job["settings"])
