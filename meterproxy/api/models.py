"""Response shapes of the JSON API, as pydantic models (the OpenAPI schemas come from these).

Handlers build plain dicts for speed and serialize them with
`meterproxy.exact_json.dumps` (exact decimals); the tests validate real responses
against these models, so a shape cannot drift from its documentation.
Costs are `Cost`: a decimal serialized as an exact JSON number (never a
float's rounding, never a string).

`measures_to_api` turns the store's integer sums (``cost_pico`` included) into
the API's fields; every endpoint that reports totals uses it, so the same
names mean the same thing everywhere.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from meterproxy.money import pico_to_usd

__all__ = [
    "Cost",
    "ErrorResponse",
    "Group",
    "ModelSubtotal",
    "RequestRow",
    "RequestsResponse",
    "SessionDetail",
    "SessionSummary",
    "SessionsResponse",
    "SummaryResponse",
    "TimeseriesResponse",
    "Totals",
    "UnpricedModel",
    "UnpricedModelsResponse",
    "measures_to_api",
]

Cost = Annotated[
    Decimal,
    WithJsonSchema({"type": "number", "description": "USD, exact decimal digits (summed as integers)"}),
]


def measures_to_api(measures: dict[str, int]) -> dict[str, Any]:
    """Store sums -> API totals fields (``cost_pico`` becomes ``cost_usd``)."""
    out: dict[str, Any] = {}
    for name, value in measures.items():
        if name == "cost_pico":
            out["cost_usd"] = pico_to_usd(value)
        elif name == "estimated_cost_pico":
            out["estimated_cost_usd"] = pico_to_usd(value)
        else:
            out[name] = value
    return out


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Totals(_Model):
    requests: int
    input_tokens: int = Field(description="Every prompt token, cached ones included.")
    cache_read_tokens: int
    cache_write_tokens: int
    cache_write_1h_tokens: int
    output_tokens: int = Field(description="Every generated token, reasoning included.")
    reasoning_tokens: int
    web_search_requests: int
    cost_usd: Cost = Field(description="Sum of priced requests' costs.")
    unpriced_requests: int = Field(description="Usage reported, but the model is not in the price tables.")
    unmetered_requests: int = Field(description="No trusted usage (missing, invalid or none).")
    errors: int = Field(description="Status >= 400 or an error recorded.")
    partial_requests: int = Field(
        0, description="Usage from a stream cut before its final report: counted and priced as a lower bound."
    )
    provider_cost_requests: int = Field(
        0, description="Cost is the provider's (or agent log's) own figure; the tables could not price them."
    )
    estimated_requests: int = Field(
        0,
        description="No usage reported: tokens counted by meterproxy (estimate_usage), priced as estimates.",
    )
    estimated_cost_usd: Cost = Field(
        description="The estimated requests' cost: apart from cost_usd, never part of reported spend.",
    )


class Group(Totals):
    key: dict[str, str | None] = Field(description="group_by dimension -> value (null: not set).")


class UnpricedModel(_Model):
    model: str | None
    provider: str | None
    unpriced_requests: int
    input_tokens: int = Field(
        0, description="Input tokens of the unpriced requests' model (all its requests)."
    )
    output_tokens: int = Field(
        0, description="Output tokens of the unpriced requests' model (all its requests)."
    )


class SummaryResponse(_Model):
    since: str | None
    until: str | None
    tz: str
    group_by: list[str]
    totals: Totals
    groups: list[Group]
    truncated: bool = Field(description="True when more groups exist than `limit`.")
    unpriced_models: list[UnpricedModel] = Field(
        description="The 100 with most unpriced requests; all of them: /api/models/unpriced."
    )
    priced_models: dict[str, str | None] = Field(
        description="Each model name in the groups -> the price-table id it is priced as (null: unknown).",
    )
    cache_savings_usd: Cost = Field(
        description="What cached input saved against plain input prices, net of cache-write premiums "
        "(known models only; meterproxy.savings)."
    )
    notes: list[str] = Field(description="Caveats, e.g. retention-deleted raw rows.")


class UnpricedModelsResponse(_Model):
    since: str | None
    until: str | None
    models: list[UnpricedModel] = Field(description="One page, most unpriced requests first.")
    total: int = Field(description="Unpriced models in the range, all pages.")
    next_offset: int | None = Field(description="offset of the next page; null on the last.")


class TimeseriesPoint(Totals):
    t: str = Field(description="Bucket start, ISO 8601 with the zone's offset.")


class Series(_Model):
    key: dict[str, str | None]
    totals: Totals
    points: list[TimeseriesPoint]


class TimeseriesResponse(_Model):
    bucket: str
    tz: str
    since: str
    until: str
    split: str | None
    series: list[Series]
    truncated: bool
    priced_models: dict[str, str | None] = Field(
        description="With split=model: each model name -> the price-table id it prices as (null: unknown)."
    )
    notes: list[str]


class SessionSummary(Totals):
    session: str
    first_ts: str
    last_ts: str
    users: list[str]
    models: list[str]


class SessionsResponse(_Model):
    sessions: list[SessionSummary]
    total: int = Field(description="Sessions matching the filters (all pages).")
    cost_usd: Cost = Field(description="Cost of all matching sessions (all pages).")
    next_offset: int | None


class RequestRow(_Model):
    id: str
    ts: str
    source: str
    upstream: str | None
    provider: str | None
    endpoint: str | None
    method: str | None
    requested_model: str | None
    model: str | None
    priced_model: str | None
    status: int | None
    streamed: bool
    input_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cache_write_1h_tokens: int
    output_tokens: int
    reasoning_tokens: int
    web_search_requests: int
    audio_input_tokens: int = Field(0, description="Audio part of input_tokens (realtime, audio).")
    audio_cache_read_tokens: int = Field(0, description="Cached part of audio_input_tokens.")
    image_input_tokens: int = Field(0, description="Image part of input_tokens (images, realtime).")
    audio_output_tokens: int = Field(0, description="Audio part of output_tokens (realtime, speech).")
    image_output_tokens: int = Field(0, description="Image part of output_tokens (images).")
    cost_usd: Cost | None
    provider_cost_usd: Cost | None
    cost_difference_usd: Cost | None = Field(
        None, description="provider_cost_usd - cost_usd when both are known (price-table check)."
    )
    usage_source: str
    service_tier: str | None
    duration_ms: float | None
    ttfb_ms: float | None
    upstream_ms: float | None
    user: str | None
    session: str | None
    tags: dict[str, str]
    key_fingerprint: str | None
    error: str | None
    client_disconnected: bool
    provider_request_id: str | None = Field(
        None, description="The provider's own request id (request-id, x-request-id; an import's requestId)."
    )
    cost_source: str | None = Field(
        None,
        description="Where cost_usd came from: computed (reported usage x price tables), partial (a stream "
        "cut before its final usage: a lower bound), provider (the provider's own figure), estimated "
        "(no usage reported: the cost is in estimated_cost_usd, cost_usd stays null); null while unpriced.",
    )
    estimated_cost_usd: Cost | None = Field(
        None,
        description="estimate_usage: the answer reported no usage; meterproxy counted its tokens and priced "
        "them. Never part of cost_usd or of any spend total.",
    )


class RequestsResponse(_Model):
    requests: list[RequestRow]
    next_cursor: str | None = Field(description="Next page by time (sort=time, order=desc), else null.")
    total: int | None = Field(None, description="Rows matching (sorted pages only).")
    next_offset: int | None = Field(None, description="Offset of the next sorted page, null at the end.")


class ModelSubtotal(Totals):
    model: str | None


class SessionDetail(_Model):
    session: str
    totals: Totals
    first_ts: str
    last_ts: str
    users: list[str]
    models: list[ModelSubtotal] = Field(description="Subtotals per model, most expensive first.")
    requests: list[RequestRow] = Field(description="Newest first, one page.")
    offset: int
    next_offset: int | None = Field(description="Offset of the next page, null at the end.")
    next_cursor: str | None = Field(description="Keyset cursor of the next page, null at the end.")


class RequestContent(_Model):
    """A request's stored text (only with ``store_content``), already redacted."""

    id: str
    request: str
    response: str
    truncated: bool


class ErrorBody(_Model):
    type: str
    code: str
    message: str
    param: str | None = None


class ErrorResponse(_Model):
    error: ErrorBody
