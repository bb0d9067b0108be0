"""Token ids against the references, decoding round trips, streaming detokenisation."""

from __future__ import annotations

from pathlib import Path

import pytest

from souverain import load_tokenizer
from souverain.tokenizer import IncrementalDecoder
from souverain.tokenizer.gguf_vocab import gguf_tokenizer
from tests.tokenizer.corpus import corpus
from tests.tokenizer.mistral_files import MISTRAL_FILES, mistral_file, spm_gguf_metadata

CORPUS = corpus()


def test_corpus_is_large() -> None:
    assert len(CORPUS) >= 200


@pytest.fixture(scope="module")
def smol(smollm2_path: Path):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    return load_tokenizer(smollm2_path), ref


def test_smollm2_gguf_ids_match_transformers(smol) -> None:
    ours, ref = smol
    bad = [t for t in CORPUS if ours.encode(t) != ref.encode(t)]
    assert not bad, bad[:5]


def test_smollm2_decode_round_trips(smol) -> None:
    ours, ref = smol
    for text in CORPUS:
        ids = ours.encode(text, parse_special=False)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids) == text, text


def test_smollm2_chat_template_matches_transformers(smol) -> None:
    ours, ref = smol
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bonjour ! 🤗"},
                {"role": "assistant", "content": "Salut."}, {"role": "user", "content": "2+2?"}]
    for conversation in (messages, messages[1:2]):
        expected = ref.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert ours.apply_chat_template(conversation) == list(expected)


def test_hf_tokenizer_json_folder_matches(smol, tmp_path: Path) -> None:
    _, ref = smol
    ref.save_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    for text in CORPUS:
        assert ours.encode(text) == ref.encode(text), text


@pytest.mark.parametrize("version", list(MISTRAL_FILES))
def test_mistral_tokenizers_match_mistral_common(version: str) -> None:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = mistral_file(version)
    ref = MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer
    ours = load_tokenizer(path)
    for text in CORPUS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, bos=True, eos=False), text
        assert ours.decode(ids) == ref.decode(ids), text


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_gguf_sentencepiece_vocab_matches_mistral_common(version: str) -> None:
    """A llama-type GGUF vocabulary (how Mistral GGUFs carry theirs) tokenises as SentencePiece does."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = mistral_file(version)
    ref = MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer
    ours = gguf_tokenizer(spm_gguf_metadata(path))
    bad = [t for t in CORPUS if ours.encode(t, parse_special=False) != ref.encode(t, bos=True, eos=False)]
    assert not bad, bad[:5]
    for text in CORPUS:
        ids = ref.encode(text, bos=True, eos=False)
        assert ours.decode(ids) == ref.decode(ids), text


def _stream(tok, ids: list[int]) -> list[str]:
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    return [*pieces, decoder.flush()]


def test_streaming_never_breaks_characters(smol) -> None:
    ours, _ = smol
    for text in CORPUS:
        ids = ours.encode(text, parse_special=False)
        pieces = _stream(ours, ids)
        assert "".join(pieces) == ours.decode(ids), text
        assert not any("\ufffd" in p for p in pieces), text


@pytest.mark.parametrize("version", list(MISTRAL_FILES))
def test_streaming_mistral(version: str) -> None:
    tok = load_tokenizer(mistral_file(version))
    for text in CORPUS:
        ids = tok.encode(text, add_special=False)
        pieces = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids), text
        assert not any("\ufffd" in p for p in pieces), text


def test_special_tokens_not_parsed_from_untrusted_text(smol) -> None:
    ours, _ = smol
    assert ours.encode("<|im_start|>") == [1]
    assert 1 not in ours.encode("<|im_start|>", parse_special=False)


def test_tokenizer_json_post_processor_adds_bos(smol, tmp_path: Path) -> None:
    """Llama/Mistral tokenizer.json files add BOS through a TemplateProcessing post-processor."""
    import json

    from transformers import AutoTokenizer

    _, ref = smol
    ref.save_pretrained(tmp_path)
    path = tmp_path / "tokenizer.json"
    data = json.loads(path.read_text())
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}},
    }
    path.write_text(json.dumps(data))
    expected = AutoTokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    for text in CORPUS[:50]:
        assert ours.encode(text) == expected.encode(text), text
        assert ours.encode(text, add_special=False) == expected.encode(text, add_special_tokens=False), text
    assert ours.encode("hi")[0] == 0
