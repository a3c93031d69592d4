"""Teacher cache: round trip, resume after interruption, manifest checks, training from it."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from kdflow.cli import main
from kdflow.config import DataConfig
from kdflow.data import encode_rows, read_rows
from kdflow.errors import DataError
from kdflow.teacher_cache import TeacherCache, build_cache, manifest_key, same_tokenizer_targets, topk_from_logits

from conftest import tiny_llama


def key(**over):
    base = dict(teacher="t@1", teacher_tokenizer="a", student_tokenizer="a", data="d", data_settings={"max_length": 256},
                k=8, temperature=2.0, token_scope="response", logp_dtype="float16", store_tail=True)
    base.update(over)
    return manifest_key(**base)


@pytest.fixture()
def setup(bpe_tok, tiny_data):
    examples = encode_rows(read_rows(str(tiny_data["train"])).head(10), bpe_tok, DataConfig())
    teacher = tiny_llama(bpe_tok, layers=2, hidden=32, seed=7).eval()
    compute = same_tokenizer_targets(teacher, len(bpe_tok), 8, 2.0, "response")
    return examples, teacher, compute


def test_topk_from_logits_keeps_the_exact_tail():
    logits = torch.randn(5, 50) * 3
    ids, lp, tail = topk_from_logits(logits, 6, 2.0)
    full = F.log_softmax(logits / 2.0, -1)
    assert torch.equal(ids, full.topk(6).indices)
    assert torch.allclose(lp, full.topk(6).values)
    assert torch.allclose(torch.logsumexp(torch.cat([lp, tail[:, None]], -1), -1), torch.zeros(5), atol=1e-6)


def test_round_trip_matches_the_teacher(tmp_path, bpe_tok, setup):
    examples, teacher, compute = setup
    manifest = build_cache(tmp_path / "c", key(), examples, bpe_tok.pad_token_id, compute, batch_size=3, shard_size=4,
                           vocab_size=len(bpe_tok), progress=False)
    assert manifest["complete"] and [s["examples"] for s in manifest["shards"]] == [4, 4, 2]
    loaded = TeacherCache(tmp_path / "c", key()).load(verify=True)
    for e in examples:
        ids = torch.tensor([e["input_ids"]])
        with torch.no_grad():
            logits = teacher(ids).logits[0, :-1]
        resp = torch.tensor(e["labels"][1:]) != -100
        ref_ids, ref_lp, ref_tail = topk_from_logits(logits[resp], 8, 2.0)
        got = loaded[e["row_index"]]
        assert torch.equal(got["ids"], ref_ids)
        assert torch.allclose(got["logp"], ref_lp, atol=2e-2, rtol=2e-3)  # float16 storage
        assert torch.allclose(got["tail_logp"], ref_tail, atol=1e-5)
    # storage: uint16 ids + float16 log-probs + float32 tail = 2k + 2k + 4 bytes per position, plus small headers
    per_pos = manifest["bytes_per_position"]
    assert 4 * 8 + 4 <= per_pos < 4 * 8 + 4 + 60


def test_interrupted_build_resumes_from_the_last_complete_shard(tmp_path, bpe_tok, setup):
    examples, _, compute = setup
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 3:  # dies inside the second shard
            raise KeyboardInterrupt
        return compute(batch)

    with pytest.raises(KeyboardInterrupt):
        build_cache(tmp_path / "c", key(), examples, bpe_tok.pad_token_id, flaky, batch_size=2, shard_size=4,
                    vocab_size=len(bpe_tok), progress=False)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert not m["complete"] and len(m["shards"]) == 1
    assert not list((tmp_path / "c").glob("*.tmp"))
    with pytest.raises(DataError, match="incomplete \\(4 of 10 examples\\)"):
        TeacherCache(tmp_path / "c", key())
    calls["n"] = 100
    seen = []
    counting = lambda batch: (seen.append(batch["row_index"].tolist()), compute(batch))[1]
    build_cache(tmp_path / "c", key(), examples, bpe_tok.pad_token_id, counting, batch_size=2, shard_size=4,
                vocab_size=len(bpe_tok), progress=False)
    assert sum(seen, [])[0] == 4  # the first shard was not recomputed
    build_cache(tmp_path / "ref", key(), examples, bpe_tok.pad_token_id, compute, batch_size=2, shard_size=4,
                vocab_size=len(bpe_tok), progress=False)
    a = TeacherCache(tmp_path / "c", key()).load()
    b = TeacherCache(tmp_path / "ref", key()).load()
    for r in b:
        assert torch.equal(a[r]["ids"], b[r]["ids"]) and torch.equal(a[r]["logp"], b[r]["logp"])


def test_a_cache_built_with_other_settings_is_refused(tmp_path, bpe_tok, setup):
    examples, _, compute = setup
    build_cache(tmp_path / "c", key(), examples[:2], bpe_tok.pad_token_id, compute, vocab_size=len(bpe_tok), progress=False)
    with pytest.raises(DataError, match=r"does not match this run \(temperature: cache 2.0 vs run 1.0\)"):
        TeacherCache(tmp_path / "c", key(temperature=1.0))
    with pytest.raises(DataError, match=r"\(data, k differ\)"):
        build_cache(tmp_path / "c", key(k=4, data="other"), examples[:2], bpe_tok.pad_token_id, compute, progress=False)
    with pytest.raises(DataError, match="no teacher cache at"):
        TeacherCache(tmp_path / "none", key())


def test_distill_from_the_cache_never_loads_the_teacher(tmp_path, tiny_dirs, tiny_data, monkeypatch, capsys):
    import kdflow.methods.kd as kd

    cache = tmp_path / "cache"
    common = [f"teacher.name={tiny_dirs['teacher']}", f"student.name={tiny_dirs['student']}",
              f"data.train={tiny_data['train']}", f"teacher_cache.dir={cache}", "teacher_cache.k=16",
              "teacher_cache.shard_size=20", "kd.temperature=2.0"]
    assert main(["cache-teacher", *common]) == 0
    assert "bytes per position" in capsys.readouterr().out
    loaded = []
    real_load = kd.load_model
    monkeypatch.setattr(kd, "load_model", lambda spec: loaded.append(spec.name) or real_load(spec))
    out = tmp_path / "run"
    rc = main(["distill", *common, f"output_dir={out}", "train.max_steps=3", "train.batch_size=4",
               "train.report_to=[none]", "train.logging_steps=1", "evaluate_teacher=false", "evaluate_before=false"])
    assert rc == 0
    assert str(tiny_dirs["teacher"]) not in loaded
    hist = json.loads((out / "log_history.json").read_text())
    assert all(h["kd"] > 0 for h in hist if "kd" in h)
    # a different KD temperature does not match the cache: refused, not silently used
    rc = main(["distill", *common[:-1], "kd.temperature=1.0", f"output_dir={tmp_path / 'run2'}", "train.max_steps=1",
               "train.report_to=[none]"])
    assert rc == 2 and "temperature: cache 2.0 vs run 1.0" in capsys.readouterr().err


def test_full_vocabulary_cache_gives_the_online_kd_loss(tmp_path, bpe_tok, tiny_dirs, tiny_data):
    """k = |V| with the exact tail: the cached KD term equals the online dense one (to float16)."""
    from kdflow.config import DistillConfig, load_config
    from kdflow.data import Collator
    from kdflow.losses import shifted_masks
    from kdflow.methods.kd import make_distill_trainer_class
    from kdflow.models import freeze, load_model
    from kdflow.config import ModelSpec
    from kdflow.training import training_arguments

    examples = encode_rows(read_rows(str(tiny_data["train"])).head(6), bpe_tok, DataConfig())
    teacher = freeze(load_model(ModelSpec(name=str(tiny_dirs["teacher"]))))
    student = load_model(ModelSpec(name=str(tiny_dirs["student"])))
    V = len(bpe_tok)
    compute = same_tokenizer_targets(teacher, V, V, 2.0, "response")
    build_cache(tmp_path / "c", key(k=V), examples, bpe_tok.pad_token_id, compute, vocab_size=V, progress=False)
    TeacherCache(tmp_path / "c", key(k=V)).attach(examples, "response")
    cfg = load_config(DistillConfig, None, ["kd.temperature=2.0", "kd.divergence=fkl", "train.report_to=[none]"])
    Trainer = make_distill_trainer_class()
    args = training_arguments(cfg.train, tmp_path / "t", 0, False)
    batch = Collator(bpe_tok.pad_token_id)(examples)
    online = Trainer(model=student, args=args, cfg=cfg, teacher=teacher, vocab_size=V).loss_sums(student, batch)
    cached = Trainer(model=student, args=args, cfg=cfg, teacher=None, vocab_size=V).loss_sums(student, batch)
    assert online["kd"][1] == cached["kd"][1] == int(shifted_masks(batch["labels"], batch["attention_mask"])[1].sum())
    assert torch.allclose(online["kd"][0], cached["kd"][0], rtol=2e-3)
    assert torch.allclose(online["ce"][0], cached["ce"][0])


# ----------------------------------------------------------------------------------------------
# A damaged cache is refused in one line naming the shard (issue 14, item 10)


def _rewrite_shard(folder, change):
    """Apply `change` to shard 0's arrays and record the new file's checksum and size, as a cache
    damaged before its manifest was written (or a hand-made one) would look."""
    import hashlib

    from safetensors.torch import load_file, save_file

    manifest = json.loads((folder / "manifest.json").read_text())
    path = folder / manifest["shards"][0]["file"]
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))
    manifest["shards"][0].update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(), bytes=path.stat().st_size)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture()
def built(tmp_path, bpe_tok, setup):
    examples, _, compute = setup
    build_cache(tmp_path / "c", key(), examples[:4], bpe_tok.pad_token_id, compute, shard_size=2,
                vocab_size=len(bpe_tok), progress=False)
    return tmp_path / "c", len(bpe_tok)


def test_a_flipped_byte_is_found_by_the_checksum(built):
    folder, vocab = built
    path = folder / "shard-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the log-probs: the file still parses
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-00001.safetensors is damaged \(its checksum differs"):
        TeacherCache(folder, key()).load()


def test_a_cut_shard_is_refused_when_the_cache_is_opened(built):
    folder, vocab = built
    path = folder / "shard-00000.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"shard-00000.safetensors has \d+ bytes, the manifest says"):
        TeacherCache(folder, key())


@pytest.mark.parametrize("change,match", [
    (lambda t: t["logp"].view(-1)[3].fill_(float("nan")), "logp holds a value that is no log-probability"),
    (lambda t: t["tail_logp"].view(-1)[0].fill_(float("inf")), "tail_logp holds a value that is no log-probability"),
    (lambda t: t["ids"].view(-1)[5].fill_(1000), "token id 1000 is outside the student's vocabulary"),
    (lambda t: t["offsets"].__setitem__(1, 10**6), "inconsistent"),
])
def test_values_no_target_can_have_are_refused_naming_the_shard(built, change, match):
    folder, vocab = built
    assert vocab < 1000
    _rewrite_shard(folder, change)
    with pytest.raises(DataError, match=f"shard {folder / 'shard-00000.safetensors'}: {match}"):
        TeacherCache(folder, key(), vocab_size=vocab).load()


def test_a_manifest_cannot_name_files_outside_the_cache(built, tmp_path):
    folder, vocab = built
    shutil.copy(folder / "shard-00000.safetensors", tmp_path / "outside.safetensors")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["file"] = "../outside.safetensors"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"names the shard '../outside.safetensors', which is not a file inside"):
        TeacherCache(folder, key()).load()
