"""Which tokens a set of sequences shares: a prefix tree (radix tree) over token ids.

A causal model's hidden state at position p depends only on tokens 0..p, so sequences that start with
the same tokens need those tokens run once. In SDPO scoring that happens twice over: the teacher and
student prompts of one interaction agree up to where the hindsight block enters the last user turn, and
the interactions of one conversation extend each other (turn k's prompt + response is the start of turn
k+1's prompt while the context window still holds the first message). A tree over all sequences of a
batch finds both kinds at once, by token equality, with no knowledge of conversations or templates:
a node is a run of tokens shared by every sequence below it, and running each node once on top of its
parent's KV cache computes every sequence exactly.

Built from the sorted sequences and the longest common prefix of neighbours (the classic LCP-interval
construction): O(total tokens) comparisons, no per-token Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PrefixTree:
    """Node 0 is the root (no tokens). Node n covers positions [start[n], end[n]) of every sequence whose
    leaf is n or below n; its tokens are `sequences[source[n]][start[n]:end[n]]`."""

    parent: list[int]  # -1 for the root
    start: list[int]  # = end[parent]
    end: list[int]
    source: list[int]  # one sequence passing through the node
    leaf: list[int]  # per sequence: the node where it ends (identical sequences share one)

    def __len__(self) -> int:
        return len(self.parent)

    def path(self, node: int) -> list[int]:
        """Nodes from the root's child down to `node`."""
        nodes = []
        while node > 0:
            nodes.append(node)
            node = self.parent[node]
        return nodes[::-1]

    def tokens(self) -> int:
        """Tokens a tree-walking scorer runs: each shared run once."""
        return sum(e - s for s, e in zip(self.start, self.end))


def common_prefix_length(*sequences: list[int]) -> int:
    """Number of leading ids all sequences share (compared in numpy: prompts run to thousands of ids)."""
    n = min(len(s) for s in sequences)
    first = np.asarray(sequences[0][:n])
    for other in sequences[1:]:
        differ = np.flatnonzero(first[:n] != np.asarray(other[:n]))
        n = int(differ[0]) if differ.size else n
    return n


def build_prefix_tree(sequences: list[list[int]]) -> PrefixTree:
    """The prefix tree of `sequences` (lists of token ids; empty ones end at the root)."""
    order = sorted(range(len(sequences)), key=lambda i: sequences[i])
    depth, source, parent = [0], [-1], [-1]  # the root
    leaf = [0] * len(sequences)
    stack = [0]  # the path of the previous sequence, root first, depths increasing
    previous = None
    for i in order:
        s = sequences[i]
        if previous is not None and s == sequences[previous]:
            leaf[i] = leaf[previous]
            continue
        shared = common_prefix_length(s, sequences[previous]) if previous is not None else 0
        # Close the previous path below `shared`: each closed node hangs under the one below it, or under
        # a new node at depth `shared` when the one below stops short of it (the branch point).
        while depth[stack[-1]] > shared:
            closed = stack.pop()
            if depth[stack[-1]] < shared:
                depth.append(shared), source.append(source[closed]), parent.append(-1)
                stack.append(len(depth) - 1)
            parent[closed] = stack[-1]
        if len(s) > depth[stack[-1]]:
            depth.append(len(s)), source.append(i), parent.append(-1)
            stack.append(len(depth) - 1)
        leaf[i] = stack[-1]  # `s` is never a proper prefix of an earlier (smaller) sequence
        previous = i
    while len(stack) > 1:
        closed = stack.pop()
        parent[closed] = stack[-1]

    start = [0] + [depth[parent[n]] for n in range(1, len(depth))]
    return PrefixTree(parent=parent, start=start, end=depth, source=source, leaf=leaf)


@dataclass(frozen=True)
class Chains:
    """The tree cut into chains, each run as one forward pass: from a node, follow the child with the
    most tokens below it down to a leaf (heavy-path decomposition). A conversation's turns become one
    long chain (its latest student sequence) with the teacher branches hanging off it, so a scorer makes
    few long passes instead of one per node, and the chains nest only O(log nodes) deep."""

    nodes: list[list[int]]  # per chain, tree nodes top-down
    parent: list[int]  # per chain: the chain holding its first node's parent (-1 for the root)
    level: list[int]  # 1 + the parent chain's level: a chain runs after its parent's level
    chain_of: list[int]  # per tree node (the root: -1)

    def __len__(self) -> int:
        return len(self.nodes)


def heavy_chains(tree: PrefixTree) -> Chains:
    """Cut `tree` into chains along its heaviest paths (see `Chains`)."""
    weight = [e - s for s, e in zip(tree.start, tree.end)]
    heavy = [-1] * len(tree)
    for node in sorted(range(1, len(tree)), key=lambda n: -tree.end[n]):  # children before parents
        parent = tree.parent[node]
        weight[parent] += weight[node]
        if heavy[parent] < 0 or weight[node] > weight[heavy[parent]]:
            heavy[parent] = node
    heads = sorted((n for n in range(1, len(tree)) if tree.parent[n] == 0 or heavy[tree.parent[n]] != n), key=lambda n: tree.end[n])
    nodes, parent, level, chain_of = [], [], [], [-1] * len(tree)
    for head in heads:  # by depth: a head's parent chain already exists
        chain, node = [], head
        while node >= 0:
            chain.append(node)
            chain_of[node] = len(nodes)
            node = heavy[node]
        above = chain_of[tree.parent[head]] if tree.parent[head] > 0 else -1
        nodes.append(chain), parent.append(above), level.append(level[above] + 1 if above >= 0 else 1)
    return Chains(nodes=nodes, parent=parent, level=level, chain_of=chain_of)
