"""CLIP's image and text towers (Radford et al., 2021) and CLIP score (Hessel et al., 2021).

The image tower is transformers' ``CLIPVisionModel`` followed by ``visual_projection``
(``CLIPModel.get_image_features``): a patch convolution without bias, a class token and
learned positions, ``pre_layrnorm``, pre-norm blocks ``x + Attn(LN(x)); x + MLP(LN(x))``
(the text tower's ``ClipLayer``, without a mask), ``post_layernorm`` on the class token and
a projection without bias. The text tower is ``erg_jax.models.text``'s ``ClipText`` with
the folder's ``text_projection`` (``get_text_features``), pooled at the end token.

Images are prepared on the host as the folder's ``preprocessor_config.json`` says,
following CLIPImageProcessor's PIL path: the shortest edge resized with PIL (bicubic for
CLIP), a centre crop, ``x * rescale_factor`` in float64 cast to float32, then
``(x - image_mean) / image_std``. Prompts are tokenised without truncation and cut to the
model's positions afterwards, as torchmetrics does (a cut prompt loses its end token).

CLIP score of an image embedding e_I and a text embedding e_T:

    score = max(100 cos(e_I, e_T), 0)

torchmetrics' ``clip_score`` / ``CLIPScore`` average the unclipped ``100 cos`` over the
samples and clip the mean; the two agree whenever no cosine is negative.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from erg_jax.energy import Energy
from erg_jax.metrics.features import FeatureExtractor, check_images
from erg_jax.models.text import TextEncoder, load_text_encoder
from erg_jax.models.text import layers as L
from erg_jax.models.text.clip import ClipLayer
from erg_jax.weights import StateDict, conv2d, embedding, linear, norm, read_config, read_folder

logger = logging.getLogger(__name__)

PREPROCESSOR_FILE = "preprocessor_config.json"
# What a CLIPModel folder's weights hold besides the two towers' own tensors.
HEADS = ("visual_projection.weight", "text_projection.weight")


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    """Architecture fields of a transformers CLIPVisionConfig (+ CLIPConfig.projection_dim).

    ``ClipLayer`` reads hidden_size, num_heads, intermediate_size, hidden_act and eps, which
    this config names as ``ClipTextConfig`` does.
    """

    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "quick_gelu"
    eps: float = 1e-5
    projection_dim: int = 512

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class ClipVision(nn.Module):
    """CLIP's ViT image tower with its projection: ``get_image_features``."""

    config: ClipVisionConfig
    dtype: L.Dtype = jnp.float32
    param_dtype: L.Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """Args: pixels (b, s, s, c), normalised, s = image_size. Returns (b, p) float32."""
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b = pixels.shape[0]
        patch = (c.patch_size, c.patch_size)
        conv = nn.Conv(
            c.hidden_size, patch, patch, "VALID", use_bias=False, name="patch_embed", **kw
        )
        x = conv(pixels.astype(self.dtype))
        x = x.reshape(b, -1, c.hidden_size)  # patches in row-major order, as torch flattens
        init = nn.initializers.normal(0.02)
        cls = self.param("class_embed", init, (c.hidden_size,), self.param_dtype)
        cls = jnp.broadcast_to(jnp.asarray(cls, self.dtype), (b, 1, c.hidden_size))
        x = jnp.concatenate([cls, x], axis=1)
        pos = L.embed(
            c.num_positions, c.hidden_size, ("positions", "embed"), name="pos_embed", **kw
        )
        x = x + pos(jnp.arange(x.shape[1]))[None]
        x = L.layer_norm(c.eps, name="pre_norm", **kw)(x)
        for i in range(c.num_layers):
            x = ClipLayer(c, name=f"layers_{i}", **kw)(x, Energy(), None)
        pooled = L.layer_norm(c.eps, name="post_norm", **kw)(x[:, 0])
        proj = L.dense(c.projection_dim, ("embed", None), bias=False, name="projection", **kw)
        return proj(pooled).astype(jnp.float32)


