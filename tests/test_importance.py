"""Loss-aware sampling of t (improved DDPM sec. 3.3): the sampler's warm-up, its probabilities and unbiased
weights on synthetic loss tables, and the training loop with it (the first steps of a uniform run, exact resume,
two ranks keeping one history)."""

import math

import pytest
import torch
from tiny import losses, train_tiny

from ddpm.checkpoint import latest_checkpoint, load_checkpoint
from ddpm.importance import ImportanceSampler

T = 6


def _filled(table: torch.Tensor) -> ImportanceSampler:
    """A sampler whose history is `table` [T, 10] (each row added in order)."""
    s = ImportanceSampler(table.shape[0])
    for j in range(table.shape[1]):
        s.update(torch.arange(table.shape[0]), table[:, j])
    return s


def _synthetic(seed: int = 0) -> torch.Tensor:
    """Losses [T, 10] of very different sizes per t, as L_vlb's terms are (the first ones dominate)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([8.0, 2.0, 1.0, 0.5, 0.2, 0.05], dtype=torch.float64)[:, None]
    return scale * (1 + 0.3 * torch.rand(T, 10, generator=g, dtype=torch.float64))


def test_warm_up_draws_t_as_the_uniform_sampler_with_weights_one():
    s = ImportanceSampler(T)
    rounds = 0
    while not s.warmed_up():
        g, ref = torch.Generator().manual_seed(rounds), torch.Generator().manual_seed(rounds)
        t = s.sample(8, g)
        assert torch.equal(t, torch.randint(0, T, (8,), generator=ref))  # the uniform run's own draw
        assert torch.equal(s.weights(t), torch.ones(8, dtype=torch.float64))
        assert torch.equal(s.probs(), torch.full((T,), 1 / T, dtype=torch.float64))
        s.update(t, torch.rand(8, dtype=torch.float64) + t)
        rounds += 1
    assert (s.counts == 10).all() and rounds >= 60 / 8  # 10 losses for each of the 6 timesteps first
    assert not torch.equal(s.probs(), torch.full((T,), 1 / T, dtype=torch.float64))  # now loss-aware
    # one t short of 10 keeps it uniform
    s.counts[3] = 9
    assert not s.warmed_up() and torch.equal(s.weights(torch.tensor([0, 5])), torch.ones(2, dtype=torch.float64))


def test_probabilities_by_hand():
    table = torch.tensor([[1.0] * 10, [3.0] * 10, [1.0, 2.0] * 5, [0.0] * 10, [4.0] * 10, [1.0] * 9 + [0.5]],
                         dtype=torch.float64)
    s = _filled(table)
    root = torch.tensor([1.0, 3.0, math.sqrt(2.5), 0.0, 4.0, math.sqrt(9.25 / 10)], dtype=torch.float64)
    want = 0.999 * root / root.sum() + 0.001 / T  # sqrt(E[L_t^2]), mixed with 0.001 uniform
    torch.testing.assert_close(s.probs(), want, rtol=1e-14, atol=0)
    assert s.probs().sum().item() == pytest.approx(1.0, abs=1e-15) and s.probs()[3] == 0.001 / T  # never 0
    t = torch.tensor([0, 3, 4])
    torch.testing.assert_close(s.weights(t), 1 / (T * want[t]), rtol=1e-14, atol=0)


def test_history_keeps_the_last_ten_and_skips_non_finite_losses():
    s = ImportanceSampler(2)
    for i in range(13):
        s.update(torch.tensor([0]), torch.tensor([float(i)]))
    assert s.losses[0].tolist() == [float(i) for i in range(3, 13)] and s.counts.tolist() == [10, 0]
    s.update(torch.tensor([0, 1, 1]), torch.tensor([math.nan, math.inf, 2.0]))
    assert s.losses[0, -1] == 12.0 and s.counts.tolist() == [10, 1] and s.losses[1, 0] == 2.0
    with pytest.raises(ValueError, match="t and losses must both be"):
        s.update(torch.tensor([0, 1]), torch.tensor([1.0]))


def test_the_weighted_loss_is_unbiased():
    """E_{t ~ p}[L_t / (T p_t)] = mean_t L_t: exactly by enumeration, and over 200,000 draws of the sampler
    within 4 standard errors, with less variance than uniform draws (the point of it: p_t ~ the loss size)."""
    table = _synthetic()
    s = _filled(table)
    loss = table.mean(1)  # a synthetic per-t expected loss L_t
    p, w = s.probs(), s.weights(torch.arange(T))
    assert (p * w * loss).sum().item() == pytest.approx(loss.mean().item(), rel=1e-14)
    n = 200_000
    t = s.sample(n, torch.Generator().manual_seed(1))
    est = s.weights(t) * loss[t]
    assert abs(est.mean().item() - loss.mean().item()) < 4 * est.std().item() / math.sqrt(n)
    counts = torch.bincount(t, minlength=T).double() / n
    assert (counts - p).abs().max().item() < 4 * math.sqrt(p.max().item() / n)  # t really is drawn from p
    uniform = loss[torch.randint(0, T, (n,), generator=torch.Generator().manual_seed(2))]
    assert est.var().item() < 0.1 * uniform.var().item()


def test_state_dict_round_trip_repeats_the_draws():
    s = _filled(_synthetic(3))
    other = ImportanceSampler(T)
    other.load_state_dict(s.state_dict())
    draws = [x.sample(64, torch.Generator().manual_seed(5)) for x in (s, other)]
    assert torch.equal(draws[0], draws[1]) and torch.equal(other.probs(), s.probs())
    state = s.state_dict()
    state["losses"][0, 0] = -1.0  # a copy: the sampler's own table is untouched
    assert s.losses[0, 0] > 0
    with pytest.raises(ValueError, match="does not fit T = 7"):
        ImportanceSampler(7).load_state_dict(s.state_dict())


# ------------------------------------------------------------------------------------- in the training loop

# T = 4 and 16 examples a step: every t holds 10 losses after 4 steps, so the runs below go past the warm-up
IMPORTANCE = ["--set", "diffusion.num_timesteps=4", "--set", "diffusion.timestep_sampler=importance"]


def _state(run):
    return load_checkpoint(latest_checkpoint(run / "checkpoints"))


def test_a_run_starts_as_the_uniform_run_and_resumes_bit_for_bit(tmp_path):
    uniform, a, b = tmp_path / "uniform", tmp_path / "a", tmp_path / "b"
    train_tiny(uniform, 1, "--set", "diffusion.num_timesteps=4")
    train_tiny(a, 1, *IMPORTANCE)
    cu, ca = _state(uniform), _state(a)
    assert set(ca.tensors) - set(cu.tensors) == {"importance/losses", "importance/counts"}
    for k in cu.tensors:  # the warm-up: the same t, weights 1, so the same step
        assert torch.equal(ca.tensors[k], cu.tensors[k]), k
    assert losses(a) == losses(uniform)
    # 7 steps at once, or 4 and a resume for 3: the history travels in the checkpoint
    train_tiny(a, 7, "--resume", *IMPORTANCE)
    train_tiny(b, 4, *IMPORTANCE)
    history = ImportanceSampler(4)
    saved = _state(b).tensors
    history.load_state_dict({"losses": saved["importance/losses"], "counts": saved["importance/counts"]})
    assert history.warmed_up()  # before the resume, so that its draws are loss-aware ...
    assert history.probs().max() > 1.1 * history.probs().min()  # ... and not uniform (measured: 0.22 to 0.28)
    train_tiny(b, 7, "--resume", *IMPORTANCE)
    ca, cb = _state(a), _state(b)
    assert ca.step == cb.step == 7 and ca.tensors.keys() == cb.tensors.keys()
    for k in ca.tensors:
        assert torch.equal(ca.tensors[k], cb.tensors[k]), k
    assert losses(a) == losses(b)


@pytest.mark.slow
def test_two_ranks_keep_the_history_of_the_whole_batch(tmp_path):
    """Under torchrun every rank adds all ranks' losses, in the global batch's order: the same history as one
    process with the whole batch (to float32 rounding of the losses), on both ranks (rank 0 saves it)."""
    from test_distributed import TINY, _torchrun

    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--batch-size", "16", *TINY, *IMPORTANCE]
    from ddpm.cli import main

    assert main(["train", "--out", str(one), "--steps", "5", *common]) == 0
    _torchrun(2, "train", "--out", str(two), "--steps", "5", *common)
    a, b = _state(one).tensors, _state(two).tensors
    assert torch.equal(a["importance/counts"], b["importance/counts"]) and (a["importance/counts"] == 10).all()
    torch.testing.assert_close(b["importance/losses"], a["importance/losses"], rtol=1e-3, atol=1e-6)
