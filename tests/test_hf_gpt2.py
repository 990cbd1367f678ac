"""Hugging Face GPT-2 directories: import, export, round trips, bad input, and (optional) transformers itself.

The machine has no network, so every checkpoint here is built by the test: either by hand (safetensors +
config.json in the Hugging Face layout) or, when torch and transformers are installed, by save_pretrained.
"""
import json
import os

import numpy as np
import pytest

from nanogpt_np.io.hf_gpt2 import CheckpointError, export_gpt2_dir, import_gpt2_dir, is_gpt2_dir
from nanogpt_np.model import GPT, GPTConfig, parameter_shapes
from nanogpt_np.io.safetensors import float32_to_bf16_bits, load_file, save_file

CFG = dict(block_size=16, vocab_size=300, n_layer=2, n_head=2, n_embd=16)


def hf_config(**over):
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 300, "n_positions": 16,
           "n_ctx": 16, "n_embd": 16, "n_layer": 2, "n_head": 2, "n_inner": None,
           "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "bos_token_id": 256,
           "eos_token_id": 256, "tie_word_embeddings": True}
    cfg.update(over)
    return cfg


def random_params(seed=0, **over):
    rng = np.random.default_rng(seed)
    shapes = parameter_shapes(GPTConfig(**{**CFG, **over}))
    return {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in shapes.items()}


def write_hf_dir(path, params=None, config=None, prefix="transformer.", extra=None, dtypes=None, drop=()):
    """A Hugging Face-style GPT-2 directory written by hand (weights only; no tokenizer files)."""
    os.makedirs(path, exist_ok=True)
    params = random_params() if params is None else params
    tensors = {prefix + k: v for k, v in params.items() if k not in drop}
    tensors.update(extra or {})
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"}, dtypes=dtypes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config() if config is None else config, f)
    return path


def byte_symbols():
    """GPT-2's printable stand-in for every byte (written here independently, for the test's own vocab)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def write_tokenizer_files(path, n_merges=10):
    """vocab.json (256 bytes + merges + <|endoftext|>) and merges.txt, in GPT-2's formats."""
    sym = byte_symbols()
    vocab = {sym[b]: b for b in range(256)}
    merges = []
    pairs = [("t", "h"), ("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("a", "n"), ("i", "n"), ("e", "r"),
             ("o", "n"), ("Ġ", "a"), ("r", "e")][:n_merges]
    for a, b in pairs:
        merges.append(f"{a} {b}")
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def logits_of(config, params, idx):
    model = GPT(config, seed=123)
    model.load_params(params)
    model.eval()
    logits, _ = model.forward(idx)
    return np.asarray(logits.data)


# ----------------------------------------------------------------------------------------------- weights

def test_import_hand_written_dir(tmp_path):
    params = random_params()
    # with the mask buffers older files carry, and lm_head tied (== wte)
    extra = {"transformer.h.0.attn.bias": np.tril(np.ones((1, 1, 16, 16), np.float32)),
             "transformer.h.1.attn.masked_bias": np.array(-1e4, np.float32),
             "lm_head.weight": params["wte.weight"]}
    d = write_hf_dir(tmp_path / "hf", params, extra=extra)
    assert not is_gpt2_dir(d)                  # no vocab.json + merges.txt: not a complete GPT-2 directory
    config, got, tok = import_gpt2_dir(d, require_tokenizer=False)
    assert tok is None
    assert (config.block_size, config.vocab_size, config.n_layer, config.n_head, config.n_embd) == (16, 300, 2, 2, 16)
    assert config.bias and config.layer_norm_eps == 1e-5
    assert list(got) == list(parameter_shapes(config))
    for k, v in params.items():
        np.testing.assert_array_equal(got[k], v)


def test_import_without_prefix_and_half_precision(tmp_path):
    params = random_params()
    half = {k: v.astype(np.float16) for k, v in params.items()}
    d = write_hf_dir(tmp_path / "fp16", half, prefix="")            # openai-community/gpt2 has no prefix
    _, got, _ = import_gpt2_dir(d, require_tokenizer=False)
    for k, v in half.items():
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], v.astype(np.float32))
    bf = {k: float32_to_bf16_bits(v) for k, v in params.items()}
    d = write_hf_dir(tmp_path / "bf16", bf, dtypes={"transformer." + k: "BF16" for k in bf})
    _, got, _ = import_gpt2_dir(d, require_tokenizer=False)
    assert np.abs(got["wte.weight"] - params["wte.weight"]).max() < 2e-3   # bf16 has 8 bits of mantissa


