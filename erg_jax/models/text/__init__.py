"""Text encoders with C-ERG: T5, CLIP text, BERT and Llama in Flax, loaded from local
Hugging Face folders (Berrada Ifriqi et al., 2025: temperature in the text encoder's
self-attention)."""

from erg_jax.models.text.bert import Bert, BertConfig
from erg_jax.models.text.clip import ClipText, ClipTextConfig
from erg_jax.models.text.encoder import TextEncoder, load_text_encoder
from erg_jax.models.text.layers import layer_energies
from erg_jax.models.text.llama import Llama, LlamaConfig
from erg_jax.models.text.t5 import T5Config, T5Encoder

__all__ = [
    "Bert",
    "BertConfig",
    "ClipText",
    "ClipTextConfig",
    "Llama",
    "LlamaConfig",
    "T5Config",
    "T5Encoder",
    "TextEncoder",
    "layer_energies",
    "load_text_encoder",
]
