"""Tests for nanogpt_np.data.loader.BatchLoader: shapes, shift, reproducibility, resume, shards, memmap."""
import json

import numpy as np
import pytest

from nanogpt_np.data.loader import BatchLoader


def _data(n=1000, dtype=np.uint16):
    return (np.arange(n) % 50000).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int32, np.int64])
def test_shapes_dtype_and_shift(dtype):
    loader = BatchLoader(_data(dtype=dtype), batch_size=4, block_size=8, seed=1)
    x, y = loader.next_batch()
    assert x.shape == (4, 8) and y.shape == (4, 8)
    assert x.dtype == np.int64 and y.dtype == np.int64
    # data is arange, so y must be x + 1 everywhere
    np.testing.assert_array_equal(y, x + 1)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


def test_same_seed_same_batches_different_seed_different():
    a = BatchLoader(_data(), 4, 8, seed=3)
    b = BatchLoader(_data(), 4, 8, seed=3)
    c = BatchLoader(_data(), 4, 8, seed=4)
    xa, xb, xc = a.next_batch()[0], b.next_batch()[0], c.next_batch()[0]
    np.testing.assert_array_equal(xa, xb)
    assert not np.array_equal(xa, xc)


def test_resume_from_state_via_json_continues_exactly():
    data = _data(5000)
    ref = BatchLoader(data, 3, 16, seed=7)
    for _ in range(5):
        ref.next_batch()
    saved = json.loads(json.dumps(ref.state_dict()))  # must survive JSON
    expected = [ref.next_batch() for _ in range(4)]

    fresh = BatchLoader(data, 3, 16, seed=123)  # a different seed: the state must override it
    fresh.load_state_dict(saved)
    for (ex, ey) in expected:
        x, y = fresh.next_batch()
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)
    assert fresh.batches_drawn == ref.batches_drawn


def test_state_mismatch_warns():
    a = BatchLoader(_data(), 4, 8)
    b = BatchLoader(_data(), 2, 8)
    with pytest.warns(UserWarning, match="batch_size"):
        b.load_state_dict(a.state_dict())


def test_too_short_data_raises_clear_error():
    with pytest.raises(ValueError, match=r"data has 8 tokens, fewer than block_size\+1 = 9"):
        BatchLoader(np.arange(8, dtype=np.uint16), 2, 8)
    BatchLoader(np.arange(9, dtype=np.uint16), 2, 8).next_batch()  # exactly T+1 is enough


def test_all_windows_reachable_and_in_bounds():
    data = np.arange(12, dtype=np.int32)
    loader = BatchLoader(data, batch_size=64, block_size=4, seed=0)
    starts = set()
    for _ in range(20):
        x, y = loader.next_batch()
        assert y.max() <= 11
        starts.update(x[:, 0].tolist())
    assert starts == set(range(12 - 4))  # starts 0..7


def test_shards_proportional_and_no_crossing():
    # shard A has tokens 0..99 (92 windows of T=8); shard B has 1000..1019 (12 windows); C too short
    a = np.arange(100, dtype=np.uint16)
    b = np.arange(1000, 1020, dtype=np.uint16)
    c = np.arange(5000, 5005, dtype=np.uint16)
    loader = BatchLoader([a, b, c], batch_size=256, block_size=8, seed=0)
    from_a = from_b = 0
    for _ in range(40):
        x, y = loader.next_batch()
        np.testing.assert_array_equal(y, x + 1)  # a window never spans two shards
        assert not np.any(x >= 5000)
        from_a += int(np.sum(x[:, 0] < 1000))
        from_b += int(np.sum(x[:, 0] >= 1000))
    frac_b = from_b / (from_a + from_b)
    assert abs(frac_b - 12 / 104) < 0.02


def test_memmap_is_not_read_whole(tmp_path):
    path = tmp_path / "tokens.bin"
    data = (np.arange(50_000) % 60000).astype(np.uint16)
    data.tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    loader = BatchLoader(mm, 2, 32, seed=0)
    assert loader.shards[0] is mm  # kept as a memmap, no copy
    x, y = loader.next_batch()
    assert x.shape == (2, 32)
    for row_x, row_y in zip(x, y):
        start = int(np.where(data == row_x[0])[0][0])  # values are unique below 60000
        np.testing.assert_array_equal(row_x, data[start : start + 32])
        np.testing.assert_array_equal(row_y, data[start + 1 : start + 33])


