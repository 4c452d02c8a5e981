-- graphile-worker #619: `insert ... on conflict do nothing` burns an identity value on
-- every call, so after ~2^31 adds the integer ids ran out. Insert only missing names
-- (the conflict clause stays for concurrent inserts). Signatures are unchanged.
create or replace function :GRAPHILE_WORKER_SCHEMA.add_jobs(
  specs :GRAPHILE_WORKER_SCHEMA.job_spec[],
  job_key_preserve_run_at boolean default false
) returns setof :GRAPHILE_WORKER_SCHEMA._private_jobs as $$
declare
  v_specs :GRAPHILE_WORKER_SCHEMA.job_spec[] := specs;
  v_job :GRAPHILE_WORKER_SCHEMA._private_jobs;
  v_keys text[];
begin
  insert into :GRAPHILE_WORKER_SCHEMA._private_tasks as tasks (identifier)
    select distinct spec.identifier
    from unnest(specs) spec
    where not exists (
      select 1 from :GRAPHILE_WORKER_SCHEMA._private_tasks as t where t.identifier = spec.identifier
    )
    on conflict do nothing;

  insert into :GRAPHILE_WORKER_SCHEMA._private_job_queues as job_queues (queue_name)
    select distinct spec.queue_name
    from unnest(specs) spec
    where spec.queue_name is not null
    and not exists (
      select 1 from :GRAPHILE_WORKER_SCHEMA._private_job_queues as q where q.queue_name = spec.queue_name
    )
    on conflict do nothing;

  -- Wake up to N idle workers; random() defeats NOTIFY's de-duplication. An empty array
  -- gives a NULL payload (sent empty), which listeners read as 1.
  perform pg_notify(
    'jobs:insert',
    '{"r":' || random()::text || ',"count":' || array_length(specs, 1)::text || '}'
  );

  -- kongtask (graphile-worker #580): if a keyed job gets locked between the retire step
  -- and the upsert, the upsert skips it and returns nothing for that spec. Repeat both
  -- steps for such specs until every spec has produced a live row.
  loop
    -- A keyed job that is running or permanently failed gives up its key to the new job.
    update :GRAPHILE_WORKER_SCHEMA._private_jobs as jobs
      set key = null, attempts = jobs.max_attempts, updated_at = now()
      from unnest(v_specs) spec
      where spec.job_key is not null
      and jobs.key = spec.job_key
      and jobs.is_available is not true;

    -- kongtask: rows are inserted (so get their ids, and run within a queue) in the order
    -- of the specs; without the `order by` the joins' plan decides, and a batch went in
    -- backwards.
    v_keys := '{}';
    for v_job in
      insert into :GRAPHILE_WORKER_SCHEMA._private_jobs as jobs (
        job_queue_id, task_id, payload, run_at, max_attempts, key, priority, flags
      )
        select
          job_queues.id,
          tasks.id,
          coalesce(spec.payload, '{}'::json),
          coalesce(spec.run_at, now()),
          coalesce(spec.max_attempts, 25),
          spec.job_key,
          coalesce(spec.priority, 0),
          (select jsonb_object_agg(item.flag, true) from unnest(spec.flags) as item(flag))
        from unnest(v_specs) with ordinality as spec
        inner join :GRAPHILE_WORKER_SCHEMA._private_tasks as tasks on tasks.identifier = spec.identifier
        left join :GRAPHILE_WORKER_SCHEMA._private_job_queues as job_queues on job_queues.queue_name = spec.queue_name
        order by spec.ordinality
      on conflict (key) do update set
        job_queue_id = excluded.job_queue_id,
        task_id = excluded.task_id,
        payload = (case
          when json_typeof(jobs.payload) = 'array' and json_typeof(excluded.payload) = 'array'
            then (jobs.payload::jsonb || excluded.payload::jsonb)::json
          else excluded.payload
        end),
        max_attempts = excluded.max_attempts,
        run_at = (case
          when job_key_preserve_run_at is true and jobs.attempts = 0 then jobs.run_at
          else excluded.run_at
        end),
        priority = excluded.priority,
        revision = jobs.revision + 1,
        flags = excluded.flags,
        attempts = 0,
        last_error = null,
        updated_at = now()
      where jobs.locked_at is null
      returning *
    loop
      if v_job.key is not null then
        v_keys := v_keys || v_job.key;
      end if;
      return next v_job;
    end loop;

    v_specs := array(
      select v_specs[i]
      from generate_subscripts(v_specs, 1) as i
      where (v_specs[i]).job_key is not null
      and not ((v_specs[i]).job_key = any(v_keys))
    );
    exit when coalesce(cardinality(v_specs), 0) = 0;
  end loop;
end;
$$ language plpgsql;

create or replace function :GRAPHILE_WORKER_SCHEMA.add_job(
  identifier text,
  payload json default null,
  queue_name text default null,
  run_at timestamptz default null,
  max_attempts int default null,
  job_key text default null,
  priority int default null,
  flags text[] default null,
  job_key_mode text default 'replace'
) returns :GRAPHILE_WORKER_SCHEMA._private_jobs as $$
declare
  v_job :GRAPHILE_WORKER_SCHEMA._private_jobs;
begin
  if (
    add_job.job_key is null
    or add_job.job_key_mode is null
    or add_job.job_key_mode in ('replace', 'preserve_run_at')
  ) then
    select * into v_job
      from :GRAPHILE_WORKER_SCHEMA.add_jobs(
        array[(
          add_job.identifier,
          add_job.payload,
          add_job.queue_name,
          add_job.run_at,
          add_job.max_attempts::smallint,
          add_job.job_key,
          add_job.priority::smallint,
          add_job.flags
        ):::GRAPHILE_WORKER_SCHEMA.job_spec],
        (add_job.job_key_mode = 'preserve_run_at')
      )
      limit 1;
    return v_job;
  elsif add_job.job_key_mode = 'unsafe_dedupe' then
    insert into :GRAPHILE_WORKER_SCHEMA._private_tasks as tasks (identifier)
      select add_job.identifier
      where not exists (
        select 1 from :GRAPHILE_WORKER_SCHEMA._private_tasks as t where t.identifier = add_job.identifier
      )
      on conflict do nothing;
    if add_job.queue_name is not null then
      insert into :GRAPHILE_WORKER_SCHEMA._private_job_queues as job_queues (queue_name)
        select add_job.queue_name
        where not exists (
          select 1 from :GRAPHILE_WORKER_SCHEMA._private_job_queues as q where q.queue_name = add_job.queue_name
        )
        on conflict do nothing;
    end if;
    -- Any existing row wins, whatever its state; only the hit is recorded.
    insert into :GRAPHILE_WORKER_SCHEMA._private_jobs as jobs (
      job_queue_id, task_id, payload, run_at, max_attempts, key, priority, flags
    )
      select
        job_queues.id,
        tasks.id,
        coalesce(add_job.payload, '{}'::json),
        coalesce(add_job.run_at, now()),
        coalesce(add_job.max_attempts::smallint, 25::smallint),
        add_job.job_key,
        coalesce(add_job.priority::smallint, 0::smallint),
        (select jsonb_object_agg(item.flag, true) from unnest(add_job.flags) as item(flag))
      from :GRAPHILE_WORKER_SCHEMA._private_tasks as tasks
      left join :GRAPHILE_WORKER_SCHEMA._private_job_queues as job_queues
        on job_queues.queue_name = add_job.queue_name
      where tasks.identifier = add_job.identifier
    on conflict (key) do update set
      revision = jobs.revision + 1,
      updated_at = now()
    returning * into v_job;
    if v_job.revision = 0 then
      perform pg_notify('jobs:insert', '{"r":' || random()::text || ',"count":1}');
    end if;
    return v_job;
  else
    raise exception 'Invalid job_key_mode value, expected ''replace'', ''preserve_run_at'' or ''unsafe_dedupe''.'
      using errcode = 'GWBKM';
  end if;
end;
$$ language plpgsql;
