"""Named queries of fast crash recovery (:mod:`kongtask._liveness`), rendered per schema.

Values travel as bound parameters; the schema name is the only text spliced in, and only
through :class:`~kongtask._schema_sql.SchemaSql`. The marker, the lock class and the key
derivation are constants of this module, so the SQL and the Python side
(:func:`kongtask._liveness.liveness_lock_key`) cannot drift apart: the tests check both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._schema_sql import SchemaSql

#: The fixed part of every marked pool id's hex: ``"kong"`` in ASCII (0x6b 0x6f 0x6e 0x67).
MARKER = "6b6f6e67"
#: First key of the two-int advisory lock form: the same four bytes as a positive int4.
LOCK_CLASS = int(MARKER, 16)  # 1802464871

# A marked pool id in full: the marker, then 40 random bits. Anchored, so a Node id that
# merely contains the marker somewhere does not match.
_MARKED_ID_RE = f"^(ot)?pool-{MARKER}[0-9a-f]{{10}}$"
#: The same pattern for other modules' SQL (a POSIX regex, no quote in it).
MARKED_ID_RE = _MARKED_ID_RE

# The second key of the lock, computed from the id text: its last 8 hex digits as a signed
# int4 (bit(32) -> int reinterprets the bits). :func:`kongtask._liveness.liveness_lock_key`
# computes the same pair in Python.
_KEY2 = "('x' || right({id}, 8))::bit(32)::int"
# The same 32 bits as pg_locks shows them (unsigned).
_KEY2_UNSIGNED = "('x' || right({id}, 8))::bit(32)::bigint"

# "Somebody holds (or waits for) the liveness lock of pool {id} in this database."
# A waiting request counts as alive on purpose: it is a live session of that pool (a
# reconnecting listener queued behind its own old backend), never a dead one. pg_locks
# is not MVCC: it shows the lock table at the moment the statement reads it, which is
# what the race argument in _liveness.py relies on. pg_locks shows both keys as unsigned
# oids, so the second key is compared through the unsigned value of the same 32 bits.
_LOCK_HELD = f"""exists (
    select 1 from pg_catalog.pg_locks as l
    where l.locktype = 'advisory'
      and l.database = (select d.oid from pg_catalog.pg_database as d
                        where d.datname = pg_catalog.current_database())
      and l.classid = {LOCK_CLASS}::oid
      and l.objsubid = 2
      and l.objid = {_KEY2_UNSIGNED.format(id="{id}")}::oid
  )"""


# Schema-independent: advisory locks are per database.
#: ``$1`` pool id -> whether this session now holds the pool's liveness lock.
TRY_LOCK = f"select pg_catalog.pg_try_advisory_lock({LOCK_CLASS}, {_KEY2.format(id='$1::text')})"
#: ``$1`` pool id; returns once this session holds the pool's liveness lock.
LOCK = f"select pg_catalog.pg_advisory_lock({LOCK_CLASS}, {_KEY2.format(id='$1::text')})"
#: Server-side TCP keepalives for the session holding a liveness lock: a client that
#: vanished without closing its socket is noticed after 10 + 3 x 5 = 25 s instead of the
#: OS default of two hours (ignored on Unix-domain sockets).
KEEPALIVES = (
    "select pg_catalog.set_config('tcp_keepalives_idle', '10', false),"
    " pg_catalog.set_config('tcp_keepalives_interval', '5', false),"
    " pg_catalog.set_config('tcp_keepalives_count', '3', false)"
)
#: ``$1`` pool id -> whether any session of this database holds (or waits for) the lock.
LOCK_HELD = "select " + _LOCK_HELD.format(id="$1::text")
#: The second keys (unsigned, as ``pg_locks`` shows them) of every liveness lock held or
#: awaited in this database right now: the kongtask pools alive at this moment. Cheap
#: (the lock table, no scan of the jobs), so sweepers run it at every check.
LIVE_KEYS = f"""
select l.objid::bigint as key from pg_catalog.pg_locks as l
where l.locktype = 'advisory'
  and l.database = (select d.oid from pg_catalog.pg_database as d
                    where d.datname = pg_catalog.current_database())
  and l.classid = {LOCK_CLASS}::oid
  and l.objsubid = 2"""


@dataclass(frozen=True, slots=True, repr=False)
class LivenessQueries(SchemaSql):
    """Every statement of fast crash recovery, for one schema.

    Attributes:
      dead_pools: the marked pool ids that lock jobs or queue rows and whose liveness
        lock nobody holds (a full scan of both tables: run it rarely).
      release_dead_pools: ``$1`` suspect pool ids (text[]), ``$2`` restart grace in
        seconds, ``$3`` suspect lock keys (bigint[], unsigned, from :data:`LIVE_KEYS`) ->
        one row ``(pools, jobs, queues, in_grace)``: the ids released, how many rows each
        table got back, and whether the restart grace stopped it (then nothing was
        touched). Re-checks every suspect in the same statement. Scans the tables only
        when given suspect keys.
    """

    dead_pools: str = field(init=False)
    release_dead_pools: str = field(init=False)

    def _render(self, s: str) -> dict[str, str]:
        return dict(
            # Both tables are scanned for locked rows (there is no index on the lock columns,
            # and the schema must not grow one); `locked_at is not null` is the cheap first
            # filter, the anchored regex the second, the pg_locks probe runs once per pool id.
            dead_pools=f"""
