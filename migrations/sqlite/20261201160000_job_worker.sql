-- Who runs a job (`--worker-name`, default host name and process id) and until when its lease
-- holds: a worker renews it while the job runs, and a running job whose lease has run out goes
-- to the next worker that claims. RFC 3339 text like every timestamp, so text order is time order.
alter table jobs add column worker text;
alter table jobs add column lease_expires_at text;