def vision_config(hf: dict) -> ClipVisionConfig:
    """The image tower's config from a CLIPModel config.json (CLIP's defaults otherwise)."""
    v = hf["vision_config"]
    return ClipVisionConfig(
        image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 32),
        num_channels=v.get("num_channels", 3),
        hidden_size=v.get("hidden_size", 768),
        num_layers=v.get("num_hidden_layers", 12),
        num_heads=v.get("num_attention_heads", 12),
        intermediate_size=v.get("intermediate_size", 3072),
        hidden_act=v.get("hidden_act", "quick_gelu"),
        eps=v.get("layer_norm_eps", 1e-5),
        projection_dim=hf.get("projection_dim", 512),
    )


def convert_vision(tensors: dict[str, np.ndarray], c: ClipVisionConfig, source: str) -> dict:
    """Flax params of ``ClipVision`` from a CLIPModel state dict (its text side ignored)."""
    vision = {k: v for k, v in tensors.items() if k.startswith("vision_model.")}
    vision["visual_projection.weight"] = tensors["visual_projection.weight"]
    sd = StateDict(vision, source)
    sd.skip("vision_model.embeddings.position_ids")
    d, f, pre = c.hidden_size, c.intermediate_size, "vision_model"
    p = {
        "patch_embed": conv2d(
            sd, f"{pre}.embeddings.patch_embedding", c.num_channels, d, c.patch_size, bias=False
        ),
        "class_embed": sd.take(f"{pre}.embeddings.class_embedding", (d,)),
        "pos_embed": embedding(sd, f"{pre}.embeddings.position_embedding", c.num_positions, d),
        "pre_norm": norm(sd, f"{pre}.pre_layrnorm", d),
        "post_norm": norm(sd, f"{pre}.post_layernorm", d),
        "projection": linear(sd, "visual_projection", d, c.projection_dim, bias=False),
    }
    for i in range(c.num_layers):
        layer = f"{pre}.encoder.layers.{i}"
        att = f"{layer}.self_attn"
        p[f"layers_{i}"] = {
            "attn_norm": norm(sd, f"{layer}.layer_norm1", d),
            "attn": {
                "q": linear(sd, f"{att}.q_proj", d, d),
                "k": linear(sd, f"{att}.k_proj", d, d),
                "v": linear(sd, f"{att}.v_proj", d, d),
                "o": linear(sd, f"{att}.out_proj", d, d),
            },
            "mlp_norm": norm(sd, f"{layer}.layer_norm2", d),
            "mlp_in": linear(sd, f"{layer}.mlp.fc1", d, f),
            "mlp_out": linear(sd, f"{layer}.mlp.fc2", f, d),
        }
    sd.finish()
    return p


