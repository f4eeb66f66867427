"""Usage no model could have produced: flagged before pricing, never priced.

The parsers already refuse counts that are negative, fractional or past
10^12 (`providers.base.MAX_TOKENS`: corrupt frames). Below that a count can
still be absurd: 999,999,999,999 input tokens priced as a real request cost
$749,999. One request cannot use more tokens than its model's context window
(prompt and answer together), and no model offered today has a window past
10 million tokens (Llama 4 Scout's; Gemini's is 2 million, GPT and Claude 1
million at most). `MAX_REQUEST_TOKENS` is twice that, so a bigger model to
come is not flagged on its first day.

When it fires: in the meter, at the moment a request is finished, just before
pricing (`meterproxy.meter.price_record_with`). A record past the bound gets
``usage_source="invalid"`` (untrusted: no tokens, not priced, counted as
unmetered) and a note with the numbers; the client got the answer as sent.
Batch endpoints are exempt: one record there carries the usage of many requests.
"""

from __future__ import annotations

from meterproxy.usage import RequestRecord, Usage

__all__ = ["MAX_REQUEST_TOKENS", "flag_implausible", "implausible", "past_bound"]

#: Most tokens (input plus output) one request can use: twice the largest context window offered.
MAX_REQUEST_TOKENS = 20_000_000


def past_bound(usage: Usage) -> bool:
    """True if a count of ``usage`` is past what one request can use (`implausible` says why).

    Plain comparisons: the meter asks this of every priced request before anything else here.
    """
    return (
        usage.input_tokens + usage.output_tokens > MAX_REQUEST_TOKENS
        or usage.cache_read_tokens > MAX_REQUEST_TOKENS
        or usage.cache_write_tokens > MAX_REQUEST_TOKENS
        or usage.reasoning_tokens > MAX_REQUEST_TOKENS
    )


def implausible(usage: Usage) -> str | None:
    """Why ``usage`` cannot be one request's, or None if it can."""
    if past_bound(usage):
        return (
            f"implausible usage: {usage.input_tokens} input + {usage.output_tokens} output tokens "
            f"exceed any model's context window (bound {MAX_REQUEST_TOKENS}); not counted or priced"
        )
    return None


def flag_implausible(record: RequestRecord) -> bool:
    """Mark ``record`` untrusted if its usage is past the bound; True if it was."""
    usage = record.usage
    if usage is None or "batch" in record.endpoint:
        return False
    reason = implausible(usage)
    if reason is None:
        return False
    record.usage, record.usage_source = None, "invalid"
    notes = record.extra.setdefault("notes", [])
    if isinstance(notes, list):
        notes.append(reason)
    return True
