"""Our Tokenizer wrapper against HF transformers' tokenizer on the same files; sentencepiece; streaming decode."""
import pytest
from conftest import EVAL

from tinygen.tokenizer import StreamDecoder, Tokenizer

EDGE_CASES = ["Hello world", " Hello world", "12345 and 3.14159", "a  b   c\t\td\n\n\ne", "   leading", "trailing   ",
              "emoji 🦙🔥 mixed", "中文字符测试，日本語のテキスト", "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>x",
              "don't can't I'm", "naïve café résumé", "", "\u200b zero width", "x" * 300]


@pytest.fixture(scope="module")
def tokenizers(default_model_dir):
    from transformers import AutoTokenizer

    return Tokenizer(default_model_dir), AutoTokenizer.from_pretrained(default_model_dir)


def test_ids_equal_hf_on_edge_cases(tokenizers):
    ours, hf = tokenizers
    assert ours.encode("Hello world") == [19556, 905]  # reference ids from the notes
    for text in EDGE_CASES:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text


def test_ids_equal_hf_on_long_corpus(tokenizers):
    ours, hf = tokenizers
    text = (EVAL / "wikitext2_test.txt").read_text(encoding="utf-8")[:500_000]
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text


def test_special_tokens_and_round_trip(tokenizers):
    ours, _ = tokenizers
    assert ours.encode("<|im_start|>") == [1] and ours.encode("<|im_end|>") == [2]
    assert {0, 1, 2} <= ours.special_ids and 2 in ours.eos_ids
    for text in EDGE_CASES:
        assert ours.decode(ours.encode(text), skip_special=False) == text


def test_chat_template_matches_hf(tokenizers):
    ours, hf = tokenizers
    for messages in ([{"role": "user", "content": "What is 2+2?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.render_chat(messages) == expected


def test_stream_decoder_never_splits_characters(tokenizers):
    ours, _ = tokenizers
    text = "Llamas 🦙 say 你好, naïvely — done."
    ids = ours.encode(text)
    assert len(ids) > len(text.split())  # the emoji and CJK take several byte-level tokens
    stream = StreamDecoder(ours)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"The quick brown fox {i} jumps over the lazy dog number {i * 7}." for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=120,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}')
    tok = Tokenizer(tmp_path)
    text = "The lazy fox jumps 42 times."
    ids = tok.encode(text, bos=True)
    assert ids[0] == 1 and tok.decode(ids) == text
    assert tok.encode("</s>") == [2] and 2 in tok.eos_ids
    assert tok.decode(ids + [2], skip_special=False) == "<s>" + text + "</s>"