select p.id from (
  select distinct locked_by as id from {s}._private_jobs
   where locked_at is not null and locked_by ~ '{_MARKED_ID_RE}'
  union
  select distinct locked_by from {s}._private_job_queues
   where locked_at is not null and locked_by ~ '{_MARKED_ID_RE}'
) as p
where not {_LOCK_HELD.format(id="p.id")}""",
            # One statement, so the liveness re-check and the release see one moment: a pool
            # that took its lock since the suspects were collected is left alone. The
            # restart grace skips everything for a while after the server (re)started,
            # because then every pool is reconnecting and none holds its lock yet.
            # Jobs: both lock columns cleared, attempts kept (the lost attempt counts) and
            # run_at := greatest(run_at, now()), exactly what the 4-hour stale-lock sweep does.
            # Queue rows: both lock columns cleared. Then one jobs:insert notification in
            # the format add_jobs sends, so idle workers pick the jobs up without polling.
            release_dead_pools=f"""
with grace as (
  select now() - pg_catalog.pg_postmaster_start_time() < make_interval(secs => $2::float8)
      -- After a crash restart (a backend died: every session ends, the postmaster does
      -- not restart) the start time stays old; then every live pool's lock session is
      -- new: if even the oldest one started within the grace, wait too.
      or coalesce((
        select min(a.backend_start)
        from pg_catalog.pg_locks as l
        join pg_catalog.pg_stat_activity as a on a.pid = l.pid
        where l.locktype = 'advisory'
          and l.database = (select d.oid from pg_catalog.pg_database as d
                            where d.datname = pg_catalog.current_database())
          and l.classid = {LOCK_CLASS}::oid
          and l.objsubid = 2
      ) > now() - make_interval(secs => $2::float8), false)
         as active
), candidates as (
  select p.id from unnest($1::text[]) as p(id)
  where p.id ~ '{_MARKED_ID_RE}'
  union
  -- Pools known only by the key of a lock that vanished: find their ids in the rows.
  -- (Constant conditions first: PostgreSQL skips the scan when there is no such key.)
  select j.locked_by from {s}._private_jobs as j
   where cardinality($3::bigint[]) > 0 and not (select g.active from grace as g)
     and j.locked_at is not null and j.locked_by ~ '{_MARKED_ID_RE}'
     and {_KEY2_UNSIGNED.format(id="j.locked_by")} = any($3::bigint[])
  union
  select q.locked_by from {s}._private_job_queues as q
   where cardinality($3::bigint[]) > 0 and not (select g.active from grace as g)
     and q.locked_at is not null and q.locked_by ~ '{_MARKED_ID_RE}'
     and {_KEY2_UNSIGNED.format(id="q.locked_by")} = any($3::bigint[])
), dead as (
  select c.id from candidates as c
  where not (select g.active from grace as g)
    and not {_LOCK_HELD.format(id="c.id")}
), released_jobs as (
  update {s}._private_jobs as j
     set locked_at = null, locked_by = null, run_at = greatest(j.run_at, now())
    from dead
   where j.locked_by = dead.id
  returning j.id
), released_queues as (
  update {s}._private_job_queues as q
     set locked_at = null, locked_by = null
    from dead
   where q.locked_by = dead.id
  returning q.id
), counts as (
  select (select count(*) from released_jobs) as jobs,
         (select count(*) from released_queues) as queues
)
select array(select id from dead order by id) as pools, c.jobs, c.queues,
       (select g.active from grace as g) as in_grace,
       case when c.jobs > 0 then pg_catalog.pg_notify(
         'jobs:insert', '{{"r":' || random() || ',"count":' || c.jobs || '}}'
       ) end as notified
from counts as c""",
        )
