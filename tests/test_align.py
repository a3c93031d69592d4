"""Cross-tokenizer alignment (kdflow.align): MinED maps, position pairing, projection, KD targets.

Tokenizers are trained here (byte-level BPE, WordPiece, Unigram), so the vocabularies genuinely
differ. Results are checked against brute-force references and invariants: prefix texts of paired
positions agree, probability mass is conserved, the fast MinED equals a Python `min` over the
whole vocabulary.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdflow.align.project import project_topk
from kdflow.align.sequence import boundary_points, pair_by_dtw, pair_by_points
from kdflow.align.targets import CrossTokenizer
from kdflow.align.vocab import (BYTE_BASE, MARKER, Scheme, build_map, canonical_vocab, mined_map, token_text,
                                vocab_maps)
from kdflow.config import AlignConfig, DataConfig
from kdflow.data import Encoder, collate, row_turns

from conftest import CHATML, corpus, tiny_llama, untrained_tokenizer

UTILIZE = ["we utilize the tools; they utilize the land"] * 40  # makes " utilize" one token
UTIL_IZE = ["the utility of util; utilities; organize and realize; ize"] * 40  # util + ize, never utilize
UNICODE = ["café naïve résumé 東京 🎉 👩‍💻 “quotes” — ok"] * 30


def make_tok(kind: str, extra: list[str] = (), vocab: int = 500, chat: bool = True, bos: bool = False,
             pad_is_eos: bool = True):
    """A tokenizer trained here on the WordNet text plus `extra` lines."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tk, trainer = untrained_tokenizer(kind, vocab, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<unk>", "<s>"])
    tk.train_from_iterator(corpus() + list(extra), trainer)
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", unk_token="<unk>",
                                  pad_token="<|im_end|>" if pad_is_eos else "<pad>", bos_token="<s>" if bos else None)
    if chat:
        tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and several times faster than on two when other jobs
    load the CPU); the thread count is restored for the tests after these."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield "train.num_threads=1"
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toks():
    return {"bpe": make_tok("bpe", UTILIZE + UNICODE, 600), "wordpiece": make_tok("wordpiece", UTIL_IZE, 400),
            "unigram": make_tok("unigram", UTIL_IZE, 400), "bpe2": make_tok("bpe", UTIL_IZE, 500)}


# ----------------------------------------------------------------------------------------------
# Helpers: an independent view of what tokens spell


def token_bytes(vocab, i: int) -> bytes:
    """The bytes a token spells, from its canonical text (marker -> space, private-use -> byte)."""
    text = vocab.texts[i].replace(MARKER, " ")
    return b"".join(bytes([ord(c) - BYTE_BASE]) if ord(c) >= BYTE_BASE else c.encode() for c in text)


def prefixes(vocab, ids, lowercase=False, unk_text=None) -> list[str | None]:
    """Text spelled by ids[:j] for each j (whitespace removed), None where it ends inside a character.

    An unknown-token id spells nothing we can read back; `unk_text[j]` gives the text it stands for.
    """
    out, acc = [], b""
    for j in range(len(ids) + 1):
        try:
            s = "".join(acc.decode("utf-8").split())
            out.append(s.lower() if lowercase else s)
        except UnicodeDecodeError:
            out.append(None)
        if j < len(ids):
            if unk_text is not None and ids[j] == vocab.roles.get("unk"):
                acc += unk_text[j].encode()
            else:
                acc += b"" if vocab.special[ids[j]] else token_bytes(vocab, ids[j])
    return out


def spans_of(tok, text):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc.input_ids), [tuple(o) for o in enc.offset_mapping]


def space_only(vocab, ids):
    return [not vocab.special[i] and vocab.texts[i].replace(MARKER, " ").isspace() for i in ids]


def pair_texts(recv_tok, send_tok, text, sequence="offsets"):
    rv, sv = canonical_vocab(recv_tok), canonical_vocab(send_tok)
    r_ids, r_sp = spans_of(recv_tok, text)
    s_ids, s_sp = spans_of(send_tok, text)
    if sequence == "offsets":
        pairs = pair_by_points(boundary_points(r_sp, text, space_only(rv, r_ids), 0, len(text)),
                               boundary_points(s_sp, text, space_only(sv, s_ids), 0, len(text)))
    else:
        low = rv.scheme.lowercase or sv.scheme.lowercase
        pairs = pair_by_dtw([rv.texts[i].lower() if low else rv.texts[i] for i in r_ids],
                            [sv.texts[i].lower() if low else sv.texts[i] for i in s_ids])
    unk = ([text[a:b] for a, b in r_sp], [text[a:b] for a, b in s_sp])
    return rv, sv, r_ids, s_ids, pairs, unk


def check_pairs_are_sound(rv, sv, r_ids, s_ids, pairs, unk=(None, None)):
    """Paired tokens begin after the same text (whitespace aside); nothing is paired twice."""
    low = rv.scheme.lowercase or sv.scheme.lowercase
    pr, ps = prefixes(rv, r_ids, low, unk[0]), prefixes(sv, s_ids, low, unk[1])
    used = [k for k in pairs if k >= 0]
    assert len(used) == len(set(used)) and used == sorted(used)  # one-to-one and monotone
    for j, k in enumerate(pairs):
        if k >= 0:
            assert pr[j] is not None and pr[j] == ps[k], (j, k, pr[j], ps[k])
    return pr, ps


