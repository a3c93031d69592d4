"""Model loading paths, pruning, LoRA, logits at selected positions, tokenizer checks."""

import pytest
import torch

from kdflow.config import LoraSpec, ModelSpec, StudentSpec
from kdflow.errors import ConfigError, ModelError
from kdflow.models import (apply_lora, build_student, load_model, load_tokenizer, output_head, prune_layers,
                           require_same_tokenizer, resolve_source, selected_hidden, selected_logits, tokenizer_fingerprint)

from conftest import tiny_llama, train_tokenizer


def test_local_folder_round_trip(tiny_dirs, bpe_tok):
    spec = ModelSpec(name=str(tiny_dirs["teacher"]))
    tok = load_tokenizer(spec)
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(bpe_tok)
    m = load_model(spec)
    assert m.config.num_hidden_layers == 4


def test_hub_id_offline_gives_a_clear_error():
    with pytest.raises(ModelError, match="could not load model 'no-such-org/no-such-model'.*offline"):
        load_model(ModelSpec(name="no-such-org/no-such-model"))


def test_source_resolution(tmp_path):
    assert resolve_source(ModelSpec(name="org/name", revision="abc")).identity == "org/name@abc"
    with pytest.raises(ModelError, match="GGUF file .* not found"):
        resolve_source(ModelSpec(name=str(tmp_path / "x.gguf")))
    (tmp_path / "w.bin").write_text("x")
    with pytest.raises(ModelError, match="not a .gguf file"):
        resolve_source(ModelSpec(name=str(tmp_path / "w.bin")))
    with pytest.raises(ConfigError, match="unknown bundled model"):
        resolve_source(ModelSpec(name="bundled:nope"))


