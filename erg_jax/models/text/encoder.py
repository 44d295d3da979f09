"""Loading a Hugging Face text-encoder folder into a jitted JAX encoder with C-ERG.

``load_text_encoder(DIR)`` reads config.json, the safetensors weights (single or sharded,
bf16 included) and the fast tokenizer, without torch, and returns a ``TextEncoder`` whose
``encode`` takes an Energy for the self-attention of the encoder (C-ERG, Berrada Ifriqi
et al., 2025): one Energy for all layers or one per layer. ``encode_branches`` runs the
strong (tau_c = 1) and tempered encodings of a batch as one vmapped call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from erg_jax import sharding
from erg_jax.energy import Energy, check_energy
from erg_jax.models.text import bert, clip, llama, t5
from erg_jax.weights import read_config, read_folder

logger = logging.getLogger(__name__)

# model_type -> (family module with make_config / convert, Flax module class)
FAMILIES = {
    "t5": (t5, t5.T5Encoder),
    "umt5": (t5, t5.T5Encoder),  # Wan's text encoder: T5 with a bias table per layer
    "bert": (bert, bert.Bert),
    "clip": (clip, clip.ClipText),
    "clip_text_model": (clip, clip.ClipText),
    "llama": (llama, llama.Llama),
}
DEFAULT_MAX_LENGTH = 512  # for models without learned positions (T5, Llama)
PRECISIONS = ("default", "high", "highest")


@dataclasses.dataclass
class TextEncoder:
    """A loaded text encoder: tokenizer, Flax module, (possibly sharded) params.

    Attributes:
      module: the Flax encoder (``T5Encoder`` for T5 and umT5, ``ClipText``, ``Bert`` or
        ``Llama``).
      params: its parameters, placed on ``mesh`` when one was given.
      tokenizer: the transformers fast tokenizer of the folder, or None.
      max_length: token length of ``tokenize``'s output.
      num_layers: attention layers, the length of a per-layer Energy.
      hidden_layer, norm_hidden: which hidden state ``encode`` returns as 'hidden_state'.
      precision: matmul precision ("default", "high", "highest") or None (JAX's).
      mesh: the device mesh, or None.
    """

    module: nn.Module
    params: Any
    tokenizer: Any
    max_length: int
    num_layers: int
    hidden_layer: int = -1
    norm_hidden: bool = False
    precision: str | None = None
    mesh: Any = None
    rules: Any = None

    def __post_init__(self):
        self._encode = jax.jit(self._forward)
        self._branches = jax.jit(jax.vmap(self._forward, in_axes=(None, None, None, 0)))
        self._entropy = jax.jit(self._entropies)

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and mask, both (b, max_length) int32, right-padded.

        A prompt longer than max_length is truncated (keeping the end token where the
        tokenizer adds one) with a logged warning.
        """
        if self.tokenizer is None:
            raise ValueError("this encoder was loaded without a tokenizer")
        texts = [texts] if isinstance(texts, str) else list(texts)
        full = self.tokenizer(texts, truncation=False)["input_ids"]
        for text, ids in zip(texts, full, strict=True):
            if len(ids) > self.max_length:
                logger.warning(
                    "prompt of %d tokens truncated to %d: %.60r", len(ids), self.max_length, text
                )
        out = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="np",
        )
        return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)

    def _forward(self, params, ids, mask, energy, intermediates=False):
        kw = dict(hidden_layer=self.hidden_layer, norm_hidden=self.norm_hidden)
        if intermediates:
            return self.module.apply(
                {"params": params}, ids, mask, energy, mutable=["intermediates"], **kw
            )
        return self.module.apply({"params": params}, ids, mask, energy, **kw)

    def _precision(self):
        """The matmul precision context; jit traces and caches under it."""
        if self.precision is None:
            return contextlib.nullcontext()
        return jax.default_matmul_precision(self.precision)

    def _inputs(self, ids, mask):
        ids = np.asarray(ids, np.int32)
        mask = None if mask is None else np.asarray(mask, np.int32)
        if self.mesh is None:
            return ids, mask
        put = lambda x: jax.device_put(x, sharding.batch_sharding(self.mesh, x.shape, self.rules))
        return put(ids), (None if mask is None else put(mask))

    def encode(self, ids, mask=None, energy: Energy | Sequence[Energy] = Energy()) -> dict:
        """Encodes token ids at the given attention energy (C-ERG).

        Args:
          ids: (b, n) int token ids. mask: (b, n), 1 for tokens, 0 for padding; None
            attends to every position (as SD3 / Flux pipelines call CLIP and T5).
          energy: one Energy for all layers, an Energy whose fields have a leading
            (num_layers,) axis, or a list of num_layers Energies.

        Returns:
          'last_hidden_state' and 'hidden_state' (the chosen layer's), (b, n, d); and
          'pooled' (b, d_pool) for BERT and CLIP ('pooler_output' too with a projection).
        """
        _check(energy)
        with self._precision():
            return self._encode(self.params, *self._inputs(ids, mask), energy)

    def encode_branches(self, ids, mask, energies: Energy | Sequence[Energy]) -> dict:
        """Encodings of the same batch under several energies, as one vmapped call.

        Args:
          energies: an Energy whose fields have a leading branch axis (B,) or (B,
            num_layers, ...), or a list of B Energies; e.g.
            ``Energy(tau=jnp.array([1.0, tau_c]))`` for ERG's strong and weak condition.

        Returns:
          The outputs of ``encode`` with a leading (B,) axis.
        """
        if not isinstance(energies, Energy):
            energies = jax.tree_util.tree_map(
                lambda *xs: jnp.stack(jnp.broadcast_arrays(*map(jnp.asarray, xs))), *energies
            )
        _check(energies)
        fields = [jnp.asarray(x, jnp.float32) for x in jax.tree_util.tree_leaves(energies)]
        sizes = {x.shape[0] for x in fields if x.ndim}
        if len(sizes) != 1:
            raise ValueError(
                f"energies need one leading branch axis, got field shapes "
                f"{[tuple(x.shape) for x in fields]}"
            )
        (size,) = sizes
        energies = jax.tree_util.tree_map(  # a scalar field is the same in every branch
            lambda x: jnp.broadcast_to(
                jnp.asarray(x, jnp.float32), (size,) if jnp.ndim(x) == 0 else jnp.shape(x)
            ),
            energies,
        )
        with self._precision():
            return self._branches(self.params, *self._inputs(ids, mask), energies)

    def _entropies(self, params, ids, mask, energy):
        _, state = self._forward(params, ids, mask, energy, intermediates=True)
        flat = traverse_util.flatten_dict(state["intermediates"])
        per_layer = {int(k[0].split("_")[1]): v[0] for k, v in flat.items() if k[-1] == "entropy"}
        ent = jnp.stack([per_layer[i] for i in range(self.num_layers)])  # (L, b, n, h)
        w = jnp.ones(ids.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
        return jnp.sum(ent * w[None, :, :, None], axis=(1, 2)) / jnp.sum(w)

    def attention_entropy(
        self, ids, mask=None, energy: Energy = Energy(), *, per_head: bool = False
    ) -> jax.Array:
        """Mean attention entropy (nats) of each layer, (num_layers,): averaged over heads
        and over the real (unmasked) query tokens of the batch; per_head: (num_layers, h),
        each head's."""
        _check(energy)
        with self._precision():
            out = self._entropy(self.params, *self._inputs(ids, mask), energy)
        return out if per_head else jnp.mean(out, axis=-1)


def _check(energy) -> None:
    for e in energy if isinstance(energy, (list, tuple)) else [energy]:
        check_energy(e)


def _dtype(x: Any) -> Any:
    return jnp.dtype(x) if x is not None else None


def load_text_encoder(
    path: str | os.PathLike,
    *,
    hidden_layer: int = -1,
    norm_hidden: bool = False,
    max_length: int | None = None,
    dtype: Any = "float32",
    param_dtype: Any = None,
    precision: str | None = None,
    mesh: Any = None,
    rules: Any = None,
    tokenizer: bool | str | os.PathLike = True,
) -> TextEncoder:
    """A text encoder from a local Hugging Face folder; torch is not needed.

    Args:
      path: folder with config.json, model.safetensors (or its sharded index) and the
        tokenizer files (tokenizer.json / tokenizer_config.json ...).
      hidden_layer: which hidden state ``encode`` returns as 'hidden_state', indexed as
        transformers' ``hidden_states`` (0 = embeddings, -1 = last, -2 = penultimate).
      norm_hidden: apply the model's final norm to that hidden state.
      max_length: tokens per prompt; default: the tokenizer's model_max_length, capped by
        the learned positions of CLIP / BERT, or by 512 for T5, umT5 and Llama.
      dtype, param_dtype: activation and parameter dtypes (param_dtype defaults to dtype).
      precision: matmul precision "default", "high" or "highest"; None keeps JAX's.
      mesh, rules: shard parameters over this mesh by logical axis rules
        (``erg_jax.sharding``); each device reads only its slice from disk.
      tokenizer: load the tokenizer from ``path`` (True), from another folder (a path:
        diffusers pipelines keep it in ``tokenizer*/`` beside ``text_encoder*/``), or not
        at all (False); a loaded tokenizer is checked against the config.

    Raises:
      ValueError: unsupported architecture, missing or inconsistent weights (naming the
        file or tensor), or a tokenizer that does not fit the config.
    """
    path = os.fspath(path)
    hf = read_config(path)
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        arch = hf.get("architectures")
        raise ValueError(
            f"unsupported architecture in {path}: model_type={kind!r} "
            f"architectures={arch}; supported model types: {sorted(FAMILIES)}"
        )
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")
    family, module_cls = FAMILIES[kind]
    tensors, source = read_folder(path)
    cfg = family.make_config(hf, tensors)
    dtype = _dtype(dtype)
    param_dtype = _dtype(param_dtype) or dtype
    module = module_cls(cfg, dtype=dtype, param_dtype=param_dtype)
    if tokenizer is True:
        tok = _load_tokenizer(path, hf, cfg)
    elif tokenizer is False or tokenizer is None:
        tok = None
    else:
        tok = _load_tokenizer(os.fspath(tokenizer), hf, cfg)
    host = family.convert(tensors, cfg, source)

    abstract = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), None, Energy())
    )
    abstract = abstract["params"]
    _check_tree(host, abstract, source)
    if mesh is not None:
        params = sharding.place(host, sharding.param_shardings(abstract, mesh, rules), param_dtype)
    else:
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x), param_dtype), host)

    if max_length is None:
        limits = [getattr(tok, "model_max_length", None) or DEFAULT_MAX_LENGTH]
        if kind in ("bert", "clip", "clip_text_model"):
            limits.append(cfg.max_positions)
        else:
            limits.append(DEFAULT_MAX_LENGTH)
        max_length = min(int(min(x, 10**9)) for x in limits)
    return TextEncoder(
        module,
        params,
        tok,
        int(max_length),
        cfg.num_layers,
        hidden_layer,
        norm_hidden,
        precision,
        mesh,
        rules,
    )