# ----------------------------------------------------------------------------------------------
# Canonical token text


def test_canonical_text_makes_word_starts_and_bytes_comparable(toks):
    texts = {k: canonical_vocab(toks[k]).texts for k in ("bpe", "wordpiece", "unigram")}
    for name, tok in toks.items():
        if name == "bpe2":
            continue
        ids = tok("we utilize the", add_special_tokens=False).input_ids
        assert texts[name][ids[-1]] == MARKER + "the", name  # Ġthe, the (WordPiece), ▁the
    bpe = canonical_vocab(toks["bpe"])
    assert bpe.scheme.byte_level and canonical_vocab(toks["unigram"]).scheme.space_char == MARKER
    assert canonical_vocab(toks["wordpiece"]).scheme.lowercase
    # byte-level: "Ġ" is a word start, "Ċ" a newline, a split emoji one private-use char per byte
    assert token_text("Ġ", bpe.scheme) == (MARKER, False)
    assert token_text("ĠĠ", bpe.scheme)[0] == MARKER + " "
    assert token_text("Ċ", bpe.scheme)[0] == "\n"
    assert token_text("ðŁİ", bpe.scheme)[0] == "".join(chr(BYTE_BASE + b) for b in "🎉".encode()[:3])
    assert token_text("Ã©", bpe.scheme)[0] == "é"
    # SentencePiece byte fallback: the same private-use char for the same byte, flagged
    sp = Scheme(space_char=MARKER, byte_fallback=True)
    assert token_text("<0xF0>", sp) == (chr(BYTE_BASE + 0xF0), True)
    assert token_text("<0x41>", sp) == ("A", True)
    assert token_text("▁hello", sp) == (MARKER + "hello", False)
    wp = Scheme(continuation_prefix="##")
    assert token_text("##ing", wp)[0] == "ing" and token_text("walk", wp)[0] == MARKER + "walk"


class SlowTokenizer:
    """A tokenizer without a tokenizers pipeline and without offsets (like a Python "slow" one)."""

    def __init__(self, tokens, unk="<unk>", eos="</s>"):
        self.tokens = tokens
        self.unk_token_id, self.eos_token_id = tokens.index(unk), tokens.index(eos)
        self.all_special_ids = [self.unk_token_id, self.eos_token_id]

    def __len__(self):
        return len(self.tokens)

    def convert_ids_to_tokens(self, ids):
        return [self.tokens[i] for i in ids]


def test_a_tokenizer_without_pipeline_gets_its_scheme_from_the_vocabulary():
    tokens = ["<unk>", "</s>", "▁the", "▁a", "s", "▁cat", "<0xF0>", "<0x41>", "A"]
    v = canonical_vocab(SlowTokenizer(tokens))
    assert v.scheme.space_char == MARKER and v.scheme.byte_fallback
    assert v.texts[2] == MARKER + "the" and v.texts[6] == chr(BYTE_BASE + 0xF0)
    assert v.byte_fallback[7] and not v.byte_fallback[8] and v.texts[7] == v.texts[8] == "A"
    assert v.roles == {"eos": 1, "unk": 0}
    # two tokens spell "A": an ordinary sender "A" lands on the ordinary one, not the byte token
    m = build_map(canonical_vocab(make_tok("bpe", vocab=300)), v)
    assert m[make_tok("bpe", vocab=300).convert_tokens_to_ids("A")] == 8


def test_offsets_need_a_fast_tokenizer_and_the_error_says_what_to_do(toks, monkeypatch):
    from kdflow.errors import AlignmentError

    student = make_tok("unigram", UTIL_IZE, 400)
    original = type(student).__call__

    def no_offsets(self, *a, **kw):
        if kw.get("return_offsets_mapping"):
            raise NotImplementedError("offsets are only available with fast tokenizers")
        return original(self, *a, **kw)

    monkeypatch.setattr(type(student), "__call__", no_offsets)
    row, e = example(student, "Use it.", "we utilize the land")
    with pytest.raises(AlignmentError, match="no character offsets.*align.sequence=dtw"):
        cross(toks["bpe"], student).pair_example(row_turns(row, "t", DataConfig()), e)
    _, src, _, located = cross(toks["bpe"], student, sequence="dtw").pair_example(row_turns(row, "t", DataConfig()), e)
    assert located and sum(p >= 0 for p in src) >= 4


# ----------------------------------------------------------------------------------------------
# MinED


def brute_force_mined(queries, candidates, penalty=None, marker=MARKER):
    """The reference algorithm: a Python min over every candidate for every query."""
    from rapidfuzz.distance import Levenshtein

    penalty = penalty or [0] * len(candidates)
    strip = lambda t: t[1:] if t.startswith(marker) else t  # noqa: E731
    out = []
    for q in queries:
        out.append(min(range(len(candidates)), key=lambda i: (Levenshtein.distance(q, candidates[i]),
                                                              strip(q) != strip(candidates[i]),
                                                              candidates[i], penalty[i], i)))
    return np.array(out)


