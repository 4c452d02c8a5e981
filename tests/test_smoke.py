"""The oracle fixture gives a database graphile-worker 0.18.0 migrated."""

from kongtask._pg import Database


async def test_graphile_worker_oracle_migrates(gw_db: Database) -> None:
    rows = await gw_db.fetch("select id, breaking from graphile_worker.migrations order by id")
    assert [r["id"] for r in rows] == list(range(1, 21))
    assert [r["id"] for r in rows if r["breaking"]] == [1, 3, 11, 13, 14, 16, 19]