def _check_tree(host: dict, abstract: Any, source: str) -> None:
    got = traverse_util.flatten_dict(host, sep="/")
    want = traverse_util.flatten_dict(nn.unbox(abstract), sep="/")
    if set(got) != set(want):
        raise ValueError(
            f"{source}: converted parameters {sorted(set(got) ^ set(want))[:5]} do "
            "not match the model"
        )
    for k, v in want.items():
        if tuple(got[k].shape) != tuple(v.shape):
            raise ValueError(f"{source}: parameter {k} has shape {got[k].shape}, model {v.shape}")


def _load_tokenizer(path: str, hf: dict, cfg: Any):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
    except Exception as e:  # transformers raises many kinds; all mean "no usable tokenizer"
        raise ValueError(f"cannot load a fast tokenizer from {path}: {e}") from e
    if tok is None or isinstance(tok, bool):
        raise ValueError(f"no tokenizer files in {path}")
    if len(tok) > cfg.vocab_size:
        raise ValueError(
            f"tokenizer in {path} does not match the config: it has {len(tok)} "
            f"tokens, the model's vocab_size is {cfg.vocab_size}"
        )
    eos = getattr(cfg, "eos_token_id", None)
    if hf.get("model_type", "").startswith("clip") and eos not in (None, 2):
        if tok.eos_token_id != eos:
            raise ValueError(
                f"tokenizer in {path} does not match the config: eos_token_id "
                f"{tok.eos_token_id}, config {eos} (CLIP pools at the end token)"
            )
    if tok.pad_token is None:  # Llama 3 has none; padded positions are masked anyway
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok
