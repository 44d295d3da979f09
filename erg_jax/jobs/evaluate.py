"""The evaluation job: which method is better, measured on a sampling job's workdir.

    python -m launch.evaluate --workdir=OUT \
        --config.evaluation.inception=pt_inception-2015-12-05-6726825d.pth \
        --config.evaluation.dinov2=dinov2-vitl14 --config.evaluation.clip=clip-vit-l14 \
        --config.evaluation.reference=coco_val2014_512/

For every method in OUT (or those in ``evaluation.methods``), the chosen feature
networks read its PNGs: Inception-v3 (FID, KID, and precision / recall / density /
coverage on ``evaluation.prdc_features``), DINOv2 (FD-DINOv2) and CLIP (CLIP score against
each sample's prompt, read from the method's samples.jsonl). The reference is a folder of
real images (center-cropped and resized to the samples' size, or
``evaluation.reference_size``; their features are saved once as
OUT/evaluation/reference_<network>.npz, usable as a reference elsewhere) or an .npz of
Inception statistics in pytorch-fid's / clean-fid's layout (mu, sigma: FID only, unless
it also holds ``features``, or ``arr_0`` images as the ADM reference batches do).

At scale: features are extracted in jitted batches split over the process's devices
(``batch_size`` is the global batch, padded to a multiple of the device count), and the
shards of ``shard_size`` sample indices are divided between the processes (shard j on
process j mod P). Each shard's features are written whole or not at all
(OUT/evaluation/features/<network>/<method>/<j>.npz), so a killed run resumes from the
shards on disk; a shard whose samples changed since is extracted again. Process 0 then
writes OUT/evaluation/metrics.json, table.md, and the job's index.html with the table.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np

from erg_jax import metrics
from erg_jax.jobs import output
from erg_jax.metrics.features import Sharded
from erg_jax.metrics.inception import RESIZE_MODES
from erg_jax.models import registry

NETWORKS = ("inception", "dinov2", "clip")
FIELDS = dict(
    inception="",  # Inception-v3 weight file (pytorch-fid's or torch-fidelity's): FID, KID
    inception_resize="tf1",  # "tf1" (torch-fidelity, on the device) or "clean" (clean-fid)
    dinov2="",  # transformers Dinov2Model folder: FD-DINOv2
    clip="",  # transformers CLIPModel folder: CLIP score against each sample's prompt
    reference="",  # folder of real images, or an .npz of Inception statistics (mu, sigma)
    reference_size=0,  # real images center-cropped and resized to this; 0 = the samples' size
    methods="",  # comma-separated; "" = every method of the workdir
    batch_size=64,  # global batch of the feature networks (a multiple of the devices)
    shard_size=1024,  # sample indices per features file (the unit of resuming)
    dtype="float32",  # the networks' compute dtype: float32 or bfloat16
    prdc_features="inception",  # the features of precision / recall / density / coverage
    precision_recall_k=3,  # Kynkaanniemi et al.'s k
    nearest_k=5,  # density and coverage (Naeem et al.)'s k, as the paper reports them
    kid_subsets=100,
    kid_subset_size=1000,  # at most the smaller set's size (the table says what was used)
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def section() -> ml_collections.ConfigDict:
    """The evaluation section with its defaults (configs/evaluate.py)."""
    return ml_collections.ConfigDict(dict(FIELDS))


def check(ev) -> dict:
    """The evaluation section as a checked dict; every bad field named before any work."""
    ev = dict(ev)
    unknown = sorted(set(ev) - set(FIELDS))
    if unknown:
        raise ValueError(f"evaluation: unknown fields {unknown}; the fields are {sorted(FIELDS)}")
    ev = {**FIELDS, **ev}
    if not any(ev[n] for n in NETWORKS):
        raise ValueError(
            "evaluation: name at least one feature network: evaluation.inception (a weight "
            "file), evaluation.dinov2 or evaluation.clip (a transformers folder)"
        )
    for name in NETWORKS:
        if ev[name] and not os.path.exists(ev[name]):
            raise ValueError(f"evaluation.{name}: {ev[name]!r} does not exist")
    if ev["reference"] and not os.path.exists(ev["reference"]):
        raise ValueError(f"evaluation.reference: {ev['reference']!r} does not exist")
    if ev["reference"] and not (os.path.isdir(ev["reference"]) or ev["reference"].endswith(".npz")):
        raise ValueError(
            f"evaluation.reference must be a folder of images or an .npz, got {ev['reference']!r}"
        )
    if (ev["inception"] or ev["dinov2"]) and not ev["reference"]:
        raise ValueError(
            "evaluation.reference: FID, KID, FD-DINOv2 and precision / recall need real "
            "images: a folder of them, or an .npz of Inception statistics"
        )
    if ev["inception_resize"] not in RESIZE_MODES:
        raise ValueError(
            f"evaluation.inception_resize must be one of {RESIZE_MODES}, "
            f"got {ev['inception_resize']!r}"
        )
    if ev["dtype"] not in ("float32", "bfloat16"):
        raise ValueError(f"evaluation.dtype must be float32 or bfloat16, got {ev['dtype']!r}")
    if ev["prdc_features"] not in ("inception", "dinov2"):
        raise ValueError(
            f"evaluation.prdc_features must be inception or dinov2, got {ev['prdc_features']!r}"
        )
    for key in ("batch_size", "shard_size", "precision_recall_k", "nearest_k", "kid_subsets"):
        if int(ev[key]) < 1:
            raise ValueError(f"evaluation.{key} must be >= 1, got {ev[key]}")
    if int(ev["kid_subset_size"]) < 2:
        raise ValueError(f"evaluation.kid_subset_size must be >= 2, got {ev['kid_subset_size']}")
    if int(ev["reference_size"]) < 0:
        raise ValueError(f"evaluation.reference_size must be >= 0, got {ev['reference_size']}")
    return ev


# ----------------------------------------------------------------------------- inputs


def job_methods(manifest: dict, chosen: str = "") -> list[str]:
    """A job's methods in its order (its manifest's), or the chosen ones (each checked)."""
    methods = output.manifest_methods(manifest)
    if chosen:
        picked = [m.strip() for m in chosen.split(",") if m.strip()]
        bad = [m for m in picked if m not in methods]
        if bad:
            raise ValueError(f"evaluation.methods: {bad} not in the workdir; it has {methods}")
        methods = picked
    return methods


def read_image(path: str) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """The central square of an image, resized to size x size (PIL bicubic)."""
    from PIL import Image

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top : top + side, left : left + side]
    if side == size:
        return square
    return np.asarray(Image.fromarray(square).resize((size, size), Image.BICUBIC))


class Source:
    """Images by index: a method's PNGs, or the reference's files or array."""

    def __init__(self, name: str, indices: Sequence[int], load: Callable[[int], np.ndarray]):
        self.name, self.indices, self.load = name, sorted(int(i) for i in indices), load


def method_source(workdir: str, method: str) -> Source:
    def load(i):
        return read_image(output.sample_path(workdir, method, i))

    return Source(method, output.done_indices(workdir, method), load)


def reference_source(path: str, size: int) -> Source | None:
    """The real images of evaluation.reference, or None for an .npz of statistics only."""
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise ValueError(f"evaluation.reference: no images ({IMAGE_EXTENSIONS}) in {path}")
        return Source(
            "reference",
            range(len(files)),
            lambda i: center_crop_resize(read_image(os.path.join(path, files[i])), size),
        )
    with np.load(path) as f:
        if "arr_0" not in f.files:
            return None
        images = np.asarray(f["arr_0"])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"evaluation.reference: arr_0 of {path} is not uint8 (n, H, W, 3)")
    return Source("reference", range(len(images)), lambda i: center_crop_resize(images[i], size))


# ----------------------------------------------------------------------------- features


def _shard_path(workdir: str, network: str, source: str, shard: int) -> str:
    return os.path.join(workdir, "evaluation", "features", network, source, f"{shard:08d}.npz")


def _write_npz(path: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    output.atomic_write_bytes(path, buf.getvalue())


def _read_shard(path: str) -> dict | None:
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError):
        return None


def extract_source(
    workdir: str,
    network: str,
    extractor: Sharded,
    source: Source,
    shard_size: int,
    texts: Callable[[Sequence[int]], np.ndarray] | None = None,
    process: tuple[int, int] = (0, 1),
    stop_after: int | None = None,
) -> int:
    """Extracts this process's missing or stale shards of a source; returns how many.

    ``texts(indices)``, for CLIP, gives the prompts' embeddings saved beside the images'.
    ``stop_after`` ends the run after that many shards (how the tests kill a run)."""
    index, count = process
    by_shard: dict[int, list[int]] = {}
    for i in source.indices:
        by_shard.setdefault(i // shard_size, []).append(i)
    done = 0
    for shard, indices in sorted(by_shard.items()):
        if shard % count != index:
            continue
        path = _shard_path(workdir, network, source.name, shard)
        old = _read_shard(path) if os.path.exists(path) else None
        if old is not None and np.array_equal(old["indices"], indices):
            continue
        if stop_after is not None and done >= stop_after:
            raise KeyboardInterrupt(f"stopped after {done} shards")
        images = np.stack([source.load(i) for i in indices])
        arrays = dict(indices=np.asarray(indices, np.int64), features=extractor(images))
        if texts is not None:
            arrays["text"] = np.asarray(texts(indices), np.float32)
        _write_npz(path, **arrays)
        done += 1
    return done


def read_features(workdir: str, network: str, source: Source, shard_size: int) -> dict:
    """Every shard of a source, checked complete: indices, features (and text)."""
    shards = sorted({i // shard_size for i in source.indices})
    parts = []
    for shard in shards:
        part = _read_shard(_shard_path(workdir, network, source.name, shard))
        want = [i for i in source.indices if i // shard_size == shard]
        if part is None or not np.array_equal(part["indices"], want):
            raise ValueError(f"{network} features of {source.name} shard {shard} are missing")
        parts.append(part)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


# ----------------------------------------------------------------------------- the job


def _key(*parts) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:10]


def load_networks(ev: dict) -> dict:
    """name -> (FeatureExtractor, folder key, CLIP scorer or None) of the chosen networks.
    The folder key changes with the weights and preprocessing, so that features made
    with other settings are never reused."""
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if ev["dtype"] == "bfloat16" else jnp.float32
    out = {}
    if ev["inception"]:
        net = metrics.load_inception(ev["inception"], resize=ev["inception_resize"], dtype=dtype)
        key = _key(os.path.abspath(ev["inception"]), ev["inception_resize"], ev["dtype"])
        out["inception"] = (net, f"inception-{key}", None)
    if ev["dinov2"]:
        net = metrics.load_dinov2(ev["dinov2"], dtype=dtype)
        out["dinov2"] = (net, f"dinov2-{_key(os.path.abspath(ev['dinov2']), ev['dtype'])}", None)
    if ev["clip"]:
        scorer = metrics.load_clip(ev["clip"], dtype=dtype)
        key = _key(os.path.abspath(ev["clip"]), ev["dtype"])
        out["clip"] = (scorer.image, f"clip-{key}", scorer)
    return out


def _prompts(workdir: str, method: str) -> dict[int, str]:
    return {int(r["index"]): str(r["condition"]) for r in output.read_metadata(workdir, method)}


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def evaluate(workdir: str, settings, *, devices=None, stop_after: int | None = None) -> dict | None:
    """Runs the evaluation job on a sampling job's workdir (module docstring).

    Args:
      workdir: the sampling job's folder (manifest.json, a folder of PNGs per method).
      settings: the evaluation section (``section()``'s fields).
      devices: the devices of this process to extract on (default: all local ones).
      stop_after: stop after extracting this many shards (the tests' kill).

    Returns:
      on process 0, the contents of OUT/evaluation/metrics.json; None elsewhere.
    """
    ev = check(settings)
    count = len(devices) if devices is not None else jax.local_device_count()
    if int(ev["batch_size"]) % count:
        raise ValueError(
            f"evaluation.batch_size must be a multiple of the {count} devices, "
            f"got {ev['batch_size']}"
        )
    manifest = output.read_manifest(workdir)
    methods = job_methods(manifest, ev["methods"])
    kind = manifest.get("config", {}).get("model", {}).get("kind")
    if ev["clip"] and kind and not registry.get(kind).text:
        raise ValueError(f"evaluation.clip: the workdir's model is class-conditional ({kind}); "
                         "CLIP score needs each sample's prompt")  # fmt: skip
    sources = [method_source(workdir, m) for m in methods]
    empty = [s.name for s in sources if not s.indices]
    if empty:
        raise ValueError(f"evaluation.methods: {empty} have no samples in {workdir}")
    size = int(ev["reference_size"]) or sources[0].load(sources[0].indices[0]).shape[0]
    reference = reference_source(ev["reference"], size) if ev["reference"] else None
    ref_stats = None  # Inception statistics of an .npz reference (FID from its mu, sigma)
    if ev["reference"] and not os.path.isdir(ev["reference"]):
        with np.load(ev["reference"]) as f:
            has_statistics = "mu" in f.files and "sigma" in f.files
        if reference is None or has_statistics:
            ref_stats = metrics.load_statistics(ev["reference"])
    if ev["reference"] and reference is None:
        if ev["dinov2"]:
            raise ValueError(
                "evaluation.dinov2: FD-DINOv2 needs real images, and evaluation.reference "
                f"({ev['reference']}) holds Inception statistics only"
            )
    if reference is not None:
        reference.name = f"reference-{_key(os.path.abspath(ev['reference']), size)}"
    networks = load_networks(ev)
    process = (jax.process_index(), jax.process_count())
    budget = [stop_after]

    def run(folder, extractor, source, texts=None):
        n = extract_source(workdir, folder, extractor, source, int(ev["shard_size"]),
                           texts, process, budget[0])  # fmt: skip
        if budget[0] is not None:
            budget[0] -= n

    for name, (net, folder, scorer) in networks.items():
        extractor = Sharded(net, int(ev["batch_size"]), devices)
        if name != "clip" and reference is not None:
            run(folder, extractor, reference)
        for source in sources:
            texts = None
            if scorer is not None:
                prompts = _prompts(workdir, source.name)

                def texts(indices, prompts=prompts, scorer=scorer):
                    return scorer.encode_text([prompts[i] for i in indices])

            run(folder, extractor, source, texts)
    _sync("erg_jax evaluation features")
    if jax.process_index() != 0:
        _sync("erg_jax evaluation table")
        return None
    result = table(workdir, ev, networks, sources, reference, ref_stats)
    _sync("erg_jax evaluation table")
    return result


def _reference_features(workdir, ev, network, folder, reference, ref_stats) -> dict:
    """The reference's statistics (mu, sigma) and, where known, features of a network;
    the ones extracted from images are also saved as OUT/evaluation/reference_<net>.npz."""
    if reference is None:
        return ref_stats
    feats = read_features(workdir, folder, reference, int(ev["shard_size"]))["features"]
    metrics.save_statistics(os.path.join(workdir, "evaluation", f"reference_{network}.npz"), feats)
    out = dict(zip(("mu", "sigma"), metrics.feature_statistics(feats), strict=True))
    if network == "inception" and ref_stats is not None:
        # an .npz of images (arr_0) and their published statistics: FID from the latter
        out.update(mu=ref_stats["mu"], sigma=ref_stats["sigma"])
    return dict(out, features=feats)


COLUMNS = {
    "fid": "FID",
    "kid": "KID",
    "precision": "precision",
    "recall": "recall",
    "density": "density",
    "coverage": "coverage",
    "fd_dinov2": "FD-DINOv2",
    "clip_score": "CLIP score",
}


def table(workdir, ev, networks, sources, reference, ref_stats) -> dict:
    """Every metric per method from the saved features; writes metrics.json, table.md and
    the job's index.html (with the table)."""
    shard = int(ev["shard_size"])
    refs = {
        name: _reference_features(workdir, ev, name, folder, reference, ref_stats)
        for name, (_, folder, _) in networks.items()
        if name != "clip" and (reference is not None or ref_stats is not None)
    }
    rows, notes = {}, []
    for source in sources:
        row = {"samples": len(source.indices)}
        feats = {n: read_features(workdir, f, source, shard) for n, (_, f, _) in networks.items()}
        if "inception" in refs:
            ref, fake = refs["inception"], feats["inception"]["features"]
            mu, sigma = metrics.feature_statistics(fake)
            row["fid"] = metrics.frechet_distance_from_statistics(
                mu, sigma, ref["mu"], ref["sigma"]
            )
            if "features" in ref:
                size = min(int(ev["kid_subset_size"]), len(fake), len(ref["features"]))
                kid = metrics.kernel_distance(ref["features"], fake, int(ev["kid_subsets"]), size)
                row.update(kid, kid_subset_size=size)
        if "dinov2" in refs:
            ref, fake = refs["dinov2"], feats["dinov2"]["features"]
            mu, sigma = metrics.feature_statistics(fake)
            row["fd_dinov2"] = metrics.frechet_distance_from_statistics(
                mu, sigma, ref["mu"], ref["sigma"]
            )
        prdc_ref = refs.get(ev["prdc_features"], {})
        if "features" in prdc_ref:
            real, fake = prdc_ref["features"], feats[ev["prdc_features"]]["features"]
            pr = metrics.prdc(real, fake, int(ev["precision_recall_k"]))
            dc = metrics.prdc(real, fake, int(ev["nearest_k"]))
            row.update(precision=pr["precision"], recall=pr["recall"])
            row.update(density=dc["density"], coverage=dc["coverage"])
        if "clip" in feats:
            row["clip_score"] = metrics.clip_score(feats["clip"]["features"], feats["clip"]["text"])
        rows[source.name] = row
    if ev["inception"] and "features" not in refs.get("inception", {}):
        notes.append("KID and precision / recall need reference features; the reference "
                     "holds Inception statistics only")  # fmt: skip
    result = {
        "methods": rows,
        "reference": {
            "source": ev["reference"],
            "images": len(reference.indices) if reference is not None else None,
        },
        "columns": COLUMNS,
        "settings": ev,
        "notes": notes,
    }
    folder = os.path.join(workdir, "evaluation")
    os.makedirs(folder, exist_ok=True)
    output.atomic_write_json(os.path.join(folder, "metrics.json"), result)
    output.atomic_write_bytes(os.path.join(folder, "table.md"), markdown_table(result).encode())
    from erg_jax.jobs.report import job_report

    job_report(workdir)
    return result


def table_columns(result: dict) -> list[str]:
    """The metric keys any method has, in COLUMNS' order."""
    present = {k for row in result["methods"].values() for k in row}
    return [k for k in COLUMNS if k in present]


def markdown_table(result: dict) -> str:
    """The per-method table as Markdown (KID with its standard deviation over subsets)."""
    keys = table_columns(result)
    head = "| method | samples | " + " | ".join(COLUMNS[k] for k in keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for method, row in result["methods"].items():
        cells = []
        for k in keys:
            if k not in row:
                cells.append("")
            elif k == "kid":
                cells.append(f"{row['kid']:.5f} ± {row['kid_std']:.5f}")
            else:
                cells.append(f"{row[k]:.4g}")
        lines.append(f"| {method} | {row['samples']} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [f"\n{n}" for n in result["notes"]]) + "\n"
