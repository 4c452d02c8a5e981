--! breaking
-- A NULL queue_name means "no serialisation": such jobs run in parallel.
alter table :GRAPHILE_WORKER_SCHEMA.jobs alter column queue_name drop not null;

-- Queue bookkeeping only for jobs that have a queue.
drop trigger _500_increase_job_queue_count on :GRAPHILE_WORKER_SCHEMA.jobs;
drop trigger _500_decrease_job_queue_count on :GRAPHILE_WORKER_SCHEMA.jobs;
drop trigger _500_increase_job_queue_count_update on :GRAPHILE_WORKER_SCHEMA.jobs;
drop trigger _500_decrease_job_queue_count_update on :GRAPHILE_WORKER_SCHEMA.jobs;
create trigger _500_increase_job_queue_count after insert on :GRAPHILE_WORKER_SCHEMA.jobs
  for each row when (new.queue_name is not null)
  execute procedure :GRAPHILE_WORKER_SCHEMA.jobs__increase_job_queue_count();
create trigger _500_decrease_job_queue_count after delete on :GRAPHILE_WORKER_SCHEMA.jobs
  for each row when (old.queue_name is not null)
  execute procedure :GRAPHILE_WORKER_SCHEMA.jobs__decrease_job_queue_count();
create trigger _500_increase_job_queue_count_update after update of queue_name on :GRAPHILE_WORKER_SCHEMA.jobs
  for each row when (new.queue_name is distinct from old.queue_name and new.queue_name is not null)
  execute procedure :GRAPHILE_WORKER_SCHEMA.jobs__increase_job_queue_count();
create trigger _500_decrease_job_queue_count_update after update of queue_name on :GRAPHILE_WORKER_SCHEMA.jobs
  for each row when (new.queue_name is distinct from old.queue_name and old.queue_name is not null)
  execute procedure :GRAPHILE_WORKER_SCHEMA.jobs__decrease_job_queue_count();

create or replace function :GRAPHILE_WORKER_SCHEMA.get_job(
  worker_id text,
  task_identifiers text[] = null,
  job_expiry interval = interval '4 hours'
) returns :GRAPHILE_WORKER_SCHEMA.jobs as $$
declare
  v_job_id bigint;
  v_queue_name text;
  v_row :GRAPHILE_WORKER_SCHEMA.jobs;
begin
  if worker_id is null or length(worker_id) < 10 then
    raise exception 'invalid worker id';
  end if;

  select jobs.queue_name, jobs.id into v_queue_name, v_job_id
    from :GRAPHILE_WORKER_SCHEMA.jobs
    where (jobs.locked_at is null or jobs.locked_at < (now() - job_expiry))
    and (
      jobs.queue_name is null
      or exists (
        select 1 from :GRAPHILE_WORKER_SCHEMA.job_queues
        where job_queues.queue_name = jobs.queue_name
        and (job_queues.locked_at is null or job_queues.locked_at < (now() - job_expiry))
        for update skip locked
      )
    )
    and jobs.run_at <= now()
    and jobs.attempts < jobs.max_attempts
    and (task_identifiers is null or jobs.task_identifier = any(task_identifiers))
    order by jobs.priority asc, jobs.run_at asc, jobs.id asc
    limit 1
    for update skip locked;

  if v_job_id is null then
    return null;
  end if;

  if v_queue_name is not null then
    update :GRAPHILE_WORKER_SCHEMA.job_queues
      set locked_by = worker_id, locked_at = now()
      where job_queues.queue_name = v_queue_name;
  end if;

  update :GRAPHILE_WORKER_SCHEMA.jobs
    set attempts = jobs.attempts + 1, locked_by = worker_id, locked_at = now()
    where jobs.id = v_job_id
    returning * into v_row;

  return v_row;
end;
$$ language plpgsql volatile;

drop function :GRAPHILE_WORKER_SCHEMA.add_job(text, json, text, timestamptz, int, text);
create function :GRAPHILE_WORKER_SCHEMA.add_job(
  identifier text,
  payload json = '{}',
  queue_name text = null,
  run_at timestamptz = now(),
  max_attempts int = 25,
  job_key text = null
) returns :GRAPHILE_WORKER_SCHEMA.jobs as $$
declare
  v_job :GRAPHILE_WORKER_SCHEMA.jobs;
begin
  if add_job.job_key is not null then
    insert into :GRAPHILE_WORKER_SCHEMA.jobs (task_identifier, payload, queue_name, run_at, max_attempts, key)
      values (
        add_job.identifier, add_job.payload, add_job.queue_name,
        add_job.run_at, add_job.max_attempts, add_job.job_key
      )
      on conflict (key) do update set
        task_identifier = excluded.task_identifier,
        payload = excluded.payload,
        queue_name = excluded.queue_name,
        max_attempts = excluded.max_attempts,
        run_at = excluded.run_at,
        attempts = 0,
        last_error = null
      where jobs.locked_at is null
      returning * into v_job;
    if v_job.id is not null then
      return v_job;
    end if;
    update :GRAPHILE_WORKER_SCHEMA.jobs
      set key = null, attempts = jobs.max_attempts
      where jobs.key = add_job.job_key;
  end if;

  insert into :GRAPHILE_WORKER_SCHEMA.jobs (task_identifier, payload, queue_name, run_at, max_attempts, key)
    values (
      add_job.identifier, add_job.payload, add_job.queue_name,
      add_job.run_at, add_job.max_attempts, add_job.job_key
    )
    returning * into v_job;
  return v_job;
end;
$$ language plpgsql volatile;
