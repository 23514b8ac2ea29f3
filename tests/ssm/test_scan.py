"""The selective-scan functional: agreement, hooks, gradients."""

import pytest
import torch

from qmamba_ao.ssm import ScanHooks, selective_scan, selective_scan_ref


def _inputs(b=2, d=8, n=4, length=13, groups=1, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    t = dict(
        u=r(b, d, length),
        delta=r(b, d, length),
        A=-torch.rand(d, n, generator=g, dtype=dtype) * 2 - 0.1,
        B=r(b, groups, n, length),
        C=r(b, groups, n, length),
        D=r(d),
        z=r(b, d, length),
        delta_bias=r(d) * 0.1,
    )
    if requires_grad:
        for v in t.values():
            v.requires_grad_(True)
    return t


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("use_z", [True, False])
def test_matches_reference_float64(groups, use_z):
    t = _inputs(groups=groups)
    if not use_z:
        t.pop("z")
    ref = selective_scan_ref(**t, delta_softplus=True)
    out = selective_scan(**t, delta_softplus=True)
    assert torch.allclose(out, ref, rtol=1e-10, atol=0)


def test_grouped_channels_read_their_own_group():
    t = _inputs(groups=4, d=8)
    base = selective_scan(**t, delta_softplus=True)
    t["B"][:, 3] += 1.0  # only channels 6, 7 read group 3
    changed = selective_scan(**t, delta_softplus=True)
    diff = (changed - base).abs().amax(dim=(0, 2))
    assert torch.all(diff[:6] == 0) and torch.all(diff[6:] > 0)


@pytest.mark.parametrize("groups", [1, 2])
def test_handwritten_backward_matches_autograd(groups):
    t = _inputs(groups=groups, requires_grad=True, length=9)
    out = selective_scan(**t, delta_softplus=True)
    grads = torch.autograd.grad(out.square().sum(), list(t.values()))
    t2 = {k: v.detach().clone().requires_grad_(True) for k, v in t.items()}
    ref = selective_scan_ref(**t2, delta_softplus=True)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(t2.values()))
    for name, a, b in zip(t, grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10), name


def test_gradcheck_core():
    t = _inputs(b=1, d=4, n=2, length=5, groups=2, requires_grad=True)
    args = [t[k] for k in ("u", "delta", "A", "B", "C")]
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, delta_softplus=True), args)


def test_identity_hooks_change_nothing():
    t = _inputs()
    calls = {"h": 0}

    def h_hook(h, step):
        calls["h"] += 1
        return h

    hooks = ScanHooks(dA=lambda x: x, dBu=lambda x: x, h=h_hook, y=lambda x: x)
    out = selective_scan(**t, delta_softplus=True, hooks=hooks)
    assert torch.allclose(out, selective_scan_ref(**t, delta_softplus=True), rtol=1e-10, atol=0)
    assert calls["h"] == t["u"].shape[-1]


def test_hook_shapes_and_step_order():
    t = _inputs(b=2, d=8, n=4, length=6)
    seen = {}
    steps = []

    def rec(name):
        def f(x):
            seen[name] = tuple(x.shape)
            return x

        return f

    def h_hook(h, step):
        steps.append(step)
        seen["h"] = tuple(h.shape)
        return h

    selective_scan(**t, hooks=ScanHooks(dA=rec("dA"), dBu=rec("dBu"), h=h_hook, y=rec("y")))
    assert seen == {"dA": (2, 8, 6, 4), "dBu": (2, 8, 6, 4), "h": (2, 8, 4), "y": (2, 8, 6)}
    assert steps == list(range(6))


def test_h_feedback_switch():
    t = _inputs(length=10)
    t.pop("z")
    t.pop("D")
    zero_state = lambda h, step: torch.zeros_like(h)  # noqa: E731
    fed = selective_scan(**t, hooks=ScanHooks(h=zero_state, h_feedback=True))
    assert torch.count_nonzero(fed) == 0
    # Read-out only: y still zero (C . 0) but the recurrence is untouched, so a hook that
    # records the state it receives sees the exact states.
    states = []
    selective_scan(**t, hooks=ScanHooks(h=lambda h, s: states.append(h) or torch.zeros_like(h), h_feedback=False))
    exact = []
    selective_scan(**t, hooks=ScanHooks(h=lambda h, s: exact.append(h) or h))
    assert all(torch.equal(a, b) for a, b in zip(states, exact))
    # Halving the state each step: feedback compounds, read-out only does not.
    half = lambda h, step: h * 0.5  # noqa: E731
    plain = selective_scan(**t)
    ro = selective_scan(**t, hooks=ScanHooks(h=half, h_feedback=False))
    assert torch.allclose(ro, plain * 0.5, rtol=1e-12)
    fb = selective_scan(**t, hooks=ScanHooks(h=half, h_feedback=True))
    assert not torch.allclose(fb, plain * 0.5)


def test_bad_shapes_raise_clear_errors():
    t = _inputs(d=6)
    t["B"] = t["B"].expand(-1, 4, -1, -1)
    t["C"] = t["C"].expand(-1, 4, -1, -1)
    with pytest.raises(ValueError, match="divisible by groups"):
        selective_scan(**t)
    t = _inputs()
    t["A"] = t["A"][:3]
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(**t)


