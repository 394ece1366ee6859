"""Built-in prefix caches (`engine.prefix_cache`): none, hashed blocks (vLLM's scheme), a radix tree (SGLang's).

Pure Python, no torch. Both real ones index full blocks by content and prefix; they differ in what they drop
under memory pressure:

- `blocks` keys each block by the block before it and its own tokens, in one flat table, and evicts the
  least recently used evictable block, whatever its depth. A dropped interior block makes the blocks after it
  unreachable until it is computed again; they stay in the table until they are evicted in turn.
- `radix` keeps one tree node per block, children keyed by their tokens, and evicts only leaves (least recently
  used first), so a shared prefix outlives every continuation of it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import attrs

from ..core.interfaces import PrefixCache


@attrs.frozen
class NoPrefixCacheConfig:
    """No parameters: every prompt is prefilled from scratch."""


class NoPrefixCache(PrefixCache):
    """No sharing (the default): nothing is ever cached."""

    Config = NoPrefixCacheConfig
    enabled = False

    def __init__(self, config: NoPrefixCacheConfig | None = None) -> None:
        self.config = config or NoPrefixCacheConfig()

    def match(self, keys: Sequence[tuple[int, ...]]) -> list[int]:
        return []

    def insert(self, keys: Sequence[tuple[int, ...]], blocks: Sequence[int]) -> list[bool]:
        return [False] * len(blocks)

    def set_evictable(self, block: int, evictable: bool) -> None:
        raise AssertionError("no block is ever cached without a prefix cache")

    def evict(self, n: int) -> list[int]:
        return []


@attrs.frozen
class HashedBlocksConfig:
    """No parameters."""


class HashedBlocks(PrefixCache):
    """One table from (previous block, tokens) to blocks; least recently used evictable block first."""

    Config = HashedBlocksConfig

    def __init__(self, config: HashedBlocksConfig | None = None) -> None:
        self.config = config or HashedBlocksConfig()
        self._by_key: dict[tuple, int] = {}
        self._key_of: dict[int, tuple] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # evictable blocks, least recently used first

    # A block's key is (the block holding the prefix before it, its own tokens): exact, where a hash chain
    # could alias two prefixes on a collision. Blocks after an evicted one keep a key no lookup can reach.

    def match(self, keys: Sequence[tuple[int, ...]]) -> list[int]:
        blocks: list[int] = []
        parent = -1
        for k in keys:
            b = self._by_key.get((parent, k))
            if b is None:
                break
            blocks.append(b)
            if b in self._lru:
                self._lru.move_to_end(b)
            parent = b
        return blocks

    def insert(self, keys: Sequence[tuple[int, ...]], blocks: Sequence[int]) -> list[bool]:
        held = []
        parent = -1
        for k, b in zip(keys, blocks):
            key = (parent, k)
            have = self._by_key.get(key)
            if have is None:
                self._by_key[key] = have = b
                self._key_of[b] = key
            if have != b:
                break
            held.append(True)
            parent = have
        return held + [False] * (len(blocks) - len(held))

    def set_evictable(self, block: int, evictable: bool) -> None:
        if evictable:
            self._lru[block] = None
        else:
            self._lru.pop(block, None)

    def evict(self, n: int) -> list[int]:
        out = []
        while self._lru and len(out) < n:
            b, _ = self._lru.popitem(last=False)
            del self._by_key[self._key_of.pop(b)]
            out.append(b)
        return out


class _Node:
    __slots__ = ("block", "children", "parent", "key")

    def __init__(self, block: int, parent: _Node | None, key: tuple[int, ...]) -> None:
        self.block = block
        self.parent = parent
        self.key = key
        self.children: dict[tuple[int, ...], _Node] = {}


@attrs.frozen
class RadixTreeConfig:
    """No parameters."""


class RadixTree(PrefixCache):
    """A tree of blocks, children keyed by their tokens; only evictable leaves are dropped, least recent first."""

    Config = RadixTreeConfig

    def __init__(self, config: RadixTreeConfig | None = None) -> None:
        self.config = config or RadixTreeConfig()
        self._root = _Node(-1, None, ())
        self._node: dict[int, _Node] = {}
        self._evictable: set[int] = set()
        self._leaves: OrderedDict[int, None] = OrderedDict()  # evictable leaves, least recently used first

    def match(self, keys: Sequence[tuple[int, ...]]) -> list[int]:
        node, blocks = self._root, []
        for k in keys:
            node = node.children.get(k)
            if node is None:
                break
            blocks.append(node.block)
            if node.block in self._leaves:
                self._leaves.move_to_end(node.block)
        return blocks

    def insert(self, keys: Sequence[tuple[int, ...]], blocks: Sequence[int]) -> list[bool]:
        node, held = self._root, []
        for k, b in zip(keys, blocks):
            child = node.children.get(k)
            if child is None:
                child = node.children[k] = self._node[b] = _Node(b, node, k)
                self._leaves.pop(node.block, None)  # the parent is no longer a leaf
            if child.block != b:
                break
            held.append(True)
            node = child
        return held + [False] * (len(blocks) - len(held))

    def set_evictable(self, block: int, evictable: bool) -> None:
        node = self._node[block]
        if evictable:
            self._evictable.add(block)
            if not node.children:
                self._leaves[block] = None
        else:
            self._evictable.discard(block)
            self._leaves.pop(block, None)

    def evict(self, n: int) -> list[int]:
        out = []
        while self._leaves and len(out) < n:
            b, _ = self._leaves.popitem(last=False)
            node = self._node.pop(b)
            self._evictable.discard(b)
            parent = node.parent
            del parent.children[node.key]
            out.append(b)
            if parent is not self._root and not parent.children and parent.block in self._evictable:
                self._leaves[parent.block] = None  # its last child went: it is a leaf now
        return out
