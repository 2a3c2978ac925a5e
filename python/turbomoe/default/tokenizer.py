"""The embedded default's tokenizer: 256 byte tokens plus chat special tokens, built offline.

Byte-level means every string is representable and the vocabulary is tiny, so the default model
spends its parameters on the network rather than on embeddings, and nothing is downloaded.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD = "<|pad|>"
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD, ENDOFTEXT, IM_START, IM_END)

# ChatML, the format of Qwen's chat models. The {% generation %} markers let transformers (and
# TRL's assistant-only loss) find the assistant tokens with return_assistant_tokens_mask=True; the
# closing <|im_end|> sits inside them so the model learns where its answer stops.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _byte_tokenizer() -> Tokenizer:
    # ByteLevel maps each byte to one printable unicode character; a BPE model with those 256
    # characters as its vocabulary and no merges is then exactly one token per byte, id == byte.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet), "ByteLevel alphabet changed"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2 byte -> character table that ByteLevel uses: printable latin-1 bytes map to
    # themselves, the rest to code points from 256 upward, in byte order.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh byte-level chat tokenizer (vocabulary 256 bytes + 4 special tokens)."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_tokenizer(),
        pad_token=PAD,
        eos_token=IM_END,
        extra_special_tokens=[ENDOFTEXT, IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
        padding_side="right",
    )
    return tokenizer
