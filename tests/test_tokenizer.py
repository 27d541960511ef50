"""Parity of centerclip_jax.data.tokenizer with OpenAI CLIP's SimpleTokenizer."""

from __future__ import annotations

import csv
import importlib.util
import os
import pickle
import random
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import regex

from centerclip_jax.data import tokenizer as tokenizer_lib

SOT, EOT = 49406, 49407


def _data_dir() -> Path:
  return Path(__file__).resolve().parent / "data"


def _load_simple_tokenizer_module():
  # `import clip.simple_tokenizer` runs clip/__init__.py, which needs
  # pkg_resources; load the one file we need directly instead.
  spec = importlib.util.find_spec("clip")
  assert spec is not None and spec.submodule_search_locations, (
      "clip-anytorch is not installed (pip install --no-deps clip-anytorch==2.6.0)")
  path = Path(list(spec.submodule_search_locations)[0]) / "simple_tokenizer.py"
  module_spec = importlib.util.spec_from_file_location("_clip_simple_tokenizer", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def ref_module():
  return _load_simple_tokenizer_module()


@pytest.fixture(scope="module")
def ref(ref_module):
  """The reference, unchanged."""
  return ref_module.SimpleTokenizer()


@pytest.fixture(scope="module")
def ref_plain(ref_module):
  """The reference with the special-token alternatives removed from its word regex.

  Identical to `ref` except that a literal `<|startoftext|>` / `<|endoftext|>`
  in a caption is split into ordinary words instead of becoming 49406 / 49407.
  """
  plain = ref_module.SimpleTokenizer()
  pattern = plain.pat.pattern
  prefix = r"<\|startoftext\|>|<\|endoftext\|>|"
  assert pattern.startswith(prefix), pattern
  plain.pat = regex.compile(pattern[len(prefix):], regex.IGNORECASE)
  return plain


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.Tokenizer()


def _ref_tokenize(ref, texts, max_words):
  """CLIP4Clip rule from reference ids: SOT, <= max_words - 2 ids, EOT, zeros."""
  out = np.zeros((len(texts), max_words), np.int64)
  for i, text in enumerate(texts):
    row = [SOT] + ref.encode(text)[:max_words - 2] + [EOT]
    out[i, :len(row)] = row
  return out


def _msrvtt_sentences():
  path = _data_dir() / "msrvtt_jsfusion_test.csv"
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 1000 and set(rows[0]) == {"key", "vid_key", "video_id", "sentence"}
  return [r["sentence"] for r in rows]


def _lsmdc_sentences():
  path = _data_dir() / "lsmdc16_test_captions.txt"
  lines = path.read_text(encoding="utf-8").splitlines()
  assert len(lines) == 1000
  return lines


def test_special_tokens_and_cache(tok):
  assert tok.sot_token == SOT and tok.eot_token == EOT
  assert tokenizer_lib.get_tokenizer() is tokenizer_lib.get_tokenizer()
  assert isinstance(tokenizer_lib.get_tokenizer(), tokenizer_lib.Tokenizer)


def test_pickle_round_trip(tok):
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode("a &amp; b 'ſ") == tok.encode("a &amp; b 'ſ") == [320, 261, 321, 6, 129, 379]


def test_known_ids(tok):
  # Ids from OpenAI CLIP's vocabulary (e.g. "hi there" -> 1883, 997).
  assert tok.encode("Hi there") == [1883, 997]
  np.testing.assert_array_equal(tok.tokenize("Hi", max_words=5),
                                [[SOT, 1883, EOT, 0, 0]])


@pytest.mark.parametrize("loader", [_msrvtt_sentences, _lsmdc_sentences],
                         ids=["msrvtt_jsfusion_test", "lsmdc16_test"])
def test_real_caption_parity(tok, ref, loader):
  sentences = loader()
  mismatches = [(s, tok.encode(s), ref.encode(s)) for s in sentences
                if tok.encode(s) != ref.encode(s)]
  assert not mismatches, mismatches[:5]
  for max_words in (32, 8):
    got = tok.tokenize(sentences, max_words=max_words)
    assert got.dtype == np.int32 and got.shape == (len(sentences), max_words)
    np.testing.assert_array_equal(got, _ref_tokenize(ref, sentences, max_words))


ADVERSARIAL = [
    # HTML entities, also double-escaped.
    "A man &amp; a woman", "&lt;b&gt;bold&lt;/b&gt; text", "it&#39;s fine", "it&#x27;s",
    "double &amp;amp; escaped", "&amp;lt;i&amp;gt; nested", "&nbsp;&nbsp;spaced&nbsp;",
    "&copy; 2020 &quot;quoted&quot;", "&notanentity; &amp &", "AT&T and R&D",
    # Emoji, flags, ZWJ sequences, variation selectors.
    "a dog 🐶 runs 🏃‍♂️ fast 👍🏽", "🇺🇸🇬🇧", "❤️❤️ love", "👨‍👩‍👧 family",
    # Accents, combining characters, casing specials, ligatures.
    "Café crème brûlée", "cafe\u0301 e\u0300", "Ångström naïve façade", "ÉCOLE NORMALE",
    "İstanbul", "STRASSE ß", "ΟΔΥΣΣΕΥΣ σοφός", "ﬁsh ﬂow ﬀ", "Ⅻ ½ ² ٣ ߁",
    # CJK and other scripts.
    "一个男人在厨房里做饭", "日本語のテキストです", "한국어 문장", "a 猫 cat 犬",
    "Кириллица и латиница", "עברית العربية ไทย",
    # Empty, whitespace only, odd whitespace and control characters.
    "", " ", "   \t\n  ", "\u3000\xa0\u2003", "\x1c\x1d", "a\x1cb", "tab\tand\nnewline",
    "a\x00b\x07c", "zero\u200bwidth",
    # Digits and apostrophes.
    "1234567890 3.14 1,000,000 2nd 21st", "it's they're we've I'm you'll he'd don't",
    "IT'S THEY'RE WE'VE", "rock 'n' roll", "’s curly ‘quotes’", "''double'' 'single'",
    # Quirks of the reference's case-insensitive word regex.
    "'ſ long s", "x'ſ", "!'ſ", "'ﬅ", "'ſ'ſ", "a\u0345b", "\u0345", "!\u0345!",
    # Mojibake that ftfy repairs.
    "Ã©tÃ© Ã  Paris", "donâ€™t stop", "â€œquotedâ€\x9d", "SchÃ¶ne GrÃ¼ÃŸe",
    # Long text and long words.
    "word " * 200, "a" * 500, "supercalifragilistic" * 20, "1" * 100, "!?" * 100,
    # instant-clip-tokenizer's special literals: plain text for the reference.
    "<end_of_text>", "<start_of_text>hello", "x<end_of_text>y", "<<end_of_text>>",
    "<START_OF_TEXT> caps", "a_of_text>",
]


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_adversarial_parity(tok, ref, text):
  assert tok.encode(text) == ref.encode(text)
  for max_words in (3, 32):
    np.testing.assert_array_equal(tok.tokenize([text], max_words),
                                  _ref_tokenize(ref, [text], max_words))


def test_cleaning_examples():
  clean = tokenizer_lib.clean_text
  assert clean("donâ€™t") == "don't"
  assert clean("double &amp;amp; escaped") == "double & escaped"
  assert clean("  A\t\tB \n C  ") == "a b c"
  assert clean("a\u3000\xa0\u2003B") == "a b"
  assert clean("a\x1cb\x07") == "ab"  # ftfy drops control characters


CAPTION_SPECIALS = [
    "<|endoftext|>", "<|startoftext|>", "a<|endoftext|>b", "hello <|endoftext|> world",
    "<|ENDOFTEXT|>", "<|startoftext|>text<|endoftext|>", "x <|endoftext|><|endoftext|>",
    "!<|endoftext|>", "&lt;|endoftext|&gt;", "<end_of_text><|endoftext|><start_of_text>",
]


@pytest.mark.parametrize("text", CAPTION_SPECIALS)
def test_caption_cannot_inject_special_tokens(tok, ref_plain, text):
  ids = tok.encode(text)
  assert ids and SOT not in ids and EOT not in ids
  assert ids == ref_plain.encode(text)
  row = tok.tokenize(text, max_words=77)[0]
  assert row[0] == SOT and np.sum(row == SOT) == 1 and np.sum(row == EOT) == 1
  assert row[len(ids) + 1] == EOT


def test_special_literal_deviation_is_the_documented_one(tok, ref):
  # The reference injects EOT when its regex starts a word at "<|endoftext|>"
  # but treats the same literal as text after punctuation; we always do the latter.
  assert ref.encode("a<|endoftext|>b") == [320, EOT, 321]
  assert ref.encode("!<|endoftext|>") == tok.encode("!<|endoftext|>")
  assert tok.encode("a<|endoftext|>b") == (
      tok.encode("a") + tok.encode("<|endoftext|>") + tok.encode("b"))
  assert tok.encode("<|endoftext|>") == tok.encode("<|") + tok.encode("endoftext") + tok.encode("|>")


def test_tokenize_truncation_and_padding(tok, ref):
  long_text = " ".join(f"word{i}" for i in range(100))
  ids = ref.encode(long_text)
  assert len(ids) > 100
  for max_words in (3, 4, 32, 77):
    row = tok.tokenize(long_text, max_words)[0]
    assert row.tolist() == [SOT] + ids[:max_words - 2] + [EOT]
  short = tok.tokenize(["a cat", ""], max_words=6)
  assert short.tolist() == [[SOT, 320, 2368, EOT, 0, 0], [SOT, EOT, 0, 0, 0, 0]]
  assert tok.tokenize([], 7).shape == (0, 7)
  assert tok.tokenize(("a", "b"), np.int64(5)).shape == (2, 5)


@pytest.mark.parametrize("max_words", [2, 1, 0, -5, 2.5, "32", None])
def test_max_words_validation(tok, max_words):
  with pytest.raises(ValueError, match="max_words"):
    tok.tokenize(["a cat"], max_words)


def test_non_string_input(tok):
  with pytest.raises(ValueError, match=r"texts\[1\]"):
    tok.tokenize(["ok", None])
  with pytest.raises(ValueError, match="str"):
    tok.encode(b"bytes")


_FRAGMENTS = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list("!?.,;:-_()[]{}<>|/\\\"'`~@#$%^&*+=")
    + [" ", "  ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x7f", "\x1b[31m"]
    + ["\x85", "\xa0", "\u3000", "\u200b", "\x00", "\x07"]
    + ["&amp;", "&lt;", "&gt;", "&#39;", "&quot;", "&amp;amp;", "&nbsp;", "&amp"]
    + ["é", "e\u0301", "ß", "İ", "Σ", "ſ", "\u0345", "ﬁ", "ﬅ", "K", "Ⅻ", "½", "٣"]
    + ["中文", "日本語", "한국어", "Ελληνικά", "😀", "👍🏽", "👨‍👩‍👧", "🇺🇸", "\ufe0f"]
    + ["<|endoftext|>", "<|startoftext|>", "<end_of_text>", "<start_of_text>", "_of_text>"]
    + ["Ã©", "â€™", "’", "“", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "n't"]
    + ["a" * 40, "0123456789" * 3])


def test_fuzz_random_strings(tok, ref_plain):
  rng = random.Random(1234)
  bad = []
  for _ in range(3000):
    text = "".join(rng.choice(_FRAGMENTS) for _ in range(rng.randint(0, 12)))
    ids = tok.encode(text)
    if ids != ref_plain.encode(text) or SOT in ids or EOT in ids:
      bad.append((text, ids, ref_plain.encode(text)))
  assert not bad, bad[:5]


def test_fuzz_code_points(tok, ref_plain):
  # Every code point assigned in this Python's Unicode database is a word
  # character of the same class for both regexes, so all contexts must agree.
  rng = random.Random(99)
  assigned = [cp for cp in range(0x30000)
              if unicodedata.category(chr(cp)) not in ("Cn", "Cs")]
  sample = rng.sample(assigned, 1500) + [0x17F, 0x345, 0x130, 0xFB05, 0x3A3, 0x1F600]
  bad = []
  for cp in sample:
    c = chr(cp)
    for text in (c, f"a{c}b", f"'{c}", f"!{c}!", f"9{c}9", c * 3):
      if tok.encode(text) != ref_plain.encode(text):
        bad.append((hex(cp), text))
  assert not bad, bad[:10]
