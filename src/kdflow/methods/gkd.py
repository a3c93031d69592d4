"""`kdflow distill` with `method: gkd`: on-policy distillation (methods.md §9; Agarwal et al., GKD).

Per batch, with probability gkd.lmbda the answers are sampled from the student now (no gradient
through the sampling); otherwise the dataset's answers are used, or with gkd.seq_kd answers the
teacher samples now. The loss is the per-token divergence kd.divergence (fkl, rkl, jsd with
0 < beta < 1, ...) between teacher and student over the answer positions of those sequences, from
losses.py with the (sum, count) contract, the teacher scoring the same tokens in the training forward
(once per sequence, not per sampled token). With gkd.lmbda = 0 this is `method: kd` exactly.

The source of every batch and every sampled token is a function of (seed, optimizer step,
micro-batch, row): a resumed run draws what the uninterrupted one drew, and a row's answer does not
depend on the rows it is batched with. The batches of a step are replaced before their tokens are
counted, so the step-level normalisation (training.TokenNormalizedTrainer) counts the sampled tokens.

Across tokenizers the student's sampled answer is decoded to text, re-encoded (the student's
canonical tokens of that text, which the teacher's tokens are aligned to) and aligned with the
teacher's tokenisation of the same text by kdflow.align, as for `method: kd`.
"""

from __future__ import annotations

from typing import Any

import torch

from kdflow.config import DistillConfig
from kdflow.data import IGNORE_INDEX, Encoder, Rows, Turns, collate, left_pad, row_turns
from kdflow.diagnostics import UnendedWatch, unended_message
from kdflow.errors import ConfigError

SOURCES = ("student", "teacher", "data")


def check_gkd(cfg: DistillConfig, cross: Any) -> None:
    """gkd settings that cannot work, refused before training starts."""
    if cfg.teacher_cache.dir:
        raise ConfigError("method=gkd scores the student's own answers, which a teacher cache built beforehand does not "
                          "hold: remove teacher_cache.dir (the teacher runs online, or behind teacher.server)")
    if cfg.gkd.seq_kd and cross is not None:
        raise ConfigError("gkd.seq_kd=true with a teacher whose tokenizer differs from the student's is not supported: "
                          "set gkd.seq_kd=false, or use method=seqkd for the teacher's answers")


def _seed(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p) + 1) % (2**63 - 1)
    return h


def choose_source(seed: int, step: int, micro: int, lmbda: float, seq_kd: bool) -> str:
    """Where micro-batch `micro` of optimizer step `step` takes its answers from (seeded coin)."""
    u = float(torch.rand((), generator=torch.Generator().manual_seed(_seed(seed, step, micro, 17))))
    if u < lmbda:  # u in [0, 1): lmbda = 1 always samples, lmbda = 0 never
        return "student"
    return "teacher" if seq_kd else "data"


def batch_prompts(batch: dict[str, Any]) -> list[list[int]]:
    """Each row's prompt: its tokens before the first answer target."""
    out = []
    for ids, labels, att in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        target = (labels != IGNORE_INDEX).nonzero()
        p = int(target[0]) if len(target) else int(att.sum())
        out.append(ids[:p].tolist())
    return out