def test_mined_ties_are_broken_lexicographically_and_exactly():
    cands = ["abd", "zbc", "aac", "abx", "abcde", "abcdefgh", "▁.", ",", "!", "A", "A", "abcdez"]
    pen = [0] * 9 + [1, 0, 0]
    queries = ["abc", "abcdef", ".", "A", "abcdefghijk", "", "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"]
    got = mined_map(queries, cands, pen)
    assert [cands[i] for i in got[:3]] == ["aac", "abcde", "▁."]  # 4 ties at 1 -> smallest; . -> ▁. (marker only)
    assert got[3] == 10  # two "A": the one without the byte-fallback penalty
    assert np.array_equal(got, brute_force_mined(queries, cands, pen))


def test_mined_equals_brute_force_on_random_strings_with_many_ties():
    rng = random.Random(0)
    alpha = "ab" + MARKER + "c"
    rand = lambda: "".join(rng.choice(alpha) for _ in range(rng.choice([0, 1, 2, 3, 3, 4, 5, 7, 11])))  # noqa: E731
    cands = [rand() for _ in range(300)]
    queries = [rand() for _ in range(400)]
    pen = [rng.choice([0, 0, 1]) for _ in cands]
    assert np.array_equal(mined_map(queries, cands, pen, block=37), brute_force_mined(queries, cands, pen))


@pytest.mark.parametrize("a,b", [("bpe", "wordpiece"), ("unigram", "bpe2"), ("wordpiece", "unigram")])
def test_vocab_map_equals_brute_force_both_directions(toks, a, b):
    va, vb = canonical_vocab(toks[a]), canonical_vocab(toks[b])
    for s, r in ((va, vb), (vb, va)):
        got = build_map(s, r)
        cand = [i for i in range(len(r)) if not r.special[i]]
        ordinary = [i for i in range(len(s)) if not s.special[i]]
        queries = [s.texts[i].lower() if r.scheme.lowercase else s.texts[i] for i in ordinary]
        ref = brute_force_mined(queries, [r.texts[i] for i in cand], [int(r.byte_fallback[i]) for i in cand])
        assert np.array_equal(got[ordinary], np.array(cand)[ref])
        assert not r.special[got[ordinary]].any()  # ordinary tokens never land on special tokens


def test_special_tokens_map_to_their_counterparts():
    teacher = make_tok("bpe", vocab=300, bos=True, pad_is_eos=False, chat=False)
    student = make_tok("unigram", vocab=300)
    vt, vs = canonical_vocab(teacher), canonical_vocab(student)
    m = build_map(vt, vs)
    assert m[teacher.eos_token_id] == student.eos_token_id
    assert m[teacher.unk_token_id] == student.unk_token_id
    assert m[teacher.pad_token_id] == student.pad_token_id  # <pad> -> the student's pad role (= its EOS)
    assert m[teacher.bos_token_id] == student.convert_tokens_to_ids("<s>")  # no BOS role there: same content
    back = build_map(vs, vt)
    assert back[student.eos_token_id] == teacher.eos_token_id  # eos wins over pad for a token holding both


def test_special_token_without_counterpart_maps_to_minus_one():
    from transformers import AddedToken

    teacher = make_tok("bpe", vocab=300)
    teacher.add_special_tokens({"additional_special_tokens": [AddedToken("<|tool|>", special=True)]})
    m = build_map(canonical_vocab(teacher), canonical_vocab(make_tok("wordpiece", vocab=300)))
    assert m[teacher.convert_tokens_to_ids("<|tool|>")] == -1


def test_vocab_maps_cache_hit_returns_identical_maps(toks, tmp_path):
    first = vocab_maps(toks["bpe"], toks["unigram"], cache_dir=tmp_path)
    assert first.info["cache"] == "built"
    again = vocab_maps(toks["bpe"], toks["unigram"], cache_dir=tmp_path)
    swapped = vocab_maps(toks["unigram"], toks["bpe"], cache_dir=tmp_path)  # one entry serves both orders
    assert again.info["cache"] == "hit" and swapped.info["cache"] == "hit"
    assert np.array_equal(first.a_to_b, again.a_to_b) and np.array_equal(first.b_to_a, again.b_to_a)
    assert np.array_equal(first.a_to_b, swapped.b_to_a) and np.array_equal(first.b_to_a, swapped.a_to_b)
    assert np.array_equal(first.a_to_b, build_map(canonical_vocab(toks["bpe"]), canonical_vocab(toks["unigram"])))
    entries = [p for p in tmp_path.iterdir()]
    assert len(entries) == 1 and {p.name for p in entries[0].iterdir()} == {"meta.json", "first_to_second.npy",
                                                                          "second_to_first.npy"}
    # an entry whose digests do not match (here: edited by hand) is rebuilt, not trusted
    meta = json.loads((entries[0] / "meta.json").read_text())
    meta["first_digest"] = "0" * 16
    (entries[0] / "meta.json").write_text(json.dumps(meta))
    assert vocab_maps(toks["bpe"], toks["unigram"], cache_dir=tmp_path).info["cache"] == "built"


