"""A small CNN that reads the shape and colour of an ``erg_jax.data`` image.

The quality bench (``erg_jax.jobs.quality``) uses it twice: its two heads give a sample's
shape and colour (consistency with the condition), and its penultimate layer gives the
features for the Frechet distance and precision / recall / density / coverage (Naeem et al.
2020), as Inception's pool features do for FID (Heusel et al. 2017), on our 32x32 data.

Architecture, NHWC in [-1, 1]: three stages of 3x3 convolutions with ReLU and 2x2 average
pooling (32 -> 16 -> 8 -> 4), a global mean over the 4x4 grid, a dense ReLU layer of
``features`` units (the features), then linear shape and colour heads. Trained with
AdamW on cross-entropy, a little Gaussian pixel noise added so slightly imperfect
samples are still read correctly.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from erg_jax import checkpoint, data

DEFAULTS = dict(kind="classifier", widths=(16, 32, 64), features=128, image_size=data.IMAGE_SIZE)


class AttributeCNN(nn.Module):
    """images (b, 32, 32, 3) -> {'shape': (b, 6), 'colour': (b, 6) logits, 'features'}."""

    widths: tuple[int, ...] = (16, 32, 64)
    features: int = 128

    @nn.compact
    def __call__(self, images: jax.Array) -> dict:
        h = images.astype(jnp.float32)
        for i, w in enumerate(self.widths):
            h = nn.relu(nn.Conv(w, (3, 3), name=f"conv{i}_a")(h))
            if i > 0:
                h = nn.relu(nn.Conv(w, (3, 3), name=f"conv{i}_b")(h))
            h = nn.avg_pool(h, (2, 2), strides=(2, 2))
        h = nn.relu(nn.Conv(2 * self.widths[-1], (3, 3), name="conv_top")(h))
        feats = nn.relu(nn.Dense(self.features, name="features")(jnp.mean(h, axis=(1, 2))))
        return {
            "shape": nn.Dense(data.NUM_SHAPES, name="shape_head")(feats),
            "colour": nn.Dense(data.NUM_COLOURS, name="colour_head")(feats),
            "features": feats,
        }


def module(config: dict) -> AttributeCNN:
    return AttributeCNN(tuple(int(w) for w in config["widths"]), int(config["features"]))


class Classifier:
    """``classifier(images) -> dict(shape, colour, features)`` (numpy), jitted, batched.

    Attributes:
      config: the config dict; params: the Flax params.
    """

    def __init__(self, config: dict, params: Any, batch_size: int = 500):
        self.config, self.params, self.batch_size = dict(config), params, batch_size
        net = module(self.config)
        self._apply = jax.jit(lambda p, x: net.apply({"params": p}, x))

    def logits(self, images) -> dict:
        """Shape and colour logits and features of (n, 32, 32, 3) images, numpy."""
        images = np.asarray(images, np.float32)
        outs = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i : i + self.batch_size]
            pad = self.batch_size - len(chunk)  # one compiled shape for every chunk
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)])
            out = jax.device_get(self._apply(self.params, chunk))
            outs.append({k: v[: self.batch_size - pad] for k, v in out.items()})
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    def features(self, images) -> np.ndarray:
        """(n, features) penultimate-layer features of (n, 32, 32, 3) images."""
        return self.logits(images)["features"]

    def __call__(self, images) -> dict:
        """shape (n,), colour (n,) int predictions and features (n, d)."""
        out = self.logits(images)
        return {
            "shape": np.argmax(out["shape"], -1),
            "colour": np.argmax(out["colour"], -1),
            "features": out["features"],
        }


def load_classifier(directory: str) -> Classifier:
    """The classifier saved in directory (erg_jax.checkpoint format, kind 'classifier')."""
    params, config = checkpoint.restore(directory)
    if config.get("kind") != "classifier":
        raise ValueError(f"{directory} holds a {config.get('kind')!r} model, not a classifier")
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    return Classifier(config, params)


def loss_fn(net, params, images, shape, colour) -> jax.Array:
    """Sum of the two heads' mean cross-entropies."""
    out = net.apply({"params": params}, images)
    ce = optax.softmax_cross_entropy_with_integer_labels
    return ce(out["shape"], shape).mean() + ce(out["colour"], colour).mean()


def train(config, workdir: str) -> dict:
    """Trains the classifier of a configs/train_shapes.py:classifier config; exports it.

    Batch n is drawn with the generator (seed, n) from ``data.num_train`` training
    images; accuracy is measured on 2,000 held-out ones and written with the config.

    Returns:
      dict with 'params', 'model_config', 'accuracy' {shape, colour} and 'losses'.
    """
    os.makedirs(workdir, exist_ok=True)
    t = config.train
    mcfg = dict(DEFAULTS, **config.model.overrides.to_dict(), kind="classifier")
    net = module(mcfg)
    d = data.make_dataset(config.data.num_train, config.data.seed)
    params = net.init(jax.random.key(config.seed), jnp.zeros((1, 32, 32, 3)))["params"]
    lr = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, t.warmup_steps, t.steps)
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), optax.adamw(lr, weight_decay=1e-4))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, images, shape, colour, key):
        images = images + t.noise_std * jax.random.normal(key, images.shape)
        loss, grads = jax.value_and_grad(lambda p: loss_fn(net, p, images, shape, colour))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses, start = {}, time.perf_counter()
    for n in range(t.steps):
        idx = np.random.default_rng((config.seed, n)).integers(0, len(d["images"]), t.batch_size)
        key = jax.random.fold_in(jax.random.key(config.seed), n)
        params, opt_state, loss = step(
            params, opt_state, d["images"][idx], d["shape"][idx], d["colour"][idx], key
        )
        losses[n + 1] = float(loss)
        if (n + 1) % t.log_every == 0 and config.progress:
            print(f"[{n + 1}/{t.steps}] loss {loss:.4f}  {time.perf_counter() - start:.0f} s")
    held = data.make_dataset(2000, data.HELDOUT_SEED)
    read = Classifier(mcfg, params)(held["images"])
    accuracy = {
        "shape": float(np.mean(read["shape"] == held["shape"])),
        "colour": float(np.mean(read["colour"] == held["colour"])),
    }
    summary = dict(accuracy=accuracy, seconds=time.perf_counter() - start, steps=t.steps)
    with open(os.path.join(workdir, "classifier.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if config.progress:
        print(json.dumps(summary))
    if config.export:
        checkpoint.save(config.export, params, dict(mcfg, heldout_accuracy=accuracy))
    return dict(params=params, model_config=mcfg, accuracy=accuracy, losses=losses)
