"""A word-level `CLIPTokenizer` made from a word list, so tests and the microworld need no downloaded tokenizer.

`build_clip_tokenizer` writes the four files of a Stable Diffusion `tokenizer/` folder (`vocab.json`,
`merges.txt`, `special_tokens_map.json`, `tokenizer_config.json`) for a byte-pair encoding in which every given
word is exactly one token `word</w>`, and any other lowercase text still tokenizes, character by character.

How the merges avoid interfering with each other: CLIP's BPE marks the last symbol of a word with `</w>`
("cat" starts as `c`, `a`, `t</w>`), and every merge written here has a right-hand part that ends in `</w>`
(`a t</w>` -> `at</w>`, then `c at</w>` -> `cat</w>`). Such a merge can only fire on the last two symbols of
a word, so at each step at most one merge applies and the order of `merges.txt` never matters: a word is
merged from its end for as long as the growing ending is the ending of some listed word, which for a listed
word means all the way. A merge that belongs to one word therefore cannot fire inside another and block it,
whatever the ranks, in the tokenizers (Rust) BPE and in the original Python BPE alike. The function still
checks the result with the real tokenizer and raises if any word is not one token.

Text outside the base alphabet: the tokenizer lowercases its input, so uppercase is fine. Any other
character that is not printable ASCII (say "é" or an emoji) becomes one or more byte-level symbols that are not
in the vocabulary; each of them encodes to the unknown token `<|endoftext|>` instead of raising.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# Printable ASCII except space and uppercase (the normalizer lowercases text before BPE sees it). Byte-level BPE
# maps these bytes to themselves, so the characters are their own symbols.
BASE_ALPHABET: str = "".join(sorted(string.ascii_lowercase + string.digits + string.punctuation))

# CLIP's pre-tokenizer cuts text into runs of letters and *single* digits, so a run of a-z or one digit is the
# most that can ever reach BPE as one piece; "3d" or "10" arrive as several pieces and cannot be one token.
_SINGLE_PIECE_WORD = re.compile(r"[a-z]+|[0-9]")

# SD 1.x's tokenizer (openai/clip-vit-large-patch14) uses <|endoftext|> as end, unknown and padding token.
_SPECIAL_TOKENS_MAP: dict[str, str] = {
    "bos_token": BOS_TOKEN,
    "eos_token": EOS_TOKEN,
    "pad_token": EOS_TOKEN,
    "unk_token": EOS_TOKEN,
}


def build_clip_tokenizer(
    words: Iterable[str], save_directory: str | os.PathLike, *, model_max_length: int = 77
) -> CLIPTokenizer:
    """Write a CLIP tokenizer in which each word of `words` is one token, and load it.

    Args:
        words: Lowercase words, each either a run of the letters a-z or a single digit. Duplicates are ignored;
            the output does not depend on their order.
        save_directory: Folder to write the four tokenizer files into; created if missing, and files of the same
            names are overwritten.
        model_max_length: The sequence length the tokenizer pads and truncates to (77 in Stable Diffusion).

    Returns:
        The tokenizer, loaded from `save_directory` with `CLIPTokenizer.from_pretrained`.

    Raises:
        ValueError: If a word is empty, has a character other than a-z and 0-9, or has a digit and any other
            character (CLIP's pre-tokenizer would lowercase or split it, so it could never be one token); or if,
            after building, some word is still not encoded as one token.
    """
    vocabulary = sorted(set(words))
    _check_words(vocabulary)
    merges = _suffix_merges(vocabulary)
    vocab = _vocab(merges)

    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    _write_text(save_directory / "vocab.json", _to_json(vocab))
    _write_text(save_directory / "merges.txt", _merges_text(merges))
    _write_text(save_directory / "special_tokens_map.json", _to_json(_special_tokens_map()))
    _write_text(save_directory / "tokenizer_config.json", _to_json(_tokenizer_config(model_max_length)))

    tokenizer = CLIPTokenizer.from_pretrained(save_directory)
    _check_single_tokens(tokenizer, vocabulary)
    return tokenizer


def _check_words(words: list[str]) -> None:
    """Raise if a word could never reach BPE as one piece of text."""
    for word in words:
        if not _SINGLE_PIECE_WORD.fullmatch(word):
            raise ValueError(
                f"Cannot make {word!r} one token: words must be lowercase a-z letters only, or one digit 0-9 "
                "(CLIP lowercases text and splits it at anything else, including between digits)."
            )


def _suffix_merges(words: list[str]) -> list[tuple[str, str]]:
    """Return the merges that build each word from its end: `x yz</w>` -> `xyz</w>`, one per distinct ending.

    Sorted by the length of the merged token and then alphabetically, only so the file is stable and readable;
    the module docstring explains why the rank of these merges does not change any encoding.
    """
    merges: set[tuple[str, str]] = set()
    for word in words:
        for start in range(len(word) - 1):
            merges.add((word[start], word[start + 1 :] + END_OF_WORD))
    return sorted(merges, key=lambda merge: (len(merge[0] + merge[1]), merge))


def _vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Number the tokens as SD's vocabulary does: base symbols, then merged tokens, then the special tokens.

    The end token gets the largest id, as in CLIP, because `CLIPTextModel` configs that keep the legacy
    `eos_token_id=2` find the end of the prompt with `argmax(input_ids)`.
    """
    tokens = list(BASE_ALPHABET) + [character + END_OF_WORD for character in BASE_ALPHABET]
    tokens += [left + right for left, right in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: token_id for token_id, token in enumerate(tokens)}


def _merges_text(merges: list[tuple[str, str]]) -> str:
    # The header line is part of the format: both the Python and the Rust CLIP tokenizers skip it.
    return "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges)


def _special_tokens_map() -> dict[str, object]:
    """Return `special_tokens_map.json` as SD 1.x ships it (padding as a bare string, the rest as AddedToken)."""
    special_tokens = {name: _added_token(content) for name, content in _SPECIAL_TOKENS_MAP.items()}
    return {**special_tokens, "pad_token": _SPECIAL_TOKENS_MAP["pad_token"]}


def _tokenizer_config(model_max_length: int) -> dict[str, object]:
    """Return `tokenizer_config.json` in SD 1.x's layout, minus the fields that name the original checkpoint."""
    config: dict[str, object] = {
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": model_max_length,
        "tokenizer_class": "CLIPTokenizer",
    }
    for name, content in _SPECIAL_TOKENS_MAP.items():
        config[name] = content if name == "pad_token" else {"__type": "AddedToken", **_added_token(content)}
    return dict(sorted(config.items()))


def _added_token(content: str) -> dict[str, object]:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def _to_json(value: object) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def _write_text(path: Path, text: str) -> None:
    # Fixed encoding and newlines keep the files byte-identical on every platform.
    with open(path, "w", encoding="utf-8", newline="\n") as file:
        file.write(text)


def _check_single_tokens(tokenizer: CLIPTokenizer, words: list[str]) -> None:
    """Raise if the loaded tokenizer does not encode every word as its own single token."""
    failed = [word for word in words if tokenizer.tokenize(word) != [word + END_OF_WORD]]
    if failed:
        examples = ", ".join(f"{word!r} -> {tokenizer.tokenize(word)}" for word in failed[:5])
        raise ValueError(f"{len(failed)} word(s) are not one token after building the tokenizer: {examples}")
