-- The legacy trigger functions have had no triggers since migration 11.
drop function if exists :GRAPHILE_WORKER_SCHEMA.tg__update_timestamp();
drop function if exists :GRAPHILE_WORKER_SCHEMA.jobs__decrease_job_queue_count();
drop function if exists :GRAPHILE_WORKER_SCHEMA.jobs__increase_job_queue_count();

-- Release every job and queue a crashed worker (pool) left locked.
create or replace function :GRAPHILE_WORKER_SCHEMA.force_unlock_workers(worker_ids text[]) returns void as $$
  update :GRAPHILE_WORKER_SCHEMA.jobs as jobs
    set locked_at = null, locked_by = null
    where jobs.locked_by = any(worker_ids);
  update :GRAPHILE_WORKER_SCHEMA.job_queues as job_queues
    set locked_at = null, locked_by = null
    where job_queues.locked_by = any(worker_ids);
$$ language sql;
