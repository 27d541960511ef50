"""CLIP BPE tokenizer: OpenAI's text cleaning in front of `instant-clip-tokenizer`.

The ids match OpenAI CLIP's `SimpleTokenizer.encode` token for token, except
that a caption can never produce the special tokens (see below). The Rust
tokenizer does the byte-level BPE (same 49,408-token vocabulary and merge
order as the reference); this wrapper adds what it leaves out or does
differently:

- Cleaning as in the reference: `ftfy.fix_text`, `html.unescape` twice, strip,
  runs of whitespace to one space (the reference's `regex` `\\s`, which unlike
  Python's `re` does not include U+001C..U+001F), lowercasing with Python's
  `str.lower`.
- Special-token literals are plain text. instant-clip-tokenizer turns the
  literal `<start_of_text>` / `<end_of_text>` into the special ids; we split the
  text after the `<` so that both halves go through the ordinary rules (the
  split is always a word boundary there, so the ids equal the reference's).
  The reference itself maps a literal `<|startoftext|>` / `<|endoftext|>` to
  49406 / 49407 when its regex starts a word at the `<`; we deliberately encode
  it as the ordinary words `<|`, `startoftext`/`endoftext`, `|>` (which is what
  the reference does when the literal follows punctuation, e.g. `!<|endoftext|>`).
- Quirks of the reference's case-insensitive word regex: U+0345 (combining
  Greek ypogegrammeni) matches none of its word classes and is skipped, and
  `'ſ` (long s) counts as the contraction `'s`.

Known remaining difference: code points that Python 3.11's Unicode 14
database lists as unassigned but that the reference's `regex` module (its own,
newer tables) classifies as letters or digits, e.g. CJK Extension I
(U+2EBF0..U+2EE5D) or the Unicode 16 Latin additions U+A7CB..U+A7DC; the
Rust tables do not, so next to other letters or symbols they split into
different words. The reference's own output for them depends on the installed
`regex` version.

Sequences follow CLIP4Clip: `<|startoftext|>`, at most `max_words - 2` BPE
tokens, `<|endoftext|>`, zero padding to `max_words`.
"""

from __future__ import annotations

import functools
import html
import operator
import re
import unicodedata
from typing import Sequence

import ftfy
import instant_clip_tokenizer
import numpy as np

SOT_TOKEN = 49406  # <|startoftext|>
EOT_TOKEN = 49407  # <|endoftext|>

# The reference's regex-module `\s`: Python's `\s` minus U+001C..U+001F.
_WHITESPACE = re.compile(r"[^\S\x1c-\x1f]+")
# Text that ftfy.fix_text and html.unescape leave as it is (up to line breaks).
_PLAIN_ASCII = re.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")
# Spots where instant-clip-tokenizer's splitting differs from the reference:
# its special-token literals (split after the `<`) and the long-s contraction.
_FIXUPS = re.compile(r"(?<=<)(?=(?:start|end)_of_text>)|'\u017f")
_YPOGEGRAMMENI = "\u0345"
_LONG_S_CONTRACTION = "'\u017f"


def clean_text(text: str) -> str:
  """The reference's `whitespace_clean(basic_clean(text)).lower()`."""
  if not _PLAIN_ASCII.fullmatch(text):
    # Printable ASCII without `&` (most captions) is left unchanged by ftfy
    # and html.unescape; skipping them halves the cost of `encode`.
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
  return _WHITESPACE.sub(" ", text.strip()).strip().lower()


def _starts_word_after(char: str) -> bool:
  """Whether the reference's regex starts a new word at a `'` after `char`.

  It does unless `char` belongs to a run of symbols (not whitespace, letter or
  number), which would extend over the apostrophe.
  """
  if char.isspace() and char not in "\x1c\x1d\x1e\x1f":
    return True
  return unicodedata.category(char)[0] in "LN"


class Tokenizer:
  """CLIP BPE tokenizer; construct once and reuse (loading the vocabulary takes ~50 ms)."""

  def __init__(self):
    self._bpe = instant_clip_tokenizer.Tokenizer()
    sot, eot = self._bpe.start_of_text(), self._bpe.end_of_text()
    if (sot, eot) != (SOT_TOKEN, EOT_TOKEN):
      raise RuntimeError(
          f"instant-clip-tokenizer has special ids ({sot}, {eot}), expected "
          f"({SOT_TOKEN}, {EOT_TOKEN}); install instant-clip-tokenizer==0.1.1.")
    # `'ſ` as one word: `'` (not word-final), then the bytes of `ſ` (final);
    # no merge applies across them.
    self._long_s_ids = [self._bpe.encode("'")[0] - 256] + self._bpe.encode("\u017f")

  def __reduce__(self):
    # The Rust object does not pickle; rebuild it (e.g. in a worker process).
    return (Tokenizer, ())

  @property
  def sot_token(self) -> int:
    return SOT_TOKEN

  @property
  def eot_token(self) -> int:
    return EOT_TOKEN

  def encode(self, text: str) -> list[int]:
    """BPE ids of `text`, without the start/end tokens."""
    if not isinstance(text, str):
      raise ValueError(f"text must be a str, got {type(text).__name__}: {text!r:.80}")
    text = clean_text(text)
    if _YPOGEGRAMMENI in text:
      text = text.replace(_YPOGEGRAMMENI, " ")
    if "_of_text>" not in text and _LONG_S_CONTRACTION not in text:
      return self._bpe.encode(text)
    ids, start = [], 0
    for match in _FIXUPS.finditer(text):
      if match.group():  # `'ſ`: a contraction only where a word starts.
        pos = match.start()
        if pos > 0 and not _starts_word_after(text[pos - 1]):
          continue
        ids += self._bpe.encode(text[start:pos]) + self._long_s_ids
        start = match.end()
      else:  # Break a special-token literal after its `<`.
        ids += self._bpe.encode(text[start:match.start()])
        start = match.start()
    return ids + self._bpe.encode(text[start:])

  def tokenize(self, texts: Sequence[str] | str, max_words: int = 32) -> np.ndarray:
    """Token ids `[len(texts), max_words]` int32 (a single str gives one row).

    Each row is `<|startoftext|>`, the first `max_words - 2` BPE ids,
    `<|endoftext|>`, then zeros.
    """
    try:
      max_words = operator.index(max_words)
    except TypeError:
      raise ValueError(f"max_words must be an int, got {max_words!r}.") from None
    if max_words < 3:
      raise ValueError(f"max_words must be >= 3 (start token, at least one word, end "
                       f"token), got {max_words}.")
    if isinstance(texts, str):
      texts = [texts]
    out = np.zeros((len(texts), max_words), np.int32)
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise ValueError(f"texts[{i}] must be a str, got {type(text).__name__}: {text!r:.80}")
      ids = self.encode(text)[:max_words - 2]
      out[i, 0] = SOT_TOKEN
      out[i, 1:len(ids) + 1] = ids
      out[i, len(ids) + 1] = EOT_TOKEN
    return out


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> Tokenizer:
  """A shared `Tokenizer` (built on first use)."""
  return Tokenizer()
