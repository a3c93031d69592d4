"""The real bundled SmolLM2-135M-Instruct, end to end (slower; one session-scoped load)."""

import json

import pytest
import torch

from kdflow.cli import main

pytestmark = pytest.mark.integration


def test_bundled_model_loads_from_gguf_once_and_matches(real_model):
    tok, model = real_model
    assert len(tok) == 49152 and model.config.num_hidden_layers == 30
    assert tok.pad_token_id == tok.eos_token_id  # the pad = EOS case the masks must survive
    assert not getattr(model, "is_quantized", False)
    # greedy answer to a real prompt is sensible text, and the converted weights give finite logits
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=False)
    enc = tok(ids, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, enc.input_ids.shape[1]:])


def test_converted_folder_gives_the_same_logits_as_the_gguf_file(real_model):
    from transformers import AutoModelForCausalLM

    from kdflow.models import bundled_gguf

    tok, model = real_model
    path = bundled_gguf("bundled:smollm2-135m-instruct")
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    x = tok("Knowledge distillation transfers", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(direct(x).logits, model(x).logits, atol=1e-5)


def test_distill_cli_on_the_real_model(tmp_path, real_model, monkeypatch):
    from conftest import ROOT

    monkeypatch.chdir(ROOT)  # the shipped config names data relative to the repository
    out = tmp_path / "real"
    rc = main(["distill", "--config", "configs/distill_define.yaml", f"output_dir={out}", "student.keep_layers=[0, 29]",
               "train.max_steps=2", "train.batch_size=2", "eval.max_rows=4", "eval.max_new_tokens=8",
               "train.report_to=[none]", "data.max_train_rows=8"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    ev = m["eval"]
    assert ev["teacher"]["answer_nll"] < ev["student (before)"]["answer_nll"]
    assert ev["student (after)"]["answer_nll"] < ev["student (before)"]["answer_nll"]
    assert (out / "student" / "model.safetensors").is_file()
    # the saved student reloads through the public loading path
    assert main(["eval", f"model.name={out / 'student'}", "data.test=data/wordnet_define/test.jsonl",
                 "eval.max_rows=2", "eval.max_new_tokens=4"]) == 0


def test_minillm_sampler_on_the_real_model_matches_unpadded_uncached_forwards(real_model):
    """Left padding, explicit positions and both KV caches on the real 135M teacher and a pruned student."""
    import torch.nn.functional as F

    from kdflow.config import DataConfig
    from kdflow.data import left_pad, prompts_of, read_rows
    from kdflow.models import prune_layers
    from kdflow.rollout import mixed_sample

    from conftest import DATA

    tok, teacher = real_model
    student = prune_layers(teacher, [0, 14, 29]).eval()
    rows = read_rows(str(DATA / "test.jsonl")).head(3)
    prompts = prompts_of(rows, tok, DataConfig())
    prompts[1] = prompts[1][:-9] + prompts[1][-5:]  # make the lengths differ so that left padding matters
    assert len({len(p) for p in prompts}) > 1
    ids, mask = left_pad(prompts, tok.pad_token_id)
    kw = dict(max_new_tokens=5, mix_alpha=0.2, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, vocab_size=len(tok),
              stop_at_eos=False, keep_teacher_logprobs=True)
    cached = mixed_sample(student, teacher, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    plain = mixed_sample(student, teacher, ids, mask, generator=torch.Generator().manual_seed(0), use_cache=False, **kw)
    assert torch.equal(cached.response_ids, plain.response_ids)
    assert torch.allclose(cached.teacher_logprobs, plain.teacher_logprobs, atol=1e-3)
    for i, p in enumerate(prompts):
        y = cached.response_ids[i].tolist()
        with torch.no_grad():
            t = F.log_softmax(teacher(torch.tensor([p + y])).logits[0, len(p) - 1:-1].float(), -1)
            s = F.log_softmax(student(torch.tensor([p + y])).logits[0, len(p) - 1:-1].float(), -1)
        assert torch.allclose(cached.teacher_logprobs[i], t, atol=1e-3)
        assert torch.allclose(cached.student_logp[i], s.gather(-1, torch.tensor(y)[:, None]).squeeze(-1), atol=1e-3)


def test_codistill_cli_on_the_real_model(tmp_path, real_model, monkeypatch):
    """The shipped codistill config, cut to two tiny pruned peers and two steps (one as LoRA)."""
    from conftest import ROOT

    monkeypatch.chdir(ROOT)
    out = tmp_path / "codistill"
    rc = main(["codistill", "--config", "configs/codistill.yaml", f"output_dir={out}",
               "peers[0].model.keep_layers=[0, 29]", "peers[1].model.keep_layers=[29]",
               "peers[1].model.lora={enabled: true, r: 4}", "peers[1].learning_rate=0.001",
               "train.max_steps=2", "train.batch_size=2", "eval.max_rows=3", "eval.max_new_tokens=6",
               "train.report_to=[none]", "data.max_train_rows=8", "baseline_alone=false"])
    assert rc == 0
    ev = json.loads((out / "metrics.json").read_text())["eval"]
    assert ev["deep10 (co-trained)"]["answer_nll"] < ev["deep10 (before)"]["answer_nll"]
    for peer in ("deep10", "shallow6"):
        assert (out / "peers" / peer / "model" / "model.safetensors").is_file()
    # the LoRA peer trained its adapter only (B starts at zero; two steps move it off zero)
    from safetensors.torch import load_file

    adapter = load_file(str(out / "peers" / "shallow6" / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
