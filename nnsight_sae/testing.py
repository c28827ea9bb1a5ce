"""Tiny randomly initialised models of each supported family, for fast tests.

``make_tiny_model(family, folder)`` writes a real Hugging Face model folder
(config, safetensors weights, a word-level tokenizer) that ``load_model``
loads like any other; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "gpt_neox", "gemma2", "gemma3", "bert")
VOCAB = 128
WORDS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]


def _config(family: str):
    import transformers as t

    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    decoder = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                   max_position_embeddings=128, **common)
    gqa = dict(decoder, num_key_value_heads=2)
    configs = {
        "gpt2": lambda: t.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=128, **common),
        "llama": lambda: t.LlamaConfig(**gqa),
        "qwen2": lambda: t.Qwen2Config(**gqa),
        "mistral": lambda: t.MistralConfig(**gqa),
        "gpt_neox": lambda: t.GPTNeoXConfig(**decoder),
        "gemma2": lambda: t.Gemma2Config(head_dim=8, **gqa),
        "gemma3": lambda: t.Gemma3TextConfig(head_dim=8, **gqa),
        "bert": lambda: t.BertConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=128, vocab_size=VOCAB,
                                     pad_token_id=0),
    }
    if family not in configs:
        raise ValueError(f"unknown tiny family {family!r}; families: {', '.join(FAMILIES)}")
    return configs[family]()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="[BOS]", eos_token="[EOS]", mask_token="[MASK]")


def make_tiny_model(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random model of ``family`` to ``folder`` and return the folder."""
    import transformers as t

    config = _config(family)
    torch.manual_seed(seed)
    cls = t.BertForMaskedLM if family == "bert" else t.AutoModelForCausalLM
    model = cls.from_config(config) if cls is t.AutoModelForCausalLM else cls(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    # Name the tokenizer class, or AutoTokenizer picks the family's own (e.g. Qwen2's BPE).
    tok_cfg = folder / "tokenizer_config.json"
    cfg = json.loads(tok_cfg.read_text()) if tok_cfg.exists() else {}
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", unk_token="[UNK]", pad_token="[PAD]",
               bos_token="[BOS]", eos_token="[EOS]", mask_token="[MASK]")
    tok_cfg.write_text(json.dumps(cfg))
    return folder


def load_tiny_model(family: str, folder: str | Path, seed: int = 0, **kw):
    """Make a tiny model of ``family`` in ``folder`` and load it with ``load_model``."""
    from transformers import PreTrainedTokenizerFast

    from .models import load_model

    make_tiny_model(family, folder, seed)
    # The word-level tokenizer, not the family's own class that AutoTokenizer would pick.
    return load_model(folder, tokenizer=PreTrainedTokenizerFast.from_pretrained(folder), **kw)


def tiny_prompts(n: int = 2, length: int = 7, seed: int = 0) -> list[str]:
    """Space-separated word prompts the tiny tokenizer encodes one token per word."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, length), generator=g)
    return [" ".join(WORDS[i] for i in row) for row in ids.tolist()]


def random_dictionary(site, *, type_name="topk", d_in=32, d_sae=64, seed=0, **cfg):
    """A randomly initialised dictionary for a tiny model's site (types with a ``k``: 8 unless given)."""
    from .plugins import registry

    cls = registry().get("dictionary_types", type_name)
    if "k" in cls.config_class.declared():
        cfg.setdefault("k", 8)
    d = cls({"d_in": d_in, "d_sae": d_sae, "site": site, **cfg})
    d.reset_parameters(seed)
    return d
