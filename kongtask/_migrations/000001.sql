--! breaking
-- Legacy base schema (graphile-worker's original layout). Replaced wholesale by migration 11.
create table :GRAPHILE_WORKER_SCHEMA.job_queues (
  queue_name text not null primary key,
  job_count int not null,
  locked_at timestamptz,
  locked_by text
);
alter table :GRAPHILE_WORKER_SCHEMA.job_queues enable row level security;

create table :GRAPHILE_WORKER_SCHEMA.jobs (
  id bigserial primary key,
  queue_name text not null default md5(random()::text || clock_timestamp()::text),
  task_identifier text not null,
  payload json not null default '{}'::json,
  priority int not null default 0,
  run_at timestamptz not null default now(),
  attempts int not null default 0,
  max_attempts int not null default 25,
  last_error text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
alter table :GRAPHILE_WORKER_SCHEMA.jobs enable row level security;
create index jobs_priority_run_at_id_idx on :GRAPHILE_WORKER_SCHEMA.jobs (priority, run_at, id);

create function :GRAPHILE_WORKER_SCHEMA.tg__update_timestamp() returns trigger as $$
begin
  new.updated_at = greatest(now(), old.updated_at + interval '1 millisecond');
  return new;
end;
$$ language plpgsql;
create trigger _100_timestamps before update on :GRAPHILE_WORKER_SCHEMA.jobs
  for each row execute procedure :GRAPHILE_WORKER_SCHEMA.tg__update_timestamp();

create function :GRAPHILE_WORKER_SCHEMA.jobs__decrease_job_queue_count() returns trigger as $$
begin
  update :GRAPHILE_WORKER_SCHEMA.job_queues
    set job_count = job_queues.job_count - 1
    where job_queues.queue_name = old.queue_name
    and job_queues.job_count > 1;
  if not found then
    delete from :GRAPHILE_WORKER_SCHEMA.job_queues where job_queues.queue_name = old.queue_name;
  end if;
  return old;
end;
$$ language plpgsql;

create function :GRAPHILE_WORKER_SCHEMA.jobs__increase_job_queue_count() returns trigger as $$
begin
  insert into :GRAPHILE_WORKER_SCHEMA.job_queues (queue_name, job_count)
    values (new.queue_name, 1)
    on conflict (queue_name) do update set job_count = job_queues.job_count + 1;
  return new;
end;
$$ language plpgsql;

create trigger _500_increase_job_queue_count after insert on :GRAPHILE_WORKER_SCHEMA.jobs
  for each row execute procedure :GRAPHILE_WORKER_SCHEMA.jobs__increase_job_queue_count();
create trigger _500_decrease_job_queue_count after delete on :GRAPHILE_WORKER_SCHEMA.jobs
  for each row execute procedure :GRAPHILE_WORKER_SCHEMA.jobs__decrease_job_queue_count();
create trigger _500_increase_job_queue_count_update after update of queue_name on :GRAPHILE_WORKER_SCHEMA.jobs
  for each row when (new.queue_name is distinct from old.queue_name)
  execute procedure :GRAPHILE_WORKER_SCHEMA.jobs__increase_job_queue_count();
create trigger _500_decrease_job_queue_count_update after update of queue_name on :GRAPHILE_WORKER_SCHEMA.jobs
  for each row when (new.queue_name is distinct from old.queue_name)
  execute procedure :GRAPHILE_WORKER_SCHEMA.jobs__decrease_job_queue_count();

create function :GRAPHILE_WORKER_SCHEMA.tg_jobs__notify_new_jobs() returns trigger as $$
begin
  perform pg_notify('jobs:insert', '');
  return new;
end;
$$ language plpgsql;
create trigger _900_notify_worker after insert on :GRAPHILE_WORKER_SCHEMA.jobs
  for each statement execute procedure :GRAPHILE_WORKER_SCHEMA.tg_jobs__notify_new_jobs();

create function :GRAPHILE_WORKER_SCHEMA.add_job(
  identifier text,
  payload json = '{}',
  queue_name text = null,
  run_at timestamptz = now(),
  max_attempts int = 25
) returns :GRAPHILE_WORKER_SCHEMA.jobs as $$
  insert into :GRAPHILE_WORKER_SCHEMA.jobs (task_identifier, payload, queue_name, run_at, max_attempts)
    values (
      identifier,
      payload,
      coalesce(queue_name, md5(random()::text || clock_timestamp()::text)),
      run_at,
      max_attempts
    )
    returning *;
$$ language sql volatile;

create function :GRAPHILE_WORKER_SCHEMA.get_job(
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
    set attempts = jobs.attempts + 1
    where jobs.id = v_job_id
    returning * into v_row;

  return v_row;
end;
$$ language plpgsql volatile;

create function :GRAPHILE_WORKER_SCHEMA.complete_job(worker_id text, job_id bigint) returns :GRAPHILE_WORKER_SCHEMA.jobs as $$
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

create function :GRAPHILE_WORKER_SCHEMA.fail_job(worker_id text, job_id bigint, error_message text) returns :GRAPHILE_WORKER_SCHEMA.jobs as $$
declare
  v_row :GRAPHILE_WORKER_SCHEMA.jobs;
begin
  update :GRAPHILE_WORKER_SCHEMA.jobs
    set
      last_error = error_message,
      run_at = greatest(now(), jobs.run_at) + (exp(least(jobs.attempts, 10))::text || ' seconds')::interval
    where jobs.id = job_id
    returning * into v_row;

  update :GRAPHILE_WORKER_SCHEMA.job_queues
    set locked_by = null, locked_at = null
    where job_queues.queue_name = v_row.queue_name and job_queues.locked_by = worker_id;

  return v_row;
end;
$$ language plpgsql strict;
