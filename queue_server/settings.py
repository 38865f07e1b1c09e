"""Settings of the queue server, read once at start from ``QUEUE_*`` variables and flags."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from queue_server.push.guard import IPNetwork, normalize_host, parse_networks
from queue_server.wal.log import DEFAULT_SEGMENT_BYTES, FsyncPolicy
from telemetry.settings import SettingsError, env_float, env_int, env_str

DEFAULT_PORT = 8500


@dataclass(frozen=True, slots=True)
class Settings:
    host: str
    port: int
    data_dir: Path
    fsync: FsyncPolicy
    fsync_interval_s: float
    segment_bytes: int
    min_free_bytes: int
    tokens: str | None
    tokens_file: Path | None
    tls_cert: Path | None
    tls_key: Path | None
    log_level: str
    #: Non-global networks that push subscription endpoints may use (loopback, private ranges).
    push_allowed_networks: tuple[IPNetwork, ...] = ()
    #: Host names that push subscription endpoints may use whatever non-global address they resolve to.
    push_allowed_hosts: tuple[str, ...] = ()


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="telemetry-queue",
        description=(
            "Durable HTTP message queue of the GPU telemetry pipeline. Serves HTTP/1.1 and "
            "cleartext HTTP/2 (prior knowledge) on one port, or HTTP/1.1 and HTTP/2 over TLS "
            "when a certificate is given. Every flag defaults to the QUEUE_* variable named in its help."
        ),
    )
    add = parser.add_argument
    add("--host", default=env_str("QUEUE_HOST", "127.0.0.1", environ), help="bind address (QUEUE_HOST, default 127.0.0.1)")
    add("--port", type=int, default=env_int("QUEUE_PORT", DEFAULT_PORT, environ), help=f"TCP port (QUEUE_PORT, default {DEFAULT_PORT})")
    add(
        "--data-dir",
        type=Path,
        default=Path(env_str("QUEUE_DATA_DIR", "data/queue", environ)),
        help="directory of the write-ahead log (QUEUE_DATA_DIR, default data/queue)",
    )
    add(
        "--fsync",
        choices=[p.value for p in FsyncPolicy],
        default=env_str("QUEUE_FSYNC", "always", environ),
        help=(
            "when writes reach the disk (QUEUE_FSYNC, default always): always = before the reply; "
            "interval = every --fsync-interval-s, a machine crash loses up to that much; "
            "never = left to the OS, a machine crash loses unflushed writes"
        ),
    )
    add(
        "--fsync-interval-s",
        type=float,
        default=env_float("QUEUE_FSYNC_INTERVAL_S", 0.2, environ),
        help="seconds between syncs with --fsync interval (QUEUE_FSYNC_INTERVAL_S, default 0.2)",
    )
    add(
        "--segment-bytes",
        type=int,
        default=env_int("QUEUE_SEGMENT_BYTES", DEFAULT_SEGMENT_BYTES, environ),
        help=f"size in bytes at which a new log segment starts (QUEUE_SEGMENT_BYTES, default {DEFAULT_SEGMENT_BYTES})",
    )
    add(
        "--min-free-bytes",
        type=int,
        default=env_int("QUEUE_MIN_FREE_BYTES", 256 * 1024 * 1024, environ),
        help="publishing is rejected with 507 while the data directory has less free space than this, in bytes "
        "(QUEUE_MIN_FREE_BYTES, default 268435456)",
    )
    add(
        "--tokens",
        default=environ.get("QUEUE_TOKENS"),
        help="bearer tokens as 'SCOPES:TOKEN;...', scopes publish, consume, admin (QUEUE_TOKENS); "
        "with no tokens at all the server is open to anyone who can reach it",
    )
    add(
        "--tokens-file",
        type=Path,
        default=Path(environ["QUEUE_TOKENS_FILE"]) if environ.get("QUEUE_TOKENS_FILE") else None,
        help="file with one 'SCOPES:TOKEN' per line (QUEUE_TOKENS_FILE)",
    )
    add(
        "--tls-cert",
        type=Path,
        default=Path(environ["QUEUE_TLS_CERT"]) if environ.get("QUEUE_TLS_CERT") else None,
        help="PEM certificate; with --tls-key the server speaks TLS with HTTP/2 by ALPN (QUEUE_TLS_CERT)",
    )
    add(
        "--tls-key",
        type=Path,
        default=Path(environ["QUEUE_TLS_KEY"]) if environ.get("QUEUE_TLS_KEY") else None,
        help="PEM private key of --tls-cert (QUEUE_TLS_KEY)",
    )
    add(
        "--push-allowed-networks",
        default=env_str("QUEUE_PUSH_ALLOWED_NETWORKS", "", environ),
        help="comma-separated CIDR networks outside the public internet (loopback, private ranges) that "
        "push subscription endpoints may resolve to; link-local and cloud metadata addresses stay "
        "rejected (QUEUE_PUSH_ALLOWED_NETWORKS, default none)",
    )
    add(
        "--push-allowed-hosts",
        default=env_str("QUEUE_PUSH_ALLOWED_HOSTS", "", environ),
        help="comma-separated host names, matched exactly, that push subscription endpoints may use "
        "whatever loopback or private address they resolve to, such as a Kubernetes Service name; "
        "link-local and cloud metadata addresses stay rejected (QUEUE_PUSH_ALLOWED_HOSTS, default none)",
    )
    add("--log-level", default=env_str("QUEUE_LOG_LEVEL", "INFO", environ), help="log level (QUEUE_LOG_LEVEL, default INFO)")
    return parser


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Parse flags over ``QUEUE_*`` defaults; raise ``SettingsError`` for unusable values."""
    environ = os.environ if environ is None else environ
    parser = _parser(environ)
    args = parser.parse_args(argv)
    try:
        fsync = FsyncPolicy(args.fsync)
    except ValueError as exc:
        raise SettingsError(f"QUEUE_FSYNC={args.fsync!r} is invalid: expected always, interval or never") from exc
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SettingsError("QUEUE_TLS_CERT and QUEUE_TLS_KEY must be given together, or neither")
    if not 0 <= args.port <= 65535:
        raise SettingsError(f"QUEUE_PORT={args.port!r} is invalid: expected 0 to 65535")
    if args.fsync_interval_s <= 0:
        raise SettingsError(f"QUEUE_FSYNC_INTERVAL_S={args.fsync_interval_s!r} is invalid: expected a positive number")
    if args.segment_bytes < 4096:
        raise SettingsError(f"QUEUE_SEGMENT_BYTES={args.segment_bytes!r} is invalid: expected at least 4096")
    entries = [entry for entry in args.push_allowed_networks.split(",") if entry.strip()]
    try:
        push_allowed_networks = tuple(parse_networks(entries))
    except ValueError as exc:
        raise SettingsError(f"QUEUE_PUSH_ALLOWED_NETWORKS is invalid: {exc}") from exc
    push_allowed_hosts = tuple(normalize_host(host) for host in args.push_allowed_hosts.split(",") if host.strip())
    for host in push_allowed_hosts:
        if "/" in host or ":" in host or " " in host:
            raise SettingsError(
                f"QUEUE_PUSH_ALLOWED_HOSTS entry {host!r} is invalid: expected a host name such as "
                "collector.telemetry.svc, without scheme, port or path"
            )
    return Settings(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        fsync=fsync,
        fsync_interval_s=args.fsync_interval_s,
        segment_bytes=args.segment_bytes,
        min_free_bytes=args.min_free_bytes,
        tokens=args.tokens,
        tokens_file=args.tokens_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        log_level=args.log_level.upper(),
        push_allowed_networks=push_allowed_networks,
        push_allowed_hosts=push_allowed_hosts,
    )
