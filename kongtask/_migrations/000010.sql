-- Jobs without a queue_name are no longer given a random queue.
alter table :GRAPHILE_WORKER_SCHEMA.jobs alter column queue_name drop default;
