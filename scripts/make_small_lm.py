"""Build a small language model with its own tokenizer, pretrained on the bundled WordNet text.

The FedMKT demo needs a client whose tokenizer differs from the server's. No model hub is
reachable here, so we make one: a byte-level BPE tokenizer trained on WordNet's example
sentences and antonym task (never the "define" task that FedMKT is evaluated on), a small Llama
configuration, and a short from-scratch pretraining run through `kdflow distill method=sft`.

    python scripts/make_small_lm.py --out runs/small_lm         # ~5 minutes on 2 CPU cores
    # -> runs/small_lm/pretrain/student  (a model folder usable as model.name anywhere in kdflow)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = [ROOT / "data" / "wordnet_example" / "train.jsonl", ROOT / "data" / "wordnet_antonym" / "train.jsonl"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def texts() -> list[str]:
    out = []
    for path in CORPUS:
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            out += [row["prompt"], row["response"]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/small_lm")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=800)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from kdflow.cli import main as kdflow

    out = Path(args.out)
    init = out / "init"
    if not (init / "config.json").is_file():
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tk.train_from_iterator(texts(), trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                      bos_token=None, unk_token=None)
        tok.chat_template = CHATML
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                          num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                          num_key_value_heads=max(args.hidden // 128, 1), max_position_embeddings=512,
                          tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          bos_token_id=None)
        init.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(init)
        cfg.save_pretrained(init)
    rc = kdflow(["distill", "method=sft", "student.init=config", f"student.name={init}", "teacher.name=null",
                 "evaluate_teacher=false", "evaluate_before=false", f"output_dir={out / 'pretrain'}",
                 f"data.train={CORPUS[0]}", f"data.test={ROOT / 'data' / 'wordnet_example' / 'test.jsonl'}",
                 "data.max_length=96", f"train.max_steps={args.steps}", "train.batch_size=32", "train.learning_rate=2e-3",
                 "train.warmup_ratio=0.05", "train.lr_scheduler=cosine", "train.weight_decay=0.01",
                 "train.save_steps=200", "train.logging_steps=20", "train.report_to=[none]",
                 "eval.max_rows=50", "eval.max_new_tokens=24"])
    if rc:
        raise SystemExit(rc)
    print(f"small model ready: {out / 'pretrain' / 'student'}")


if __name__ == "__main__":
    main()
