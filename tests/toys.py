"""Small pure-JAX denoisers for the sampler and guider tests."""

import jax
import jax.numpy as jnp

from erg_jax.control import attend, maybe_blur, skip_block


def make_toy_transformer(num_layers=3, size=4, channels=2, width=16, heads=2, seed=0):
    """A random attention network (x, t, cond, attention) -> (b, size, size, channels).

    cond: (b, width) float embedding (the null condition is zeros). Every layer routes its
    attention through erg_jax.control, like the real models. Also returns a function that
    gives every layer's input, to check what a perturbation reaches.
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
        inputs = []
        for i, (wq, wk, wv, wo) in enumerate(layers):
            inputs.append(h)
            c = None if attention is None else attention.layer(i)
            q = (h @ wq).reshape(b, -1, heads, hd)
            k = (h @ wk).reshape(b, -1, heads, hd)
            v = (h @ wv).reshape(b, -1, heads, hd)
            q = maybe_blur(q, (size, size), c)
            a = attend(q, k, v, c).reshape(b, -1, width)
            h = skip_block(h, h + jnp.tanh(a @ wo), c)
        return (h @ w_out).reshape(x.shape), inputs

    def denoiser(x, t, cond, attention=None):
        return run(x, t, cond, attention)[0]

    denoiser.num_layers = num_layers
    return denoiser, lambda *a: run(*a)[1]
