"""Builds small Hugging Face tokenizers (tokenizer.json + config) for the data tests.

A byte-level BPE trained on a few sentences, with the special tokens of the common chat
template families, so that every built-in template can be rendered and checked.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from jaxalign.data.tokenizer import HFTokenizer

SPECIALS = ("<pad>", "<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
            "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "[INST]", "[/INST]")
CORPUS = ("Hello! How can I help you today?", "What is 2 + 2? The answer is 4.",
          "Be brief. Reverse the word: stone -> enots", "system user assistant model",
          "Ünïcødé text and tabs\tand newlines\n", "the quick brown fox jumps over the lazy dog")

# Per template family: the bos/eos/pad tokens its tokenizer_config.json names.
FAMILY_CONFIGS = {
    "plain": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>"},
    "chatml": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "gemma": {"bos_token": {"content": "<bos>", "special": True}, "eos_token": "<eos>",
              "pad_token": "<pad>"},
}


@functools.cache
def tokenizer_json() -> str:
    """The serialized tokenizer.json (trained once per test session)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok.to_str()


def hf_tokenizer(family: str = "plain", chat_template: str | None = None) -> HFTokenizer:
    """An ``HFTokenizer`` with ``family``'s special tokens configured."""
    return HFTokenizer(json_str=tokenizer_json(), name=f"test-{family}",
                       config=FAMILY_CONFIGS[family], chat_template=chat_template)


def write_hf_dir(directory: Path, family: str = "plain",
                 chat_template: str | None = None) -> Path:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    config = dict(FAMILY_CONFIGS[family])
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory
