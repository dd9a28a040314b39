"""OpenAssistant (oasst1/oasst2) message rows, rebuilt into their conversation trees.

Deleted messages and messages that failed review are dropped with everything below them (the dataset's own
moderation, not counted); so are empty messages, skipped and counted. SFT conversations
follow the best-ranked reply (rank 0) from each root down to a leaf; preference pairs come from sibling
assistant replies ranked against each other, each with the conversation that led to them as the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from rlhf_pipeline.stages.data.formats.records import Record, Skipped

ROLES = {"prompter": "user", "assistant": "assistant"}


@dataclass
class Node:
    record: Record
    id: str
    role: str
    text: str
    rank: float
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)

    def path(self) -> list[Node]:
        nodes, node = [], self
        while node is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]


def build_trees(records: list[Record]) -> tuple[list[Node], Skipped]:
    """The root prompts of every tree, with only the messages that are neither deleted nor failed review nor
    empty; and the empty ones, skipped."""
    nodes: dict[str, Node] = {}
    parents: dict[str, str | None] = {}
    skipped = Skipped(len(records))
    for record in records:
        role = record.get("role")
        if role not in ROLES:
            raise record.error("role", f"{role!r} is not 'prompter' or 'assistant'")
        if record.get("deleted", bool, default=False) or record.get("review_result", bool, default=True) is False:
            continue
        if not record.get("text").strip():
            skipped.add("empty message", record)
            continue
        rank = record.get("rank", (int, float), default=None)
        node = Node(
            record,
            record.get("message_id"),
            ROLES[role],
            record.get("text"),
            float("inf") if rank is None else float(rank),
        )
        nodes[node.id] = node
        parents[node.id] = record.get("parent_id", default=None)
    dropped = {r.row.get("message_id") for r in records} - nodes.keys()
    roots = []
    for node_id, parent_id in parents.items():
        node = nodes[node_id]
        if parent_id is None:
            roots.append(node)
        elif parent_id in nodes:
            node.parent = nodes[parent_id]
            node.parent.children.append(node)
        elif parent_id not in dropped:
            raise node.record.error("parent_id", f"{parent_id!r} is not a message_id in this data")
    return [root for root in roots if root.role == "user"], skipped


def _messages(nodes: list[Node]) -> list[dict[str, str]]:
    return [{"role": n.role, "content": n.text} for n in nodes]


def sft(records: list[Record]) -> tuple[list[dict[str, Any]], Skipped]:
    rows = []
    roots, skipped = build_trees(records)
    for root in roots:
        path = [root]
        while path[-1].children:
            path.append(min(path[-1].children, key=lambda n: n.rank))
        while path and path[-1].role != "assistant":
            path.pop()
        if path:
            rows.append({"messages": _messages(path)})
    return rows, skipped


def preference(records: list[Record]) -> tuple[list[dict[str, Any]], Skipped]:
    rows = []
    stack, skipped = build_trees(records)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        ranked = sorted(
            (c for c in node.children if c.role == "assistant" and c.rank != float("inf")), key=lambda n: n.rank
        )
        for better, worse in combinations(ranked, 2):
            if better.rank < worse.rank:
                rows.append(
                    {"prompt": _messages(node.path()), "chosen": _messages([better]), "rejected": _messages([worse])}
                )
    return rows, skipped


def prompt(records: list[Record]) -> tuple[list[dict[str, Any]], Skipped]:
    roots, skipped = build_trees(records)
    return [{"prompt": _messages([root])} for root in roots], skipped
