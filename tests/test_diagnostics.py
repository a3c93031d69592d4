"""The stall watch: why mode-seeking divergences stall on a collapsed student, and that kdflow says so."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdflow.diagnostics import find_stall, make_stall_watch, stall_advice, stall_message
from kdflow.losses import get_divergence, kd_sum


def _grad_norm(divergence: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[float, float]:
    z = student_logits.clone().requires_grad_(True)
    loss, _ = kd_sum(z, teacher_logits, get_divergence(divergence))
    loss.backward()
    return float(z.grad.norm()), float(loss.detach())


def test_mode_seeking_divergences_lose_their_gradient_on_a_collapsed_student():
    """A student with all its mass on one token (logit +30) that the teacher gives 0.5% gets almost
    no gradient from rkl / jsd / srkl, although its loss is large; fkl's gradient stays q − p."""
    torch.manual_seed(0)
    V = 50
    teacher = torch.randn(4, V)
    teacher[:, 7] = -float("inf")
    teacher[:, 7] = teacher.logsumexp(-1) + math.log(0.005 / 0.995)  # p(7) = 0.5%
    student = torch.zeros(4, V)
    student[:, 7] = 30.0
    for name in ("rkl", "jsd", "srkl"):
        g, loss = _grad_norm(name, student, teacher)
        assert g < 1e-6, (name, g)
        assert loss > 4 * 0.1  # the loss is far from its minimum (0) all the while
    g_rkl, loss_rkl = _grad_norm("rkl", student, teacher)
    assert loss_rkl / 4 == pytest.approx(-math.log(0.005), rel=1e-3)  # it sits at −log p(collapsed token)
    g_fkl, _ = _grad_norm("fkl", student, teacher)
    q = torch.softmax(student, -1)
    p = torch.softmax(teacher, -1)
    assert g_fkl == pytest.approx(float((q - p).norm()), rel=1e-4)  # the gradient of fkl is q − p, however saturated q is
    assert g_fkl > 1.0
    # a moderately confident student still gets a gradient from rkl: the stall is the saturation
    student[:, 7] = 3.0
    assert _grad_norm("rkl", student, teacher)[0] > 1e-2


def _history(norms: list[float]) -> list[dict]:
    return [{"step": 10 * (i + 1), "grad_norm": g, "loss": 5.0, "kd": 5.0} for i, g in enumerate(norms)] + [
        {"train_runtime": 1.0, "step": 10 * len(norms)}]


def test_find_stall_needs_a_long_stretch_of_near_zero_gradient():
    # reverse KL at seed 1 on antonyms: collapsed from step 20 on
    stall = find_stall(_history([22.4, 0.18] + [0.005] * 43))
    assert stall is not None and stall["from_step"] == 30 and stall["to_step"] == 450 and stall["logs"] == 43
    assert stall["largest_grad_norm"] == 0.005
    # reverse KL at seed 2 (its norms, logged every 10 steps): near zero but for one spike, to the end
    stall = find_stall(_history([7.6, 0.031, 0.028, 0.021, 0.011, 0.0065, 0.0035, 0.0029, 0.0024, 0.0094, 0.1228]
                                + [0.01, 0.03] * 17 + [0.004]))
    assert stall["from_step"] == 120 and stall["to_step"] == 460 and stall["logs"] == 35
    assert find_stall(_history([0.13] * 45)) is None  # the smallest norm a healthy antonym run logged
    # reverse KL at seed 0: two logs near zero, then it recovered — not a stall
    assert find_stall(_history([6.3, 0.09, 10.7, 0.0035, 0.0055, 4.2] + [5.0] * 40)) is None
    # the longest stretch is reported, not the first
    stall = find_stall(_history([1.0] + [0.001] * 5 + [1.0] + [0.002] * 8 + [1.0]))
    assert stall["from_step"] == 80 and stall["logs"] == 8
    assert find_stall(_history([float("nan")] * 10)) is None  # a NaN norm is not a small one
    assert find_stall([{"loss": 1.0, "step": 1}] * 10) is None  # nothing logged about gradients


def test_stall_watch_warns_once_with_what_to_do(capsys):
    advice = stall_advice("kd", "rkl", 1.0)
    assert "kd.kd_weight below 1" in advice and "fkl" in advice
    assert "kd_weight below 1" not in stall_advice("kd", "rkl", 0.5)  # already has a CE term
    assert "learning_rate" in stall_advice("kd", "fkl", 1.0)
    watch = make_stall_watch(advice)
    history: list[dict] = []
    state = SimpleNamespace(log_history=history, is_world_process_zero=True)
    for i, g in enumerate([20.0] + [0.003] * 8):
        history.append({"step": 10 * (i + 1), "grad_norm": g, "loss": 4.9})
        watch.on_log(None, state, None, logs=history[-1])
    out = capsys.readouterr().out
    assert out.count("WARNING: training stalled") == 1
    assert "steps 20–60" in out and "kd.kd_weight below 1" in out
    assert "steps 20–90" in stall_message(find_stall(history), advice)  # the report states the whole stretch


def test_unended_watch_warns_once_when_sampled_answers_stop_ending():
    from kdflow.diagnostics import UnendedWatch, unended_message

    w = UnendedWatch(window=4, share=0.9, after=0.5)
    assert [w.add(False, step=2, max_steps=10) for _ in range(4)] == [None] * 4  # all cut, but too early in the run
    assert w.add(True, step=5, max_steps=10) is None  # 3 of the last 4 cut: 75% < 90%
    assert [w.add(False, step=6, max_steps=10) for _ in range(4)] == [None, None, None, 1.0]  # the ended one leaves the window
    assert w.warned_at == 6
    assert w.add(False, step=7, max_steps=10) is None  # once
    mixed = UnendedWatch(window=4, share=0.9, after=0.0)
    assert [mixed.add(i % 2 == 0, step=9, max_steps=10) for i in range(8)] == [None] * 8
    msg = unended_message(1.0, 64, 120, 40, "rkl", 1.0)
    assert "gkd.max_new_tokens=40" in msg and "kd.kd_weight=0.9" in msg and "rkl" in msg and "\n" not in msg
    assert "kd.kd_weight=0.9" not in unended_message(0.95, 64, 120, 40, "rkl", 0.9)
    assert "gradient" not in unended_message(0.95, 64, 120, 40, "fkl", 1.0)
    assert "gkd.lmbda below 1" in unended_message(1.0, 64, 120, 40, "rkl", 0.9, lmbda=1.0)  # no dataset batches: no CE
