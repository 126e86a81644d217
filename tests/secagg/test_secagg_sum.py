import numpy as np
import pytest

from fedlora.secagg import SecAggAbort, apply_mask, default_threshold, run_secure_sum
from fedlora.secagg.fixedpoint import clip, decode, encode


def _vectors(n, d, seed, big=False):
    rng = np.random.default_rng(seed)
    # Half of them exceed clip_norm=1 so clipping is exercised too.
    return {
        10 + 3 * i: (rng.normal(size=d) * (1.0 if big and i % 2 else 0.01)).astype(np.float32)
        for i in range(n)
    }


def _sum_problems(result, vectors, members, clip_norm=1.0):
    """What is wrong with a secure sum of `members`' clipped vectors (empty when it is exact)."""
    expected = sum(clip(vectors[i], clip_norm) for i in members)
    problems = []
    if result.survivors != sorted(members) or result.count != len(members):
        problems.append(f"survivors {result.survivors} (count {result.count}), expected {sorted(members)}")
    exact_error = np.max(np.abs(decode(result.sum_u32, result.scale, np.float64) - expected))
    if exact_error > result.error_bound:
        problems.append(f"fixed-point sum off by {exact_error:.3g} > bound {result.error_bound:.3g}")
    f32_slack = np.abs(expected).max() * 2.0**-23
    total_error = np.max(np.abs(result.total - expected))
    if total_error > result.error_bound + f32_slack:
        problems.append(f"float32 total off by {total_error:.3g} > {result.error_bound + f32_slack:.3g}")
    return problems


@pytest.mark.parametrize("n", [3, 5, 10])
def test_secure_sum_complete_graph(n):
    vecs = _vectors(n, 2000, n, big=True)
    assert _sum_problems(run_secure_sum(vecs, 1.0, seed=n), vecs, vecs) == []


@pytest.mark.parametrize("degree", [4, 6, None])
def test_secure_sum_sparse_graph(degree):
    vecs = _vectors(20, 2000, 20, big=True)
    assert _sum_problems(run_secure_sum(vecs, 1.0, degree=degree, seed=1), vecs, vecs) == []


@pytest.mark.parametrize("n", [3, 5, 10])
@pytest.mark.parametrize("when", ["drop_before_masking", "drop_before_unmask"])
def test_every_tolerable_number_of_dropouts(n, when):
    vecs = _vectors(n, 500, n)
    ids = sorted(vecs)
    t = default_threshold(n - 1)
    rng = np.random.default_rng(n)
    for drops in range(1, n - t + 1):
        gone = set(rng.choice(ids, size=drops, replace=False).tolist())
        result = run_secure_sum(vecs, 1.0, seed=drops, **{when: gone})
        # Dropping before masking removes the input; after masking it stays in the sum.
        members = [i for i in ids if i not in gone] if when == "drop_before_masking" else ids
        assert _sum_problems(result, vecs, members) == []
        assert result.dropped == (sorted(gone) if when == "drop_before_masking" else [])
    with pytest.raises(SecAggAbort, match="threshold"):
        run_secure_sum(vecs, 1.0, **{when: set(ids[: n - t + 1])})


def test_dropouts_at_every_stage_on_sparse_graph():
    vecs = _vectors(20, 500, 3)
    result = run_secure_sum(
        vecs,
        1.0,
        degree=6,
        seed=2,
        drop_before_shares={13},
        drop_before_masking={22, 40},
        drop_before_unmask={31},
    )
    assert _sum_problems(result, vecs, [i for i in vecs if i not in {13, 22, 40}]) == []


def test_too_few_left_before_shares_aborts():
    vecs = _vectors(5, 10, 0)
    with pytest.raises(SecAggAbort, match="2 participants answered at share exchange"):
        run_secure_sum(vecs, 1.0, drop_before_shares={10, 13, 16})


def _chi2(words: np.ndarray) -> float:
    counts = np.bincount(words.view(np.uint8), minlength=256)
    expected = words.size * 4 / 256
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("known", ["nothing", "self-mask seed"])
def test_masked_vector_looks_uniform_to_the_server(make_round, known):
    # A survivor's self-mask seed is reconstructed by the server at unmask: the pairwise masks
    # alone must still hide its input, or one masked input minus PRG(b) would be the input.
    rnd = make_round(n=3, d=100_000)
    # A very structured input: a ramp. Unmasked, its encoding is far from uniform.
    rnd.vectors[0] = np.linspace(-1, 1, 100_000).astype(np.float32) * 1e-3
    relays = rnd.to_share_relays()
    y = {m.sender: m.masked for m in rnd.masked(relays)}[0].copy()
    state = rnd.states[0]
    if known == "self-mask seed":
        apply_mask(y, state.b_seed, -1)
    y = y[:-1]  # the count slot
    x_enc = encode(rnd.vectors[0], state.clip_norm, state.scale, bytes(32))  # the control: not masked
    assert _chi2(y) < 400  # 255 d.o.f.: mean 255, sd 22.6; 400 is p < 1e-8
    assert _chi2(x_enc) > 10_000  # the control: the same test catches structure
    corr = np.corrcoef(y.astype(np.float64), x_enc.view(np.int32).astype(np.float64))[0, 1]
    assert abs(corr) < 0.02  # sd of r under independence is 1/sqrt(d) ~ 0.003
