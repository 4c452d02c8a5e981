--! breaking
-- The rewrite: integer-keyed tasks and queues, generated is_available, covering partial
-- indexes, job_spec + add_jobs. Legacy jobs are copied (new ids, locks dropped).

-- Nobody may fetch or finish a legacy job while we copy them.
lock table :GRAPHILE_WORKER_SCHEMA.jobs in access exclusive mode;
lock table :GRAPHILE_WORKER_SCHEMA.job_queues in access exclusive mode;

-- A job locked in the last 4 hours may still be running on an old worker; copying it
-- would run it twice. Abort with SQLSTATE 22012, which the migrator turns into advice.
do $$
begin
  if exists (
    select 1 from :GRAPHILE_WORKER_SCHEMA.jobs
    where jobs.locked_at is not null and jobs.locked_at > now() - interval '4 hours'
  ) then
    raise exception 'There are locked jobs present; migration 11 cannot complete.'
      using errcode = 'division_by_zero';
  end if;
end
$$;

alter table :GRAPHILE_WORKER_SCHEMA.jobs rename to jobs_legacy;
alter table :GRAPHILE_WORKER_SCHEMA.job_queues rename to job_queues_legacy;

-- The legacy API (signatures as of migration 10); these return the legacy row type.
drop function if exists :GRAPHILE_WORKER_SCHEMA.add_job(text, json, text, timestamptz, int, text, int, text[], text);
drop function if exists :GRAPHILE_WORKER_SCHEMA.get_job(text, text[], interval, text[], timestamptz);
drop function if exists :GRAPHILE_WORKER_SCHEMA.complete_job(text, bigint);
drop function if exists :GRAPHILE_WORKER_SCHEMA.fail_job(text, bigint, text);
drop function if exists :GRAPHILE_WORKER_SCHEMA.complete_jobs(bigint[]);
drop function if exists :GRAPHILE_WORKER_SCHEMA.permanently_fail_jobs(bigint[], text);
drop function if exists :GRAPHILE_WORKER_SCHEMA.reschedule_jobs(bigint[], timestamptz, int, int, int);
drop function if exists :GRAPHILE_WORKER_SCHEMA.remove_job(text);

create table :GRAPHILE_WORKER_SCHEMA.tasks (
  id int generated always as identity (sequence name :GRAPHILE_WORKER_SCHEMA.tasks_id_seq),
  identifier text not null,
  constraint tasks_pkey primary key (id),
  constraint tasks_identifier_key unique (identifier),
  constraint tasks_identifier_check check (length(identifier) <= 128)
);
alter table :GRAPHILE_WORKER_SCHEMA.tasks enable row level security;

-- "1" suffixes: upstream created these while the legacy tables still held the plain names.
create table :GRAPHILE_WORKER_SCHEMA.job_queues (
  id int generated always as identity (sequence name :GRAPHILE_WORKER_SCHEMA.job_queues_id_seq),
  queue_name text not null,
  locked_at timestamptz,
  locked_by text,
  is_available boolean generated always as (locked_at is null) stored not null,
  constraint job_queues_pkey1 primary key (id),
  constraint job_queues_queue_name_key unique (queue_name),
  constraint job_queues_queue_name_check check (length(queue_name) <= 128)
);
alter table :GRAPHILE_WORKER_SCHEMA.job_queues enable row level security;

create table :GRAPHILE_WORKER_SCHEMA.jobs (
  id bigint generated always as identity (sequence name :GRAPHILE_WORKER_SCHEMA.jobs_id_seq1),
  job_queue_id int null,
  task_id int not null,
  payload json default '{}'::json not null,
  priority smallint default 0 not null,
  run_at timestamptz default now() not null,
  attempts smallint default 0 not null,
  max_attempts smallint default 25 not null,
  last_error text,
  created_at timestamptz default now() not null,
  updated_at timestamptz default now() not null,
  key text,
  locked_at timestamptz,
  locked_by text,
  revision integer default 0 not null,
  flags jsonb,
  is_available boolean generated always as ((locked_at is null) and (attempts < max_attempts)) stored not null,
  constraint jobs_pkey1 primary key (id),
  constraint jobs_key_key1 unique (key),
  constraint jobs_key_check check (length(key) > 0 and length(key) <= 512),
  constraint jobs_max_attempts_check check (max_attempts >= 1)
);
alter table :GRAPHILE_WORKER_SCHEMA.jobs enable row level security;

create index jobs_main_index
  on :GRAPHILE_WORKER_SCHEMA.jobs
  using btree (priority, run_at)
  include (id, task_id, job_queue_id)
  where (is_available = true);

