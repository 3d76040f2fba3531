"""The theta-gradient estimator against the exact Delta_s, by enumerating every gate configuration."""

import torch
import torch.nn.functional as F

from tests.tiny import TinyNet, config_weight, enumerate_configs, flat_thetas, loss_and_grad_at, set_thetas

EXPLORE = 0.05


def _setup(seed=0, batch=16):
    torch.manual_seed(seed)
    net = TinyNet()
    x, y = torch.randn(batch, 1, 6, 6), torch.randint(0, 3, (batch,))
    return net, x, y


def _table(net, x, y):
    n = flat_thetas(net).numel()
    return [(c, *loss_and_grad_at(net, c, x, y)) for c in enumerate_configs(n)]


def exact_delta(table, theta):
    """Delta_s = E[L | xi_s = 1] - E[L | xi_s = 0] under xi ~ Bern(theta)."""
    out = []
    for s in range(len(theta)):
        on = sum(config_weight(c, theta) / theta[s] * L for c, L, _ in table if c[s] == 1)
        off = sum(config_weight(c, theta) / (1 - theta[s]) * L for c, L, _ in table if c[s] == 0)
        out.append(on - off)
    return torch.tensor(out)


def estimator_mean(table, p_on, theta_for_weight):
    """E[g_s] when xi ~ Bern(p_on) and g_s = dL/dxi_s / (2 P(xi_s)) with P computed from theta_for_weight."""
    mean = torch.zeros(len(p_on))
    for c, _, grad in table:
        p_sample = torch.where(c > 0.5, theta_for_weight, 1 - theta_for_weight)
        mean += config_weight(c, p_on) * grad / (2 * p_sample)
    return mean


def test_gate_code_matches_enumerated_trapezoid_in_batch_mode():
    """Monte Carlo mean of Gate.trapezoid_grad == enumerated mean of the reweighted estimator."""
    net, x, y = _setup()
    net.train()
    theta = torch.tensor([0.9, 0.3, 0.6, 0.7])
    table = _table(net, x, y)
    p_on = theta.clamp(EXPLORE, 1 - EXPLORE)
    expected = estimator_mean(table, p_on, p_on)
    samples = _draw_estimates(net, x, y, theta, per_example=False, draws=3000, seed=1)
    stderr = samples.std(0) / len(samples) ** 0.5
    assert torch.all((samples.mean(0) - expected).abs() < 4 * stderr + 1e-4), (samples.mean(0), expected)


def _trained(seed=3, batch=64):
    """A tiny net trained for 50 steps, so that its gates have real (not random) importances."""
    net, x, y = _setup(seed=seed, batch=batch)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(50):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net, x, y


def _draw_estimates(net, x, y, theta, per_example, draws, seed, fraction=1.0):
    """`draws` Monte Carlo estimates g from the Gate code itself, gates drawn with P(on) = clamp(theta)."""
    set_thetas(net, theta)
    for g in net.gates():
        g.mode, g.explore, g.per_example, g.sample_fraction = "sample", EXPLORE, per_example, fraction
    torch.manual_seed(seed)
    samples = []
    for _ in range(draws):
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        samples.append(torch.cat([g.trapezoid_grad() for g in net.gates()]))
    return torch.stack(samples)


def test_trapezoid_bias_against_exact_delta():
    """Eval-mode BN (examples independent): the trapezoid rule is a linearisation of Delta_s.
    Measured here: unit gates within ~30 % of the largest |Delta|; the layer gate's bias is larger."""
    net, x, y = _trained()
    net.eval()
    theta = torch.full((4,), 0.5)
    table = _table(net, x, y)
    delta, trap = exact_delta(table, theta), estimator_mean(table, theta, theta)
    unit_bias = (trap[:3] - delta[:3]).abs().max() / delta[:3].abs().max()
    print(f"exact Delta {delta.tolist()}, trapezoid {trap.tolist()}, unit relative bias {unit_bias:.3f}, "
          f"layer bias {float(trap[3] - delta[3]):+.4f}")
    assert unit_bias < 0.4
    top = int(delta[:3].abs().argmax())
    assert torch.sign(trap[top]) == torch.sign(delta[top])


def test_batch_shared_gates_in_train_mode_bn_amplify_unit_gradients():
    """Pinned pitfall: with one draw per batch, a draw with every unit off makes BN2's batch variance
    0 and dL/dxi there is amplified ~1/sqrt(eps); the estimate is then far from Delta."""
    net, x, y = _trained()
    net.train()
    theta = torch.full((4,), 0.5)
    table = _table(net, x, y)
    delta, trap = exact_delta(table, theta), estimator_mean(table, theta, theta)
    assert (trap[:3] - delta[:3]).abs().max() > 3 * delta[:3].abs().max()


