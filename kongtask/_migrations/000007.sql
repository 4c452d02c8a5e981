-- job_key_mode ('replace', 'preserve_run_at', 'unsafe_dedupe'); remove_job retires running jobs.
drop function :GRAPHILE_WORKER_SCHEMA.add_job(text, json, text, timestamptz, int, text, int, text[]);
create function :GRAPHILE_WORKER_SCHEMA.add_job(
  identifier text,
  payload json = null,
  queue_name text = null,
  run_at timestamptz = null,
  max_attempts int = null,
  job_key text = null,
  priority int = null,
  flags text[] = null,
  job_key_mode text = 'replace'
) returns :GRAPHILE_WORKER_SCHEMA.jobs as $$
declare
  v_job :GRAPHILE_WORKER_SCHEMA.jobs;
begin
  if length(add_job.identifier) > 128 then
    raise exception 'Task identifier is too long (max length: 128).' using errcode = 'GWBID';
  end if;
  if length(add_job.queue_name) > 128 then
    raise exception 'Job queue name is too long (max length: 128).' using errcode = 'GWBQN';
  end if;
  if length(add_job.job_key) > 512 then
    raise exception 'Job key is too long (max length: 512).' using errcode = 'GWBJK';
  end if;
  if add_job.max_attempts < 1 then
    raise exception 'Job maximum attempts must be at least 1.' using errcode = 'GWBMA';
  end if;

  if add_job.job_key is not null and add_job.job_key_mode = 'unsafe_dedupe' then
    -- Any existing row wins; just record the hit.
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
        revision = jobs.revision + 1,
        updated_at = now()
      returning * into v_job;
    return v_job;
  elsif add_job.job_key is not null
    and add_job.job_key_mode is not null
    and add_job.job_key_mode not in ('replace', 'preserve_run_at') then
    raise exception 'Invalid job_key_mode value, expected ''replace'', ''preserve_run_at'' or ''unsafe_dedupe''.' using errcode = 'GWBKM';
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
        run_at = (case
          when add_job.job_key_mode = 'preserve_run_at' and jobs.attempts = 0 then jobs.run_at
          else excluded.run_at
        end),
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
    -- The keyed job is running: retire it (never retried) and add a fresh one.
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

drop function :GRAPHILE_WORKER_SCHEMA.remove_job(text);
create function :GRAPHILE_WORKER_SCHEMA.remove_job(job_key text) returns :GRAPHILE_WORKER_SCHEMA.jobs as $$
declare
  v_job :GRAPHILE_WORKER_SCHEMA.jobs;
begin
  -- Delete the job if nobody is running it...
  delete from :GRAPHILE_WORKER_SCHEMA.jobs
    where jobs.key = job_key
    and (jobs.locked_at is null or jobs.locked_at < now() - interval '4 hours')
    returning * into v_job;
  if v_job.id is not null then
    return v_job;
  end if;
  -- ...otherwise let the running attempt finish but never retry it.
  update :GRAPHILE_WORKER_SCHEMA.jobs
    set key = null, attempts = jobs.max_attempts
    where jobs.key = job_key
    returning * into v_job;
  return v_job;
end;
$$ language plpgsql strict;