create index jobs_no_queue_index
  on :GRAPHILE_WORKER_SCHEMA.jobs
  using btree (priority, run_at)
  include (id, task_id)
  where (is_available = true and job_queue_id is null);

-- Copy the legacy data across.
insert into :GRAPHILE_WORKER_SCHEMA.tasks (identifier)
  select distinct legacy.task_identifier
  from :GRAPHILE_WORKER_SCHEMA.jobs_legacy as legacy;

insert into :GRAPHILE_WORKER_SCHEMA.job_queues (queue_name)
  select distinct legacy.queue_name
  from :GRAPHILE_WORKER_SCHEMA.jobs_legacy as legacy
  where legacy.queue_name is not null;

insert into :GRAPHILE_WORKER_SCHEMA.jobs (
  job_queue_id, task_id, payload, priority, run_at, attempts, max_attempts,
  last_error, created_at, updated_at, key, revision, flags
)
  select
    job_queues.id,
    tasks.id,
    legacy.payload,
    legacy.priority,
    legacy.run_at,
    legacy.attempts,
    legacy.max_attempts,
    legacy.last_error,
    legacy.created_at,
    legacy.updated_at,
    legacy.key,
    legacy.revision,
    legacy.flags
  from :GRAPHILE_WORKER_SCHEMA.jobs_legacy as legacy
  inner join :GRAPHILE_WORKER_SCHEMA.tasks as tasks on tasks.identifier = legacy.task_identifier
  left join :GRAPHILE_WORKER_SCHEMA.job_queues as job_queues on job_queues.queue_name = legacy.queue_name
  order by legacy.id;

drop table :GRAPHILE_WORKER_SCHEMA.jobs_legacy;
drop table :GRAPHILE_WORKER_SCHEMA.job_queues_legacy;
drop function if exists :GRAPHILE_WORKER_SCHEMA.tg_jobs__notify_new_jobs();

-- Wake-up for workers: an empty notify per inserting statement (until migration 18).
create function :GRAPHILE_WORKER_SCHEMA.tg_jobs__after_insert() returns trigger as $$
begin
  perform pg_notify('jobs:insert', '');
  return new;
end;
$$ language plpgsql;
create trigger _900_after_insert after insert on :GRAPHILE_WORKER_SCHEMA.jobs
  for each statement execute procedure :GRAPHILE_WORKER_SCHEMA.tg_jobs__after_insert();

create type :GRAPHILE_WORKER_SCHEMA.job_spec as (
  identifier text,
  payload json,
  queue_name text,
  run_at timestamptz,
  max_attempts int,
  job_key text,
  priority int,
  flags text[]
);

create function :GRAPHILE_WORKER_SCHEMA.add_jobs(
  specs :GRAPHILE_WORKER_SCHEMA.job_spec[],
  job_key_preserve_run_at boolean default false
) returns setof :GRAPHILE_WORKER_SCHEMA.jobs as $$
begin
  insert into :GRAPHILE_WORKER_SCHEMA.tasks (identifier)
    select distinct spec.identifier
    from unnest(specs) spec
    on conflict do nothing;

  insert into :GRAPHILE_WORKER_SCHEMA.job_queues (queue_name)
    select distinct spec.queue_name
    from unnest(specs) spec
    where spec.queue_name is not null
    on conflict do nothing;

  -- A keyed job that is running or permanently failed gives up its key to the new job.
  update :GRAPHILE_WORKER_SCHEMA.jobs
    set key = null, attempts = jobs.max_attempts, updated_at = now()
    from unnest(specs) spec
    where spec.job_key is not null
    and jobs.key = spec.job_key
    and jobs.is_available is not true;

  return query insert into :GRAPHILE_WORKER_SCHEMA.jobs (
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
    from unnest(specs) spec
    inner join :GRAPHILE_WORKER_SCHEMA.tasks on tasks.identifier = spec.identifier
    left join :GRAPHILE_WORKER_SCHEMA.job_queues on job_queues.queue_name = spec.queue_name
  on conflict (key) do update set
    job_queue_id = excluded.job_queue_id,
    task_id = excluded.task_id,
    payload = excluded.payload,
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
  returning *;
end;
$$ language plpgsql;

create function :GRAPHILE_WORKER_SCHEMA.add_job(
  identifier text,
  payload json default null,
  queue_name text default null,
  run_at timestamptz default null,
  max_attempts int default null,
  job_key text default null,
  priority int default null,
  flags text[] default null,
  job_key_mode text default 'replace'
) returns :GRAPHILE_WORKER_SCHEMA.jobs as $$
declare
  v_job :GRAPHILE_WORKER_SCHEMA.jobs;
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
          add_job.max_attempts,
          add_job.job_key,
          add_job.priority,
          add_job.flags
        ):::GRAPHILE_WORKER_SCHEMA.job_spec],
        (add_job.job_key_mode = 'preserve_run_at')
      )
      limit 1;
    return v_job;
  elsif add_job.job_key_mode = 'unsafe_dedupe' then
    insert into :GRAPHILE_WORKER_SCHEMA.tasks (identifier)
      values (add_job.identifier)
      on conflict do nothing;
    if add_job.queue_name is not null then
      insert into :GRAPHILE_WORKER_SCHEMA.job_queues (queue_name)
        values (add_job.queue_name)
        on conflict do nothing;
    end if;
    -- Any existing row wins, whatever its state; only the hit is recorded.
    insert into :GRAPHILE_WORKER_SCHEMA.jobs (
      job_queue_id, task_id, payload, run_at, max_attempts, key, priority, flags
    )
      select
        job_queues.id,
        tasks.id,
        coalesce(add_job.payload, '{}'::json),
        coalesce(add_job.run_at, now()),
        coalesce(add_job.max_attempts, 25),
        add_job.job_key,
        coalesce(add_job.priority, 0),
        (select jsonb_object_agg(item.flag, true) from unnest(add_job.flags) as item(flag))
      from :GRAPHILE_WORKER_SCHEMA.tasks
      left join :GRAPHILE_WORKER_SCHEMA.job_queues on job_queues.queue_name = add_job.queue_name
      where tasks.identifier = add_job.identifier
    on conflict (key) do update set
      revision = jobs.revision + 1,
      updated_at = now()
    returning * into v_job;
    return v_job;
  else
    raise exception 'Invalid job_key_mode value, expected ''replace'', ''preserve_run_at'' or ''unsafe_dedupe''.'
      using errcode = 'GWBKM';
  end if;
