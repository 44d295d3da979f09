"""Tests of NAG (Normalized Attention Guidance, Chen et al. 2025) inside the SD3 / SD3.5
MMDiT and the FLUX.1 transformer (``AttentionControl.nag``, ``cond["negative"]``).

Reference: the paper's Algorithm 1 written here in PyTorch as diffusers attention
processors (SD3's joint attention, FLUX's double and single blocks), run by tiny random
diffusers models under the doubled-batch forward of the authors' code
(ChenDarYen/Normalized-Attention-Guidance: NAGFluxTransformer2DModel and the Trunc* norms,
which give the image stream's norm1 and norm_out the positive embedding alone). Our
converted models must give the same prediction, for L1 and L2 norms, NAG in some or all
layers, on a subset of heads, and one layer's attention alone. Without torch: scale 1
everywhere is the plain model, the scanned layout agrees, and cond["negative"] is
required by name.
"""

import copy
import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_flux import diffusers_kwargs as flux_kwargs
from test_flux import inputs as flux_inputs
from test_flux import model as flux_model
from test_mmdit import VARIANTS as SD3_VARIANTS
from test_mmdit import diffusers_kwargs as sd3_kwargs
from test_mmdit import inputs as sd3_inputs

from erg_jax.control import AttentionControl, EntropyProbe, NAGControl
from erg_jax.models import flux, mmdit

try:  # the reference; its tests skip without it (``pytest.importorskip`` in the builders)
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = F = None

TAU = 1.5  # small enough that the clamp acts on some image tokens at scale 5 (checked)


def nag_control(layers, norm, guided, alpha=0.25, heads=None, tau=TAU):
    """AttentionControl with NAG (scale 5) in the layers ``guided``, scale 1 elsewhere;
    heads: (guided heads, number of heads) of a (layers, heads) scale, or None (scale
    (layers,))."""
    scale = np.ones((layers,) if heads is None else (layers, heads[1]), np.float32)
    for i in guided:
        if heads is None:
            scale[i] = 5.0
        else:
            scale[i, list(heads[0])] = 5.0
    full = lambda v: jnp.full((layers,), v, jnp.float32)
    return AttentionControl(nag=NAGControl(jnp.asarray(scale), full(tau), full(alpha), norm))


def negative_text(config, b=3, tokens=5, seed=11):
    k = jax.random.split(jax.random.key(seed), 2)
    return dict(
        context=jax.random.normal(k[0], (b, tokens, config["joint_attention_dim"])),
        pooled=jax.random.normal(k[1], (b, config["pooled_projection_dim"])),
    )


# -- the PyTorch reference: Algorithm 1 as diffusers attention processors -----------------


class Clamps:  # how many image tokens the reference's clamp min(r, tau) acted on, of how many
    def __init__(self):
        self.clamped = self.tokens = 0


