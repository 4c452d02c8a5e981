-- Revision counter and job flags (forbidden_flags lets a worker skip flagged jobs).
alter table :GRAPHILE_WORKER_SCHEMA.jobs add column revision int not null default 0;
alter table :GRAPHILE_WORKER_SCHEMA.jobs add column flags jsonb;

drop function :GRAPHILE_WORKER_SCHEMA.add_job(text, json, text, timestamptz, int, text, int);
create function :GRAPHILE_WORKER_SCHEMA.add_job(
  identifier text,
  payload json = null,
  queue_name text = null,
  run_at timestamptz = null,
  max_attempts int = null,
  job_key text = null,
  priority int = null,
  flags text[] = null
) returns :GRAPHILE_WORKER_SCHEMA.jobs as $$
declare
  v_job :GRAPHILE_WORKER_SCHEMA.jobs;
begin
  if length(add_job.identifier) > 128 then
    raise exception 'Task identifier is too long (max length: 128)' using errcode = 'GWBID';
  end if;
  if length(add_job.queue_name) > 128 then
    raise exception 'Job queue name is too long (max length: 128)' using errcode = 'GWBQN';
  end if;
  if length(add_job.job_key) > 512 then
    raise exception 'Job key is too long (max length: 512)' using errcode = 'GWBJK';
  end if;
  if add_job.max_attempts < 1 then
    raise exception 'Job maximum attempts must be at least 1' using errcode = 'GWBMA';
  end if;

  if add_job.job_key is not null then
    insert into :GRAPHILE_WORKER_SCHEMA.jobs (task_identifier, payload, queue_name, run_at, max_attempts, key, priority, flags)
      values (
        add_job.identifier,
        coalesce(add_job.payload, '{}'::json),
        add_job.queue_name,
        coalesce(add_job.run_at, now()),
        coalesce(add_job.max_attempts, 25),
        add_job.job_key,
        coalesce(add_job.priority, 0),
        (select jsonb_object_agg(item.flag, true) from unnest(add_job.flags) as item(flag))
      )
      on conflict (key) do update set
        task_identifier = excluded.task_identifier,
        payload = excluded.payload,
        queue_name = excluded.queue_name,
        max_attempts = excluded.max_attempts,
        run_at = excluded.run_at,
        priority = excluded.priority,
        revision = jobs.revision + 1,
        flags = excluded.flags,
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

  insert into :GRAPHILE_WORKER_SCHEMA.jobs (task_identifier, payload, queue_name, run_at, max_attempts, key, priority, flags)
    values (
      add_job.identifier,
      coalesce(add_job.payload, '{}'::json),
      add_job.queue_name,
      coalesce(add_job.run_at, now()),
      coalesce(add_job.max_attempts, 25),
      add_job.job_key,
      coalesce(add_job.priority, 0),
      (select jsonb_object_agg(item.flag, true) from unnest(add_job.flags) as item(flag))
    )
    returning * into v_job;
  return v_job;
end;
$$ language plpgsql volatile;

drop function :GRAPHILE_WORKER_SCHEMA.get_job(text, text[], interval);
create function :GRAPHILE_WORKER_SCHEMA.get_job(
  worker_id text,
  task_identifiers text[] = null,
  job_expiry interval = interval '4 hours',
  forbidden_flags text[] = null
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
    and (forbidden_flags is null or jobs.flags is null or not (jobs.flags ?| forbidden_flags))
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
