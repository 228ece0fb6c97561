-- Wake-ups instead of waiting for the next poll: workers LISTEN on `vitforge_jobs` (a job was
-- queued, or went back to the queue), API processes on `vitforge_models` (a model was registered).
-- Both still poll, so a lost notification only delays.
create function vitforge_notify() returns trigger language plpgsql as $$
begin
    perform pg_notify(tg_argv[0], new.id);
    return null;
end
$$;
create trigger jobs_queued after insert or update of status on jobs
    for each row when (new.status = 'queued') execute function vitforge_notify('vitforge_jobs');
create trigger models_registered after insert on models
    for each row execute function vitforge_notify('vitforge_models');