def algorithm1(pos, neg, layer, heads, clamps):
    """NAG's image rows (b, n, D) from Z+ and Z- (b, n, D), heads merged.

    layer: (scale, tau, alpha, norm), scale a float or one float per head.
    """
    scale, tau, alpha, norm = layer
    per_head = np.broadcast_to(np.asarray(scale, np.float32), (heads,))
    per_channel = torch.tensor(np.repeat(per_head, pos.shape[-1] // heads))
    if torch.all(per_channel == 1):
        return pos
    guided = per_channel * pos - (per_channel - 1) * neg
    p = 1 if norm == "l1" else 2
    ratio = torch.linalg.vector_norm(guided, p, dim=-1, keepdim=True) / torch.linalg.vector_norm(
        pos, p, dim=-1, keepdim=True
    )
    clamps.clamped += int((ratio > tau).sum())
    clamps.tokens += ratio.numel()
    normalised = guided * torch.clamp(ratio, max=tau) / ratio
    return alpha * normalised + (1 - alpha) * pos


def _heads(attn, x, proj, norm=None):
    """(b, n, D) -> (b, n, h, d) projected (and QK-normed)."""
    y = proj(x).unflatten(-1, (attn.heads, -1))
    return y if norm is None else norm(y)


def _attention(q, k, v):
    """sdpa of (b, n, h, d) tensors, heads merged back: (b, n, h * d)."""
    out = F.scaled_dot_product_attention(*(a.transpose(1, 2) for a in (q, k, v)))
    return out.transpose(1, 2).flatten(2)


class SD3Processor:
    """NAG in SD3's joint attention: the image tokens (b) attend with the positive and the
    negative text (2b, [positive; negative]); the image rows are Algorithm 1's."""

    def __init__(self, layer, clamps):
        self.layer, self.clamps = layer, clamps

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        x, c = hidden_states, encoder_hidden_states
        b, n = x.shape[:2]
        image = [
            _heads(attn, x, attn.to_q, attn.norm_q),
            _heads(attn, x, attn.to_k, attn.norm_k),
            _heads(attn, x, attn.to_v),
        ]
        text = [
            _heads(attn, c, attn.add_q_proj, attn.norm_added_q),
            _heads(attn, c, attn.add_k_proj, attn.norm_added_k),
            _heads(attn, c, attn.add_v_proj),
        ]
        pairs = zip(image, text, strict=True)
        out = _attention(*(torch.cat([i.repeat(2, 1, 1, 1), t], 1) for i, t in pairs))
        img = algorithm1(out[:b, :n], out[b:, :n], self.layer, attn.heads, self.clamps)
        txt = out[:, n:] if attn.context_pre_only else attn.to_add_out(out[:, n:])
        return attn.to_out[0](img), txt


class FluxProcessor:
    """NAG in FLUX's attention. Double block: as ``SD3Processor``, text first. Single
    block ([text; image] 2b, text_len text tokens): the guided image rows replace both
    halves', as the authors' processor writes them."""

    def __init__(self, layer, clamps, text_len=None):
        self.layer, self.clamps, self.text_len = layer, clamps, text_len

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        x, c = hidden_states, encoder_hidden_states
        q = _heads(attn, x, attn.to_q, attn.norm_q)
        k = _heads(attn, x, attn.to_k, attn.norm_k)
        v = _heads(attn, x, attn.to_v)
        text_len = self.text_len
        if c is not None:
            text_len = c.shape[1]
            cq = _heads(attn, c, attn.add_q_proj, attn.norm_added_q)
            ck = _heads(attn, c, attn.add_k_proj, attn.norm_added_k)
            cv = _heads(attn, c, attn.add_v_proj)
            q, k, v = (
                torch.cat([t, i.repeat(2, 1, 1, 1)], 1) for t, i in ((cq, q), (ck, k), (cv, v))
            )
        q, k = (apply_rotary_emb(a, image_rotary_emb, sequence_dim=1) for a in (q, k))
        out = _attention(q, k, v)
        b = out.shape[0] // 2
        img = algorithm1(
            out[:b, text_len:], out[b:, text_len:], self.layer, attn.heads, self.clamps
        )
        if c is None:
            return torch.cat([out[:, :text_len], img.repeat(2, 1, 1)], 1)
        return attn.to_out[0](img), attn.to_add_out(out[:, :text_len])


def _truncated(norm):
    """The authors' Trunc* norms: the embedding cut to the batch of the normed tokens, so
    the image stream (b) is modulated by the positive half of [positive; negative]."""

    class Trunc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = norm

        def forward(self, x, *args, emb=None):
            if emb is not None:
                return self.inner(x, emb=emb[: x.shape[0]])
            return self.inner(x, args[0][: x.shape[0]])

    return Trunc()


def _layers(control, i):
    """Layer i of a control as the processors take it: (scale, tau, alpha, norm)."""
    nag = control.nag
    return (np.asarray(nag.scale[i]), float(nag.tau[i]), float(nag.alpha[i]), nag.norm)


def _torch(a):
    return torch.from_numpy(np.array(a))


def sd3_reference(ref, x, t, cond, neg, control, clamps):
    """SD3Transformer2DModel under NAG: the whole prediction (b, H, W, C)."""
    model = copy.deepcopy(ref)
    for i, block in enumerate(model.transformer_blocks):
        block.norm1 = _truncated(block.norm1)
        block.attn.set_processor(SD3Processor(_layers(control, i), clamps))  # attn2 stays plain
    model.norm_out = _truncated(model.norm_out)
    with torch.no_grad():
        out = model(
            hidden_states=_torch(np.array(x).transpose(0, 3, 1, 2)),
            encoder_hidden_states=torch.cat([_torch(cond["context"]), _torch(neg["context"])]),
            pooled_projections=torch.cat([_torch(cond["pooled"]), _torch(neg["pooled"])]),
            timestep=_torch(np.concatenate([t, t])),
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


def flux_reference(ref, x, t, cond, neg, control, clamps):
    """FluxTransformer2DModel under NAG, the forward of the authors'
    NAGFluxTransformer2DModel: the image tokens doubled before the single blocks, the
    positive half out."""
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    model = copy.deepcopy(ref)
    b, hgt, wid, ch = x.shape
    text_len = cond["context"].shape[1]
    doubles, singles = model.transformer_blocks, model.single_transformer_blocks
    for i, block in enumerate(doubles):
        block.norm1 = _truncated(block.norm1)
        block.attn.set_processor(FluxProcessor(_layers(control, i), clamps))
    for i, block in enumerate(singles):
        layer = _layers(control, len(doubles) + i)
        block.attn.set_processor(FluxProcessor(layer, clamps, text_len))
    twice = lambda a: torch.cat([_torch(a), _torch(a)])
    with torch.no_grad():
        nchw = _torch(np.array(x).transpose(0, 3, 1, 2))
        h = model.x_embedder(FluxPipeline._pack_latents(nchw, b, ch, hgt, wid))
        pooled = torch.cat([_torch(cond["pooled"]), _torch(neg["pooled"])])
        if "guidance" in cond:
            temb = model.time_text_embed(twice(t) * 1000, twice(cond["guidance"]) * 1000, pooled)
        else:
            temb = model.time_text_embed(twice(t) * 1000, pooled)
        c = model.context_embedder(torch.cat([_torch(cond["context"]), _torch(neg["context"])]))
        img_ids = FluxPipeline._prepare_latent_image_ids(
            b, hgt // 2, wid // 2, "cpu", torch.float32
        )
        rope = model.pos_embed(torch.cat([torch.zeros(text_len, 3), img_ids]))
        for block in doubles:
            c, h = block(hidden_states=h, encoder_hidden_states=c, temb=temb, image_rotary_emb=rope)
        h = h.repeat(2, 1, 1)
        for block in singles:
            c, h = block(hidden_states=h, encoder_hidden_states=c, temb=temb, image_rotary_emb=rope)
        out = model.proj_out(model.norm_out(h[:b], temb[:b]))
        out = FluxPipeline._unpack_latents(out, 8 * hgt, 8 * wid, 8)
    return out.numpy().transpose(0, 2, 3, 1)


# -- the models: tiny random diffusers transformers, converted -----------------------------


def _perturbed(model):
    """Non-trivial QK-norm affines, so a swapped weight shows (as test_mmdit / test_flux)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm_" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@functools.cache
def sd3_models(variant):
    """(config, params, torch model) of a tiny SD3 variant of test_mmdit.VARIANTS."""
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from erg_jax.convert import sd3

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = mmdit.mmdit_config("tiny", **SD3_VARIANTS[variant])
    ref = _perturbed(diffusers.SD3Transformer2DModel(**sd3_kwargs(config)))
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        params, config = sd3.convert_diffusers_sd3(folder, precision="highest")
    return config, params, ref


@functools.cache
def flux_models(guidance):
    """(config, params, torch model) of the tiny FLUX.1, dev-style or schnell-style."""
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from erg_jax.convert import flux as convert_flux

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = flux.flux_config("tiny", guidance_embeds=guidance)
    ref = _perturbed(diffusers.FluxTransformer2DModel(**flux_kwargs(config)))
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        params, config = convert_flux.convert_diffusers_flux(
            folder, sample_size=8, precision="highest"
        )
    return config, params, ref


def _relative(ours, theirs):
    return np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max()


# Per model, the norm and the controls of one compiled program: (guided layers, guided
# heads of a (layers, heads) scale or None for a (layers,) scale, alpha); the other
# layers and heads hold scale 1. SD3's last block (context_pre_only) is guided in
# "sd35_dual"; in "schnell" single block 2 is not, single block 3 after it is.
CASES = {
    "sd3": ("l2", [("all", "all", 0.25), ((0,), (1,), 0.125)]),
    "sd35_dual": ("l1", [("all", None, 0.25), ((1, 4), None, 0.125)]),
    "dev": ("l1", [("all", "all", 0.25), ((1, 2), (0,), 0.125)]),
    "schnell": ("l2", [("all", None, 0.25), ((0, 3), None, 0.125)]),
}


def controls(model, layers, heads):  # CASES[model] as AttentionControls
    norm, cases = CASES[model]
    out = []
    for guided, which, alpha in cases:
        guided = range(layers) if guided == "all" else guided
        which = None if which is None else (range(heads) if which == "all" else which, heads)
        out.append(nag_control(layers, norm, guided, alpha, which))
    return out


def check_against_reference(reference, denoiser, config, model, inputs):
    """Every control of CASES[model]: our prediction is the reference's within 1e-5
    (relative), the reference's clamp acts on some tokens, and NAG shows."""
    x, t, cond = inputs(config)
    neg = negative_text(config)
    layers, heads = config["num_layers"], config["num_attention_heads"]
    plain = reference(x, t, cond, neg, nag_control(layers, "l1", ()), Clamps())
    for control in controls(model, layers, heads):
        clamps = Clamps()
        theirs = reference(x, t, cond, neg, control, clamps)
        ours = denoiser(x, t, dict(cond, negative=neg), control)
        assert 0 < clamps.clamped < clamps.tokens  # the clamp acts, on some tokens
        assert _relative(ours, theirs) < 1e-5
        assert _relative(plain, theirs) > 1e-3  # the guidance shows in the prediction


@pytest.mark.parity
@pytest.mark.parametrize("variant", ["sd3", "sd35_dual"])
def test_sd3_nag_equals_the_reference(variant):
    config, params, ref = sd3_models(variant)
    reference = functools.partial(sd3_reference, ref)
    denoiser = jax.jit(mmdit.make_denoiser(config, params))
    check_against_reference(reference, denoiser, config, variant, sd3_inputs)


@pytest.mark.parity
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_nag_equals_the_reference(variant):
    config, params, ref = flux_models(variant == "dev")
    reference = functools.partial(flux_reference, ref)
    denoiser = jax.jit(flux.make_denoiser(config, params))
    check_against_reference(reference, denoiser, config, variant, flux_inputs)


def _layer_control(scale, norm, alpha=0.25):  # one layer's: scale a float or one per head
    nag = NAGControl(jnp.asarray(scale, jnp.float32), jnp.float32(TAU), jnp.float32(alpha), norm)
    return AttentionControl(nag=nag)


def _random(seed, *shapes):
    k = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(ki, s) for ki, s in zip(k, shapes, strict=True)]


LAYER_CASES = [(5.0, "l1", 0.25), ((1.0, 5.0), "l2", 0.125)]  # every head; head 1 alone


@pytest.mark.parity
def test_one_sd3_attention_equals_the_reference_processor():
    config, params, ref = sd3_models("sd35_dual")
    s, b, grid, text = mmdit.Spec.from_config(config), 2, (4, 6), 5
    x, c = _random(3, (b, 24, s.dim), (2 * b, text, s.dim))
    for i in (1, 4):  # a dual-attention block; the last block (context_pre_only: no text out)
        attention = mmdit.Attention(s, grid, context_out=i != 4)
        for scale, norm, alpha in LAYER_CASES:
            img, txt = attention.apply(
                {"params": params[f"blocks_{i}"]["attn"]}, x, c, _layer_control(scale, norm, alpha)
            )
            attn, clamps = copy.deepcopy(ref.transformer_blocks[i].attn), Clamps()
            attn.set_processor(SD3Processor((np.asarray(scale), TAU, alpha, norm), clamps))
            with torch.no_grad():
                want_img, want_txt = attn(hidden_states=_torch(x), encoder_hidden_states=_torch(c))
            assert img.shape == (b, 24, s.dim) and clamps.clamped > 0
            assert _relative(img, want_img.numpy()) < 1e-5
            if i != 4:
                assert txt.shape == (2 * b, text, s.dim)
                assert _relative(txt, want_txt.numpy()) < 1e-5


@pytest.mark.parity
def test_one_flux_attention_equals_the_reference_processor():
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    config, params, ref = flux_models(True)
    s, b, grid, text = flux.Spec.from_config(config), 2, (4, 6), 5
    rope = flux.rope_tables(flux.position_ids(grid, text), s.axes_dims)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, *grid, "cpu", torch.float32)
    their_rope = ref.pos_embed(torch.cat([torch.zeros(text, 3), img_ids]))
    x, c, h = _random(4, (b, 24, s.dim), (2 * b, text, s.dim), (2 * b, text + 24, s.dim))
    for scale, norm, alpha in LAYER_CASES:
        control, layer = _layer_control(scale, norm, alpha), (np.asarray(scale), TAU, alpha, norm)
        # double block 1: the image (b) with both texts (2b)
        img, txt = flux.Attention(s, grid).apply(
            {"params": params["double_blocks_1"]["attn"]}, x, c, rope, control
        )
        attn, clamps = copy.deepcopy(ref.transformer_blocks[1].attn), Clamps()
        attn.set_processor(FluxProcessor(layer, clamps))
        with torch.no_grad():
            want_img, want_txt = attn(_torch(x), _torch(c), image_rotary_emb=their_rope)
        assert img.shape == (b, 24, s.dim) and txt.shape == (2 * b, text, s.dim)
        assert _relative(img, want_img.numpy()) < 1e-5
        assert _relative(txt, want_txt.numpy()) < 1e-5
        # single block 0: [text; image] in both halves, the guided image rows in both
        out, _ = flux.Attention(s, grid, joint=False).apply(
            {"params": params["single_blocks_0"]["attn"]}, h, None, rope, control
        )
        attn = copy.deepcopy(ref.single_transformer_blocks[0].attn)
        attn.set_processor(FluxProcessor(layer, clamps, text))
        with torch.no_grad():
            want = attn(_torch(h), image_rotary_emb=their_rope).numpy()
        assert out.shape == h.shape and clamps.clamped > 0
        assert _relative(out, want) < 1e-5
        np.testing.assert_array_equal(out[:b, text:], out[b:, text:])


# -- without torch: the plain model at scale 1, scanned blocks, the errors -----------------


def test_sd3_scale_one_is_the_plain_model_and_the_scan_agrees():
    config = mmdit.mmdit_config("tiny", dual_attention_layers=(0, 1))  # runs 0-1 and 2
    rng = np.random.default_rng(0)  # params from the shapes alone: no init to compile
    params = jax.tree_util.tree_map(
        lambda a: jnp.asarray(rng.normal(size=a.shape) / np.sqrt(a.shape[0]), jnp.float32),
        mmdit.abstract_params(config),
    )
    heads, n = config["num_attention_heads"], config["num_layers"]
    f = jax.jit(mmdit.make_denoiser(config, params))
    x, t, cond = sd3_inputs(config)
    cond = dict(cond, negative=negative_text(config))
    plain = np.asarray(f(x, t, cond))  # cond["negative"] is read only under NAG
    ones = nag_control(n, "l2", (), heads=((), heads))  # scale (layers, heads), all 1
    assert np.array_equal(plain, np.asarray(f(x, t, cond, ones)))
    guided = nag_control(n, "l2", (1, 2), heads=((0,), heads))  # in the scan, the last block
    want = np.asarray(f(x, t, cond, guided))
    assert np.abs(want - plain).max() > 1e-3
    scan_cfg = dict(config, scan_blocks=True)
    scanned = jax.jit(mmdit.make_denoiser(scan_cfg, mmdit.stack_blocks(params, scan_cfg)))
    np.testing.assert_allclose(scanned(x, t, cond, guided), want, rtol=1e-5, atol=1e-5)


def test_flux_scale_one_is_the_plain_model_and_the_scan_agrees():
    config, _, f, _ = flux_model()
    _, _, scanned, _ = flux_model(scan=True)
    x, t, cond = flux_inputs(config)
    cond = dict(cond, negative=negative_text(config))
    plain = np.asarray(f(x, t, cond))
    got = np.asarray(f(x, t, cond, AttentionControl.neutral(4, nag="l1")))
    # Not bitwise: the single blocks carry the image tokens of both halves (2b), and
    # XLA:CPU rounds a row of a (2b * n, D) layer norm otherwise than of a (b * n, D) one.
    assert np.abs(got - plain).max() <= 1e-6 * np.abs(plain).max()
    guided = nag_control(4, "l1", (1, 3))
    want = np.asarray(f(x, t, cond, guided))
    assert np.abs(want - plain).max() > 1e-3
    np.testing.assert_allclose(scanned(x, t, cond, guided), want, rtol=1e-5, atol=1e-5)


def test_nag_needs_the_negative_text_and_the_plain_forward():
    config, params, _, _ = flux_model()
    den = flux.make_denoiser(config, params)
    x, t, cond = flux_inputs(config)
    control = nag_control(4, "l1", (1,))
    with pytest.raises(ValueError, match=r"cond\['negative'\]"):
        den(x, t, cond, control)
    short = dict(cond, negative=negative_text(config, tokens=3))
    with pytest.raises(ValueError, match=r"cond\['negative'\].*shaped as the positive"):
        den(x, t, short, control)
    stacked = jax.tree_util.tree_map(lambda a: a[None], control)
    with pytest.raises(ValueError, match="branched does not run NAG"):
        den.branched(x, t, cond, stacked)
    captured = control.replace(capture=jnp.zeros((4,)))
    with pytest.raises(ValueError, match="with_attention_map does not run NAG"):
        den.with_attention_map(x, t, cond, captured)
    sd3 = mmdit.make_denoiser(mmdit.mmdit_config("tiny"), None)  # refused before the params
    with pytest.raises(ValueError, match=r"cond\['negative'\]"):
        sd3(x, t, cond, nag_control(3, "l1", (1,)))
    probed = nag_control(3, "l1", (1,)).replace(probe=EntropyProbe.at([1.0], 3))
    with pytest.raises(ValueError, match="with_entropy does not run NAG"):
        sd3.with_entropy(x, t, cond, probed)