# ----------------------------------------------------------------------------------------------
# Sequence alignment


@pytest.mark.parametrize("sequence", ["offsets", "dtw"])
@pytest.mark.parametrize("split", ["wordpiece", "unigram", "bpe2"])
def test_util_ize_against_utilize_pairs_positions_correctly(toks, split, sequence):
    text = "we utilize the"
    whole = toks["bpe"]
    assert whole.tokenize(text) == ["we", "Ġutilize", "Ġthe"]  # the setting the test needs
    pieces = [t.lstrip("Ġ▁#") for t in toks[split].tokenize(text)]
    assert pieces[-3:] == ["util", "ize", "the"], pieces
    for recv, send in ((toks[split], whole), (whole, toks[split])):
        rv, sv, r_ids, s_ids, pairs, unk = pair_texts(recv, send, text, sequence)
        r_tok = [rv.texts[i].lstrip(MARKER) for i in r_ids]
        s_tok = [sv.texts[i].lstrip(MARKER) for i in s_ids]
        got = {r_tok[j]: (s_tok[k] if k >= 0 else None) for j, k in enumerate(pairs) if r_tok[j] != "e"}
        if recv is whole:
            assert got == {"we": "w", "utilize": "util", "the": "the"}
        else:
            assert got["util"] == "utilize" and got["ize"] is None and got["the"] == "the"  # not ize-the
        check_pairs_are_sound(rv, sv, r_ids, s_ids, pairs, unk)


def token_dtw(r, s, cost):
    """FedMKT's DTW over whole tokens (textbook recurrence, `cost` per token pair): for each receiver
    token, the sender token whose cell the path enters diagonally (both begin there), or -1."""
    n, m = len(r), len(s)
    D = np.full((n + 1, m + 1), np.inf)
    D[0, 0] = 0
    for i in range(n):
        for j in range(m):
            D[i + 1, j + 1] = cost(r[i], s[j]) + min(D[i, j], D[i, j + 1], D[i + 1, j])
    out, i, j = [-1] * n, n, m
    while i > 1 or j > 1:
        diag, up, left = D[i - 1, j - 1], D[i - 1, j], D[i, j - 1]
        if diag <= up and diag <= left:
            out[i - 1] = j - 1
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
    out[0] = 0
    return out


def test_token_level_dtw_joins_different_contexts_and_ours_does_not():
    """The paper's example and a variant: token-level DTW pairs a word's last piece with the next word
    (raw costs: `ize`-`the`; costs normalised by length: `e`-`the`). Aligning the spelled characters
    leaves the piece unpaired and pairs `the` with `the`."""
    from rapidfuzz.distance import Levenshtein

    for r, s, cost, wrong in ((["util", "ize", "the"], ["utilize", "the"], Levenshtein.distance, [0, 1, -1]),
                              (["▁utiliz", "e", "▁the"], ["▁utilize", "▁the"], Levenshtein.normalized_distance, [0, 1, -1])):
        assert token_dtw(r, s, cost) == wrong
        assert pair_by_dtw(r, s).tolist() == [0, -1, 1]


@pytest.mark.parametrize("other", ["bpe2", "unigram", "wordpiece"])
def test_multibyte_utf8_and_emoji(toks, other):
    text = "café naïve 東京 🎉🎉 👩‍💻 résumé “quotes” — ok"
    rv, sv, r_ids, s_ids, pairs, unk = pair_texts(toks["bpe"], toks[other], text)
    pr, ps = check_pairs_are_sound(rv, sv, r_ids, s_ids, pairs, unk)
    if other == "bpe2":  # both byte-level: exact texts, so every shared boundary must be found
        starts_s = {p: k for k, p in enumerate(ps[:-1]) if p is not None}
        for j in range(len(r_ids)):
            whitespace = rv.texts[r_ids[j]].replace(MARKER, " ").isspace()
            k = starts_s.get(pr[j])
            if pr[j] is not None and k is not None and not whitespace and not sv.texts[s_ids[k]].replace(MARKER, " ").isspace():
                assert pairs[j] >= 0, (j, rv.texts[r_ids[j]])
        # a token that begins inside a character (the second half of an emoji) is never paired
        for j in range(len(r_ids)):
            if pr[j] is None:
                assert pairs[j] == -1
    assert (pairs >= 0).sum() >= 4


def test_boundary_points_rules():
    text = "ab  cd"
    # zero-width prepended marker + the token after it: the later one owns the point
    assert boundary_points([(0, 1), (0, 1), (1, 2)], text, [True, False, False]).tolist() == [-1, 0, 1]
    # a token's point is what has been read before it: the space standing alone (`▁`), attached to
    # the word (`Ġcd`) or dropped (WordPiece) — the position that has read "ab" has point 2 every time
    assert boundary_points([(0, 2), (2, 3), (3, 6)], text, [False, True, False]).tolist() == [0, 2, 3]
    assert boundary_points([(0, 2), (2, 6)], text).tolist() == [0, 2]
    assert boundary_points([(0, 2), (4, 6)], text).tolist() == [0, 2]
    # a token starting before the end of an earlier one (inside a character) is no boundary
    assert boundary_points([(0, 2), (1, 2), (2, 6)], text).tolist() == [0, -1, 2]
    # outside [0, limit] relative to the origin: -1
    assert boundary_points([(0, 2), (2, 4), (4, 6)], text, origin=2, limit=3).tolist() == [-1, 0, 2]
    assert boundary_points([(0, 2), (2, 4), (4, 6)], text, origin=2, limit=1).tolist() == [-1, 0, -1]


