"""Host-side state of one request. Mutated only by the engine; schedulers read it through `RequestView`."""

from __future__ import annotations

import enum

from .types import FinishReason, Request, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # arrived, holds no row and no blocks (new, or preempted)
    RUNNING = "running"  # holds a row and blocks; schedulable while it still needs tokens
    FINISHING = "finishing"  # its last token is scheduled; waits for in-flight results
    FINISHED = "finished"


class RequestState:
    """Tokens fed, tokens pending on the device, blocks, row, and timings of one request.

    Token accounting: `known` tokens are the prompt plus the outputs the host has read; `num_pending` more were
    sampled by in-flight batches and live only on the device (in `last_token[row]` for the newest). Tokens
    `[num_computed, total_len)` still have to be fed to the model.
    """

    __slots__ = (
        "request", "index", "tokens", "prompt_len", "num_pending", "num_computed", "blocks", "block_last_use",
        "row", "row_last_use", "status", "finish_reason", "error", "token_times", "last_batch", "admit_order",
        "max_new_tokens", "max_len", "stop_ids", "seed", "num_preemptions", "finish_time", "cancel_requested",
        "num_cached", "cached_total", "block_keys", "num_offered",
    )

    def __init__(self, request: Request, index: int, max_len: int, seed: int,
                 eos_ids: frozenset[int] | tuple[int, ...] = ()) -> None:
        self.request = request
        self.index = index
        self.tokens: list[int] = list(request.prompt_ids)  # prompt + outputs read by the host
        self.prompt_len = len(request.prompt_ids)
        self.num_pending = 0
        self.num_computed = 0
        self.blocks: list[int] = []
        self.block_last_use: list[int] = []  # per block: last batch of its previous owner (for the reuse edge)
        self.row: int | None = None
        self.row_last_use = -1
        self.status = Status.WAITING
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self.token_times: list[float] = []
        self.last_batch = -1
        self.admit_order = -1
        self.max_new_tokens = request.params.max_new_tokens
        self.max_len = max_len
        # The model's EOS ends a request like a stop token (finish reason `stop`), unless the request ignores it.
        eos = () if request.params.ignore_eos else eos_ids
        self.stop_ids = frozenset(request.params.stop_token_ids).union(eos)
        self.seed = seed
        self.num_preemptions = 0
        self.finish_time = 0.0
        self.cancel_requested = False
        # Prefix cache: tokens whose KV this admission reuses (set while waiting, kept once admitted), their sum over
        # admissions, and the content keys of the request's full blocks (computed once, extended as tokens land).
        self.num_cached = 0
        self.cached_total = 0
        self.block_keys: list = []
        self.num_offered = 0  # leading blocks already offered to the prefix cache (reset when blocks are released)

    # ---- read-only view (the scheduler's contract)
    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def arrival_time(self) -> float:
        return self.request.arrival_time

    @property
    def priority(self) -> int:
        return self.request.params.priority

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def num_generated(self) -> int:
        """Outputs read plus outputs still pending on the device."""
        return len(self.tokens) - self.prompt_len + self.num_pending

    @property
    def total_len(self) -> int:
        return len(self.tokens) + self.num_pending

    # The next three are read for every running request in every step (scheduling, reserves), so each computes
    # from the fields directly rather than through the properties above it.
    @property
    def num_remaining(self) -> int:
        """Tokens still to feed before the next token can be sampled (`total_len - num_computed`)."""
        return len(self.tokens) + self.num_pending - self.num_computed

    @property
    def is_prefill(self) -> bool:
        """More than one token left to feed, or none fed yet."""
        return self.num_computed == 0 or len(self.tokens) + self.num_pending - self.num_computed > 1

    @property
    def is_decode(self) -> bool:
        """`not is_prefill`."""
        return self.num_computed != 0 and len(self.tokens) + self.num_pending - self.num_computed <= 1

    @property
    def is_schedulable(self) -> bool:
        if self.status is Status.RUNNING:
            return self.num_remaining > 0
        # A preempted request re-enters only once its in-flight tokens are known (it re-prefills them).
        return self.status is Status.WAITING and self.num_pending == 0

    def __repr__(self) -> str:
        return (f"Req({self.request_id}, {self.status.value}, computed={self.num_computed}, "
                f"pending={self.num_pending}, out={self.num_output})")
