"""Tests for aoe_lightning.data.tokenizer: byte and BPE round trips, dict round trips, loading, vocab checks."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from aoe_lightning.data.errors import DataError, TokenizerLoadError, VocabSizeError
from aoe_lightning.data.tokenizer import (
    END_OF_TEXT,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    check_vocab_fits,
    load_tokenizer,
    tokenizer_fingerprint,
    tokenizer_from_dict,
    train_bpe_tokenizer,
)

SAMPLES = [
    "Hello, world!",
    "naïve café — déjà vu",
    "数据 и данные 😀🚀",
    "tabs\tand\nnewlines\r\n  and   spaces ",
    "\x00\x01 control \x7f",
    "",
]
TRAINING_TEXT = [
    "the quick brown fox jumps over the lazy dog. " * 20,
    "She sells sea shells by the sea shore. " * 20,
    "Peter Piper picked a peck of pickled peppers. " * 20,
]


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    return train_bpe_tokenizer(TRAINING_TEXT, vocab_size=300)


def large_word_tokenizer(vocab_size: int = 70_000) -> HFTokenizer:
    """A word-level tokenizer whose ids go above 65535."""
    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab[END_OF_TEXT] = vocab_size - 1
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return HFTokenizer(backend, END_OF_TEXT)


def test_byte_tokenizer_ids_are_utf8_bytes():
    tokenizer = ByteTokenizer()
    assert tokenizer.vocab_size == 257
    assert tokenizer.eos_id == 256
    assert tokenizer.bos_id == 256
    for text in SAMPLES:
        assert tokenizer.encode(text) == list(text.encode("utf-8"))
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_byte_decode_drops_eos():
    tokenizer = ByteTokenizer()
    assert tokenizer.decode([104, 256, 105]) == "hi"


def test_tokenizers_follow_protocol(bpe):
    assert isinstance(ByteTokenizer(), Tokenizer)
    assert isinstance(bpe, Tokenizer)


def test_bpe_round_trips_any_text(bpe):
    for text in SAMPLES:
        ids = bpe.encode(text)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == text


def test_bpe_vocabulary_and_eos(bpe):
    assert 257 < bpe.vocab_size <= 300
    assert bpe.eos_id == bpe.backend.token_to_id(END_OF_TEXT)
    assert bpe.bos_id == bpe.eos_id
    # Merges make frequent text shorter than its byte count.
    text = TRAINING_TEXT[0]
    assert len(bpe.encode(text)) < len(text.encode("utf-8")) / 2


def test_bpe_literal_eos_text_is_not_special(bpe):
    ids = bpe.encode(f"a{END_OF_TEXT}b")
    assert bpe.eos_id not in ids
    assert bpe.decode(ids) == f"a{END_OF_TEXT}b"


def test_bpe_vocab_size_too_small():
    with pytest.raises(VocabSizeError, match="vocab_size=200"):
        train_bpe_tokenizer(TRAINING_TEXT, vocab_size=200)


def test_bpe_training_is_deterministic():
    first = train_bpe_tokenizer(TRAINING_TEXT, vocab_size=300)
    second = train_bpe_tokenizer(TRAINING_TEXT, vocab_size=300)
    assert first.to_dict() == second.to_dict()


@pytest.mark.parametrize("kind", ["byte", "bpe", "large"])
def test_dict_round_trip_rebuilds_identical_tokenizer(kind, bpe):
    original = {"byte": ByteTokenizer(), "bpe": bpe, "large": large_word_tokenizer()}[kind]
    config = json.loads(json.dumps(original.to_dict()))  # must survive JSON
    rebuilt = tokenizer_from_dict(config)
    assert type(rebuilt) is type(original)
    assert rebuilt.to_dict() == original.to_dict()
    assert tokenizer_fingerprint(rebuilt) == tokenizer_fingerprint(original)
    assert rebuilt.vocab_size == original.vocab_size
    assert rebuilt.eos_id == original.eos_id
    text = "w69998 w5 w70000" if kind == "large" else SAMPLES[2]
    assert rebuilt.encode(text) == original.encode(text)


def test_ids_above_uint16_survive_encode():
    tokenizer = large_word_tokenizer()
    assert tokenizer.vocab_size == 70_000
    assert tokenizer.eos_id == 69_999
    assert tokenizer.encode("w69998 w65536 w7") == [69_998, 65_536, 7]


def test_from_dict_rejects_unknown_type():
    with pytest.raises(DataError, match="'sentencepiece'"):
        tokenizer_from_dict({"type": "sentencepiece"})
    with pytest.raises(DataError, match="no 'type' key"):
        tokenizer_from_dict({})


def test_load_tokenizer_byte_and_file(tmp_path, bpe):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    from_file = load_tokenizer(str(path))
    assert from_file.to_dict() == bpe.to_dict()
    from_folder = load_tokenizer(str(tmp_path))
    assert from_folder.to_dict() == bpe.to_dict()


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerLoadError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(TokenizerLoadError, match="prepared data folder"):
        load_tokenizer("bpe")
    with pytest.raises(TokenizerLoadError, match="neither manifest.json nor tokenizer.json"):
        load_tokenizer(str(tmp_path))
    # HF_HUB_OFFLINE=1 makes the download fail at once.
    with pytest.raises(TokenizerLoadError, match="no-such-org/no-such-tokenizer"):
        load_tokenizer("no-such-org/no-such-tokenizer")


def test_tokenizer_without_eos_needs_eos_token(tmp_path):
    backend = BackendTokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    path = tmp_path / "tokenizer.json"
    backend.save(str(path))
    with pytest.raises(TokenizerLoadError, match="--eos-token"):
        load_tokenizer(str(path))
    with pytest.raises(TokenizerLoadError, match="'<eot>' is not in the tokenizer's vocabulary"):
        load_tokenizer(str(path), eos_token="<eot>")
    tokenizer = load_tokenizer(str(path), eos_token="b")
    assert tokenizer.eos_id == 1


def test_corrupt_tokenizer_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    with pytest.raises(TokenizerLoadError, match="could not be read"):
        load_tokenizer(str(path))


def test_check_vocab_fits():
    check_vocab_fits(257, 257)
    check_vocab_fits(257, 512)
    with pytest.raises(VocabSizeError, match="vocab_size=1024 exceeds the model's vocab_size=512"):
        check_vocab_fits(1024, 512)