def test_import_then_export_is_byte_identical(tmp_path):
    params = random_params(seed=1)
    src = write_hf_dir(tmp_path / "src", params)
    config, got, _ = import_gpt2_dir(src, require_tokenizer=False)
    model = GPT(config, seed=0)
    model.load_params(got)
    out = export_gpt2_dir(model, None, tmp_path / "out")
    a = load_file(os.path.join(src, "model.safetensors"))
    b = load_file(os.path.join(out, "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert a[k].tobytes() == b[k].tobytes(), k
    # and the exported directory imports to the same config
    config2, _, _ = import_gpt2_dir(out, require_tokenizer=False)
    assert config2 == config


def test_export_then_import_gives_identical_logits(tmp_path):
    config = GPTConfig(**CFG)
    model = GPT(config, seed=7)
    export_gpt2_dir(model, None, tmp_path / "hf")
    config2, params2, _ = import_gpt2_dir(tmp_path / "hf", require_tokenizer=False)
    idx = np.random.default_rng(0).integers(0, 300, size=(2, 16))
    model.eval()
    np.testing.assert_array_equal(np.asarray(model.forward(idx)[0].data), logits_of(config2, params2, idx))


def test_export_bias_free_model_writes_zero_biases(tmp_path):
    config = GPTConfig(**CFG, bias=False)
    model = GPT(config, seed=3)
    export_gpt2_dir(model, None, tmp_path / "hf")
    config2, params2, _ = import_gpt2_dir(tmp_path / "hf", require_tokenizer=False)
    assert config2.bias and not params2["h.0.attn.c_attn.bias"].any()
    idx = np.arange(10).reshape(1, 10)
    model.eval()
    np.testing.assert_allclose(np.asarray(model.forward(idx)[0].data), logits_of(config2, params2, idx),
                               rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------- bad input

def test_missing_and_extra_tensors(tmp_path):
    d = write_hf_dir(tmp_path / "missing", drop=("h.1.mlp.c_fc.bias",))
    with pytest.raises(CheckpointError, match=r"missing 1 tensors: h\.1\.mlp\.c_fc\.bias"):
        import_gpt2_dir(d, require_tokenizer=False)
    d = write_hf_dir(tmp_path / "extra", extra={"transformer.h.2.ln_1.weight": np.ones(16, np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected tensors: transformer\.h\.2\.ln_1\.weight"):
        import_gpt2_dir(d, require_tokenizer=False)


def test_wrong_shapes(tmp_path):
    params = random_params()
    params["h.0.attn.c_attn.weight"] = params["h.0.attn.c_attn.weight"].T.copy()   # (3C, C): torch Linear layout
    d = write_hf_dir(tmp_path / "t", params)
    with pytest.raises(CheckpointError, match=r"c_attn\.weight.*shape \[48, 16\].*\[16, 48\]"):
        import_gpt2_dir(d, require_tokenizer=False)
    d = write_hf_dir(tmp_path / "v", random_params(vocab_size=200))                 # config says 300
    with pytest.raises(CheckpointError, match=r"wte\.weight.*shape \[200, 16\]"):
        import_gpt2_dir(d, require_tokenizer=False)


def test_unsupported_dtype(tmp_path):
    params = random_params()
    params["ln_f.weight"] = np.ones(16, np.int32)
    d = write_hf_dir(tmp_path / "i", params)
    with pytest.raises(CheckpointError, match=r"ln_f\.weight.*dtype I32"):
        import_gpt2_dir(d, require_tokenizer=False)


@pytest.mark.parametrize("change,match", [
    ({"activation_function": "relu"}, "activation_function"),
    ({"model_type": "llama"}, "model_type"),
    ({"n_inner": 99}, "n_inner"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings"),
    ({"n_head": 3}, "divisible"),
    ({"n_embd": "16"}, "n_embd"),
])
def test_bad_config(tmp_path, change, match):
    d = write_hf_dir(tmp_path / "c", config=hf_config(**change))
    with pytest.raises(CheckpointError, match=match):
        import_gpt2_dir(d, require_tokenizer=False)


def test_missing_files_and_untied_head(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        import_gpt2_dir(tmp_path / "nope")
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        import_gpt2_dir(d)
    (d / "config.json").write_text(json.dumps(hf_config()))
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="pytorch_model.bin but no model.safetensors"):
        import_gpt2_dir(d)
    params = random_params()
    d = write_hf_dir(tmp_path / "untied", params, extra={"lm_head.weight": params["wte.weight"] + 1})
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        import_gpt2_dir(d, require_tokenizer=False)
    d = write_hf_dir(tmp_path / "trunc")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        import_gpt2_dir(d, require_tokenizer=False)


def test_tokenizer_files_required_and_paired(tmp_path):
    d = write_hf_dir(tmp_path / "t")
    with pytest.raises(CheckpointError, match="no vocab.json"):
        import_gpt2_dir(d)
    (d / "vocab.json").write_text("{}")
    with pytest.raises(CheckpointError, match="but not merges.txt"):
        import_gpt2_dir(d)


# ----------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_and_vocab_mismatch(tmp_path):
    pytest.importorskip("nanogpt_np.tokenizers.bpe")
    d = write_hf_dir(tmp_path / "t")
    n = write_tokenizer_files(d)
    config, _, tok = import_gpt2_dir(d)
    assert tok.vocab_size == n and tok.eot_id == n - 1
    text = "the theory in the rain"
    assert tok.decode(tok.encode(text)) == text
    out = export_gpt2_dir(GPT(config), tok, tmp_path / "out")
    with open(os.path.join(out, "vocab.json"), encoding="utf-8") as f1, open(d / "vocab.json", encoding="utf-8") as f2:
        assert json.load(f1) == json.load(f2)
    _, _, tok2 = import_gpt2_dir(out)
    assert tok2.encode(text) == tok.encode(text)
    assert json.load(open(os.path.join(out, "config.json")))["eos_token_id"] == n - 1

    small = write_hf_dir(tmp_path / "small", random_params(vocab_size=200), config=hf_config(vocab_size=200))
    write_tokenizer_files(small)                                   # 267 tokens > 200 rows
    with pytest.raises(CheckpointError, match="267 tokens but the weights have only 200"):
        import_gpt2_dir(small)


# ----------------------------------------------------------------------------------------------- transformers

def _hf_logits(model, idx):
    import torch
    with torch.no_grad():
        return model(torch.tensor(idx)).logits.numpy()


def test_transformers_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=300, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():        # random biases and layernorm parameters too, so every tensor is exercised
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    idx = np.random.default_rng(0).integers(0, 300, size=(2, 16))

    config, params, _ = import_gpt2_dir(tmp_path / "hf", require_tokenizer=False)
    ours = logits_of(config, params, idx)
    np.testing.assert_allclose(ours, _hf_logits(hf, idx), rtol=0, atol=1e-5)

    model = GPT(GPTConfig(**CFG), seed=11)
    export_gpt2_dir(model, None, tmp_path / "ours")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    model.eval()
    np.testing.assert_allclose(_hf_logits(back, idx), np.asarray(model.forward(idx)[0].data), rtol=0, atol=1e-5)


def test_transformers_loads_exported_tokenizer(tmp_path):
    pytest.importorskip("nanogpt_np.tokenizers.bpe")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")            # AutoTokenizer needs it
    d = write_hf_dir(tmp_path / "t")
    write_tokenizer_files(d)
    config, params, tok = import_gpt2_dir(d)
    model = GPT(config)
    model.load_params(params)
    out = export_gpt2_dir(model, tok, tmp_path / "out")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "the theory in the rain, another"
    assert hf_tok(text)["input_ids"] == tok.encode(text)


def test_export_a_run_directory_and_the_command_line(tmp_path, capsys):
    from nanogpt_np.tokenizers.char import CharTokenizer
    from nanogpt_np.io.checkpoint import save_checkpoint
    from nanogpt_np.io.hf_gpt2 import main
    tok = CharTokenizer.from_text("abc def")
    config = GPTConfig(**{**CFG, "vocab_size": tok.vocab_size})
    model = GPT(config, seed=2)
    save_checkpoint(tmp_path / "run", model, None, {}, {"step": 1}, tok)
    main(["export", str(tmp_path / "run"), str(tmp_path / "hf")])
    assert "wrote" in capsys.readouterr().out
    files = sorted(os.listdir(tmp_path / "hf"))
    assert files == ["config.json", "model.safetensors", "nanogpt_tokenizer.json"]   # char vocab: not GPT-2 files
    config2, params2, _ = import_gpt2_dir(tmp_path / "hf", require_tokenizer=False)
    assert config2 == config
    for k, v in model.state_dict().items():
        assert params2[k].tobytes() == v.tobytes()
    main(["check", str(tmp_path / "hf")])
    assert "parameters" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: .*config.json: file not found"):
        main(["check", str(tmp_path)])                   # a directory with no config.json


def test_sharded_checkpoint(tmp_path):
    params = random_params(seed=9)
    d = tmp_path / "sharded"
    d.mkdir()
    names = list(params)
    shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({"transformer." + k: params[k] for k in keys}, d / shard, metadata={"format": "pt"})
        weight_map.update({"transformer." + k: shard for k in keys})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(hf_config()))
    _, got, _ = import_gpt2_dir(d, require_tokenizer=False)
    for k, v in params.items():
        np.testing.assert_array_equal(got[k], v)
    os.remove(d / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: weight shard .* is missing"):
        import_gpt2_dir(d, require_tokenizer=False)


def test_is_gpt2_dir_needs_config_weights_and_tokenizer(tmp_path):
    d = write_hf_dir(tmp_path / "hf", random_params())
    write_tokenizer_files(d)
    assert is_gpt2_dir(d) and is_gpt2_dir(str(d))
    os.rename(d / "model.safetensors", d / "other.safetensors")
    assert not is_gpt2_dir(d)
    (d / "model.safetensors.index.json").write_text("{}")          # a sharded checkpoint counts
    assert is_gpt2_dir(d)
    os.remove(d / "merges.txt")
    assert not is_gpt2_dir(d)
    assert not is_gpt2_dir(tmp_path / "nope") and not is_gpt2_dir(d / "config.json")
    run = tmp_path / "run"                                          # a nanogpt_np run directory is not one
    run.mkdir()
    (run / "config.json").write_text(json.dumps(CFG))
    (run / "model.safetensors").write_bytes(b"")
    assert not is_gpt2_dir(run)


def test_export_over_an_earlier_export_leaves_no_stale_files(tmp_path, capsys):
    from nanogpt_np.tokenizers.char import CharTokenizer
    from nanogpt_np.io.checkpoint import save_checkpoint
    from nanogpt_np.io.hf_gpt2 import main
    tok = CharTokenizer.from_text("abc def")
    save_checkpoint(tmp_path / "run", GPT(GPTConfig(**{**CFG, "vocab_size": tok.vocab_size}), seed=2),
                    None, {}, {"step": 1}, tok)
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json",
                 "model.safetensors.index.json", "README.md"):
        (hf / name).write_text("{}")
    main(["export", str(tmp_path / "run"), str(hf)])
    assert sorted(os.listdir(hf)) == ["README.md", "config.json", "model.safetensors", "nanogpt_tokenizer.json"]
    with pytest.raises(SystemExit, match="error: .*training run directory"):
        main(["export", str(tmp_path / "run"), str(tmp_path / "run")])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit, match="^error: "):
        main(["export", str(tmp_path / "run"), str(tmp_path / "afile")])   # an OSError, not a traceback
