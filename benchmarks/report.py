"""The benchmark's report: the results dict built by run.py, printed as
Markdown tables followed by the findings that make figures suspect.

Everything it needs comes in that dict, the harness's constants included
(under "settings"), so it does not import run.py.
"""

from __future__ import annotations


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "–" if value is None else f"{value:,.{digits}f}{suffix}"


def scenario_table(rows: list[dict]) -> str:
    lines = [
        "| scenario | target | conns | req/s | GB/s | p50 ms | p99 ms | errors "
        "| proxy CPU µs/req | proxy cores | proxy RSS MiB | req/s × | p50 × | p99 × |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        ratios = row.get("vs_direct", {})
        lines.append(" | ".join([
            f"| {row['scenario']}", row["target"], str(row["connections"]),
            fmt(row["req_per_s"], 0), fmt(row["gb_per_s"] if row["bulk"] else None, 2),
            fmt(row["latency_ms"]["p50"], 3), fmt(row["latency_ms"]["p99"], 3),
            str(row["errors"]),
            fmt(row["proxy_cpu_us_per_req"], 1), fmt(row["proxy_cpu_cores"], 2),
            fmt(row["proxy_rss_mib"], 1),
            fmt(ratios.get("req_per_s"), 2), fmt(ratios.get("p50"), 2),
            fmt(ratios.get("p99"), 2) + " |",
        ]))
    return "\n".join(lines)


def cost_table(rows: list[dict]) -> str:
    """Proxy CPU µs per request, one column per proxied target: L4 against L7 at a glance."""
    targets = list(dict.fromkeys(row["target"] for row in rows if row["via_proxy"]))
    scenarios = list(dict.fromkeys(row["scenario"] for row in rows))
    cost = {(row["scenario"], row["target"]): row["proxy_cpu_us_per_req"] for row in rows}
    lines = ["| proxy CPU µs/req | " + " | ".join(targets) + " |",
             "|---|" + "--:|" * len(targets)]
    for scenario in scenarios:
        lines.append(f"| {scenario} | "
                     + " | ".join(fmt(cost.get((scenario, target)), 1) for target in targets) + " |")
    return "\n".join(lines)


def mtls_lines(results: dict) -> list[str]:
    """What mTLS adds per request (the two chains of the same run), and the
    handshakes behind it."""
    lines = []
    for cost in results.get("mtls", []):
        plain_name, mtls_name = results["settings"]["mtls_pair"]
        added = cost["added_us_per_req"]
        lines.append(f"**mTLS**, {cost['scenario']}: {mtls_name} {fmt(cost['mtls_us_per_req'])} against "
                     f"{plain_name} {fmt(cost['plain_us_per_req'])} µs/req in this run (×{fmt(cost['ratio'], 2)}): "
                     f"mTLS adds {added:+.1f} µs per request for both ends together (originate + terminate), "
                     f"about {added / 2:+.1f} µs per sidecar")
    handshakes = results.get("tls_handshakes")
    if handshakes is not None:
        def counts(by_key: dict) -> str:
            return ", ".join(f"{count:,.0f} {key.split('/')[1]} ({key.split('/')[0]})"
                             for key, count in sorted(by_key.items())) or "none"

        during = [f"{row['scenario']} / {row['target']} "
                  f"{sum(row['tls_handshakes']['originations'].values()):,.0f}"
                  for row in results["scenarios"] if row.get("tls_handshakes") is not None]
        lines.append(f"mTLS handshakes over the whole run (warm-ups included): originated "
                     f"{counts(handshakes['originations'])}; terminated {counts(handshakes['terminations'])}. "
                     f"Originated during the measured runs: {'; '.join(during) or '–'}")
    return lines


def memory_table(idle_rss: float, idle: dict, settings: dict) -> str:
    n = f"{idle['requested']:,}"
    wanted = settings["idle_connections_wanted"]
    rows = [
        ("proxy RSS idle, right after ready", fmt(idle_rss, 1, " MiB")),
        (f"proxy RSS holding {n} idle connections",
         fmt(idle["rss_with_connections_mib"], 1, " MiB")),
        (f"RSS added by {n} idle connections", fmt(idle["rss_added_mib"], 1, " MiB")),
        (f"… scaled to {wanted:,}", fmt(idle[f"rss_added_per_{wanted}_mib"], 1, " MiB")),
        ("proxy RSS after closing them", fmt(idle["rss_after_close_mib"], 1, " MiB")),
        ("connections opened / failed", f"{idle['connected']:,} / {idle['failed']:,}"),
        ("still open at the client after the hold", f"{idle['open_at_client_after_hold']:,}"),
        (f"proxy `{settings['active_metric']}` while held", fmt(idle["proxy_active_metric"], 0)),
        ("backend connections established while held", f"{idle['backend_established']:,}"),
    ]
    lines = ["| memory | value |", "|---|--:|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def print_report(results: dict) -> None:
    machine = results["machine"]
    settings = results["settings"]
    print(f"\n## sidecar_proxy benchmark ({machine['date']})\n")
    print(f"{machine['cpu_model']}, {machine['nproc']} cores; Python {machine['python']}, "
          f"uvloop {machine['uvloop']}, httptools {machine.get('httptools')}, "
          f"h11 {machine.get('h11')}; {machine['nginx']}; {machine['wrk']}; "
          f"proxy {machine['proxy_commit']} ({machine.get('data_path')} data path); "
          f"{settings['duration_s']} s per run\n")
    print(scenario_table(results["scenarios"]) + "\n")
    if any(row["via_proxy"] for row in results["scenarios"]):
        print(cost_table(results["scenarios"]) + "\n")
    for line in mtls_lines(results):
        print(line + "\n")
    print(memory_table(results["idle_rss_mib"], results["idle_connections"], settings) + "\n")
    warnings = findings(results)
    if warnings:
        print("### Worth a look\n")
        print("\n".join(f"- {warning}" for warning in warnings) + "\n")


def findings(results: dict) -> list[str]:
    """Things in the results that make the figures suspect."""
    settings = results["settings"]
    return (scenario_findings(results["scenarios"], settings)
            + tls_findings(results)
            + idle_findings(results["idle_connections"], settings)
            + proxy_findings(results["proxy"], settings))


def scenario_findings(rows: list[dict], settings: dict) -> list[str]:
    notes = []
    for row in rows:
        run = f"{row['scenario']} / {row['target']}"
        if row["errors"]:
            notes.append(f"{run}: {row['errors']} wrk errors {row['errors_by_kind']}")
        if row["other_cpu_cores"] > settings["other_load_limit"]:
            notes.append(f"{run}: something else used {row['other_cpu_cores']:.2f} cores "
                         f"during the run; its figures are suspect")
    return notes


def tls_findings(results: dict) -> list[str]:
    notes = []
    for row in results["scenarios"]:
        handshakes = row.get("tls_handshakes")
        if handshakes is None:
            continue
        ok = sum(count for key, count in handshakes["originations"].items() if key.endswith("/ok"))
        # The warm-up filled the pool: a kept-alive run should need no new connection.
        if ok > row["connections"]:
            notes.append(f"{row['scenario']} / {row['target']}: {ok:,.0f} mTLS handshakes during a "
                         f"measured run of {row['connections']} kept-alive connections: the "
                         f"upstream connections were not kept alive")
    handshakes = results.get("tls_handshakes") or {}
    for kind, by_key in handshakes.items():
        failed = {key: count for key, count in by_key.items() if not key.endswith("/ok") and count}
        if failed:
            notes.append(f"mTLS {kind} that failed: "
                         + ", ".join(f"{key} {count:,.0f}" for key, count in sorted(failed.items())))
    return notes


def idle_findings(idle: dict, settings: dict) -> list[str]:
    notes = []
    wanted = settings["idle_connections_wanted"]
    if idle["requested"] < wanted:
        notes.append(f"only {idle['requested']:,} idle connections: the proxy's descriptor "
                     f"limit is {idle['proxy_fd_limit']:,} and each relayed connection "
                     f"takes two; the {wanted:,} figure is scaled linearly")
    if (idle["connected"] != idle["requested"]
            or idle["open_at_client_after_hold"] != idle["connected"]):
        notes.append(f"idle connections: {idle['connected']} opened, "
                     f"{idle['open_at_client_after_hold']} still open after the hold")
    if not idle["relayed_within_timeout"]:
        notes.append(f"idle connections not all relayed in time: metric "
                     f"{idle['proxy_active_metric']}, backend {idle['backend_established']}")
    if idle["backend_established_after_close"] or idle["proxy_active_metric_after_close"]:
        notes.append(f"after the client closed its connections: metric "
                     f"{idle['proxy_active_metric_after_close']}, backend still "
                     f"{idle['backend_established_after_close']}")
    if idle["proxy_active_metric"] is None:
        notes.append(f"no `{settings['active_metric']}` in /metrics")
    return notes


def proxy_findings(proxy: dict, settings: dict) -> list[str]:
    notes = []
    if proxy["exit_code"] != 0:
        notes.append(f"the proxy did not exit cleanly on SIGTERM (exit code "
                     f"{proxy['exit_code']}; None = killed after {settings['stop_grace_s']} s)")
    if proxy["log_lines"]:
        tail = "\n".join(f"    {line}" for line in proxy["log_tail"])
        notes.append(f"the proxy logged {proxy['log_lines']} line(s) at level warning; "
                     f"last ones:\n{tail}")
    return notes
