"""Benchmark 3: training tokens/s of `kdflow distill` from the teacher cache / TRL's GKDTrainer (lmbda = 0).

Same teacher (bundled SmolLM2-135M-Instruct, float32), same student (the demo's 10-layer pruned
copy), same WordNet rows as chat messages, same batch size and sequence limit, forward KL at
temperature 1 (TRL: beta = 0; kdflow: kd_weight = 1, fkl), float32, no gradient checkpointing.
TRL runs the teacher online each step over full-vocabulary logits at every position; kdflow reads
the teacher's top-64 from its cache. Rounds alternate (kdflow, TRL, kdflow, TRL) so load from other
processes hits both; tokens/s = non-padding tokens of the timed steps / their time. The cache is
built once and its time reported separately, with the one-epoch figure that includes it.
Goal: ratio >= 2. Needs the bench extra (`pip install -e ".[bench]"`, which `make bench` does).

    python bench/bench_vs_trl.py [--steps 10] [--rounds 2] [--batch 8]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

from common import demo_student, load_teacher_and_tokenizer, median, wordnet_examples

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()

    import datasets
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from trl.experimental.utils import DataCollatorForChatML

    from kdflow.config import DistillConfig, load_config
    from kdflow.data import Collator, ListDataset, read_rows
    from kdflow.methods.kd import make_distill_trainer_class
    from kdflow.teacher_cache import TeacherCache, build_cache, manifest_key, same_tokenizer_targets
    from kdflow.training import training_arguments

    from common import TRAIN

    teacher, tok = load_teacher_and_tokenizer()
    n = args.batch * args.steps
    examples = wordnet_examples(tok, n, args.max_length)
    rows = read_rows(str(TRAIN)).head(n).items
    messages = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": r["prompt"]},
                                                         {"role": "assistant", "content": r["response"]}]} for r in rows])
    key = manifest_key(teacher="bundled", teacher_tokenizer="t", student_tokenizer="t", data="bench-trl",
                       data_settings={}, k=64, temperature=1.0, token_scope="response", logp_dtype="float16", store_tail=True)
    cache_dir = tempfile.mkdtemp(prefix="kdflow-bench-cache-")
    t0 = time.perf_counter()
    build_cache(cache_dir, key, examples, tok.pad_token_id, same_tokenizer_targets(teacher, len(tok), 64, 1.0, "response"),
                batch_size=16, vocab_size=len(tok), progress=False)
    cache_seconds = time.perf_counter() - t0
    TeacherCache(cache_dir, key).attach(examples, "response")
    base_student = demo_student(teacher)

    class Timed(TrainerCallback):
        """Per-step wall time; the collator wrapper below records each batch's real tokens."""

        def __init__(self):
            self.times = []

        def on_step_begin(self, a, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.times.append(time.perf_counter() - self._t)

    class Counting:
        def __init__(self, inner):
            self.inner, self.tokens = inner, []

        def __call__(self, batch):
            out = self.inner(batch)
            self.tokens.append(int(out["attention_mask"].sum()))
            return out

    def tokens_per_second(timer: Timed, counter: Counting) -> tuple[float, float]:
        # skip the first two steps (one-off allocations, optimizer state)
        t, k = timer.times[2:], counter.tokens[2:len(timer.times)]
        return sum(k) / sum(t), median(t)

    Distill = make_distill_trainer_class()

    def run_kdflow() -> tuple[float, float]:
        cfg = load_config(DistillConfig, None, ["method=kd", "kd.kd_weight=1.0", "kd.divergence=fkl", "kd.temperature=1.0",
                                                f"train.batch_size={args.batch}", f"train.max_steps={args.steps}",
                                                "train.report_to=[none]", "train.save_steps=0", "train.logging_steps=1000",
                                                "train.lr_scheduler=constant"])
        targs = training_arguments(cfg.train, tempfile.mkdtemp(), 0, False)
        targs.disable_tqdm = True
        timer, counter = Timed(), Counting(Collator(tok.pad_token_id))
        Distill(model=copy.deepcopy(base_student), args=targs, train_dataset=ListDataset(examples), data_collator=counter,
                cfg=cfg, teacher=None, vocab_size=len(tok), callbacks=[timer]).train()
        return tokens_per_second(timer, counter)

    def run_trl() -> tuple[float, float]:
        targs = GKDConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=args.steps,
                          lmbda=0.0, beta=0.0, temperature=1.0, max_length=args.max_length, learning_rate=5e-5,
                          lr_scheduler_type="constant", bf16=False, fp16=False, gradient_checkpointing=False,
                          report_to="none", save_strategy="no", logging_steps=1000, disable_tqdm=True, use_cpu=True,
                          seed=0)
        timer = Timed()
        counter = Counting(DataCollatorForChatML(tokenizer=tok, max_length=args.max_length))
        GKDTrainer(model=copy.deepcopy(base_student), teacher_model=teacher, args=targs, train_dataset=messages,
                   processing_class=tok, data_collator=counter, callbacks=[timer]).train()
        return tokens_per_second(timer, counter)

    ours, theirs = [], []
    for r in range(args.rounds):
        ours.append(run_kdflow())
        theirs.append(run_trl())
        print(f"round {r + 1}: kdflow {ours[-1][0]:.0f} tokens/s ({ours[-1][1]:.2f} s/step), "
              f"TRL GKD {theirs[-1][0]:.0f} tokens/s ({theirs[-1][1]:.2f} s/step)")
    a, b = median([x[0] for x in ours]), median([x[0] for x in theirs])
    print()
    print(f"kdflow distill (teacher cache, k=64)  {a:8.0f} tokens/s")
    print(f"TRL GKDTrainer (lmbda=0, online)      {b:8.0f} tokens/s")
    print(f"ratio kdflow / TRL                    {a / b:8.2f}   (goal >= 2)")
    epoch_tokens = sum(len(e["input_ids"]) for e in examples)
    ours_epoch = cache_seconds + epoch_tokens / a
    print(f"one pass over these {n} rows including the cache build ({cache_seconds:.1f} s): "
          f"kdflow {ours_epoch:.1f} s vs TRL {epoch_tokens / b:.1f} s (ratio {epoch_tokens / b / ours_epoch:.2f})")


if __name__ == "__main__":
    main()
