"""Benchmark 3b: training tokens/s of kdflow's `method: gkd` / TRL, teacher online on both sides.

Two comparisons, each one run side by side:
  * on-policy, lambda = 1: every batch's answers are sampled from the student now. kdflow:
    `method: gkd` with gkd.lmbda = 1; TRL: the stable `trl.DistillationTrainer` (on-policy only).
    Goal: ratio kdflow / TRL >= 1.5.
  * off-policy, lambda = 0: the dataset's answers, the teacher run live each step (no teacher cache).
    kdflow: `method: gkd` with gkd.lmbda = 0 (which is `method: kd` with the teacher online); TRL:
    `trl.experimental.gkd.GKDTrainer` with lmbda = 0, because `DistillationTrainer` has no off-policy
    mode (it always samples). Goal: ratio >= 1.3.

Same teacher (bundled SmolLM2-135M-Instruct, float32), same student (the demo's 10-layer pruned
copy), same WordNet rows (chat prompts; the prompt tokens are checked to be identical on both sides),
same batch (--batch, one micro-batch per step, no gradient accumulation), AdamW (adamw_torch_fused) at
lr 5e-5, constant schedule, no warm-up or weight decay, gradient clipping at 1.0, float32 (no bf16), no
gradient checkpointing (TRL's configs default it on: turned off), CPU. Sampling: temperature 1.0,
top_p 1.0, no top-k, at most --max-new-tokens (16) new tokens, a row stopping at its EOS (plain
transformers `generate()` in TRL, use_vllm = False). Divergence at temperature 1 over the answer
tokens: on-policy --onpolicy-divergence (default rkl: kdflow kd.divergence=rkl, TRL beta = 1, TRL's
own default; fkl: beta = 0), off-policy forward KL (kdflow fkl, TRL beta = 0), with kd.kd_weight = 1
(no CE term on kdflow's side; TRL's trainers have none).

Timing: a step's time runs from the end of the previous optimizer step (for the first, the start of
the epoch) to the end of this one, so it covers fetching the batch, sampling the answers (kdflow
samples in `get_batch_samples`, before the Trainer's on_step_begin; TRL in `training_step`), the
teacher, forward, backward and the optimizer. The first --warmup steps of each run are left out.
Tokens = answer tokens that enter the loss (kdflow: answer labels; TRL DistillationTrainer: its
completion mask; TRL GKDTrainer: labels != -100), so tokens/s = those tokens of the timed steps / their
time. Rounds alternate (kdflow, TRL, kdflow, TRL, for each mode) so load from other processes hits both;
the figure of each side is the median over rounds.

What cannot be matched exactly (printed too): the two sides draw different random samples, so
on-policy answer lengths differ a little (tokens/s normalises it; the mean per row is printed); TRL
ends a completion at any EOS id of the model's generation config as well as the tokenizer's, kdflow at
the tokenizer's (printed when they differ; for SmolLM2 they are the same); off-policy, TRL's
DataCollatorForChatML tokenises the answers itself and also trains on the newline the chat template puts
after <|im_end|>, one target per row more than kdflow's, which TRL's count includes (about 1 in 12
tokens: a small advantage to TRL in tokens/s; the mean answer tokens per row of each side are printed).
Needs the bench extra (`pip install -e ".[bench]"`, which `make bench` does).

    python bench/bench_onpolicy_vs_trl.py [--steps 4] [--rounds 2] [--batch 8] [--max-new-tokens 16]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import tempfile
import time

from common import TRAIN, demo_student, load_teacher_and_tokenizer, median

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

LR = 5e-5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="first steps of each run left out of the timing")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--onpolicy-divergence", choices=["rkl", "fkl"], default="rkl")
    ap.add_argument("--modes", default="on,off", help="on (lambda = 1), off (lambda = 0), or both: on,off")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from trl.experimental.utils import DataCollatorForChatML

    from kdflow.config import DataConfig, DistillConfig, load_config
    from kdflow.data import IGNORE_INDEX, Collator, ListDataset, encode_rows, read_rows, row_turns
    from kdflow.methods.gkd import make_gkd_trainer_class
    from kdflow.training import training_arguments

    teacher, tok = load_teacher_and_tokenizer()
    n = args.batch * args.steps
    rows = read_rows(str(TRAIN)).head(n)
    dcfg = DataConfig(max_length=args.max_length)
    examples = encode_rows(rows, tok, dcfg)
    turns = [row_turns(r, loc, dcfg) for r, loc in zip(rows.items, rows.locations)]
    prompts = datasets.Dataset.from_list([{"prompt": list(t.messages)} for t in turns])
    messages = datasets.Dataset.from_list(
        [{"messages": list(t.messages) + [{"role": "assistant", "content": t.response}]} for t in turns])
    base_student = demo_student(teacher)
    warmup = min(args.warmup, args.steps - 1)

    # The same prompt tokens on both sides (TRL applies the chat template to the prompt messages).
    same_prompts = all(
        tok.apply_chat_template(list(t.messages), add_generation_prompt=True, tokenize=True,
                                return_dict=True)["input_ids"] == e["input_ids"][:e["prompt_len"]]
        for t, e in zip(turns, examples))
    gen_eos = base_student.generation_config.eos_token_id
    gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
    trl_eos = sorted({tok.eos_token_id, *gen_eos})
    notes = []
    if not same_prompts:
        notes.append("the prompt tokens differ between kdflow's encoding and TRL's chat template")
    if trl_eos != [tok.eos_token_id]:
        notes.append(f"TRL stops sampling at token ids {trl_eos}, kdflow at {tok.eos_token_id} only")

    class Timed(TrainerCallback):
        """End of each optimizer step; the epoch's start opens the first interval."""

        def __init__(self):
            self.stamps = []

        def on_epoch_begin(self, a, state, control, **kw):
            if not self.stamps:
                self.stamps.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            self.stamps.append(time.perf_counter())

    def result(timer: Timed, tokens: list[int], rows_per_step: int) -> dict[str, float]:
        steps = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]
        t, k = steps[warmup:], tokens[warmup:len(steps)]
        per_row = sum(tokens[:len(steps)]) / (len(steps) * rows_per_step)
        return {"tps": sum(k) / sum(t), "step": median(t), "per_row": per_row}

    GKD = make_gkd_trainer_class()

    class CountedGKD(GKD):
        """kdflow's GKD trainer, recording the answer tokens (the KD targets) of each batch it trains on."""

        def answers(self, batch, step, micro):
            out = super().answers(batch, step, micro)
            self.bench_tokens.append(int((out["labels"] != IGNORE_INDEX).sum()))
            return out

    class CountedDistillation(DistillationTrainer):
        """TRL's DistillationTrainer, recording the completion tokens in the loss of each generated batch."""

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            self.bench_tokens.append(int(out["completion_mask"].sum()))
            return out

    class CountingCollator:
        def __init__(self, inner):
            self.inner, self.tokens = inner, []

        def __call__(self, batch):
            out = self.inner(batch)
            self.tokens.append(int((out["labels"] != -100).sum()))
            return out

    def run_kdflow(lmbda: float, divergence: str) -> dict[str, float]:
        cfg = load_config(DistillConfig, None, [
            "method=gkd", f"gkd.lmbda={lmbda}", f"gkd.max_new_tokens={args.max_new_tokens}", "gkd.temperature=1.0",
            "gkd.top_p=1.0", "kd.kd_weight=1.0", f"kd.divergence={divergence}", "kd.temperature=1.0",
            f"data.max_length={args.max_length}", f"train.batch_size={args.batch}", "train.grad_accum=1",
            f"train.max_steps={args.steps}", f"train.learning_rate={LR}", "train.lr_scheduler=constant",
            "train.warmup_ratio=0", "train.weight_decay=0", "train.max_grad_norm=1.0", "train.bf16=false",
            "train.gradient_checkpointing=false", "train.report_to=[none]", "train.save_steps=0",
            "train.logging_steps=1000"])
        targs = training_arguments(cfg.train, tempfile.mkdtemp(), cfg.seed, False, device=torch.device("cpu"))
        targs.disable_tqdm = True
        timer = Timed()
        trainer = CountedGKD(model=copy.deepcopy(base_student), args=targs, train_dataset=ListDataset(examples),
                             data_collator=Collator(tok.pad_token_id), cfg=cfg, teacher=teacher, vocab_size=len(tok),
                             callbacks=[timer], tokenizer=tok, rows=rows)
        trainer.bench_tokens = []
        trainer.train()
        expected = "student" if lmbda == 1 else "data"
        assert trainer.gkd_stats[expected] == args.steps, trainer.gkd_stats
        return result(timer, trainer.bench_tokens, args.batch)

    common_trl = dict(output_dir=None, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                      max_steps=args.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                      weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused", temperature=1.0, bf16=False,
                      fp16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
                      logging_steps=1000, disable_tqdm=True, use_cpu=True, seed=0)
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(DistillationConfig)}:
        common_trl["activation_checkpointing"] = False  # transformers 5.2x's name for it (the old one warns)

    def run_trl_onpolicy(beta: float) -> dict[str, float]:
        targs = DistillationConfig(**{**common_trl, "output_dir": tempfile.mkdtemp()}, beta=beta, top_p=1.0, top_k=0,
                                   max_completion_length=args.max_new_tokens, use_vllm=False)
        timer = Timed()
        trainer = CountedDistillation(model=copy.deepcopy(base_student), teacher_model=teacher, args=targs,
                                      train_dataset=prompts, processing_class=tok, callbacks=[timer])
        assert not targs.gradient_checkpointing
        trainer.bench_tokens = []
        trainer.train()
        return result(timer, trainer.bench_tokens, args.batch)

    def run_trl_offpolicy() -> dict[str, float]:
        targs = GKDConfig(**{**common_trl, "output_dir": tempfile.mkdtemp()}, lmbda=0.0, beta=0.0, seq_kd=False,
                          max_new_tokens=args.max_new_tokens, max_length=args.max_length)
        assert not targs.gradient_checkpointing
        timer = Timed()
        counter = CountingCollator(DataCollatorForChatML(tokenizer=tok, max_length=args.max_length))
        GKDTrainer(model=copy.deepcopy(base_student), teacher_model=teacher, args=targs, train_dataset=messages,
                   processing_class=tok, data_collator=counter, callbacks=[timer]).train()
        return result(timer, counter.tokens, args.batch)

    beta_on = {"rkl": 1.0, "fkl": 0.0}[args.onpolicy_divergence]
    runs = {
        "on": ("on-policy (lambda=1)", lambda: run_kdflow(1.0, args.onpolicy_divergence),
               lambda: run_trl_onpolicy(beta_on), "TRL DistillationTrainer", 1.5),
        "off": ("off-policy (lambda=0, teacher online)", lambda: run_kdflow(0.0, "fkl"), run_trl_offpolicy,
                "TRL GKDTrainer (experimental)", 1.3),
    }
    got = {m: ([], []) for m in modes}
    for r in range(args.rounds):
        for m in modes:
            title, ours, theirs, _, _ = runs[m]
            a, b = ours(), theirs()
            got[m][0].append(a)
            got[m][1].append(b)
            print(f"round {r + 1} {title}: kdflow {a['tps']:.0f} tokens/s ({a['step']:.2f} s/step), "
                  f"TRL {b['tps']:.0f} tokens/s ({b['step']:.2f} s/step)", flush=True)

    print()
    print(f"batch {args.batch}, {args.steps} steps per run ({warmup} untimed), {args.rounds} rounds, at most "
          f"{args.max_new_tokens} sampled tokens, on-policy divergence {args.onpolicy_divergence} "
          f"(TRL beta={beta_on:g}), off-policy fkl (beta=0), temperature 1, float32, CPU")
    for m in modes:
        title, _, _, trl_name, goal = runs[m]
        ours, theirs = got[m]
        a, b = median([x["tps"] for x in ours]), median([x["tps"] for x in theirs])
        pa, pb = median([x["per_row"] for x in ours]), median([x["per_row"] for x in theirs])
        print(f"{title}")
        print(f"  kdflow method=gkd                   {a:8.0f} tokens/s   ({pa:.1f} answer tokens/row)")
        print(f"  {trl_name:<36}{b:8.0f} tokens/s   ({pb:.1f} answer tokens/row)")
        print(f"  ratio kdflow / TRL                  {a / b:8.2f}   (goal >= {goal:g})")
    if "off" in modes:
        notes.append("off-policy, TRL's side is trl.experimental.gkd.GKDTrainer(lmbda=0): trl.DistillationTrainer "
                     "always samples its answers; TRL's collator also trains on the newline after <|im_end|> (one "
                     "token a row more, counted on its side)")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
