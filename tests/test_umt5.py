"""umT5 (Wan 2.1 / 2.2's text encoder): parity with transformers' UMT5EncoderModel with a
bias table per layer, C-ERG against an independently tempered PyTorch attention, and the
Wan prompt embedding against diffusers' WanPipeline."""

import jax.numpy as jnp
import numpy as np
import pytest

from erg_jax.energy import Energy
from erg_jax.models.text import load_text_encoder
from erg_jax.models.text.t5 import relative_buckets, wan_prompt_embeds

pytest.importorskip("transformers")

PROMPTS = ["a photo of a red car", "the cat sitting on the mat", "hello  world", "a big dog"]
TAUS = (0.5, 1.7)  # per-layer temperatures: each layer has its own bias, so they may differ
SIZES = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    """A WanPipeline-style folder: text_encoder/ (a random UMT5EncoderModel whose layers
    have clearly different bias tables) and tokenizer/ (a T5 Unigram fast tokenizer)."""
    torch = pytest.importorskip("torch")
    import transformers as tf
    from pipelines import make_t5_tokenizer

    root = tmp_path_factory.mktemp("wan")
    tok = make_t5_tokenizer()
    tok.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    cfg = tf.UMT5Config(
        vocab_size=len(tok) + 7,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        initializer_factor=2.0,
        **SIZES,
    )
    model = tf.UMT5EncoderModel(cfg).eval()
    with torch.no_grad():  # large, unrelated tables: a shared-table bug shows
        for i, block in enumerate(model.encoder.block):
            block.layer[0].SelfAttention.relative_attention_bias.weight.normal_(0.0, 2.0 + i)
    model.save_pretrained(root / "text_encoder")
    return root, model


def torch_run(model, ids, mask, taus=None):
    """transformers' last hidden state and hidden_states; with taus, layer i's attention
    logits (q.k + position bias) are multiplied by taus[i] before the padding mask."""
    import torch
    from transformers.models.umt5 import modeling_umt5

    def tempered(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kw):
        logits = torch.matmul(q, k.transpose(2, 3)) * scaling + kw["position_bias"]
        logits = taus[module.layer_idx] * logits
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attention_mask, torch.finfo(logits.dtype).min)
        elif attention_mask is not None:
            logits = logits + attention_mask
        weights = torch.softmax(logits, dim=-1)
        return torch.matmul(weights, v).transpose(1, 2).contiguous(), weights

    impl = model.config._attn_implementation
    saved = modeling_umt5.eager_attention_forward
    try:
        if taus is not None:
            model.set_attn_implementation("eager")
            modeling_umt5.eager_attention_forward = tempered
        with torch.no_grad():
            out = model(
                input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask),
                output_hidden_states=True,
            )
    finally:
        modeling_umt5.eager_attention_forward = saved
        model.set_attn_implementation(impl)
    return out.last_hidden_state.numpy(), [h.numpy() for h in out.hidden_states]


def test_umt5_buckets_match_transformers():
    torch = pytest.importorskip("torch")
    from transformers import UMT5Config
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    att = UMT5Attention(UMT5Config(relative_attention_num_buckets=32), True)
    n = 300
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    np.testing.assert_array_equal(relative_buckets(n, 32, 128), att._relative_position_bucket(rel))


@pytest.mark.parity
def test_umt5_parity_with_transformers(wan_folder):
    """Last and first-layer hidden states match, with padding, and every layer reads its
    own table: layer 0's table in layer 1 (T5's sharing) is far off."""
    root, model = wan_folder
    enc = load_text_encoder(root / "text_encoder", tokenizer=root / "tokenizer", hidden_layer=1)
    assert enc.max_length == 512 and enc.num_layers == 2
    ids, mask = enc.tokenize(PROMPTS)
    ids, mask = ids[:, :16], mask[:, :16]
    assert mask[:, 0].all() and not mask.all()
    want, hidden = torch_run(model, ids, mask)
    ours = enc.encode(ids, mask)
    assert rel_err(ours["last_hidden_state"], want) < 1e-4
    assert rel_err(ours["hidden_state"], hidden[1]) < 1e-4

    tables = [enc.params[f"layers_{i}"]["relative_bias"] for i in range(2)]
    assert "relative_bias" not in enc.params and rel_err(tables[1], tables[0]) > 0.5
    shared = {**enc.params, "layers_1": {**enc.params["layers_1"], "relative_bias": tables[0]}}
    wrong = enc.module.apply({"params": shared}, ids, mask, Energy())["last_hidden_state"]
    assert rel_err(wrong, want) > 1e-2


@pytest.mark.parity
def test_umt5_cerg_parity_and_branches(wan_folder):
    """tau_c per layer equals PyTorch with layer i's logits (scores + its own bias) times
    taus[i]; encode_branches gives the plain and tempered encodings in one call."""
    root, model = wan_folder
    enc = load_text_encoder(root / "text_encoder", tokenizer=root / "tokenizer", max_length=16)
    ids, mask = enc.tokenize(PROMPTS)
    want, _ = torch_run(model, ids, mask, taus=TAUS)
    plain_ref, _ = torch_run(model, ids, mask)
    energy = Energy(tau=jnp.asarray(TAUS))
    ours = enc.encode(ids, mask, energy)["last_hidden_state"]
    assert rel_err(ours, want) < 1e-4
    assert rel_err(plain_ref, want) > 1e-2  # the temperature did change the output
    both = enc.encode_branches(ids, mask, [Energy(), energy])["last_hidden_state"]
    assert both.shape == (2, 4, 16, SIZES["d_model"])
    assert rel_err(both[0], plain_ref) < 1e-4 and rel_err(both[1], want) < 1e-4


@pytest.mark.parity
def test_wan_prompt_embeds_match_diffusers(wan_folder):
    """The (b, 512, d) embedding, zero past each prompt, equals WanPipeline's, prompt
    cleanup and truncation included; its C-ERG branches are the tempered encodings."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import WanPipeline

    root, model = wan_folder
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    pipe = WanPipeline(tokenizer=tok, text_encoder=model, vae=None, scheduler=None)
    prompts = [" a  photo of&amp;a red car\n", "hello world", "the cat sitting on the mat " * 3]
    enc = load_text_encoder(root / "text_encoder", tokenizer=root / "tokenizer")
    cpu = torch.device("cpu")
    for length in (512, 8):
        with torch.no_grad():
            want = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=length, device=cpu)
        want = want.numpy()
        ours = np.asarray(wan_prompt_embeds(enc, prompts, max_length=length))
        assert ours.shape == want.shape == (3, length, SIZES["d_model"])
        assert rel_err(ours, want) < 1e-4, length
        zero = np.all(want == 0, axis=-1)
        np.testing.assert_array_equal(np.all(ours == 0, axis=-1), zero)
        assert zero[1].any() and not zero[:, 0].any()  # "hello world": 3 tokens
    assert zero[2].sum() == 0  # the long prompt fills all 8 tokens

    energies = Energy(tau=jnp.array([1.0, 0.6]))
    both = wan_prompt_embeds(enc, prompts[:2], energies, max_length=24, branches=True)
    weak = wan_prompt_embeds(enc, prompts[:2], Energy(tau=0.6), max_length=24)
    plain = wan_prompt_embeds(enc, prompts[:2], max_length=24)
    assert both.shape == (2, 2, 24, SIZES["d_model"])
    assert rel_err(both[0], plain) < 1e-5 and rel_err(both[1], weak) < 1e-5
    assert rel_err(weak, plain) > 1e-3
    np.testing.assert_array_equal(np.asarray(both[1]) == 0, np.asarray(plain) == 0)
