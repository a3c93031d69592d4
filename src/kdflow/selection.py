"""Which sender's distribution a receiver distils towards, per sample (pure functions).

Shared by FedMKT (senders = parties) and multi-teacher KD (senders = teachers, the receiver's CE
set to +inf so that the best teacher is always taken); methods do not import `kdflow.federated`.

Every function takes per-sample cross-entropies (mean over answer tokens, float32) and returns,
per sample, what the KD target is:
    choice[n] = j >= 0   use sender j's distribution
    choice[n] = -1       no KD term for this sample
    choice[n] = -2       use the receiver's own earlier distribution (the reference code's rule)
`weighted` returns mixture weights instead.
"""

from __future__ import annotations

import numpy as np

OWN = -2
SKIP = -1


def _check(receiver_ce: np.ndarray, sender_ce: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    receiver_ce = np.asarray(receiver_ce, dtype=np.float32)
    sender_ce = np.asarray(sender_ce, dtype=np.float32)
    if sender_ce.ndim == 1:
        sender_ce = sender_ce[None]
    if sender_ce.shape[1] != receiver_ce.shape[0]:
        raise ValueError(f"senders report CE for {sender_ce.shape[1]} samples, the receiver for {receiver_ce.shape[0]}")
    if not (np.isfinite(receiver_ce).all() and np.isfinite(sender_ce).all()):
        raise ValueError("per-sample cross-entropies must be finite")
    return receiver_ce, sender_ce


def dualmince(receiver_ce: np.ndarray, sender_ce: np.ndarray) -> np.ndarray:
    """FedMKT's DualMinCE: the sender with the lowest CE, kept only if it beats the receiver.

    Compared in float32 with a strict `<`: a tie keeps the receiver as it is (the reference
    compares in bf16, where near-ties become ties, and then distils anyway).
    """
    receiver_ce, sender_ce = _check(receiver_ce, sender_ce)
    best = sender_ce.argmin(0)
    best_ce = sender_ce[best, np.arange(sender_ce.shape[1])]
    return np.where(best_ce < receiver_ce, best, SKIP).astype(np.int64)


def reference_rule(receiver_ce: np.ndarray, sender_ce: np.ndarray) -> np.ndarray:
    """The reference code: as DualMinCE, but an unselected sample distils towards the receiver's own
    earlier distribution instead of leaving the KD term."""
    choice = dualmince(receiver_ce, sender_ce)
    return np.where(choice == SKIP, OWN, choice)


def no_selection(receiver_ce: np.ndarray, sender_ce: np.ndarray) -> np.ndarray:
    """Every sample distils towards the best sender, better than the receiver or not."""
    _, sender_ce = _check(receiver_ce, sender_ce)
    return sender_ce.argmin(0).astype(np.int64)


def weighted(receiver_ce: np.ndarray, sender_ce: np.ndarray, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Soft selection: (mixture weights over senders [K, N], KD weight per sample [N]).

    Senders are mixed with weights softmax(-CE / temperature); the sample's KD term is weighted by
    the chance the mixture beats the receiver, sigmoid((CE_receiver - CE_mix) / temperature).
    """
    receiver_ce, sender_ce = _check(receiver_ce, sender_ce)
    z = -sender_ce / temperature
    z = z - z.max(0, keepdims=True)
    w = np.exp(z)
    w = w / w.sum(0, keepdims=True)
    mix_ce = (w * sender_ce).sum(0)
    sample_weight = 1.0 / (1.0 + np.exp(-(receiver_ce - mix_ce) / temperature))
    return w.astype(np.float32), sample_weight.astype(np.float32)


SELECTIONS = {"dualmince": dualmince, "reference": reference_rule, "none": no_selection}
