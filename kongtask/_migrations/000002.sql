-- Job keys (unique, non-empty) and job-level locks.
alter table :GRAPHILE_WORKER_SCHEMA.jobs add column key text unique check (length(key) > 0);
alter table :GRAPHILE_WORKER_SCHEMA.jobs add column locked_at timestamptz;
alter table :GRAPHILE_WORKER_SCHEMA.jobs add column locked_by text;

-- The queue lock used to be the only lock: carry it over to the queue's running job.
update :GRAPHILE_WORKER_SCHEMA.jobs
  set locked_at = job_queues.locked_at, locked_by = job_queues.locked_by
  from :GRAPHILE_WORKER_SCHEMA.job_queues
  where job_queues.queue_name = jobs.queue_name
  and job_queues.locked_at is not null
  and jobs.attempts > 0
  and jobs.id = (
    select j2.id from :GRAPHILE_WORKER_SCHEMA.jobs j2
    where j2.queue_name = jobs.queue_name and j2.attempts > 0
    order by j2.priority, j2.run_at, j2.id limit 1
  );

drop function :GRAPHILE_WORKER_SCHEMA.add_job(text, json, text, timestamptz, int);
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
    -- Update the pending job with this key in place.
    insert into :GRAPHILE_WORKER_SCHEMA.jobs (task_identifier, payload, queue_name, run_at, max_attempts, key)
      values (
        add_job.identifier,
        add_job.payload,
        coalesce(add_job.queue_name, md5(random()::text || clock_timestamp()::text)),
        add_job.run_at,
        add_job.max_attempts,
        add_job.job_key
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
    -- The keyed job is running: retire it (no retry) and add a fresh one.
    update :GRAPHILE_WORKER_SCHEMA.jobs
      set key = null, attempts = jobs.max_attempts
      where jobs.key = add_job.job_key;
  end if;

  insert into :GRAPHILE_WORKER_SCHEMA.jobs (task_identifier, payload, queue_name, run_at, max_attempts, key)
    values (
      add_job.identifier,
      add_job.payload,
      coalesce(add_job.queue_name, md5(random()::text || clock_timestamp()::text)),
      add_job.run_at,
      add_job.max_attempts,
      add_job.job_key
    )
    returning * into v_job;
  return v_job;
end;
$$ language plpgsql volatile;

create function :GRAPHILE_WORKER_SCHEMA.remove_job(job_key text) returns :GRAPHILE_WORKER_SCHEMA.jobs as $$
  delete from :GRAPHILE_WORKER_SCHEMA.jobs
    where key = job_key and locked_at is null
    returning *;
$$ language sql strict;

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

  select job_queues.queue_name, jobs.id into v_queue_name, v_job_id
    from :GRAPHILE_WORKER_SCHEMA.jobs
    inner join :GRAPHILE_WORKER_SCHEMA.job_queues on (job_queues.queue_name = jobs.queue_name)
    where (job_queues.locked_at is null or job_queues.locked_at < (now() - job_expiry))
    and (jobs.locked_at is null or jobs.locked_at < (now() - job_expiry))
    and jobs.run_at <= now()
    and jobs.attempts < jobs.max_attempts
    and (task_identifiers is null or jobs.task_identifier = any(task_identifiers))
    order by jobs.priority asc, jobs.run_at asc, jobs.id asc
    limit 1
    for update of job_queues skip locked;

  if v_queue_name is null then
    return null;
  end if;

  update :GRAPHILE_WORKER_SCHEMA.job_queues
    set locked_by = worker_id, locked_at = now()
    where job_queues.queue_name = v_queue_name;

  update :GRAPHILE_WORKER_SCHEMA.jobs
    set attempts = jobs.attempts + 1, locked_by = worker_id, locked_at = now()
    where jobs.id = v_job_id
    returning * into v_row;

  return v_row;
end;
$$ language plpgsql volatile;

create or replace function :GRAPHILE_WORKER_SCHEMA.complete_job(worker_id text, job_id bigint) returns :GRAPHILE_WORKER_SCHEMA.jobs as $$
declare
  v_row :GRAPHILE_WORKER_SCHEMA.jobs;
begin
  delete from :GRAPHILE_WORKER_SCHEMA.jobs where jobs.id = job_id returning * into v_row;

  update :GRAPHILE_WORKER_SCHEMA.job_queues
    set locked_by = null, locked_at = null
    where job_queues.queue_name = v_row.queue_name and job_queues.locked_by = worker_id;

  return v_row;
end;
$$ language plpgsql;

create or replace function :GRAPHILE_WORKER_SCHEMA.fail_job(worker_id text, job_id bigint, error_message text) returns :GRAPHILE_WORKER_SCHEMA.jobs as $$
declare
  v_row :GRAPHILE_WORKER_SCHEMA.jobs;
begin
  update :GRAPHILE_WORKER_SCHEMA.jobs
    set
      last_error = error_message,
      run_at = greatest(now(), jobs.run_at) + (exp(least(jobs.attempts, 10))::text || ' seconds')::interval,
      locked_by = null,
      locked_at = null
    where jobs.id = job_id and jobs.locked_by = worker_id
    returning * into v_row;

  update :GRAPHILE_WORKER_SCHEMA.job_queues
    set locked_by = null, locked_at = null
    where job_queues.queue_name = v_row.queue_name and job_queues.locked_by = worker_id;

  return v_row;
end;
$$ language plpgsql strict;