def make_gkd_trainer_class() -> type:
    from kdflow.methods.kd import make_distill_trainer_class
    from kdflow.rollout import student_sample

    Base = make_distill_trainer_class()

    class GKDTrainer(Base):
        """DistillTrainer whose training batches are replaced, before their tokens are counted, by
        sequences whose answers the student (or the teacher) samples now."""

        def __init__(self, *args: Any, tokenizer: Any, rows: Rows, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.tok = tokenizer
            self.rows = rows
            self.encoder = Encoder(tokenizer, self.cfg.data)
            self.gkd_stats = {**{s: 0 for s in SOURCES}, "sampled_answers": 0, "cut_answers": 0, "sampled_tokens": 0,
                              "unended_warning_step": None}
            self.unended = UnendedWatch()

        # -- the step's batches
        def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
            step = self.state.global_step
            sourced = (self.answers(b, step, i) for i, b in enumerate(epoch_iterator))
            return super().get_batch_samples(sourced, num_batches, device)

        def answers(self, batch: dict[str, Any], step: int, micro: int) -> dict[str, Any]:
            g = self.cfg.gkd
            source = choose_source(self.cfg.seed, step, micro, g.lmbda, g.seq_kd)
            self.gkd_stats[source] += 1
            if source == "data":
                return batch
            model = self.model if source == "student" else self.teacher
            prompts = batch_prompts(batch)
            ids, mask = left_pad(prompts, self.tok.pad_token_id)
            rows = batch["row_index"].tolist()
            gens = [torch.Generator().manual_seed(_seed(self.cfg.seed, step, micro, r, SOURCES.index(source)))
                    for r in rows]
            out = student_sample(model, ids, mask, max_new_tokens=g.max_new_tokens, eos_id=self.tok.eos_token_id,
                                 pad_id=self.tok.pad_token_id, vocab_size=self.spec.vocab_size,
                                 temperature=g.temperature, top_p=g.top_p, generator=gens, bf16=self.args.bf16)
            examples = []
            for b, (prompt, r) in enumerate(zip(prompts, rows)):
                answer = out.response_ids[b][out.response_mask[b]].tolist()
                ended = bool(answer) and answer[-1] == self.tok.eos_token_id
                self.gkd_stats["sampled_answers"] += 1
                self.gkd_stats["cut_answers"] += 0 if ended else 1
                if source == "student":
                    self.watch_ending(ended, step)
                examples.append(self._example(prompt, answer, ended, r))
            self.gkd_stats["sampled_tokens"] += sum(len(e["input_ids"]) - e["prompt_len"] for e in examples)
            new = collate(examples, self.tok.pad_token_id)
            new["kdflow_source"] = source
            return new

        def watch_ending(self, ended: bool, step: int) -> None:
            unended = self.unended.add(ended, step, self.state.max_steps or self.args.max_steps)
            if unended is None:
                return
            self.gkd_stats["unended_warning_step"] = step
            if self.is_world_process_zero():
                kd = self.cfg.kd
                print("[kdflow] " + unended_message(unended, self.unended.recent.maxlen, step, self.cfg.gkd.max_new_tokens,
                                                    kd.divergence, kd.kd_weight, self.cfg.gkd.lmbda), flush=True)

        def _example(self, prompt: list[int], answer: list[int], ended: bool, row: int) -> dict[str, Any]:
            limit = self.cfg.data.max_length
            if self.cross is None:
                # the sampled tokens themselves; an answer cut at max_new_tokens (or data.max_length) ends
                # without EOS, so no target teaches the student to stop there
                r = answer[:max(limit - len(prompt), 0)]
                return {"input_ids": prompt + r, "labels": [IGNORE_INDEX] * len(prompt) + r, "prompt_len": len(prompt),
                        "row_index": row}
            # Across tokenizers: the answer as text, which both tokenizers read (kdflow.align pairs positions)
            text = self.tok.decode(answer[:-1] if ended else answer, skip_special_tokens=True)
            base = row_turns(self.rows.items[row], self.rows.locations[row], self.cfg.data)
            turns = Turns(base.messages, text)
            p = self.encoder.prompt_ids(turns)
            r = self.encoder.response_ids(turns, ended)[:max(limit - len(p), 0)]
            e = {"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r, "prompt_len": len(p), "row_index": row}
            self.cross.attach(e, turns)
            return e

        # -- the loss: no CE target on answers nobody wrote as the reference
        def count_tokens(self, batch: dict[str, Any]) -> dict[str, int]:
            counts = super().count_tokens(batch)
            if batch.get("kdflow_source", "data") != "data":
                counts["ce"] = 0
            return counts

        def loss_sums(self, model: Any, inputs: dict[str, Any]) -> dict[str, tuple[torch.Tensor, int]]:
            sums = super().loss_sums(model, inputs)
            if inputs.get("kdflow_source", "data") != "data" and "ce" in sums:
                sums["ce"] = (sums["ce"][0] * 0.0, 0)
            return sums

    return GKDTrainer
