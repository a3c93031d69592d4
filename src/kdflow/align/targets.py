"""Soft-label KD targets from a teacher whose tokenizer differs from the student's.

Each model renders the prompt with its own chat template (they may differ); the answer text is
the same for both. So only the answer is aligned, and cross-tokenizer KD covers answer tokens
only (`kd.token_scope=response`):

1. `CrossTokenizer.prepare` encodes every example a second time with the teacher's tokenizer
   and template, pairs each student KD row (the position predicting answer token j) with the
   teacher position that has read exactly the same answer text (or by DTW), and
   stores on the example: `teacher_input_ids` (the teacher's prompt + as much of its answer as
   the pairs need), `teacher_src` (teacher position per student KD row, -1 when unpaired) and
   `teacher_valid` (rows in the KD term). Done once, before training.
2. `CrossTokenizer.targets` runs the teacher on its own padded batch, takes its top-k at the
   paired positions (after the KD temperature), projects them into the student's vocabulary
   and returns `TopKTargets` whose rows match the student's KD rows — what `head_losses`
   consumes, online or written to the teacher cache.
3. `CrossTokenizer.carry_rows` does the same for top-k rows that arrive precomputed on the
   sender's own encoding of a row (FedMKT's payloads), without running any model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdflow.align.project import project_topk
from kdflow.align.sequence import PAIRING_VERSION, boundary_points, pair_by_dtw, pair_by_points
from kdflow.align.vocab import MAP_VERSION, MARKER, CanonicalVocab, vocab_maps
from kdflow.config import AlignConfig, DataConfig
from kdflow.data import IGNORE_INDEX, Encoder, ResponseEncoding, Rows, Turns, row_turns
from kdflow.losses import TopKTargets


@dataclass
class AlignStats:
    examples: int = 0
    positions: int = 0  # student KD rows
    paired: int = 0  # rows with a teacher position
    in_kd: int = 0  # rows in the KD term (paired, plus one-hot rows with unpaired=onehot_next)
    unaligned_examples: int = 0  # rows whose answer text could not be located in a template's rendering

    def summary(self) -> str:
        share = 100.0 * self.paired / max(self.positions, 1)
        text = (f"{self.paired} of {self.positions} student answer positions paired with a teacher position "
                f"({share:.1f}%), {self.in_kd} in the KD term")
        if self.unaligned_examples:
            text += f"; {self.unaligned_examples} rows had no locatable answer text and are left out of the KD term"
        return text


def _space_only(vocab: CanonicalVocab, ids: list[int]) -> list[bool]:
    out = []
    for i in ids:
        t = vocab.texts[i] if 0 <= i < len(vocab.texts) else ""
        out.append(bool(t) and not vocab.special[i] and t.replace(MARKER, " ").isspace())
    return out


def _dtw_strings(vocab: CanonicalVocab, ids: list[int], lowercase: bool) -> list[str]:
    eos = vocab.roles.get("eos")
    out = []
    for i in ids:
        t = "\x00eos" if i == eos else vocab.texts[i]  # both ends of the answer look alike to DTW
        out.append(t.lower() if lowercase else t)
    return out


def _assemble(paired: torch.Tensor, projected: tuple | None, next_tokens: torch.Tensor, valid: torch.Tensor,
              k: int) -> TopKTargets:
    """TopKTargets over all rows: projected teacher rows where paired; a one-hot on the row's own next
    token where unpaired but valid (unpaired=onehot_next) — never the current token; empty elsewhere."""
    N = paired.shape[0]
    out_ids = torch.full((N, k), -1, dtype=torch.long)
    out_lp = torch.full((N, k), -math.inf)
    out_tail = torch.zeros(N)
    if projected is not None:
        out_ids[paired], out_lp[paired], out_tail[paired] = projected
    onehot = valid & ~paired
    if bool(onehot.any()):
        out_ids[onehot, 0] = next_tokens[onehot]
        out_lp[onehot, 0] = 0.0
        out_tail[onehot] = -math.inf
    return TopKTargets(out_ids, out_lp, valid, out_tail)


class CrossTokenizer:
    """Alignment between one teacher tokenizer and one student tokenizer, for soft-label KD."""

    def __init__(self, teacher_tok: Any, student_tok: Any, data_cfg: DataConfig, align_cfg: AlignConfig):
        self.cfg = align_cfg
        self.data_cfg = data_cfg
        self.teacher_tok, self.student_tok = teacher_tok, student_tok
        maps = vocab_maps(teacher_tok, student_tok, use_cache=align_cfg.vocab_map_cache)
        self.maps = maps
        self.teacher_to_student = torch.from_numpy(maps.a_to_b.astype(np.int64))
        self.teacher_vocab, self.student_vocab = maps.vocab_a, maps.vocab_b
        self.teacher_enc = Encoder(teacher_tok, data_cfg)
        self.student_enc = Encoder(student_tok, data_cfg)
        self.pad_id = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else teacher_tok.eos_token_id

    # -- per example, once

    def pair_tokens(self, student: ResponseEncoding, teacher: ResponseEncoding, answer: str) -> np.ndarray | None:
        """Student answer token j -> teacher answer token k (or -1); None when the answer cannot be located."""
        if self.cfg.sequence == "dtw":
            low = self.teacher_vocab.scheme.lowercase or self.student_vocab.scheme.lowercase
            return pair_by_dtw(_dtw_strings(self.student_vocab, student.ids, low),
                               _dtw_strings(self.teacher_vocab, teacher.ids, low))
        shared = answer
        o_s, o_t = student.text.find(shared), teacher.text.find(shared)
        if o_s < 0 or o_t < 0:  # a template that trims the answer
            shared = answer.strip()
            o_s, o_t = student.text.find(shared), teacher.text.find(shared)
            if o_s < 0 or o_t < 0 or not shared:
                return None
        ps = boundary_points(student.spans, student.text, _space_only(self.student_vocab, student.ids), o_s, len(shared))
        pt = boundary_points(teacher.spans, teacher.text, _space_only(self.teacher_vocab, teacher.ids), o_t, len(shared))
        return pair_by_points(ps, pt)

    def pair_example(self, turns: Turns, example: dict[str, Any]) -> tuple[list[int], list[int], list[bool], bool]:
        """(teacher input ids, teacher position per student KD row, rows in the KD term, answer located)."""
        offsets = self.cfg.sequence == "offsets"
        s = self.student_enc.response_encoding(turns, spans=offsets)
        t = self.teacher_enc.response_encoding(turns, spans=offsets)
        t_prompt = self.teacher_enc.prompt_ids(turns)
        P_s = example["prompt_len"]
        n = len(example["input_ids"]) - P_s  # answer tokens the student keeps (cut at data.max_length)
        if example["input_ids"][P_s:] != s.ids[:n]:
            raise RuntimeError("the example's answer tokens differ from its re-encoding; was it encoded with "
                               "another tokenizer or data settings?")
        pairs = self.pair_tokens(s, t, turns.response)
        located = pairs is not None
        pairs = pairs[:n] if located else np.full(n, -1, dtype=np.int64)
        P_t = len(t_prompt)
        # student KD row j is the position predicting answer token j; its teacher counterpart is the
        # position predicting teacher answer token k, i.e. teacher position P_t + k - 1
        src = [P_t + int(k) - 1 if k >= 0 and P_t + k >= 1 else -1 for k in pairs]
        # the teacher reads its prompt and its answer up to the last token a pair predicts (included, so
        # that the predicting position is never the sequence's last, which models score for nothing)
        last = max((int(k) for k in pairs if k >= 0), default=-1)
        teacher_ids = t_prompt + t.ids[:last + 1]
        if self.cfg.unpaired == "onehot_next":
            valid = [True] * n
        else:
            valid = [p >= 0 for p in src]
        return teacher_ids, src, valid, located

    def prepare(self, examples: list[dict[str, Any]], rows: Rows) -> AlignStats:
        """Attach teacher_input_ids / teacher_src / teacher_valid to each (student-encoded) example."""
        stats = AlignStats()
        for e in examples:
            i = e["row_index"]
            turns = row_turns(rows.items[i], rows.locations[i], self.data_cfg)
            src, valid, located = self.attach(e, turns)
            stats.examples += 1
            stats.positions += len(src)
            stats.paired += sum(1 for p in src if p >= 0)
            stats.in_kd += sum(valid)
            stats.unaligned_examples += 0 if located else 1
        return stats

    def attach(self, example: dict[str, Any], turns: Turns) -> tuple[list[int], list[bool], bool]:
        """Attach teacher_input_ids / teacher_src / teacher_valid to one example whose answer is turns.response
        (a dataset row, or an answer sampled during training)."""
        teacher_ids, src, valid, located = self.pair_example(turns, example)
        example["teacher_input_ids"] = teacher_ids
        example["teacher_src"] = torch.tensor(src, dtype=torch.long)
        example["teacher_valid"] = torch.tensor(valid, dtype=torch.bool)
        return src, valid, located

    # -- per batch

    @torch.no_grad()
    def targets(self, teacher: Any, batch: dict[str, Any], k: int, temperature: float) -> TopKTargets:
        """Projected teacher top-k at the student's KD rows of a collated batch (row-major order)."""
        from kdflow.models import input_device, selected_hidden
        from kdflow.teacher_cache import topk_from_logits

        # built on the CPU (the batch may already sit on an accelerator), returned where the labels are
        out_device = batch["labels"].device
        labels = batch["labels"].cpu()
        next_tokens = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
        srcs = [s.cpu() for s in batch["teacher_src"]]
        src = torch.cat(srcs) if srcs else torch.zeros(0, dtype=torch.long)
        valid = torch.cat([v.cpu() for v in batch["teacher_valid"]]) if srcs else torch.zeros(0, dtype=torch.bool)
        if src.numel() != next_tokens.numel():
            raise ValueError(f"cross-tokenizer batch has {src.numel()} aligned rows for {next_tokens.numel()} KD rows")
        k_eff = min(k, len(self.teacher_to_student))
        owner = torch.cat([torch.full((len(s),), b, dtype=torch.long) for b, s in enumerate(srcs)]) if srcs else src
        paired = src >= 0
        projected = None
        if bool(paired.any()):
            seqs = batch["teacher_input_ids"]
            W = max(len(x) for x in seqs)
            device = input_device(teacher)
            ids = torch.full((len(seqs), W), self.pad_id, dtype=torch.long)
            attn = torch.zeros((len(seqs), W), dtype=torch.long)
            for b, x in enumerate(seqs):
                ids[b, :len(x)] = torch.tensor(x, dtype=torch.long)
                attn[b, :len(x)] = 1
            where = torch.zeros((len(seqs), W - 1), dtype=torch.bool)
            where[owner[paired], src[paired]] = True
            hidden, head = selected_hidden(teacher, ids.to(device), attn.to(device), where.to(device))
            V = len(self.teacher_to_student)
            logits = torch.cat([head(hidden[s:s + 512])[..., :V].float().cpu() for s in range(0, hidden.shape[0], 512)])
            t_ids, t_lp, t_tail = topk_from_logits(logits, k_eff, temperature)
            row_of = (torch.cumsum(where.flatten().long(), 0) - 1).view(where.shape)
            rows = row_of[owner[paired], src[paired]]
            projected = project_topk(t_ids[rows], t_lp[rows], self.teacher_to_student, t_tail[rows])
        out = _assemble(paired, projected, next_tokens, valid, k_eff)
        return TopKTargets(*(x.to(out_device) for x in (out.ids, out.logp, out.valid, out.tail_logp)))

    def carry_rows(self, turns: Turns, student_example: dict[str, Any], teacher_example: dict[str, Any],
                   ids: torch.Tensor, logp: torch.Tensor, tail_logp: torch.Tensor | None = None) -> TopKTargets:
        """Top-k rows the teacher side computed on its own encoding of a row -> the student's rows.

        For distributions that arrive precomputed (FedMKT's payloads): row k of `ids`/`logp` is the
        sender's position predicting its answer token k, as `teacher_example` (the row encoded by the
        sender's tokenizer and template) has it. Returns one row per student answer token, projected
        into the student's vocabulary, with `valid` as `unpaired` says.
        """
        offsets = self.cfg.sequence == "offsets"
        s = self.student_enc.response_encoding(turns, spans=offsets)
        t = self.teacher_enc.response_encoding(turns, spans=offsets)
        n = len(student_example["input_ids"]) - student_example["prompt_len"]
        m = len(teacher_example["input_ids"]) - teacher_example["prompt_len"]
        if teacher_example["input_ids"][teacher_example["prompt_len"]:] != t.ids[:m] or ids.shape[0] != m:
            raise ValueError(f"teacher rows ({ids.shape[0]}) do not match the teacher's encoding of the row ({m} answer tokens)")
        pairs = self.pair_tokens(s, t, turns.response)
        pairs = torch.from_numpy(pairs[:n] if pairs is not None else np.full(n, -1, dtype=np.int64))
        pairs[pairs >= m] = -1  # the teacher's answer was cut earlier than the student's
        paired = pairs >= 0
        projected = None
        if bool(paired.any()):
            k = pairs[paired]
            projected = project_topk(ids[k], logp[k], self.teacher_to_student, None if tail_logp is None else tail_logp[k])
        answer = torch.tensor(student_example["input_ids"][student_example["prompt_len"]:], dtype=torch.long)
        valid = torch.ones(n, dtype=torch.bool) if self.cfg.unpaired == "onehot_next" else paired
        return _assemble(paired, projected, answer, valid, ids.shape[1])

    def cache_compute(self, teacher: Any, k: int, temperature: float):
        """The per-batch function `teacher_cache.build_cache` calls: one dict of targets per example."""

        def compute(batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
            t = self.targets(teacher, batch, k, temperature)
            out, start = [], 0
            for s in batch["teacher_src"]:
                n = len(s)
                out.append({"ids": t.ids[start:start + n], "logp": t.logp[start:start + n],
                            "tail_logp": t.tail_logp[start:start + n], "valid": t.valid[start:start + n]})
                start += n
            return out

        return compute

    def key(self) -> dict[str, Any]:
        """What a cached target depends on beyond the usual manifest fields (teacher_cache.manifest_key)."""
        return {"sequence": self.cfg.sequence, "unpaired": self.cfg.unpaired, "vocab_map_version": MAP_VERSION,
                "pairing_version": PAIRING_VERSION,
                "teacher_vocab": self.teacher_vocab.digest(), "student_vocab": self.student_vocab.digest()}