def space_convention_toks():
    """Two tokenizers trained here that treat the space before a number differently: a SentencePiece-
    style one writes it as a standalone `▁` before single digits (as Llama-2 and Mistral do), a
    byte-level one attaches it (`Ġ194`, as GPT-2 and OPT do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = corpus(300) + [f"in {y} there were {n} of them, {y % 100} percent" for y in range(1900, 2030) for n in (3, 45, 600)]
    specials = ["<|im_end|>", "<unk>"]
    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(prepend_scheme="first"),
                                                pre_tokenizers.Digits(individual_digits=True)])
    sp.decoder = decoders.Metaspace(prepend_scheme="first")
    sp.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=600, special_tokens=specials))
    bl, trainer = untrained_tokenizer("bpe", 600, specials)
    bl.train_from_iterator(lines, trainer)
    return [PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", unk_token="<unk>", pad_token="<|im_end|>")
            for t in (sp, bl)]


def test_offset_pairs_read_identical_text_across_space_conventions(tiny_data):
    """Paired positions have read exactly the same characters, spaces included (each side's text read
    back through its own decoder), when one tokenizer writes a standalone space before digits and the
    other attaches it to the number."""
    from kdflow.data import read_rows

    sp, bl = space_convention_toks()
    sentence = "The war ended in 1945 and 2,300 people came back in 1946; in 12 years 600 more."
    assert sp.tokenize(sentence)[8:11] == ["▁in", "▁", "1"] and bl.tokenize(sentence)[8:10] == ["Ġin", "Ġ194"]
    texts = [sentence] + [r["response"] for r in read_rows(str(tiny_data["train"])).head(40).items]
    for recv, send in ((sp, bl), (bl, sp)):
        paired = 0
        for text in texts:
            rv, sv, r_ids, s_ids, pairs, unk = pair_texts(recv, send, text)
            check_pairs_are_sound(rv, sv, r_ids, s_ids, pairs, unk)
            for j, k in enumerate(pairs):
                if k >= 0:
                    read_r = recv.decode(r_ids[:j], clean_up_tokenization_spaces=False)
                    assert read_r == send.decode(s_ids[:k], clean_up_tokenization_spaces=False), (text, j, k)
                    assert read_r == text[:len(read_r)]
                    paired += 1
        assert paired > 300
    # the position before the standalone space pairs with the one before the number that carries it
    rv, sv, r_ids, s_ids, pairs, unk = pair_texts(sp, bl, sentence)
    assert bl.convert_ids_to_tokens(s_ids)[pairs[9]] == "Ġ194" and pairs[10] == -1


# ----------------------------------------------------------------------------------------------
# Positions of whole examples (prompt rendered by each model's own template)


def cross(teacher_tok, student_tok, **align):
    return CrossTokenizer(teacher_tok, student_tok, DataConfig(), AlignConfig(vocab_map_cache=False, **align))


def example(tok, prompt, response):
    row = {"prompt": prompt, "response": response}
    return row, Encoder(tok, DataConfig()).encode(row, "test", 0)


def check_example(ct, row, e):
    """Invariants of one example's pairing; returns (student answer ids, teacher answer ids, src)."""
    teacher_ids, src, valid, located = ct.pair_example(row_turns(row, "test", DataConfig()), e)
    P_s = e["prompt_len"]
    s_ans = e["input_ids"][P_s:]
    assert located and len(src) == len(s_ans) == sum(1 for x in e["labels"][1:] if x != -100)
    t_prompt = ct.teacher_enc.prompt_ids(row_turns(row, "test", DataConfig()))
    P_t = len(t_prompt)
    assert teacher_ids[:P_t] == t_prompt
    t_ans = teacher_ids[P_t:]
    low = ct.teacher_vocab.scheme.lowercase or ct.student_vocab.scheme.lowercase
    pr, pt = prefixes(ct.student_vocab, s_ans, low), prefixes(ct.teacher_vocab, t_ans, low)
    for j, p in enumerate(src):
        assert p == -1 or P_t - 1 <= p < len(teacher_ids) - 1  # a real teacher position, never the last
        if p >= 0:
            k = p + 1 - P_t  # the teacher token that position p predicts
            assert pr[j] == pt[k], (j, k)
    assert valid == [p >= 0 for p in src] if ct.cfg.unpaired == "mask" else all(valid)
    return s_ans, t_ans, src, P_t


