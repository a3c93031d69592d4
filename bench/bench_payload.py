"""Benchmark: bytes per client per round of FedMKT's wire format against the reference format.

A FedMKT client sends the server its top-k log-probs at every answer position of the public set
and one CE per sample; the server sends its own back. Here a real client (SmolLM2-135M-Instruct
pruned to 10 of its 30 layers, as in configs/fedmkt_flower.yaml) computes them on 256 public
WordNet rows with the SmolLM2 tokenizer, and the same content is measured in two formats:

  kdflow     ids uint16, log-probs float16, tail log-mass float32, offsets int64, CE float32
             (`payload.encode`), in Flower ArrayRecords (`to_array_record`; + .npy headers)
  reference  the reference implementation's top-k logits and int64 ids as nested Python lists,
             serialised as text (`payload.reference_format_bytes`)

It also times encode + Flower records + validation on receipt (`from_array_record`), and checks
that the fp16 log-probs stay within 1e-3 of the float32 ones.

    python bench/bench_payload.py [--rows 256] [--k 128]
"""

from __future__ import annotations

import argparse
import time

from common import TRAIN, Timer, load_teacher_and_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--k", type=int, nargs="+", default=[128, 64])
    args = ap.parse_args()

    import numpy as np

    from kdflow.config import DataConfig, LoraSpec, PartyConfig, StudentSpec
    from kdflow.data import encode_rows, partition_rows, read_rows
    from kdflow.federated import payload as wire
    from kdflow.federated.fedmkt import make_party, public_outputs
    from kdflow.models import freeze, prune_layers

    teacher, tok = load_teacher_and_tokenizer()
    base = freeze(prune_layers(teacher, [0, 3, 6, 9, 12, 15, 18, 21, 24, 29]))
    spec = PartyConfig(name="c1", model=StudentSpec(init="prune_teacher", lora=LoraSpec(enabled=True)))
    client = make_party(spec, base, tok, seed=1)
    public, _ = partition_rows(read_rows(str(TRAIN)), args.rows, 2, args.rows, seed=0)
    client.public = encode_rows(public, tok, DataConfig(max_length=256))
    positions = client.positions()
    print(f"public set: {len(public)} WordNet rows, {sum(positions)} answer positions "
          f"({sum(positions) / len(positions):.1f} per row), vocabulary {client.vocab_size}")
    print()
    print("| k | kdflow arrays | in Flower records | reference (nested lists) | reference / kdflow | bytes per position "
          "| encode + records + validate | uint8 codes (fedmkt.wire_logprobs) | reference / uint8 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with Timer() as t_fwd:
        full = public_outputs(client, k=max(args.k), temperature=1.0, batch_size=16)
    wire.to_array_record(wire.encode(full, client.vocab_size))  # warm-up: imports Flower
    for k in sorted(args.k, reverse=True):
        # top-k of the top-max(k): the first k columns (sorted), the rest joins the tail mass
        lp = full.logp[:, :k]
        tail = np.log1p(-np.minimum(np.exp(np.logaddexp.reduce(lp.astype(np.float64), axis=1)), 1 - 1e-12))
        out = wire.PublicOutputs(full.ids[:, :k], lp, tail.astype(np.float32), full.offsets, full.ce)
        arrays = wire.encode(out, client.vocab_size)
        with Timer() as t_wire:
            record = wire.to_array_record(wire.encode(out, client.vocab_size))
            back = wire.from_array_record(record, sender="c1", vocab_size=client.vocab_size, k=k, positions=positions)
        ours = wire.nbytes(arrays)
        on_records = sum(len(a.data) for a in record.values())
        t0 = time.perf_counter()
        ref = wire.reference_format_bytes(out)
        t_ref = time.perf_counter() - t0
        assert np.array_equal(back.ids, out.ids)
        err = float(np.abs(np.where(np.isfinite(out.logp), back.logp - out.logp, 0)).max())
        assert err < 1e-3 * max(1.0, float(-out.logp[np.isfinite(out.logp)].min())), err
        coded = wire.encode(out, client.vocab_size, "uint8")
        back8 = wire.decode(coded, sender="c1", vocab_size=client.vocab_size, k=k, positions=positions, logp_format="uint8")
        fin = np.isfinite(out.logp)
        p_err = float(np.abs(np.exp(back8.logp[fin]) - np.exp(out.logp[fin].astype(np.float32))).max())
        print(f"| {k} | {ours:,} B | {on_records:,} B | {ref:,} B | {ref / ours:.1f}x | {ours / sum(positions):.0f} "
              f"| {t_wire.seconds * 1000:.0f} ms | {wire.nbytes(coded):,} B | {ref / wire.nbytes(coded):.1f}x |")
        print(f"<!-- k={k}: uint8 codes: max |p - p_decoded| {p_err:.2e} -->")
        print(f"<!-- k={k}: reference serialisation {t_ref:.2f} s; max |fp16 - fp32| log-prob error {err:.2e} -->")
    print(f"<!-- client forward over the public set: {t_fwd.seconds:.1f} s -->")
    print()
    print("Per client per round the same payload goes each way (client->server, then the server's own back), so a "
          "client moves twice the kdflow figure per round.")


if __name__ == "__main__":
    main()
