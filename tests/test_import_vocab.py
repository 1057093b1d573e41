"""Foreign GGUF vocabularies, tokenized by llama.cpp (vocab-only load) and by our importer:
- gpt2-style BPE under each pre-tokenizer name we map (our test BPE plus a few digit merges, so that digit
  grouping rules show);
- a SentencePiece ("llama") vocabulary made from the same BPE (pieces with U+2581 for spaces, scored by merge
  order, 256 byte pieces); characters it lacks (CJK, emoji) exercise the byte fallback."""

from __future__ import annotations

import json

import pytest

TEXTS = ["Once upon a time there was a tiny model.", "Héllo wörld!  naïve café — 東京 你好 🍓👍🏽",
         "  leading spaces and\ttabs\n\nnew lines 12345 don't", "The cat sat on the mat. The end"]


MIXED = ("Héllo wörld! naïve café — 東京タワー 你好世界 🍓🎉👍🏽  12345 678\t\ttabs   spaces\n\n"
         "new  lines ¿qué? Ünïcödé ﬁ 3.14159 1,000,000 don't I'll WE'RE   \n  end 1234567")


def write_vocab_gguf(path, model: str, tokens: list[str], types: list[int], **extra) -> None:
    """A GGUF with llama hyper-parameters and a vocabulary only (llama.cpp loads it with vocab_only)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    for key, value in extra.items():
        getattr(w, f"add_{key}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_bpe_pre_tokenizers_match_llama_cpp(tmp_path, tokenizer):
    from llama_cpp import Llama

    from berrylm.export.gguf_reader import PRE_TOKENIZERS, GGUFFile, gguf_tokenizer

    d = json.loads(tokenizer.tk.to_str())
    tokens = [""] * tokenizer.tk.get_vocab_size()
    for t, i in d["model"]["vocab"].items():
        tokens[i] = t
    for a in d["added_tokens"]:
        tokens[a["id"]] = a["content"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]
    tokens += ["12", "123", "45", "456", "Ġ1", "Ġ12"]
    merges += ["1 2", "12 3", "4 5", "45 6", "Ġ 1", "Ġ1 2"]
    seen = set()
    for pre in PRE_TOKENIZERS:
        path = tmp_path / f"{pre}.gguf"
        write_vocab_gguf(path, "gpt2", tokens, [3] * 7 + [1] * (len(tokens) - 7), tokenizer_pre=pre,
                         token_merges=merges, eos_token_id=2)
        llm = Llama(str(path), vocab_only=True, verbose=False)
        ours = gguf_tokenizer(GGUFFile(path)).encode(MIXED)
        assert ours == llm.tokenize(MIXED.encode(), add_bos=False, special=False), pre
        seen.add(tuple(ours))
    assert len(seen) >= 3  # the rules really differ on this text (gpt-2 / digits first / llama-3 / qwen2)


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory, tokenizer):
    from tokenizers import decoders

    bl = decoders.ByteLevel()
    pieces = []
    for i in range(tokenizer.tk.get_vocab_size()):
        tok = tokenizer.tk.id_to_token(i)
        text = bl.decode([tok])
        if i >= 7 and text and "\ufffd" not in text:
            pieces.append(text.replace(" ", "\u2581"))
    chars = sorted({c for p in pieces for c in p})
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for n, p in enumerate(chars + [p for p in pieces if len(p) > 1]):
        if p not in tokens:
            tokens.append(p)
            types.append(1)
            scores.append(-float(n))
    path = tmp_path_factory.mktemp("spm") / "spm-vocab.gguf"
    write_vocab_gguf(path, "llama", tokens, types, token_scores=scores, bos_token_id=1, eos_token_id=2,
                     unk_token_id=0, add_space_prefix=True)
    return path


def test_spm_ids_match_llama_cpp(spm_gguf):
    from llama_cpp import Llama

    from berrylm.export.gguf_reader import GGUFFile, gguf_tokenizer

    llm = Llama(str(spm_gguf), vocab_only=True, verbose=False)
    tok = gguf_tokenizer(GGUFFile(spm_gguf))
    for text in TEXTS:
        ours = tok.encode(text)
        assert ours == llm.tokenize(text.encode(), add_bos=False, special=False), text
        assert tok.decode(ours) == text
    assert len(tok.encode(TEXTS[0])) <= 0.6 * len(TEXTS[0])  # merges happen (not one piece per character)
    assert tok.encode("東") == [tok.tk.token_to_id(t) for t in ("\u2581", "<0xE6>", "<0x9D>", "<0xB1>")]
    assert tok.eos_ids == [2] and tok.bos_token == "<s>"