def test_bos_on_one_side_only(toks):
    teacher = make_tok("bpe", UTILIZE, 400, chat=False, bos=True)  # plain prompt, BOS added
    student = toks["unigram"]  # ChatML, no BOS
    ct = cross(teacher, student)
    row, e = example(student, "Use it in a sentence.", "we utilize the land")
    s_ans, t_ans, src, P_t = check_example(ct, row, e)
    t_prompt = ct.teacher_enc.prompt_ids(row_turns(row, "test", DataConfig()))
    assert t_prompt[0] == teacher.bos_token_id and e["input_ids"][0] != teacher.bos_token_id
    assert src[0] == P_t - 1  # the last prompt position predicts the first answer token on both sides


def test_eos_pairs_with_eos(toks):
    for teacher, student in ((toks["bpe"], toks["wordpiece"]), (make_tok("bpe", UTILIZE, 400, chat=False), toks["unigram"])):
        ct = cross(teacher, student)
        row, e = example(student, "Define the noun \"tool\".", "an implement used in the practice of a vocation")
        s_ans, t_ans, src, P_t = check_example(ct, row, e)
        assert s_ans[-1] == student.eos_token_id and src[-1] >= 0
        assert ct.pair_example(row_turns(row, "t", DataConfig()), e)[0][src[-1] + 1] == teacher.eos_token_id


@pytest.mark.parametrize("sequence", ["offsets", "dtw"])
def test_every_student_position_is_paired_or_masked_on_real_rows(toks, tiny_data, sequence):
    """Every pair joins positions that have read the same answer text (token-level DTW joined
    different contexts for about a fifth of its pairs)."""
    from kdflow.data import read_rows

    rows = read_rows(str(tiny_data["train"])).head(24)
    for t, s in (("bpe", "wordpiece"), ("bpe", "unigram"), ("unigram", "bpe2")):
        ct = cross(toks[t], toks[s], sequence=sequence)
        examples = [Encoder(toks[s], DataConfig()).encode(r, w, i) for i, (r, w) in enumerate(zip(rows.items, rows.locations))]
        stats = ct.prepare(examples, rows)
        for row, e in zip(rows.items, examples):
            check_example(ct, row, e)
            src = e["teacher_src"]
            assert torch.equal(e["teacher_valid"], src >= 0)
            used = src[src >= 0]
            assert torch.all(used[1:] > used[:-1])  # each teacher position serves one student position
        assert stats.positions == sum(len(e["teacher_src"]) for e in examples)
        assert stats.paired / stats.positions > 0.75, (t, s, stats)


# ----------------------------------------------------------------------------------------------
# Projection


def naive_projection(ids, logp, vmap):
    out = []
    for row_ids, row_lp in zip(ids.tolist(), logp.tolist()):
        d = {}
        for i, lp in zip(row_ids, row_lp):
            if i >= 0 and vmap[i] >= 0:
                d[vmap[i]] = d.get(vmap[i], 0.0) + math.exp(lp)
        out.append(d)
    return out


def test_projection_adds_duplicates_and_preserves_mass():
    g = torch.Generator().manual_seed(0)
    V_s, V_r, N, k = 60, 12, 40, 16
    vmap = torch.randint(-1, V_r, (V_s,), generator=g)  # many collisions, some ids without counterpart
    logits = torch.randn(N, V_s, generator=g) * 2
    lp = F.log_softmax(logits, -1)
    top = lp.topk(k, -1)
    tail = torch.logsumexp(lp.scatter(-1, top.indices, -math.inf), -1)
    ids, vals = top.indices.clone(), top.values.clone()
    ids[:3, -2:] = -1  # empty input slots: their mass counts as outside the k
    vals[:3, -2:] = -math.inf
    tail[:3] = torch.logaddexp(tail[:3], torch.logsumexp(top.values[:3, -2:], -1))
    p_ids, p_lp, p_tail = project_topk(ids, vals, vmap, tail)
    ref = naive_projection(ids, vals, vmap.tolist())
    for r in range(N):
        got = {int(i): math.exp(v) for i, v in zip(p_ids[r].tolist(), p_lp[r].tolist()) if i >= 0}
        assert got.keys() == ref[r].keys()
        assert all(abs(got[i] - ref[r][i]) < 1e-5 for i in got)
        assert (p_ids[r] >= 0).sum() == len(got)  # no id twice
        live = p_lp[r][p_ids[r] >= 0]
        assert torch.all(live[:-1] >= live[1:]) and torch.all(p_ids[r][len(got):] == -1)  # sorted, empties last
    total = torch.logsumexp(torch.cat([p_lp, p_tail[:, None]], -1), -1)
    assert torch.allclose(total, torch.zeros(N), atol=1e-5)  # all of the sender's mass is still there
    # without an exact tail the leftover is 1 - sum of the kept probabilities: the same mass
    _, _, derived = project_topk(ids, vals, vmap)
    assert torch.allclose(derived.exp(), p_tail.exp(), atol=1e-5)


