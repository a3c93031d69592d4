"""Benchmark 1 (and 4): KD step time with the cached teacher / SFT step time, same student and batches.

Also prints the teacher cache's size in bytes per token at k = 64. Both trainers run the real
`kdflow distill` training step (DistillTrainer) on the demo's pruned student, on the same WordNet
batches; rounds alternate (SFT, KD, SFT, KD, ...) so that load from other processes hits both
alike, and each side's median step time is compared. Goal: ratio <= 1.05.

    python bench/bench_kd_step.py [--steps 8] [--rounds 3] [--batch 8] [--bf16]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

from common import load_teacher_and_tokenizer, demo_student, median, wordnet_examples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()

    from kdflow.config import DistillConfig, load_config
    from kdflow.data import Collator
    from kdflow.methods.kd import make_distill_trainer_class
    from kdflow.teacher_cache import TeacherCache, build_cache, manifest_key, same_tokenizer_targets
    from kdflow.training import training_arguments

    teacher, tok = load_teacher_and_tokenizer()
    n = args.batch * (args.steps + 2)
    sft_examples = wordnet_examples(tok, n)
    kd_examples = copy.deepcopy(sft_examples)
    key = manifest_key(teacher="bundled", teacher_tokenizer="t", student_tokenizer="t", data="bench", data_settings={},
                       k=args.k, temperature=1.0, token_scope="response", logp_dtype="float16", store_tail=True)
    cache_dir = tempfile.mkdtemp(prefix="kdflow-bench-cache-")
    t0 = time.perf_counter()
    manifest = build_cache(cache_dir, key, kd_examples, tok.pad_token_id,
                           same_tokenizer_targets(teacher, len(tok), args.k, 1.0, "response"),
                           batch_size=16, shard_size=256, vocab_size=len(tok), progress=False)
    cache_seconds = time.perf_counter() - t0
    TeacherCache(cache_dir, key).attach(kd_examples, "response")
    base_student = demo_student(teacher)
    del teacher  # training from the cache never needs it

    Trainer = make_distill_trainer_class()
    collate = Collator(tok.pad_token_id)

    def make(method: str):
        cfg = load_config(DistillConfig, None, [f"method={method}", "kd.kd_weight=0.5", "kd.temperature=1.0",
                                                f"train.batch_size={args.batch}", "train.report_to=[none]",
                                                f"train.bf16={str(args.bf16).lower()}"])
        targs = training_arguments(cfg.train, tempfile.mkdtemp(prefix="kdflow-bench-"), 0, False)
        model = copy.deepcopy(base_student)
        trainer = Trainer(model=model, args=targs, cfg=cfg, teacher=None, vocab_size=len(tok))
        trainer.create_optimizer()
        return trainer

    def step(trainer, batch) -> tuple[float, float]:
        """One optimizer step through the trainer's own training_step: (wall s, CPU s)."""
        w, c = time.perf_counter(), time.process_time()
        samples, counts = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
        with trainer.accelerator.autocast():
            trainer.training_step(trainer.model, samples[0], counts)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - w, time.process_time() - c

    # Steps alternate SFT, KD, SFT, KD on the same batches, so load from other processes hits both alike.
    sft_t, kd_t = make("sft"), make("kd")
    sft, kd = [], []
    for r in range(args.rounds):
        for i in range(args.steps + 2):
            sl = slice(i * args.batch, (i + 1) * args.batch)
            a = step(sft_t, collate(sft_examples[sl]))
            b = step(kd_t, collate(kd_examples[sl]))
            if r > 0 or i >= 2:  # the first steps pay one-off costs (allocations, optimizer state)
                sft.append(a)
                kd.append(b)
        print(f"round {r + 1}: SFT median {median([x[0] for x in sft]):.3f} s/step, "
              f"KD (cached teacher) median {median([x[0] for x in kd]):.3f} s/step")
    positions = manifest["positions"]
    print()
    print(f"student: demo pruned SmolLM2 (10 layers), batch {args.batch}, bf16={args.bf16}, k={args.k}")
    for label, i in (("wall", 0), ("CPU", 1)):
        a, b = median([x[i] for x in sft]), median([x[i] for x in kd])
        print(f"{label:>4} time: SFT {a:.3f} s/step, KD with cached teacher {b:.3f} s/step, "
              f"ratio KD / SFT {b / a:.3f}   (goal <= 1.05; medians of {len(sft)} interleaved steps)")
    print(f"cache: {positions} positions of {len(kd_examples)} examples in {cache_seconds:.1f} s, "
          f"{manifest['bytes_per_position']:.1f} bytes per token at k={args.k} (published reference: 114-300)")


if __name__ == "__main__":
    main()
