"""Pure per-request policy decisions: rate limits, retries. No I/O, clock injected."""