def test_teacher_targets_equal_a_naive_recomputation(toks, tiny_data):
    from kdflow.data import read_rows

    teacher_tok, student_tok = toks["bpe"], toks["unigram"]
    teacher = tiny_llama(teacher_tok, layers=2, hidden=32, seed=3).eval()
    rows = read_rows(str(tiny_data["train"])).head(5)
    rows.items[4] = {"prompt": "Use it.", "response": "we utilize the 🎉"}
    for unpaired in ("mask", "onehot_next"):
        ct = cross(teacher_tok, student_tok, unpaired=unpaired)
        examples = [Encoder(student_tok, DataConfig()).encode(r, w, i) for i, (r, w) in enumerate(zip(rows.items, rows.locations))]
        ct.prepare(examples, rows)
        batch = collate(examples, student_tok.pad_token_id)
        got = ct.targets(teacher, batch, k=8, temperature=2.0)
        vmap = ct.teacher_to_student.tolist()
        row = 0
        for e in examples:
            with torch.no_grad():
                logits = teacher(torch.tensor([e["teacher_input_ids"]])).logits[0]
            answer = e["input_ids"][e["prompt_len"]:]
            for j, p in enumerate(e["teacher_src"].tolist()):
                if p >= 0:
                    top = F.log_softmax(logits[p, :len(teacher_tok)] / 2.0, -1).topk(8)
                    ref = naive_projection(top.indices[None], top.values[None], vmap)[0]
                    have = {int(i): math.exp(v) for i, v in zip(got.ids[row].tolist(), got.logp[row].tolist()) if i >= 0}
                    assert have.keys() == ref.keys() and all(abs(have[i] - ref[i]) < 1e-4 for i in have)
                    assert bool(got.valid[row])
                elif unpaired == "onehot_next":
                    # the student's own next token (answer token j), never the current one
                    assert got.ids[row, 0] == answer[j] and got.logp[row, 0] == 0 and got.ids[row, 1] == -1
                    assert bool(got.valid[row])
                else:
                    assert not bool(got.valid[row])
                row += 1
        assert row == got.ids.shape[0]


def test_precomputed_teacher_rows_carry_over_like_the_online_targets(toks, tiny_data):
    """carry_rows (for FedMKT-style payloads computed on the sender's own encoding) agrees with the
    online path, which runs the teacher on the student's aligned positions."""
    from kdflow.data import read_rows
    from kdflow.teacher_cache import topk_from_logits

    teacher_tok, student_tok = toks["unigram"], toks["bpe"]
    teacher = tiny_llama(teacher_tok, layers=2, hidden=32, seed=4).eval()
    rows = read_rows(str(tiny_data["train"])).head(4)
    for unpaired in ("mask", "onehot_next"):
        ct = cross(teacher_tok, student_tok, unpaired=unpaired)
        s_ex = [Encoder(student_tok, DataConfig()).encode(r, w, i) for i, (r, w) in enumerate(zip(rows.items, rows.locations))]
        t_ex = [Encoder(teacher_tok, DataConfig()).encode(r, w, i) for i, (r, w) in enumerate(zip(rows.items, rows.locations))]
        ct.prepare(s_ex, rows)
        online = ct.targets(teacher, collate(s_ex, student_tok.pad_token_id), k=8, temperature=1.0)
        start = 0
        for row, se, te in zip(rows.items, s_ex, t_ex):
            with torch.no_grad():
                logits = teacher(torch.tensor([te["input_ids"]])).logits[0, te["prompt_len"] - 1:-1, :len(teacher_tok)]
            ids, lp, tail = topk_from_logits(logits, 8, 1.0)
            got = ct.carry_rows(row_turns(row, "t", DataConfig()), se, te, ids, lp, tail)
            n = got.ids.shape[0]
            ref_ids, ref_lp = online.ids[start:start + n], online.logp[start:start + n]
            assert torch.equal(got.valid, online.valid[start:start + n])
            v = got.valid
            assert torch.equal(got.ids[v], ref_ids[v])
            assert torch.allclose(got.logp[v], ref_lp[v], atol=1e-4)
            start += n
        assert start == online.ids.shape[0]


# ----------------------------------------------------------------------------------------------
# Through the CLI


def _save(model, tok, folder):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _args(teacher, student, data, out, *extra):
    return [f"teacher.name={teacher}", f"student.name={student}", f"data.train={data['train']}",
            f"data.validation={data['validation']}", f"output_dir={out}", "train.batch_size=4",
            "train.report_to=[none]", "train.logging_steps=1", "train.save_steps=0", "train.num_threads=1", *extra]