def test_iter_sequential_covers_in_order_and_is_deterministic():
    data = np.arange(35, dtype=np.int64)
    loader = BatchLoader(data, batch_size=2, block_size=4, seed=0)
    state = loader.state_dict()
    batches = list(loader.iter_sequential())
    # windows start at 0,4,...,28 (start 32 would need token 36): 8 windows -> 4 batches of 2
    assert len(batches) == len(loader) == 4
    starts = np.concatenate([x[:, 0] for x, _ in batches]).tolist()
    assert starts == [0, 4, 8, 12, 16, 20, 24, 28]
    for x, y in batches:
        np.testing.assert_array_equal(y, x + 1)
    assert loader.state_dict() == state  # evaluation does not disturb the random stream
    again = list(loader.iter_sequential())
    for (x1, _), (x2, _) in zip(batches, again):
        np.testing.assert_array_equal(x1, x2)
    assert len(list(loader.iter_sequential(max_batches=3))) == 3


def test_iter_sequential_partial_last_batch_and_shards():
    a = np.arange(9, dtype=np.uint16)      # T=4: windows at 0, 4
    b = np.arange(100, 113, dtype=np.uint16)  # windows at 0, 4, 8
    loader = BatchLoader([a, b], batch_size=4, block_size=4)
    batches = list(loader.iter_sequential())
    assert [x.shape[0] for x, _ in batches] == [4, 1]
    starts = np.concatenate([x[:, 0] for x, _ in batches]).tolist()
    assert starts == [0, 4, 100, 104, 108]


def test_iter_spread_samples_the_whole_data_the_same_way_every_time(rng):
    """Evaluation windows come from everywhere in the data (every shard, first to last), evenly spaced,
    and are the same at every call; the random stream is not touched."""
    T, B = int(rng.integers(2, 9)), int(rng.integers(1, 5))
    shards = [np.arange(k * 100_000, k * 100_000 + int(rng.integers(40 * T, 400 * T)), dtype=np.int64)
              for k in range(int(rng.integers(1, 4)))]
    loader = BatchLoader(shards, batch_size=B, block_size=T, seed=int(rng.integers(1000)))
    state = loader.state_dict()
    n_batches = int(rng.integers(2, 6))                             # two windows at least: a gap to measure
    batches = list(loader.iter_spread(n_batches))
    assert len(batches) == n_batches and all(x.shape == (B, T) for x, _ in batches)
    starts = np.concatenate([x[:, 0] for x, _ in batches])
    for x, y in batches:
        np.testing.assert_array_equal(y, x + 1)                      # real windows (no shard crossing)
    total = int(sum(len(s) - T for s in shards))                     # window starts in all shards
    global_index = [sum(len(s) - T for s in shards[: v // 100_000]) + v % 100_000 for v in starts.tolist()]
    gaps = np.diff(global_index)
    assert global_index[0] == 0 and np.all(gaps > 0)
    assert gaps.max() - gaps.min() <= 1                              # evenly spaced ...
    assert global_index[-1] >= total - gaps.max() - 1                # ... up to the end of the last shard
    again = np.concatenate([x[:, 0] for x, _ in loader.iter_spread(n_batches)])
    np.testing.assert_array_equal(starts, again)
    assert loader.state_dict() == state


def test_iter_spread_on_small_data_is_every_window_once():
    loader = BatchLoader(np.arange(35, dtype=np.int64), batch_size=2, block_size=4)
    spread = [x.tolist() for x, _ in loader.iter_spread(100)]
    assert spread == [x.tolist() for x, _ in loader.iter_sequential()]


def test_validation_loss_samples_the_whole_split(rng):
    """A validation split whose second half differs from its first shows up in the measured loss (it used
    to be the first eval_iters windows only). The 'model' here reports the mean token id of its inputs."""
    from nanogpt_np.trainer import evaluate

    class MeanOfInputs:
        training = False

        def eval(self):
            pass

        def train(self, mode=True):
            pass

        def loss_on(self, x, y):
            return float(np.mean(x))
    n = int(rng.integers(2000, 5000))
    tokens = np.zeros(2 * n, dtype=np.int64)
    tokens[n:] = 1                                                 # the second half differs
    loss = evaluate(MeanOfInputs(), tokens, batch_size=int(rng.integers(1, 5)), block_size=8,
                    max_batches=int(rng.integers(2, 8)))
    assert 0.3 < loss < 0.7, loss
