"""validator-core's reader of Ray's own view of the cluster: the head dashboard's REST State API.

validator-core never joins the public cluster as a Ray driver (a driver is a member that every
other member can reach); it reads what the head's GCS knows over HTTP, token in a header, and
parses only the fields it uses. The cluster is untrusted and the dashboard may be down, slow or
answer garbage: every such case is ``None`` ("Ray could not be asked"), never an exception, so
a caller decides what missing data means (it never means guilt).

    GET <dashboard>/api/v0/nodes?filter_keys=node_id&filter_predicates==&filter_values=<hex>&detail=true

The ``node_id`` filter is applied by the GCS itself (a node selector), so the answer holds at
most that node, ALIVE or DEAD: the GCS keeps dead nodes in its table (the last 1000 by default),
so a node it does not list at all was never one of its nodes, or was forgotten long ago.
"""

from __future__ import annotations

import logging
import re
from typing import Literal

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

log = logging.getLogger("rayhorde.validator")

NodeState = Literal["ALIVE", "DEAD", "UNKNOWN"]  # UNKNOWN: Ray answered, and has no such node
NODE_ID = re.compile(r"[0-9a-f]{56}")  # a Ray node id: 28 bytes, hex


class _Node(BaseModel):
    model_config = ConfigDict(extra="ignore")
    node_id: str
    state: Literal["ALIVE", "DEAD"]
    resources_total: dict[str, float] = {}


class NodeView(BaseModel):
    """One node as the head's GCS sees it."""
    state: NodeState
    resources: dict[str, float] = {}  # what the node advertises (``miner:<hotkey>``, ``executor:<class>``...)


class _Listing(BaseModel):
    model_config = ConfigDict(extra="ignore")
    result: list[_Node]
    num_filtered: int


class _Data(BaseModel):
    model_config = ConfigDict(extra="ignore")
    result: _Listing


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")
    result: Literal[True]  # the dashboard's "success" flag
    data: _Data


class RayState:
    def __init__(self, dashboard_url: str, token: str, *, timeout_s: float = 5,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = dashboard_url.rstrip("/") + "/api/v0/nodes"
        self._http = httpx.Client(timeout=timeout_s, transport=transport,
                                  headers={"Authorization": f"Bearer {token}"})

    def node_state(self, node_id: str) -> NodeState | None:
        """What the head's GCS says of node ``node_id`` now; None if it could not be asked or its
        answer was not the State API's (down, timed out, refused, malformed)."""
        view = self.node(node_id)
        return None if view is None else view.state

    def node(self, node_id: str) -> NodeView | None:
        """Node ``node_id`` as the head's GCS sees it now (its state and advertised resources);
        None if Ray could not be asked."""
        node_id = node_id.lower()
        if not NODE_ID.fullmatch(node_id):
            return NodeView(state="UNKNOWN")  # no Ray node has such an id (and it must not reach the query string)
        params = {"filter_keys": "node_id", "filter_predicates": "=", "filter_values": node_id,
                  "detail": "true", "limit": "10", "timeout": "5"}
        try:
            resp = self._http.get(self.url, params=params)
        except httpx.HTTPError as exc:
            log.warning("Ray State API %s did not answer: %r", self.url, exc)
            return None
        if resp.status_code != 200:
            log.warning("Ray State API %s answered %d: %s", self.url, resp.status_code, resp.text[:300])
            return None
        try:
            listing = _Reply.model_validate_json(resp.content).data.result
        except ValidationError as exc:
            log.warning("Ray State API %s answered something else than a node list: %s", self.url,
                        str(exc).splitlines()[0])
            return None
        nodes = [n for n in listing.result if n.node_id.lower() == node_id]
        if len({n.state for n in nodes}) > 1:
            log.warning("Ray State API %s lists node %s both ALIVE and DEAD", self.url, node_id)
            return None
        if nodes:
            return NodeView(state=nodes[0].state, resources=nodes[0].resources_total)
        if listing.num_filtered > len(listing.result):  # the list was cut: absence proves nothing
            return None
        return NodeView(state="UNKNOWN")

    def node_alive(self, node_id: str) -> bool | None:
        """True if Ray reports the node ALIVE, False if DEAD or unknown to it, None if Ray could
        not be asked."""
        state = self.node_state(node_id)
        return None if state is None else state == "ALIVE"

    def close(self) -> None:
        self._http.close()
