"""The import graph of ``fl_app`` and ``strategies`` has no cycle, function-level imports included
(imports under ``if TYPE_CHECKING:`` never run, so they are left out).

grimp (import-linter's graph builder) reads every ``import`` statement of every module, also those
inside functions, which is where cycles used to hide (``from x import y`` inside a function body).
"""

from __future__ import annotations

import grimp


def strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (the graph has a few hundred nodes)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(component)
    return components


def module_graph() -> dict[str, set[str]]:
    graph = grimp.build_graph("fl_app", "strategies", exclude_type_checking_imports=True)
    modules = {m for m in graph.modules if m.split(".")[0] in ("fl_app", "strategies")}
    edges = {m: graph.find_modules_directly_imported_by(m) & modules for m in modules}
    # a package's __init__ is a module of its own; an import of "pkg" is an edge to it
    return edges


def test_the_graph_has_no_cycle():
    graph = module_graph()
    assert len(graph) > 60  # both packages were read
    cycles = [sorted(c) for c in strongly_connected_components(graph) if len(c) > 1]
    cycles += [[m] for m, targets in graph.items() if m in targets]
    assert cycles == [], f"import cycles: {cycles}"


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert sorted(map(sorted, (c for c in strongly_connected_components(graph) if len(c) > 1))) == [["a", "b", "c"]]