def test_pruning_keeps_chosen_layers_and_copies_weights(bpe_tok):
    teacher = tiny_llama(bpe_tok, layers=4, seed=3).eval()
    same = prune_layers(teacher, [0, 1, 2, 3]).eval()
    x = torch.randint(0, len(bpe_tok), (2, 9))
    assert torch.allclose(same(x).logits, teacher(x).logits, atol=1e-6)
    student = prune_layers(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert torch.equal(s_state["model.layers.1.mlp.up_proj.weight"], t_state["model.layers.3.mlp.up_proj.weight"])
    assert [l.self_attn.layer_idx for l in student.model.layers] == [0, 1]  # KV cache slots renumbered
    with torch.no_grad():
        student.model.layers[0].mlp.up_proj.weight.add_(1.0)
    assert not torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
    # generation with a KV cache works on the pruned model
    out = student.generate(x[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=bpe_tok.pad_token_id)
    assert out.shape[1] == 7
    with pytest.raises(ConfigError, match="distinct indices"):
        prune_layers(teacher, [0, 9])


def test_keep_every_always_keeps_the_last_layer(bpe_tok):
    teacher = tiny_llama(bpe_tok, layers=5)
    st = build_student(StudentSpec(init="prune_teacher", keep_every=2), teacher, None)
    assert st.config.kdflow_pruned_from_layers == [0, 2, 4]
    st = build_student(StudentSpec(init="prune_teacher", keep_every=3), teacher, None)
    assert st.config.kdflow_pruned_from_layers == [0, 3, 4]


def test_student_from_config_overrides(bpe_tok):
    teacher = tiny_llama(bpe_tok, layers=4, hidden=48)
    st = build_student(StudentSpec(init="config", config_overrides={"num_hidden_layers": 1, "hidden_size": 16,
                                                                     "intermediate_size": 32}), teacher, None)
    assert st.config.num_hidden_layers == 1 and st.config.vocab_size == teacher.config.vocab_size
    with pytest.raises(ConfigError, match="has no field 'hiden_size'"):
        build_student(StudentSpec(init="config", config_overrides={"hiden_size": 8}), teacher, None)


def scaled_model(arch: str, vocab: int):
    """Tiny models whose forward changes the logits after the output head."""
    from transformers import (AutoModelForCausalLM, FalconH1Config, Gemma2Config, GraniteConfig, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(0)
    small = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    if arch == "granite":  # logits / logits_scaling
        return AutoModelForCausalLM.from_config(GraniteConfig(**small, logits_scaling=0.125))
    if arch == "falcon_h1":  # logits * lm_head_multiplier
        return AutoModelForCausalLM.from_config(FalconH1Config(
            **small, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1,
            mamba_chunk_size=16, lm_head_multiplier=7.0))
    if arch == "gemma2":  # tanh soft-capping, tight enough to matter on a random model's small logits
        return AutoModelForCausalLM.from_config(Gemma2Config(**small, head_dim=8, final_logit_softcapping=0.05))

    class UnknownScaling(LlamaForCausalLM):
        """An architecture kdflow has never heard of: it scales its logits after the head."""

        def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                                  **kwargs)
            out.logits = out.logits * 3.0
            return out

    return UnknownScaling(LlamaConfig(**small, tie_word_embeddings=True))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama+lora", "granite", "falcon_h1", "gemma2", "unknown_scaling"])
def test_selected_logits_equal_full_logits_at_positions(bpe_tok, arch, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    if arch == "gpt2":
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(bpe_tok), n_embd=32, n_layer=2, n_head=4))
    elif arch.startswith("llama"):
        model = tiny_llama(bpe_tok)
    else:
        model = scaled_model(arch, len(bpe_tok))
    if arch.endswith("lora"):
        model = apply_lora(model, LoraSpec(enabled=True, r=4))
        # move adapters away from their zero init so they matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_()
    model.eval()
    ids = torch.randint(0, len(bpe_tok), (3, 10))
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0
    pos = torch.rand(3, 9) > 0.5
    pos[1, 6:] = False
    got = selected_logits(model, ids, attn, pos)
    full = model(input_ids=ids, attention_mask=attn).logits[:, :-1][pos]
    assert got.shape == full.shape and torch.allclose(got, full, atol=1e-5, rtol=1e-4)
    # known scalings keep the hidden-state path (logits only where needed); the unknown one is caught
    # by the probe and falls back to the forward's own logits, saying so
    hidden, _ = selected_hidden(model, ids, attn, pos)
    if arch == "unknown_scaling":
        assert output_head(model) is None and hidden.shape[-1] == len(bpe_tok)
        assert "using the full logits of its forward instead" in capsys.readouterr().out
    else:
        assert output_head(model) is not None and hidden.shape[-1] == 32


def test_teacher_targets_use_the_scaled_logits(bpe_tok):
    """Teacher-cache targets of a Granite teacher are the top-k of its real (scaled) distribution."""
    import torch.nn.functional as F

    from kdflow.teacher_cache import same_tokenizer_targets

    model = scaled_model("granite", len(bpe_tok)).eval()
    ids = torch.randint(0, len(bpe_tok), (2, 9))
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    rows = same_tokenizer_targets(model, len(bpe_tok), k=5, temperature=1.0, token_scope="response")(batch)
    logp = F.log_softmax(model(input_ids=ids).logits[:, 2:-1].float(), -1)
    for b in range(2):
        top = logp[b].topk(5, -1)
        assert torch.equal(rows[b]["ids"], top.indices)
        assert torch.allclose(rows[b]["logp"], top.values, atol=1e-5)


def test_lora_bad_target_is_a_clear_error(bpe_tok):
    with pytest.raises(ConfigError, match=r"lora.target_modules \['c_attn'\] are not modules"):
        apply_lora(tiny_llama(bpe_tok), LoraSpec(enabled=True, target_modules=["c_attn"]))


def test_different_tokenizers_are_refused_with_a_pointer_to_cross_tokenizer(bpe_tok):
    other = train_tokenizer("wordpiece")
    require_same_tokenizer(bpe_tok, train_tokenizer("bpe"), "t", "s")  # same training -> same ids
    with pytest.raises(ModelError, match="different tokenizers.*only methods kd and hard_token support"):
        require_same_tokenizer(bpe_tok, other, "t", "s")


def test_block_importance_against_a_direct_computation(bpe_tok, tiny_data):
    """1 − cos of each block's input and output, averaged over real tokens (padding left out),
    compared with a loop over rows; the chosen layers keep the first, the last and the highest."""
    import torch
    import torch.nn.functional as F

    from conftest import tiny_llama
    from kdflow.compress.prune import block_importance, evenly_spaced, most_important
    from kdflow.config import DataConfig
    from kdflow.data import encode_rows, read_rows

    model = tiny_llama(bpe_tok, layers=5, hidden=32, seed=3).eval()
    examples = encode_rows(read_rows(str(tiny_data["train"])).head(6), bpe_tok, DataConfig())
    scores = block_importance(model, examples, bpe_tok.pad_token_id, batch_size=4)
    per_layer, tokens = [0.0] * 5, 0
    with torch.no_grad():
        for e in examples:  # one row at a time: no padding at all
            hs = model(input_ids=torch.tensor([e["input_ids"]]), output_hidden_states=True).hidden_states
            for layer in range(5):
                per_layer[layer] += float((1 - F.cosine_similarity(hs[layer][0], hs[layer + 1][0], dim=-1)).sum())
            tokens += len(e["input_ids"])
    assert scores == pytest.approx([x / tokens for x in per_layer], rel=1e-4)
    assert most_important([0.9, 0.1, 0.5, 0.3, 0.2, 0.8], 4) == [0, 2, 3, 5]
    assert most_important([0.0, 0.2, 0.2, 0.0], 3) == [0, 1, 3]  # ties: the earlier block
    assert evenly_spaced(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    with pytest.raises(ValueError):
        most_important([0.1, 0.2], 3)


def test_student_pruned_by_importance_records_its_choice(tiny_dirs, tiny_data):
    from kdflow.config import DataConfig, ModelSpec, StudentSpec
    from kdflow.data import encode_rows, read_rows
    from kdflow.errors import ConfigError
    from kdflow.models import build_student, check_student, load_model, load_tokenizer

    tspec = ModelSpec(name=str(tiny_dirs["teacher"]))
    tok, teacher = load_tokenizer(tspec), load_model(tspec)
    calib = (encode_rows(read_rows(str(tiny_data["train"])).head(8), tok, DataConfig()), tok.pad_token_id)
    spec = StudentSpec(init="prune_teacher", num_layers=3)
    student = build_student(spec, teacher, tspec, calib)
    keep = student.config.kdflow_pruned_from_layers
    assert len(keep) == 3 and keep[0] == 0 and keep[-1] == 3 and len(student.config.kdflow_layer_importance) == 4
    uniform = build_student(StudentSpec(init="prune_teacher", num_layers=3, layer_selection="uniform"), teacher, tspec)
    assert uniform.config.kdflow_pruned_from_layers == [0, 2, 3]
    with pytest.raises(ConfigError, match="only 4 layers"):
        build_student(StudentSpec(init="prune_teacher", num_layers=5), teacher, tspec, calib)
    with pytest.raises(ConfigError, match="not several"):
        check_student(StudentSpec(init="prune_teacher", num_layers=3, keep_every=2), tspec)
    with pytest.raises(ConfigError, match="needs calibration rows"):
        build_student(spec, teacher, tspec)


def test_saved_and_loaded_models_generate_with_the_kv_cache(tmp_path, bpe_tok):
    """Training switches the KV cache off; the folder written for inference must not inherit that
    (transformers writes the flag into config.json and generation_config.json), and a folder that
    did is loaded with the cache on — without it every new token re-runs the whole sequence."""
    import json

    from kdflow.config import ModelSpec
    from kdflow.models import load_model, save_model

    model = tiny_llama(bpe_tok)
    model.config.use_cache = False
    model.generation_config.use_cache = False
    save_model(model, bpe_tok, tmp_path / "student")
    assert json.loads((tmp_path / "student" / "config.json").read_text()).get("use_cache", True) is True
    assert json.loads((tmp_path / "student" / "generation_config.json").read_text()).get("use_cache", True) is True
    assert model.config.use_cache is False and model.generation_config.use_cache is False  # training keeps its setting

    model.save_pretrained(tmp_path / "old")  # as earlier versions saved it
    bpe_tok.save_pretrained(tmp_path / "old")
    assert json.loads((tmp_path / "old" / "generation_config.json").read_text())["use_cache"] is False
    loaded = load_model(ModelSpec(name=str(tmp_path / "old")))
    assert loaded.config.use_cache is True and loaded.generation_config.use_cache is True
