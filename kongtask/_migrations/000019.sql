--! breaking
-- No schema change: marks the switch of locked_by from worker ids to pool ids (0.17),
-- so older workers (which notice the breaking notify) shut down.
select 1;
