"""Small pure-JAX denoisers for the sampler and guider tests."""

import jax
import jax.numpy as jnp

from erg_jax.control import attend, image_block_output, maybe_blur, received_attention
from erg_jax.emag import update_queries


def make_toy_transformer(num_layers=3, size=4, channels=2, width=16, heads=2, seed=0):
    """A random attention network (x, t, cond, attention) -> (b, size, size, channels).

    cond: (b, width) float embedding (the null condition is zeros). Every layer routes its
    attention through erg_jax.control, like the real models. Also returns a function that
    gives every layer's input, to check what a perturbation reaches. The denoiser's
    ``with_attention_map`` also returns the received-attention map (SAG) of the layers
    the control's ``capture`` weights, on the (size, size) token grid (one pixel a token);
    ``denoiser.layers`` holds every layer's (wq, wk, wv, wo), ``denoiser.io`` (w_in, w_out).
    ``with_emag`` runs EMAG-Q (``erg_jax.emag``) through the same control path as the real
    models and returns every layer's new EMA of its queries and delta.
    """
    ks = iter(jax.random.split(jax.random.key(seed), 4 + 4 * num_layers))
    w_in = jax.random.normal(next(ks), (channels, width)) / channels**0.5
    w_out = jax.random.normal(next(ks), (width, channels)) / width**0.5
    layers = [
        [jax.random.normal(next(ks), (width, width)) / width**0.5 for _ in range(4)]
        for _ in range(num_layers)
    ]
    hd = width // heads

    def run(x, t, cond, attention=None):
        b = x.shape[0]
        h = x.reshape(b, size * size, channels) @ w_in
        h = h + cond[:, None, :] + jnp.sin(t)[:, None, None]
        inputs, received, sown = [], jnp.zeros((b, size * size)), []
        for i, (wq, wk, wv, wo) in enumerate(layers):
            inputs.append(h)
            c = None if attention is None else attention.layer(i)
            q = (h @ wq).reshape(b, -1, heads, hd)
            k = (h @ wk).reshape(b, -1, heads, hd)
            v = (h @ wv).reshape(b, -1, heads, hd)
            q, found = update_queries(q, c)  # EMAG-Q's EMA of the queries, where asked
            sown.append(found)
            q = maybe_blur(q, (size, size), c)
            if c is not None and c.capture is not None:
                received = received + c.capture * received_attention(q, k)
            a = attend(q, k, v, c).reshape(b, -1, width)
            h = image_block_output(h, h + jnp.tanh(a @ wo), c)
        return (h @ w_out).reshape(x.shape), inputs, received.reshape(b, size, size), sown

    def denoiser(x, t, cond, attention=None):
        return run(x, t, cond, attention)[0]

    def with_attention_map(x, t, cond, attention):
        out, _, received, _ = run(x, t, cond, attention)
        return out, received

    def with_emag(x, t, cond, attention):
        out, _, _, sown = run(x, t, cond, attention)
        return out, tuple(jnp.stack(s) for s in zip(*sown, strict=True))

    denoiser.num_layers = num_layers
    denoiser.layers = layers
    denoiser.io, denoiser.heads = (w_in, w_out), heads
    denoiser.with_attention_map, denoiser.with_emag = with_attention_map, with_emag
    denoiser.query_shape = lambda x: (size * size, heads, hd)
    return denoiser, lambda *a: run(*a)[1]
