"""Shared set-up for the cross-tokenizer benchmarks: the SmolLM2 tokenizer and tokenizers of 32k tokens
trained on the WordNet text (the bundled tasks plus Debian's wordnet-base glosses and lemmas).

Trained tokenizers are kept under $KDFLOW_CACHE/bench_tokenizers (Unigram training takes about two
minutes on two cores); the file name holds a digest of the training text and settings.
"""

from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path

from common import ROOT  # noqa: F401  (sets KDFLOW_CACHE and sys.path)

WORDNET = Path("/usr/share/wordnet")
SPECIALS = ["<s>", "</s>", "<pad>", "<unk>"]


def wordnet_texts() -> list[str]:
    """Every prompt and answer of data/wordnet_*, then every gloss and lemma list of wordnet-base."""
    out = []
    for f in sorted(glob.glob(str(ROOT / "data" / "wordnet_*" / "*.jsonl"))):
        for line in open(f, encoding="utf-8"):
            row = json.loads(line)
            out += [row["prompt"], row["response"]]
    for pos in ("noun", "verb", "adj", "adv"):
        path = WORDNET / f"data.{pos}"
        if not path.is_file():
            continue
        for line in open(path, encoding="utf-8", errors="replace"):
            if line.startswith("  ") or "|" not in line:  # licence header
                continue
            fields = line.split(" ")
            n = int(fields[3], 16)
            out.append(" ".join(w.replace("_", " ") for w in fields[4:4 + 2 * n:2]))
            out.append(line.split("|", 1)[1].strip())
    return out


def trained_tokenizer(kind: str, vocab_size: int = 32000):
    """A `kind` (bpe | wordpiece | unigram) tokenizer of `vocab_size` tokens trained on the WordNet text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kdflow.models import cache_root

    texts = wordnet_texts()
    digest = hashlib.sha256(json.dumps([kind, vocab_size, SPECIALS, len(texts), texts[:: max(len(texts) // 997, 1)]])
                            .encode()).hexdigest()[:12]
    path = cache_root() / "bench_tokenizers" / f"{kind}-{vocab_size}-{digest}.json"
    if path.is_file():
        tk = Tokenizer.from_file(str(path))
    else:
        if kind == "bpe":
            tk = Tokenizer(models.BPE())
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tk.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        elif kind == "wordpiece":
            tk = Tokenizer(models.WordPiece(unk_token="<unk>"))
            tk.normalizer = normalizers.BertNormalizer(lowercase=True)
            tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            tk.decoder = decoders.WordPiece()
            trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS)
        elif kind == "unigram":
            tk = Tokenizer(models.Unigram())
            tk.pre_tokenizer = pre_tokenizers.Metaspace()
            tk.decoder = decoders.Metaspace()
            trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, unk_token="<unk>")
        else:
            raise ValueError(f"unknown tokenizer kind {kind!r}; use bpe, wordpiece or unigram")
        print(f"training a {kind} tokenizer of {vocab_size} tokens on {sum(map(len, texts)) / 1e6:.1f}M characters "
              "of WordNet text (once; cached)", flush=True)
        tk.train_from_iterator(texts, trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tk.save(str(tmp))
        tmp.replace(path)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def smollm2_tokenizer():
    from kdflow.config import ModelSpec
    from kdflow.models import load_tokenizer

    return load_tokenizer(ModelSpec(name="bundled:smollm2-135m-instruct"))
