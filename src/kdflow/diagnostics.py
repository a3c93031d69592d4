"""Run-time diagnostics read from a run's own log history.

A stalled run: the gradient norm stays near zero for many logged steps while the loss stays where
it is. With mode-seeking divergences (rkl, jsd, srkl, tv) this is the student collapsing onto one
token. Their gradient with respect to the student's logits is weighted by the student's own
probabilities (for reverse KL, q_v (log q_v − log p_v − KL) at token v), so a student that puts
almost all of its mass on one token — a pruned student often starts confidently wrong — gets almost
no gradient and stays there; the loss it sits at is −log p(that token). Forward KL and CE keep a
gradient (q − p) however saturated the student is. Measured on antonyms (docs/results.md): reverse
KL at seed 1 put probability 0.999 on `<|im_end|>` at every answer position from step 20 to 450.
"""

from __future__ import annotations

from typing import Any

MODE_SEEKING = ("rkl", "jsd", "srkl", "tv")


def find_stall(history: list[dict[str, Any]], norm_below: float = 0.05, min_logs: int = 5) -> dict[str, Any] | None:
    """The longest stretch of consecutive training logs whose gradient norm is below `norm_below`,
    if it spans at least `min_logs` logs; None otherwise (or when no gradient norm is logged)."""
    best: list[dict[str, Any]] = []
    run: list[dict[str, Any]] = []
    for entry in history:
        if "grad_norm" not in entry:
            continue
        g = entry["grad_norm"]
        if g is not None and g == g and g < norm_below:
            run.append(entry)
            if len(run) > len(best):
                best = list(run)
        else:
            run = []
    if len(best) < min_logs:
        return None
    return {"from_step": best[0].get("step"), "to_step": best[-1].get("step"), "logs": len(best),
            "largest_grad_norm": max(e["grad_norm"] for e in best),
            "loss": best[-1].get("loss"), "norm_below": norm_below}


def stall_advice(method: str, divergence: str | None, kd_weight: float | None) -> str:
    """What to change, for the method and divergence that stalled."""
    if method == "kd" and divergence in MODE_SEEKING:
        ce = "" if kd_weight is not None and kd_weight < 1 else " set kd.kd_weight below 1 (e.g. 0.9) so the CE term keeps a gradient,"
        return (f"{divergence}'s gradient is weighted by the student's own probabilities, so a student collapsed "
                f"onto one token (often the end marker: empty answers) gets almost none and stays there;{ce} "
                "use kd.divergence=fkl, or start from an SFT student")
    return "the student may have saturated; lower train.learning_rate or raise train.warmup_ratio"


def stall_message(stall: dict[str, Any], advice: str) -> str:
    return (f"WARNING: training stalled: the gradient norm stayed below {stall['norm_below']:g} for "
            f"{stall['logs']} logged steps (steps {stall['from_step']}–{stall['to_step']}, loss "
            f"{stall['loss']:.3f}); {advice}")


def make_stall_watch(advice: str, norm_below: float = 0.05, min_logs: int = 5) -> Any:
    """A transformers callback that prints one warning the first time the run stalls."""
    from transformers import TrainerCallback

    class StallWatch(TrainerCallback):
        def __init__(self) -> None:
            self.warned = False

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if self.warned or not state.is_world_process_zero:
                return
            stall = find_stall(state.log_history, norm_below, min_logs)
            if stall is not None:
                self.warned = True
                print(f"[kdflow] {stall_message(stall, advice)}", flush=True)

    return StallWatch()


class UnendedWatch:
    """On-policy runs (method gkd): warns once when the answers the student samples have stopped
    ending — at least `share` of the last `window` sampled answers reached gkd.max_new_tokens
    without EOS — after the first `after` of the run (a fresh student rambles at first).

    Mode-seeking divergences meet the stall's mechanism from the other side here: once the student's
    EOS probability is near 0, reverse KL's gradient on it is near 0 however much the teacher wants
    to stop, and every sampled answer, cut without an end, scores the student where the teacher
    wants more words. Measured on the define task (docs/results.md): gkd with rkl from a pruned
    student sampled 1,652 of 1,656 answers to the 40-token limit and answered in loops ("a strong or
    strong or strong or ..."), where the teacher put 0.77 on EOS and the student 0.000.
    """

    def __init__(self, window: int = 64, share: float = 0.9, after: float = 0.25):
        from collections import deque

        self.recent: Any = deque(maxlen=window)
        self.share, self.after = share, after
        self.warned_at: int | None = None

    def add(self, ended: bool, step: int, max_steps: int) -> float | None:
        """Record one sampled answer; the share of unended answers the first time it crosses the
        threshold (the caller warns once), else None."""
        self.recent.append(bool(ended))
        if self.warned_at is not None or len(self.recent) < self.recent.maxlen or step < self.after * max_steps:
            return None
        unended = 1.0 - sum(self.recent) / len(self.recent)
        if unended < self.share:
            return None
        self.warned_at = step
        return unended


def unended_message(unended: float, window: int, step: int, max_new_tokens: int, divergence: str,
                    kd_weight: float, lmbda: float = 0.5) -> str:
    why = (f"with {divergence} a student whose end-of-answer probability is near 0 gets almost no gradient back "
           "towards it, however much the teacher wants to stop; " if divergence in MODE_SEEKING else "")
    keep_ce = "kd.kd_weight=0.9 so the dataset's batches keep a CE target on the end, "
    if lmbda >= 1:  # no dataset batches at all: CE needs some
        ce = "set gkd.lmbda below 1 (e.g. 0.5) and " + keep_ce
    else:
        ce = "" if kd_weight < 1 else "set " + keep_ce
    return (f"WARNING: {unended:.0%} of the last {window} answers the student sampled (step {step}) reached "
            f"gkd.max_new_tokens={max_new_tokens} without EOS: the student may have stopped ending its answers "
            f"(answers that loop). {why}{ce}start from an SFT student (student.init=pretrained), or use "
            "kd.divergence=fkl; raise gkd.max_new_tokens only if the task's answers are that long")
