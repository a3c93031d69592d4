"""bf16 autocast against float32 on this CPU: one training step (forward, backward, AdamW) of the
demo's pruned student (10 of SmolLM2-135M's 30 layers) on the same WordNet batch, alternating
float32 and bf16 steps so that other load hits both alike; prints each side's median and the ratio,
and whether this CPU has native bf16 (`kdflow.models.cpu_bf16_fast`, which decides whether
`train.bf16` is honoured on a CPU or replaced by float32).

    python bench/bench_bf16_cpu.py [--steps 3] [--batch 8]
"""

from __future__ import annotations

import argparse
import time

from common import demo_student, load_teacher_and_tokenizer, median, wordnet_examples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side (after one untimed step each)")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    import torch

    from kdflow.data import collate
    from kdflow.models import cpu_bf16_fast

    teacher, tok = load_teacher_and_tokenizer()
    student = demo_student(teacher)
    student.train()
    batch = collate(wordnet_examples(tok, args.batch), tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)
    times: dict[str, list[float]] = {"float32": [], "bf16": []}
    for i in range(args.steps + 1):
        for side in ("float32", "bf16"):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=side == "bf16"):
                loss = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               labels=batch["labels"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if i:
                times[side].append(time.perf_counter() - t0)
    f32, b16 = median(times["float32"]), median(times["bf16"])
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_bf16_fast()}; "
          f"torch threads {torch.get_num_threads()}; batch {tuple(batch['input_ids'].shape)}")
    print(f"training step: float32 {f32:.2f} s, bf16 autocast {b16:.2f} s; bf16 / float32 = {b16 / f32:.1f}x")


if __name__ == "__main__":
    main()
