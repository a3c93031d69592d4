"""Build the bundled WordNet tasks from Debian's `wordnet-base` files.

    apt-get install wordnet-base
    python data/build_wordnet.py            # writes data/wordnet_define/ and data/wordnet_antonym/

Tasks (one JSONL row per example, fields `prompt`, `response`, `word`, `pos`; antonym rows also
`alternatives`, every accepted answer joined by `|`):
  wordnet_define   "Define ..." -> the gloss of the word's most frequent sense (WordNet lists
                   senses in frequency order), examples stripped from the gloss.
  wordnet_antonym  "What is the opposite of ...?" -> the antonym recorded by WordNet's `!`
                   pointer on the word's most frequent sense that has one (adjectives).
  wordnet_example  "Use ... in a sentence." -> an example sentence WordNet quotes for one of the
                   word's senses (used e.g. to pretrain a small model with its own tokenizer).
Only words with at least one sense-tagged occurrence in WordNet's corpus are kept, so the task
is about words people use. Splits are drawn by word with a fixed seed, so a word never appears
in two splits. The script is deterministic: running it again gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from pathlib import Path

POS_FILES = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
SPLIT_SIZES = {"define": (4000, 300, 300), "antonym": (1200, 150, 150), "example": (8000, 300, 300)}


def read_index(wn: Path, pos_file: str) -> list[tuple[str, int, list[str]]]:
    """(lemma, tagged sense count, synset offsets in frequency order) per index line."""
    rows = []
    for line in (wn / f"index.{pos_file}").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue  # licence header
        parts = line.split()
        lemma, n_synsets, n_pointers = parts[0], int(parts[2]), int(parts[3])
        rest = parts[4 + n_pointers:]
        tagged = int(rest[1])
        offsets = rest[2:2 + n_synsets]
        rows.append((lemma, tagged, offsets))
    return rows


def read_data(wn: Path, pos_file: str) -> dict[str, dict]:
    """synset offset -> {words, gloss, antonyms: [(source word index, target offset, target word index)]}."""
    synsets = {}
    for line in (wn / f"data.{pos_file}").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue
        head, _, gloss = line.partition(" | ")
        parts = head.split()
        offset, n_words = parts[0], int(parts[3], 16)
        words = [parts[4 + 2 * i] for i in range(n_words)]
        i = 4 + 2 * n_words
        n_ptrs = int(parts[i])
        antonyms = []
        for p in range(n_ptrs):
            symbol, target, _tpos, srctgt = parts[i + 1 + 4 * p: i + 5 + 4 * p]
            if symbol == "!":
                antonyms.append((int(srctgt[:2], 16), target, int(srctgt[2:], 16)))
        synsets[offset] = {"words": words, "gloss": gloss.strip(), "antonyms": antonyms}
    return synsets


def clean_word(w: str) -> str:
    w = re.sub(r"\(.*\)$", "", w)  # adjective markers such as "(a)", "(p)"
    return w.replace("_", " ")


def definition_of(gloss: str) -> str:
    # A gloss is "definition; \"example\"; \"example\"": keep the definition only.
    definition = gloss.split('; "')[0].split('"')[0].strip().rstrip(";").strip()
    return definition


def split_rows(rows: list[dict], sizes: tuple[int, int, int], seed: int) -> dict[str, list[dict]]:
    words = sorted({r["word"] for r in rows})
    random.Random(seed).shuffle(words)
    by_word = {}
    for r in rows:
        by_word.setdefault(r["word"], []).append(r)
    out = {"test": [], "validation": [], "train": []}
    targets = dict(zip(("train", "validation", "test"), sizes))
    it = iter(words)
    for split in ("test", "validation", "train"):  # fill test first so it is stable if train grows
        while len(out[split]) < targets[split]:
            try:
                w = next(it)
            except StopIteration:
                break
            out[split].extend(by_word[w][: targets[split] - len(out[split])])
    return out


def build_define(wn: Path) -> list[dict]:
    rows = []
    for pos_file, pos in POS_FILES.items():
        data = read_data(wn, pos_file)
        for lemma, tagged, offsets in read_index(wn, pos_file):
            if tagged < 1 or not re.fullmatch(r"[a-z][a-z_\-']*", lemma):
                continue
            definition = definition_of(data[offsets[0]]["gloss"])
            if len(definition) < 3:
                continue
            word = clean_word(lemma)
            rows.append({
                "prompt": f'Define the {POS_NAMES[pos]} "{word}" in one short phrase.',
                "response": definition,
                "word": word,
                "pos": POS_NAMES[pos],
            })
    return rows


def build_antonym(wn: Path) -> list[dict]:
    data = read_data(wn, "adj")
    rows = []
    for lemma, tagged, offsets in read_index(wn, "adj"):
        if tagged < 1 or not re.fullmatch(r"[a-z][a-z\-]*", lemma):
            continue
        for off in offsets:  # most frequent sense that records an antonym
            syn = data[off]
            idx = [i + 1 for i, w in enumerate(syn["words"]) if clean_word(w).lower() == lemma.replace("_", " ")]
            ants = [a for a in syn["antonyms"] if a[0] in idx or a[0] == 0]
            if ants:
                _, target, tword = ants[0]
                tsyn = data[target]
                antonym = clean_word(tsyn["words"][max(tword, 1) - 1])
                rows.append({
                    "prompt": f'What is the opposite of the adjective "{lemma}"? Answer with one word.',
                    "response": antonym,
                    "word": lemma,
                    "pos": "adjective",
                    "alternatives": accepted_antonyms(data, lemma, offsets, antonym),
                })
                break
    return rows


def accepted_antonyms(data: dict[str, dict], lemma: str, offsets: list[str], first: str) -> str:
    """Every answer a grader should accept, `|`-joined, the recorded one first: all lemmas of every
    synset that WordNet marks as an antonym of any sense of `lemma` (the prompt names no sense)."""
    accepted = [first]
    for off in offsets:
        syn = data[off]
        idx = [i + 1 for i, w in enumerate(syn["words"]) if clean_word(w).lower() == lemma.replace("_", " ")]
        for src, target, _ in syn["antonyms"]:
            if src in idx or src == 0:
                for w in data[target]["words"]:
                    w = clean_word(w)
                    if w not in accepted:
                        accepted.append(w)
    return "|".join(accepted)


def build_example(wn: Path) -> list[dict]:
    rows = []
    for pos_file, pos in POS_FILES.items():
        data = read_data(wn, pos_file)
        for lemma, tagged, offsets in read_index(wn, pos_file):
            if tagged < 1 or not re.fullmatch(r"[a-z][a-z_\-']*", lemma):
                continue
            word = clean_word(lemma)
            for off in offsets:  # the most frequent sense whose examples use the word itself
                quotes = re.findall(r'"([^"]+)"', data[off]["gloss"])
                usable = [q.strip() for q in quotes if re.search(rf"\b{re.escape(word)}", q, re.IGNORECASE)]
                if usable:
                    rows.append({
                        "prompt": f'Use the {POS_NAMES[pos]} "{word}" in a sentence.',
                        "response": usable[0],
                        "word": word,
                        "pos": POS_NAMES[pos],
                    })
                    break
    return rows


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wordnet", default="/usr/share/wordnet", help="folder with WordNet's data.* and index.* files")
    ap.add_argument("--out", default=str(Path(__file__).parent), help="where to write the task folders")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    wn = Path(args.wordnet)
    if not (wn / "data.noun").exists():
        raise SystemExit(f"{wn}/data.noun not found: install Debian's wordnet-base (apt-get install wordnet-base) or pass --wordnet")
    for task, rows in (("define", build_define(wn)), ("antonym", build_antonym(wn)), ("example", build_example(wn))):
        splits = split_rows(rows, SPLIT_SIZES[task], args.seed)
        folder = Path(args.out) / f"wordnet_{task}"
        folder.mkdir(parents=True, exist_ok=True)
        for split, srows in splits.items():
            write_jsonl_atomic(folder / f"{split}.jsonl", srows)
        print(task, {k: len(v) for k, v in splits.items()}, "from", len(rows), "candidates")


if __name__ == "__main__":
    main()