end;
$$ language plpgsql;

create function :GRAPHILE_WORKER_SCHEMA.complete_jobs(job_ids bigint[]) returns setof :GRAPHILE_WORKER_SCHEMA.jobs as $$
  delete from :GRAPHILE_WORKER_SCHEMA.jobs
    where id = any(job_ids)
    and (locked_at is null or locked_at < now() - interval '4 hours')
    returning *;
$$ language sql;

create function :GRAPHILE_WORKER_SCHEMA.permanently_fail_jobs(
  job_ids bigint[],
  error_message text default null
) returns setof :GRAPHILE_WORKER_SCHEMA.jobs as $$
  update :GRAPHILE_WORKER_SCHEMA.jobs
    set
      last_error = coalesce(error_message, 'Manually marked as failed'),
      attempts = max_attempts,
      updated_at = now()
    where id = any(job_ids)
    and (locked_at is null or locked_at < now() - interval '4 hours')
    returning *;
$$ language sql;

create function :GRAPHILE_WORKER_SCHEMA.reschedule_jobs(
  job_ids bigint[],
  run_at timestamptz default null,
  priority int default null,
  attempts int default null,
  max_attempts int default null
) returns setof :GRAPHILE_WORKER_SCHEMA.jobs as $$
  update :GRAPHILE_WORKER_SCHEMA.jobs
    set
      run_at = coalesce(reschedule_jobs.run_at, jobs.run_at),
      priority = coalesce(reschedule_jobs.priority::smallint, jobs.priority),
      attempts = coalesce(reschedule_jobs.attempts::smallint, jobs.attempts),
      max_attempts = coalesce(reschedule_jobs.max_attempts::smallint, jobs.max_attempts),
      updated_at = now()
    where id = any(job_ids)
    and (jobs.locked_at is null or jobs.locked_at < now() - interval '4 hours')
    returning *;
$$ language sql;

create function :GRAPHILE_WORKER_SCHEMA.remove_job(job_key text) returns :GRAPHILE_WORKER_SCHEMA.jobs as $$
declare
  v_job :GRAPHILE_WORKER_SCHEMA.jobs;
begin
  delete from :GRAPHILE_WORKER_SCHEMA.jobs
    where jobs.key = remove_job.job_key
    and (jobs.locked_at is null or jobs.locked_at < now() - interval '4 hours')
    returning * into v_job;
  if v_job.id is not null then
    return v_job;
  end if;
  -- Running: let this attempt finish, but never retry it and free the key.
  update :GRAPHILE_WORKER_SCHEMA.jobs
    set key = null, attempts = jobs.max_attempts, updated_at = now()
    where jobs.key = remove_job.job_key
    returning * into v_job;
  return v_job;
end;
$$ language plpgsql strict;
