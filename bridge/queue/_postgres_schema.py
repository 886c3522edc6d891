"""The PostgreSQL queue's tables, and migrating them at start-up.

Replicas may start at the same moment: the migration runs in one transaction
holding a transaction-scoped advisory lock, so the second replica waits, then
finds ``schema_version`` current and does nothing. DDL is transactional in
PostgreSQL, so a migration is applied whole or not at all.

Timestamps are epoch seconds (double precision), as the queue's records carry
them; bodies and summaries are bytea (the JSON exactly as intake serialised it).
"""

from __future__ import annotations

from typing import Any

import psycopg

from bridge.errors import QueueUnavailable

# Advisory lock namespaces (the first key of the two-integer form). Every transaction
# takes its advisory locks before any row lock, in ascending (namespace, key) order.
NS_SCHEMA = 0x5642_0001  # key 0: migrations
NS_OPERATOR = 0x5642_0002  # key 0: restarts and cancels, one at a time across replicas
NS_LANE = 0x5642_0003  # key: a 32-bit hash of the lane
NS_GUID = 0x5642_0004  # key: a 32-bit hash of a delivery GUID (dedupe across replicas)

ACTIVE_SQL = "('pending', 'running', 'retrying')"

_V1 = f"""
CREATE TABLE repos (
    key text PRIMARY KEY,
    last_number bigint NOT NULL
);
CREATE TABLE deliveries (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    guid text NOT NULL UNIQUE,
    repo text NOT NULL,
    repo_key text NOT NULL,
    number bigint,
    github_event text NOT NULL,
    action text NOT NULL,
    event text NOT NULL,
    status text NOT NULL,
    error text NOT NULL,
    summary bytea NOT NULL,
    payload bytea,
    created_at double precision NOT NULL,
    enqueued_at double precision NOT NULL,
    started_at double precision,
    finished_at double precision
);
CREATE INDEX deliveries_repo ON deliveries (repo_key, number);
CREATE INDEX deliveries_finished ON deliveries (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE jobs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id bigint NOT NULL,
    number integer NOT NULL,
    state text NOT NULL,
    endpoint text NOT NULL,
    org text NOT NULL,
    repo text NOT NULL,
    path text NOT NULL,
    body bytea,
    fallback bytea,
    lane text NOT NULL,
    head boolean NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    first_attempt_at double precision,
    next_attempt_at double precision NOT NULL,
    lease_until double precision,
    claim_token bigint,
    unclear boolean NOT NULL DEFAULT false,
    exit_code integer NOT NULL DEFAULT 0,
    error text NOT NULL DEFAULT '',
    vela_number bigint,
    vela_link text NOT NULL DEFAULT '',
    enqueued_at double precision NOT NULL,
    started_at double precision,
    finished_at double precision,
    -- When the job may be claimed: its next attempt, or for a running job the end of
    -- its lease (a dead replica's claim is retaken then).
    due_at double precision GENERATED ALWAYS AS (
        CASE WHEN state = 'running' THEN lease_until ELSE next_attempt_at END
    ) STORED
);
CREATE INDEX jobs_delivery ON jobs (delivery_id);
CREATE INDEX jobs_lane ON jobs (lane, id) WHERE state IN {ACTIVE_SQL};
CREATE INDEX jobs_ready ON jobs (due_at) WHERE head AND state IN {ACTIVE_SQL};
CREATE TABLE attempts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id bigint NOT NULL,
    started_at double precision NOT NULL,
    duration double precision NOT NULL,
    http_status integer,
    error text NOT NULL,
    excerpt text NOT NULL
);
CREATE INDEX attempts_job ON attempts (job_id);
CREATE TABLE vela_deployments (
    repo_key text NOT NULL,
    number bigint NOT NULL,
    created_at double precision NOT NULL,
    PRIMARY KEY (repo_key, number)
);
CREATE TABLE reports (
    guid text PRIMARY KEY,
    state text NOT NULL
);
CREATE TABLE leases (
    name text PRIMARY KEY,
    holder text NOT NULL,
    until double precision NOT NULL
);
"""

# MIGRATIONS[n] takes the schema from version n to n + 1. Append; never edit.
MIGRATIONS = (_V1,)


async def migrate(conn: psycopg.AsyncConnection[Any]) -> int:
    """Bring the schema to the newest version; the version found before. ``conn``: autocommit."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (NS_SCHEMA,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS vela_bridge_schema (version integer NOT NULL)"
        )
        row = await (await conn.execute("SELECT max(version) FROM vela_bridge_schema")).fetchone()
        found = int(row[0]) if row and row[0] is not None else 0
        if found > len(MIGRATIONS):
            raise QueueUnavailable(
                f"the queue's schema is version {found}, newer than this vela-bridge knows"
                f" ({len(MIGRATIONS)}): upgrade vela-bridge"
            )
        for version in range(found, len(MIGRATIONS)):
            await conn.execute(MIGRATIONS[version])
        if found < len(MIGRATIONS):
            await conn.execute("DELETE FROM vela_bridge_schema")
            await conn.execute(
                "INSERT INTO vela_bridge_schema (version) VALUES (%s)", (len(MIGRATIONS),)
            )
        return found