# ----------------------------------------------------------------------------- preprocessing


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """CLIPImageProcessor's settings (its defaults where preprocessor_config.json is silent).

    Attributes:
      resize: (h, w) to resize to, or None to match the shortest edge to ``shortest_edge``.
      shortest_edge: the shortest edge after resizing (when ``resize`` is None).
      resample: PIL's filter number (3 = bicubic).
      crop: (h, w) of the centre crop, or None for no crop.
      rescale_factor: multiplies the uint8 values (1/255), or None for no rescale.
      mean, std: per-channel normalisation, or None for none.
    """

    resize: tuple[int, int] | None = None
    shortest_edge: int | None = 224
    resample: int = 3
    crop: tuple[int, int] | None = (224, 224)
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, ...] | None = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] | None = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_config(cls, pp: dict, where: str) -> Preprocess:
        """From a preprocessor_config.json's fields; ``where`` names it in errors."""
        kw: dict[str, Any] = {"resample": int(pp.get("resample", 3))}
        size = pp.get("size", {"shortest_edge": 224})
        if isinstance(size, int):  # old configs: an int is the shortest edge for CLIP
            size = {"shortest_edge": size}
        if not pp.get("do_resize", True):
            kw.update(shortest_edge=None)
        elif set(size) == {"shortest_edge"}:
            kw.update(shortest_edge=int(size["shortest_edge"]))
        elif set(size) == {"height", "width"}:
            kw.update(resize=(int(size["height"]), int(size["width"])), shortest_edge=None)
        else:
            raise ValueError(
                f"{where}: unsupported size {size}; expected {{'shortest_edge': n}} or "
                "{'height': h, 'width': w}"
            )
        crop = pp.get("crop_size", 224)
        crop = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
        kw["crop"] = (int(crop[0]), int(crop[1])) if pp.get("do_center_crop", True) else None
        kw["rescale_factor"] = (
            pp.get("rescale_factor", 1 / 255) if pp.get("do_rescale", True) else None
        )
        normalize = pp.get("do_normalize", True)
        kw["mean"] = tuple(pp.get("image_mean", cls.mean)) if normalize else None
        kw["std"] = tuple(pp.get("image_std", cls.std)) if normalize else None
        return cls(**kw)

    @property
    def size(self) -> tuple[int, int] | None:
        """(h, w) of every prepared image, or None when it follows the input's shape."""
        return self.crop or self.resize

    def resized(self, h: int, w: int) -> tuple[int, int]:
        """(h, w) after the resize; the long edge scales and truncates as transformers'."""
        if self.resize is not None:
            return self.resize
        if self.shortest_edge is None:
            return h, w
        s = self.shortest_edge
        return (int(s * h / w), s) if w <= h else (s, int(s * w / h))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(n, H, W, 3) uint8 -> (n, h, w, 3) float32, image by image."""
        x = check_images(images)
        if not len(x):
            h, w = self.size or self.resized(*x.shape[1:3])
            return np.zeros((0, h, w, 3), np.float32)
        return np.stack([self.one(image) for image in x])

    def one(self, image: np.ndarray) -> np.ndarray:
        """One (H, W, 3) uint8 image -> (h, w, 3) float32."""
        h, w = self.resized(*image.shape[:2])
        x = np.asarray(Image.fromarray(image).resize((w, h), resample=self.resample))
        if self.crop is not None:
            x = _centre_crop(x, *self.crop)
        if self.rescale_factor is not None:  # in float64, then float32, as transformers
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = x.astype(np.float32)
        if self.mean is not None:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return x


def _centre_crop(x: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """The centre (ch, cw) of (h, w, c); a smaller image is zero-padded around its centre."""
    h, w = x.shape[:2]
    if h < ch or w < cw:
        ph, pw = max(0, -(-(ch - h) // 2)), max(0, -(-(cw - w) // 2))
        out = np.zeros((max(h, ch), max(w, cw), x.shape[2]), x.dtype)
        out[ph : ph + h, pw : pw + w] = x
        x, h, w = out, *out.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[top : top + ch, left : left + cw]


# ----------------------------------------------------------------------------- score


def clip_score_from_embeddings(
    image_emb: np.ndarray, text_emb: np.ndarray, *, clip_at_zero: bool = True
) -> np.ndarray:
    """(n,) float64 per-sample CLIP score, max(100 cos(image, text), 0), of paired rows.

    Args:
      image_emb, text_emb: (n, d) embeddings, unnormalised (as the towers return them).
      clip_at_zero: False gives 100 cos unclipped; torchmetrics reports
        ``max(mean(clip_score_from_embeddings(..., clip_at_zero=False)), 0)``.
    """
    a = np.asarray(image_emb, np.float64)
    b = np.asarray(text_emb, np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"image and text embeddings must both be (n, d), got {a.shape} and {b.shape}"
        )
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return np.maximum(100.0 * cos, 0.0) if clip_at_zero else 100.0 * cos


@dataclasses.dataclass(frozen=True, eq=False)
class ClipScorer:
    """A CLIPModel's two towers: image and text embeddings, and the CLIP score of pairs.

    Attributes:
      image: the image tower, ``image(uint8 (n, H, W, 3)) -> (n, projection_dim)``,
        unnormalised (``get_image_features``).
      text: the text tower (``TextEncoder``), its 'pooled' output ``get_text_features``.
      max_positions: tokens the text tower takes; longer prompts are cut to this.
    """

    image: FeatureExtractor
    text: TextEncoder
    max_positions: int

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids and mask, (n, max_positions) int32: each prompt tokenised whole, then cut.

        Cutting after tokenising (torchmetrics' way) drops a long prompt's end token.
        """
        tok, m = self.text.tokenizer, self.max_positions
        rows = tok(list(prompts), truncation=False)["input_ids"]
        cut = sum(len(r) > m for r in rows)
        if cut:
            logger.warning("%d of %d prompts cut to CLIP's %d tokens", cut, len(rows), m)
        ids = np.full((len(rows), m), tok.pad_token_id, np.int32)
        mask = np.zeros((len(rows), m), np.int32)
        for i, r in enumerate(rows):
            ids[i, : min(len(r), m)] = r[:m]
            mask[i, : min(len(r), m)] = 1
        return ids, mask

    def encode_text(self, prompts: str | Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(n, projection_dim) float32 text embeddings (``get_text_features``)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = []
        for i in range(0, len(prompts), batch_size):
            ids, mask = self.tokenize(prompts[i : i + batch_size])
            out.append(np.asarray(self.text.encode(ids, mask)["pooled"], np.float32))
        return np.concatenate(out) if out else np.zeros((0, self.image.dim), np.float32)

    def score(
        self, images: np.ndarray, prompts: str | Sequence[str], batch_size: int = 64
    ) -> np.ndarray:
        """(n,) float64 CLIP score of each uint8 (H, W, 3) image with its prompt."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = check_images(images)
        if len(images) != len(prompts):
            raise ValueError(
                f"CLIP score pairs images with prompts one to one; got {len(images)} "
                f"images and {len(prompts)} prompts"
            )
        return clip_score_from_embeddings(
            self.image(images, batch_size), self.encode_text(prompts, batch_size)
        )


# ----------------------------------------------------------------------------- loading


def _check_folder(folder: str, hf: dict, tensors: dict) -> None:
    """Refuses anything but a transformers CLIPModel folder, naming what is missing."""
    missing = []
    if hf.get("model_type") != "clip":
        missing.append(
            f"model_type 'clip' in config.json (it has {hf.get('model_type')!r}, "
            f"architectures {hf.get('architectures')})"
        )
    missing += [f"'{k}' in config.json" for k in ("text_config", "vision_config") if k not in hf]
    for prefix in ("text_model.", "vision_model."):
        if not any(k.startswith(prefix) for k in tensors):
            missing.append(f"tensors '{prefix}*' in the weights")
    missing += [f"tensor '{k}' in the weights" for k in HEADS if k not in tensors]
    if not os.path.exists(os.path.join(folder, PREPROCESSOR_FILE)):
        missing.append(PREPROCESSOR_FILE)
    if missing:
        raise ValueError(
            f"{folder} is not a transformers CLIPModel folder: missing {'; '.join(missing)}"
        )


def load_clip(
    folder: str | os.PathLike, *, dtype: Any = jnp.float32, precision: str | None = None
) -> ClipScorer:
    """CLIP's image and text towers from a transformers CLIPModel folder; no torch needed.

    Args:
      folder: config.json (model_type "clip"), model.safetensors (or its sharded index),
        the tokenizer files and preprocessor_config.json, as ``save_pretrained`` writes.
      dtype: activation dtype (bfloat16 computes in bfloat16); parameters stay float32
        and embeddings come out float32.
      precision: matmul precision "default", "high" or "highest"; None keeps JAX's.

    Raises:
      ValueError: not a CLIPModel folder (naming what is missing), a preprocessing the
        image tower cannot take, or missing or misshapen weights (naming the tensor).
    """
    folder = os.fspath(folder)
    hf = read_config(folder)
    tensors, source = read_folder(folder)
    _check_folder(folder, hf, tensors)
    dtype = jnp.dtype(dtype)
    text = load_text_encoder(folder, dtype=dtype, param_dtype=jnp.float32, precision=precision)
    cfg = vision_config(hf)
    where = os.path.join(folder, PREPROCESSOR_FILE)
    prepare = Preprocess.from_config(read_config(folder, PREPROCESSOR_FILE), where)
    if prepare.size != (cfg.image_size, cfg.image_size):
        raise ValueError(
            f"{where}: images come out {prepare.size or 'in their own shapes'}, the image "
            f"tower takes {cfg.image_size}x{cfg.image_size}"
        )
    module = ClipVision(cfg, dtype=dtype, param_dtype=jnp.float32)
    params = jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, jnp.float32), convert_vision(tensors, cfg, source)
    )

    def apply(params, pixels):
        # under the context while tracing: the matmuls of the traced program keep it
        with jax.default_matmul_precision(precision):
            return module.apply({"params": params}, pixels)

    image = FeatureExtractor(
        name="clip",
        dim=cfg.projection_dim,
        params=params,
        apply=apply,
        prepare=prepare,
        settings=dict(
            folder=folder,
            dtype=dtype.name,
            precision=precision,
            preprocess=dataclasses.asdict(prepare),
        ),
    )
    return ClipScorer(image, text, text.module.config.max_positions)
