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