def test_cross_tokenizer_distill_online_and_from_the_cache(toks, tiny_data, tmp_path, monkeypatch, capsys, one_thread):
    from kdflow.cli import main
    from kdflow.teacher_cache import TeacherCache

    monkeypatch.setenv("KDFLOW_CACHE", str(tmp_path / "kc"))
    teacher = _save(tiny_llama(toks["bpe"], layers=2, hidden=48, seed=1), toks["bpe"], tmp_path / "teacher")
    student = _save(tiny_llama(toks["wordpiece"], layers=2, hidden=32, seed=2), toks["wordpiece"], tmp_path / "student")
    common = _args(teacher, student, tiny_data, tmp_path / "online", "train.max_steps=2", "evaluate_before=false",
                   f"data.test={tiny_data['test']}", "eval.max_new_tokens=3", "eval.batch_size=4", "data.max_train_rows=16")
    assert main(["distill", *common]) == 0
    out = capsys.readouterr().out
    assert "cross-tokenizer KD" in out and "student answer positions paired" in out
    metrics = json.loads((tmp_path / "online" / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 2 and metrics["cross_tokenizer"]["alignment"]["paired"] > 0
    assert any("kd" in h for h in json.loads((tmp_path / "online" / "log_history.json").read_text()))
    assert "sequence: offsets" in (tmp_path / "online" / "config.yaml").read_text()
    assert "cross-tokenizer: positions paired by offsets" in (tmp_path / "online" / "report.md").read_text()

    cache = tmp_path / "cache"
    args = _args(teacher, student, tiny_data, tmp_path / "cached", "train.max_steps=2", f"teacher_cache.dir={cache}",
                 "data.max_train_rows=16", "align.sequence=dtw", "kd.sparse_mode=renorm")
    assert main(["cache-teacher", *args]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["key"]["alignment"]["sequence"] == "dtw" and manifest["complete"]
    assert main(["distill", *args]) == 0
    assert "the teacher is not run" in capsys.readouterr().out
    # the cache holds what the online path computes, in the student's vocabulary
    from kdflow.data import encode_rows, read_rows

    rows = read_rows(str(tiny_data["train"])).head(16)
    examples = encode_rows(rows, toks["wordpiece"], DataConfig())
    ct = cross(toks["bpe"], toks["wordpiece"], sequence="dtw")
    ct.prepare(examples, rows)
    from transformers import AutoModelForCausalLM

    online = ct.targets(AutoModelForCausalLM.from_pretrained(teacher).eval(), collate(examples[:4], toks["wordpiece"].pad_token_id),
                        k=64, temperature=2.0)
    cached = TeacherCache(cache, manifest["key"]).load()
    ids = torch.cat([cached[i]["ids"] for i in range(4)])
    valid = torch.cat([cached[i]["valid"] for i in range(4)])
    assert torch.equal(valid, online.valid) and torch.equal(ids[valid], online.ids[valid])
    assert (ids == -1).any()  # empty slots survive the uint16 storage

    # a setting the alignment cannot honour is a clear error
    assert main(["distill", *common, "kd.token_scope=all", "output_dir=" + str(tmp_path / "bad")]) == 2
    assert "kd.token_scope=all needs teacher and student to share a tokenizer" in capsys.readouterr().err
    # hard_token: CE on the argmax of the carried distribution, online
    assert main(["distill", *common, "method=hard_token", "output_dir=" + str(tmp_path / "hard")]) == 0
    hist = json.loads((tmp_path / "hard" / "log_history.json").read_text())
    assert any("kd" in h for h in hist)


def test_cross_tokenizer_kd_lowers_the_students_held_out_loss(toks, tmp_path, monkeypatch, one_thread):
    """A teacher that learnt the task (SFT) passes it on through pure KD (kd_weight=1: no CE on the
    labels): the student's held-out answer NLL falls, and falls far less with an untrained teacher."""
    from conftest import DATA, write_jsonl
    from kdflow.cli import main

    monkeypatch.setenv("KDFLOW_CACHE", str(tmp_path / "kc"))
    lines = (DATA / "train.jsonl").read_text().splitlines()
    train = write_jsonl(tmp_path / "train.jsonl", [json.loads(x) for x in lines[:256]])
    held = write_jsonl(tmp_path / "held.jsonl", [json.loads(x) for x in (DATA / "test.jsonl").read_text().splitlines()[:32]])
    data = {"train": train, "validation": held}
    t_tok, s_tok = toks["bpe"], toks["unigram"]
    raw_teacher = _save(tiny_llama(t_tok, layers=2, hidden=64, seed=5), t_tok, tmp_path / "raw_teacher")
    student = _save(tiny_llama(s_tok, layers=2, hidden=64, seed=6), s_tok, tmp_path / "student")
    quick = ["evaluate_teacher=false", "eval.max_new_tokens=1", "eval.batch_size=16", f"data.test={held}",
             "train.learning_rate=0.004", "train.batch_size=16", "train.lr_scheduler=constant", "seed=0"]
    assert main(["distill", *_args(raw_teacher, raw_teacher, data, tmp_path / "teach", "method=sft", "train.max_steps=80",
                                   "evaluate_before=false", *quick)]) == 0
    trained_teacher = tmp_path / "teach" / "student"

    def kd_from(teacher, name):
        assert main(["distill", *_args(teacher, student, data, tmp_path / name, "method=kd", "kd.kd_weight=1.0",
                                       "kd.temperature=1.0", "train.max_steps=50", *quick)]) == 0
        ev = json.loads((tmp_path / name / "metrics.json").read_text())["eval"]
        return ev["student (before)"]["answer_nll"], ev["student (after)"]["answer_nll"]

    before, after = kd_from(trained_teacher, "kd_trained")
    _, after_raw = kd_from(raw_teacher, "kd_raw")
    print(f"held-out answer NLL: before {before:.3f}, after KD from the trained teacher {after:.3f}, "
          f"after KD from the untrained teacher {after_raw:.3f}")
    assert after < before - 0.5
    assert after < after_raw - 0.3
