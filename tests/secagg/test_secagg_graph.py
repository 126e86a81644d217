import pytest

from fedlora.secagg import communication_graph, default_degree, default_threshold


def _connected(graph):
    start = next(iter(graph))
    seen, todo = {start}, [start]
    while todo:
        for j in graph[todo.pop()]:
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return len(seen) == len(graph)


@pytest.mark.parametrize(
    "n, k, seed", [(20, 6, 0), (20, 5, 1), (101, 14, b"abc"), (64, 2, 7), (9, 8, 0)]
)
def test_graph_is_k_regular_symmetric_connected(n, k, seed):
    ids = [3 * i + 1 for i in range(n)]
    g = communication_graph(ids, k, seed)
    assert sorted(g) == ids
    for i, nbrs in g.items():
        assert len(nbrs) == len(set(nbrs)) == min(k, n - 1)
        assert i not in nbrs
        assert all(i in g[j] for j in nbrs)
    assert _connected(g)


def test_graph_depends_on_seed_only():
    ids = list(range(30))
    assert communication_graph(ids, 6, 1) == communication_graph(ids[::-1], 6, 1)
    assert communication_graph(ids, 6, 1) != communication_graph(ids, 6, 2)


def test_odd_degree_on_odd_count_refused():
    with pytest.raises(ValueError, match="even k"):
        communication_graph(list(range(21)), 5, 0)


def test_defaults():
    assert default_degree(5) == 4  # small: complete graph
    assert default_degree(1000) % 2 == 0 and default_degree(1000) < 40
    for k in range(1, 40):
        t = default_threshold(k)
        assert 2 * t > k + 1 and t <= k + 1
