"""Fine-tuning on a task: the loss mask gives prompt positions exactly zero gradient, and a few seconds of
fine-tuning raise task accuracy above the untuned model's."""
import numpy as np
import pytest

from nanogpt_np import ops
from nanogpt_np.tokenizers.char import CharTokenizer
from nanogpt_np.eval.evaluate import task_metrics
from nanogpt_np.model import GPT, GPTConfig
from nanogpt_np.optim import AdamW, clip_grad_norm
from nanogpt_np.data.task_data import Example, TaskLoader, load_task_data
from nanogpt_np.tensor import backward, clear_tape

GOOD = ["great", "lovely", "superb", "fine", "warm", "bright", "fun", "sweet"]
BAD = ["awful", "dull", "poor", "grim", "weak", "bland", "sad", "cold"]
THINGS = ["film", "book", "meal", "song", "play", "show"]


def sentiment_examples(n, seed):
    """'<adjective> <thing>:' -> ' pos' / ' neg' (labels decided by the adjective)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        positive = bool(rng.integers(2))
        adj = rng.choice(GOOD if positive else BAD)
        out.append(Example(f"{adj} {rng.choice(THINGS)}:", " pos\n" if positive else " neg\n", f"synthetic:{i}"))
    return out


TOK = CharTokenizer.from_text("".join(GOOD + BAD + THINGS) + " :\nposneg")


def tiny_model(seed=0):
    return GPT(GPTConfig(block_size=32, vocab_size=TOK.vocab_size, n_layer=1, n_head=2, n_embd=32), seed=seed)


def test_prompt_positions_get_exactly_zero_gradient():
    model = tiny_model()
    data = load_task_data(sentiment_examples(4, seed=1), TOK, block_size=32)
    L = int(data.lengths.max())
    x, y = data.x[:, :L], data.y[:, :L]                                  # (4, L)
    logits, _ = model.forward(x)                                         # (4, L, V)
    logits.use_grad_buffer(np.zeros_like(logits.data))                   # keep d loss / d logits
    loss = ops.cross_entropy(logits, y, -1)
    backward(loss)
    dlogits = logits.grad
    prompt = y < 0                                                        # prompt and padding positions
    assert prompt.any() and (~prompt).any()
    assert np.all(dlogits[prompt] == 0.0)                                 # exactly zero, not just small
    assert np.all(np.abs(dlogits[~prompt]).sum(-1) > 0)                   # completion positions do learn
    # the mask matters: learning every next token (prompt included) gives a different gradient
    model.zero_grad()
    _, loss1 = model.forward(x, y)
    backward(loss1)
    g_masked = model.flat_grads.copy()
    y_all = np.where(prompt, np.roll(x, -1, axis=1), y)                  # prompt positions predict the next token
    y_all[:, -1] = np.where(prompt[:, -1], -1, y_all[:, -1])
    model.zero_grad()
    _, loss2 = model.forward(x, y_all)
    backward(loss2)
    assert not np.array_equal(g_masked, model.flat_grads)
    clear_tape()


def finetune(model, examples, steps, lr=3e-3, batch_size=16, seed=0):
    """The trainer's step, on task rows: masked loss, backward, clip, AdamW."""
    loader = TaskLoader(load_task_data(examples, TOK, model.config.block_size), batch_size, seed=seed)
    opt = AdamW(model, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        x, y = loader.next_batch()
        model.zero_grad()
        _, loss = model.forward(x, y)
        backward(loss)
        clip_grad_norm(model.flat_grads, 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def test_finetuning_raises_task_accuracy():
    train = sentiment_examples(200, seed=2)
    test = sentiment_examples(40, seed=3)
    model = tiny_model(seed=4)
    model.eval()
    before = task_metrics(model, TOK, test, kind="labels")
    losses = finetune(model, train, steps=100)
    after = task_metrics(model, TOK, test, kind="labels")
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert after["task_loss"] < before["task_loss"]
    assert after["accuracy"] > before["accuracy"]
    assert after["accuracy"] >= 0.9, after["samples"]
    assert after["macro_f1"] >= 0.9


def test_trainer_fine_tunes_on_a_task_file(tmp_path):
    """train.py --init_from=RUN --dataset=task.jsonl: fine-tuning on prompt/completion pairs."""
    import json
    from nanogpt_np import trainer
    from nanogpt_np.io.checkpoint import save_checkpoint
    from nanogpt_np.config import parse_args
    from nanogpt_np.eval.evaluate import run_evaluation
    base = tiny_model(seed=5)
    save_checkpoint(tmp_path / "base", base, None, {}, {"step": 0}, TOK)
    for name, exs in (("train.jsonl", sentiment_examples(200, 6)), ("test.jsonl", sentiment_examples(40, 7))):
        (tmp_path / name).write_text("".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n"
                                             for e in exs))
    before = run_evaluation(tmp_path / "base", task=str(tmp_path / "test.jsonl"), out=str(tmp_path / "b.json"),
                            log=lambda *a: None)
    cfg = parse_args([f"--init_from={tmp_path / 'base'}", f"--dataset={tmp_path / 'train.jsonl'}",
                      "--preset=finetune", "--learning_rate=3e-3", "--max_iters=150", "--eval_interval=50",
                      "--block_size=32", "--batch_size=16", "--device=cpu", f"--out_dir={tmp_path / 'ft'}"])
    trainer.train(cfg, echo=lambda *a: None)
    after = run_evaluation(tmp_path / "ft", task=str(tmp_path / "test.jsonl"), log=lambda *a: None)
    assert after["task"]["accuracy"] > before["task"]["accuracy"]


def test_init_from_refuses_settings_its_weights_contradict(tmp_path):
    """--init_from brings an architecture and a tokenizer; --model, --n_layer, --n_head, --n_embd, --bias,
    --tokenizer, --vocab_size given explicitly and different are refused (naming the difference), not ignored.
    Given and equal, or set by a preset, they are fine."""
    from nanogpt_np.config import ConfigError, parse_args
    from nanogpt_np.trainer import train
    (tmp_path / "d.txt").write_text("the quick brown fox jumps over the lazy dog. " * 100)
    base = [f"--dataset={tmp_path / 'd.txt'}", "--block_size=8", "--batch_size=2", "--max_iters=2",
            "--eval_interval=2", "--eval_iters=1", "--device=cpu"]
    train(parse_args(base + ["--n_layer=1", "--n_head=2", "--n_embd=8", f"--out_dir={tmp_path / 'base'}"]),
          echo=lambda *a: None)
    init = base + [f"--init_from={tmp_path / 'base'}"]
    for extra, named in [(["--n_layer=2"], "n_layer: weights 1, --n_layer asks 2"),
                         (["--n_embd=16"], "n_embd: weights 8"),
                         (["--n_head=4"], "n_head: weights 2"),
                         (["--model=tiny"], "--model=tiny asks"),
                         (["--bias=false"], "bias: weights True"),
                         (["--tokenizer=bpe"], "tokenizer: weights char, --tokenizer asks bpe"),
                         (["--vocab_size=300"], "--vocab_size asks 300")]:
        with pytest.raises(ConfigError, match="--init_from=.*" + named.replace("(", r"\(")):
            train(parse_args(init + extra + [f"--out_dir={tmp_path / 'ft'}"]), echo=lambda *a: None)
    assert not (tmp_path / "ft" / "checkpoints").exists()
    summary = train(parse_args(init + ["--n_layer=1", "--tokenizer=char", "--bias=true", "--preset=quick",
                                       "--max_iters=2", f"--out_dir={tmp_path / 'ft'}"]), echo=lambda *a: None)
    assert summary["step"] == 2