# -- blocks of steps and the two formulations ------------------------------------------------


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 3 steps for the default test shape (b=2, d=8, n=4), so every path crosses blocks."""
    from qmamba_ao.ssm import functional

    monkeypatch.setattr(functional, "BLOCK_ELEMS", 2 * 8 * 4 * 3)
    yield functional
    functional.set_scan_method("auto")


@pytest.mark.parametrize("method", ["loop", "parallel"])
@pytest.mark.parametrize("groups", [1, 4])
def test_blocked_scan_matches_reference_float64(small_blocks, method, groups):
    small_blocks.set_scan_method(method)
    t = _inputs(groups=groups, length=13)
    assert torch.allclose(
        selective_scan(**t, delta_softplus=True), selective_scan_ref(**t, delta_softplus=True), rtol=1e-10, atol=0
    )


@pytest.mark.parametrize("decay", ["zero", "tiny", "one"])
def test_parallel_equals_loop_with_extreme_quantized_decays(small_blocks, decay):
    # A quantized dA may be exactly 0 (state forgotten), subnormal or exactly 1; the associative
    # scan only multiplies and adds, so it agrees with the step loop without NaN or Inf.
    t = _inputs(length=13)
    g = torch.Generator().manual_seed(1)
    value = {"zero": 0.0, "tiny": 1e-300, "one": 1.0}[decay]

    def dA_hook(x):
        mask = torch.rand(x.shape, generator=g, dtype=x.dtype) < 0.3
        return x.masked_fill(mask, value)

    outs = {}
    for method in ("loop", "parallel"):
        small_blocks.set_scan_method(method)
        g.manual_seed(1)
        outs[method] = selective_scan(**t, delta_softplus=True, hooks=ScanHooks(dA=dA_hook))
    assert torch.isfinite(outs["parallel"]).all()
    assert torch.allclose(outs["parallel"], outs["loop"], rtol=1e-10, atol=1e-12)


def test_strongly_decaying_channels_stay_finite(small_blocks):
    t = _inputs(length=13)
    t["A"] = t["A"] * 1e4  # exp(delta * A) underflows to 0 for most steps
    for method in ("loop", "parallel"):
        small_blocks.set_scan_method(method)
        out = selective_scan(**t, delta_softplus=True)
        assert torch.isfinite(out).all()
        assert torch.allclose(out, selective_scan_ref(**t, delta_softplus=True), rtol=1e-10, atol=1e-300)


def test_gradcheck_across_blocks(monkeypatch):
    from qmamba_ao.ssm import functional

    monkeypatch.setattr(functional, "BLOCK_ELEMS", 1 * 4 * 2 * 2)  # blocks of 2 steps
    t = _inputs(b=1, d=4, n=2, length=5, groups=2, requires_grad=True)
    args = [t[k] for k in ("u", "delta", "A", "B", "C")]
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, delta_softplus=True), args)


def test_hooks_across_blocks_see_every_step_in_order(small_blocks):
    t = _inputs(length=10)
    steps, blocks = [], []
    ref = selective_scan(**t, delta_softplus=True)
    out = selective_scan(**t, delta_softplus=True, hooks=ScanHooks(h=lambda h, s: steps.append(s) or h))
    # identity hooks change nothing beyond the last bits (the hooked scan forms the decay with exp, the
    # plain one with exp2: see functional.LOG2E)
    assert steps == list(range(10)) and torch.allclose(out, ref, rtol=1e-12, atol=0)
    selective_scan(**t, hooks=ScanHooks(h=lambda h, s: h, h_block=lambda hs, s: blocks.append((s, len(hs))) or hs))
    assert blocks == [(0, 3), (3, 3), (6, 3), (9, 1)]
    # with feedback the per-step hook runs at every step and the block hook is not used
    half = lambda h, s: h * 0.5  # noqa: E731
    fb = selective_scan(**t, hooks=ScanHooks(h=half, h_block=lambda hs, s: 1 / 0, h_feedback=True))
    small_blocks.BLOCK_ELEMS = 1 << 30  # one block: the same values
    assert torch.allclose(fb, selective_scan(**t, hooks=ScanHooks(h=half, h_feedback=True)), rtol=1e-12)


def test_scan_method_is_validated():
    from qmamba_ao.ssm import functional

    with pytest.raises(ValueError, match="scan method must be one of"):
        functional.set_scan_method("fast")
    with pytest.raises(ValueError, match="need the per-step hook h"):
        selective_scan(**_inputs(), hooks=ScanHooks(h_block=lambda hs, s: hs, h_feedback=True))


@pytest.mark.parametrize("feedback", [False, True])
def test_hooked_scan_is_differentiable(feedback):
    """Hooks under autograd (e.g. learning quantization parameters) take a differentiable loop whose
    gradients equal those of the hand-written backward when the hooks are identities."""
    torch.manual_seed(0)
    b, d, n, length = 2, 6, 3, 11
    u, delta = torch.randn(b, d, length, dtype=torch.float64), torch.rand(b, d, length, dtype=torch.float64)
    A = -torch.rand(d, n, dtype=torch.float64) - 0.1
    B, C = torch.randn(b, 1, n, length, dtype=torch.float64), torch.randn(b, 1, n, length, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (u, delta, A, B, C)]
    plain = torch.autograd.grad(selective_scan(*inputs).square().sum(), inputs)
    hooks = ScanHooks(h=lambda h, t: h * 1.0, h_feedback=feedback)
    hooked = torch.autograd.grad(selective_scan(*inputs, hooks=hooks).square().sum(), inputs)
    for a, c in zip(plain, hooked):
        torch.testing.assert_close(a, c)
