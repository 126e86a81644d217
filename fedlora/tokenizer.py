"""The built-in tiny Llama's tokenizer: byte-level BPE trained on verbalised clinical records.

The trained tokenizer is shipped as `assets/tiny-llama-tokenizer.json` so every machine gets
identical ids without a download; `python -m fedlora.tokenizer` rebuilds it deterministically.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ASSET = Path(__file__).parent / "assets" / "tiny-llama-tokenizer.json"
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
# `builtin:tiny-llama-chat`'s template, in the shape instruct models use: a header per role, an
# end-of-turn token (here EOS) after every turn, and a generation prompt that opens the answer.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
VOCAB_SIZE = 1024


def training_corpus() -> list[str]:
    """Prompts and answers of every built-in clinical task."""
    from fedlora.config import DataSection
    from fedlora.data import BUILTIN_TASKS, load_examples

    texts = []
    for name in BUILTIN_TASKS:
        for example in load_examples(DataSection(dataset=name)):
            texts.append(example.prompt + example.response)
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def builtin_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_file=str(ASSET), **SPECIAL_TOKENS)


if __name__ == "__main__":
    train_tokenizer(training_corpus()).save(str(ASSET))
    print(f"wrote {ASSET}")