def test_per_example_gates_in_train_mode_track_the_deterministic_delta():
    """Per-example draws leave BN2's batch statistics almost unchanged by one example's gates, so
    the estimate tracks Delta of the network evaluated with fixed statistics."""
    net, x, y = _trained()
    net.eval()
    theta = torch.full((4,), 0.5)
    delta = exact_delta(_table(net, x, y), theta)
    net.train()
    mc = _draw_estimates(net, x, y, theta, per_example=True, draws=1000, seed=4)
    err = (mc.mean(0)[:3] - delta[:3]).abs().max() / delta[:3].abs().max()
    print(f"per-example train-mode {mc.mean(0).tolist()} vs eval-mode Delta {delta.tolist()}: {err:.3f}")
    assert err < 0.4


def test_estimator_mean_does_not_depend_on_own_theta_near_one():
    """Sampling from clamp(theta) keeps the estimate exact at theta = 0.99; the method-notes variant
    (sample from theta, clamp only the weight) under-weights xi = 0 there: the pull-down of kept gates."""
    net, x, y = _setup(seed=5)
    net.train()
    table = _table(net, x, y)
    base = torch.tensor([0.7, 0.7, 0.7, 0.7])
    near_one = base.clone()
    near_one[0] = 0.99
    ours_mid = estimator_mean(table, base, base)[0]
    ours_top = estimator_mean(table, near_one.clamp(EXPLORE, 1 - EXPLORE), near_one.clamp(EXPLORE, 1 - EXPLORE))[0]
    notes_top = estimator_mean(table, near_one, near_one.clamp(EXPLORE, 1 - EXPLORE))[0]
    assert abs(float(ours_top - ours_mid)) < 1e-6
    assert abs(float(notes_top - ours_mid)) > 1e-3 * abs(float(ours_mid)) + 1e-6


def test_per_example_sampling_is_unbiased_and_has_lower_variance():
    """With eval-mode BN the examples are independent, so per-example gates estimate the same mean."""
    net, x, y = _setup(seed=7, batch=32)
    net.eval()
    theta = torch.tensor([0.8, 0.4, 0.6, 0.5])
    table = _table(net, x, y)
    expected = estimator_mean(table, theta, theta)
    results = {pe: _draw_estimates(net, x, y, theta, pe, draws=2000, seed=2) for pe in (True, False)}
    per_ex = results[True]
    stderr = per_ex.std(0) / len(per_ex) ** 0.5
    assert torch.all((per_ex.mean(0) - expected).abs() < 4 * stderr + 1e-4)
    ratio = results[False].var(0) / per_ex.var(0)
    print(f"variance ratio batch/per-example: {ratio.tolist()}")
    assert torch.all(ratio > 3)


def test_a_drawn_share_of_the_batch_estimates_the_same_mean_and_the_rest_sees_the_deterministic_gates():
    """prune.sample_fraction: with eval-mode BN (examples independent) the estimate from the drawn half of
    the batch, scaled to the whole batch, is the estimator of the drawn examples' mean loss (batches are
    shuffled, so over the data it is the full estimator's mean); the other half is gated by
    xi = 1[theta >= 0.5], so it carries no gate noise."""
    net, x, y = _setup(seed=7, batch=32)
    net.eval()
    theta = torch.tensor([0.8, 0.4, 0.6, 0.5])
    expected = estimator_mean(_table(net, x[:16], y[:16]), theta, theta)
    half = _draw_estimates(net, x, y, theta, True, draws=2000, seed=3, fraction=0.5)
    stderr = half.std(0) / len(half) ** 0.5
    assert torch.all((half.mean(0) - expected).abs() < 4 * stderr + 1e-4), (half.mean(0), expected)
    for g in net.gates():
        assert g.drawn_rows == 16
        assert torch.equal(g.xi[16:].detach(), g.keep_mask().float().expand(16, g.size))


def test_train_mode_bn_makes_unit_gradients_of_a_block_sum_to_zero_at_theta_one():
    """Pinned behaviour: BN after conv2 is scale invariant in train mode, so at xi = 1 the unit-gate
    gradients of a block sum to ~0: units are judged against their block-mates (docs/method.md)."""
    net, x, y = _setup(seed=9, batch=64)
    net.train()
    _, grad = loss_and_grad_at(net, torch.ones(4), x, y)
    units = grad[:3]
    assert units.abs().sum() > 1e-4
    assert abs(float(units.sum())) < 1e-3 * float(units.abs().sum()) + 1e-6
