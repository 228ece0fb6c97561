//! The job queue's statements (claim, lease, fencing, start-up recovery) on whichever backend the
//! suite runs on: SQLite by default, PostgreSQL under `scripts/test-postgres.sh`. The service runs
//! as `--role api`, so no worker of its own claims the jobs these tests drive by hand.

use std::time::Duration;

use vitforge::db::Pool;
use vitforge::db::jobs::{self, Cancel, Holder, Job, NewJob, Recovered, Status};
use vitforge::db::job_metrics::{self, MistakeRow, TrainPoint};
use vitforge::db::models::{self, Model, Registration};
use vitforge::train::Phase;
use vitforge::train::report::EvalReport;

use crate::helpers::{TestApp, spawn_app_with};

const LEASE: Duration = Duration::from_secs(60);

/// A service that runs no job, and one queued job on an uploaded dataset.
async fn queued_job() -> (TestApp, Job) {
    let app = spawn_app_with(|c| c.role = vitforge::config::Role::Api).await;
    let dataset = app.upload_pets(2, false).await;
    let params = serde_json::json!({});
    let new = NewJob { dataset_id: &dataset, base_model: "m", params: &params, recipe: "r", epochs: 1, base_is_model: false };
    let job = jobs::insert(&app.db, &new).await.unwrap().unwrap();
    (app, job)
}

/// A model row of `job`'s, with the id `id` and the folder `models/<id>`.
pub(crate) fn model_of(job: &Job, id: &str) -> Model {
    Model {
        id: id.into(),
        job_id: Some(job.id.clone()),
        base_model: "m".into(),
        labels: vec![],
        metrics: None,
        params: None,
        recipe: None,
        created_at: vitforge::db::now(),
        path: format!("models/{id}"),
    }
}

async fn status(db: &Pool, id: &str) -> Status {
    jobs::get(db, id).await.unwrap().unwrap().status
}

/// Lets a lease taken for `Duration::ZERO` run out (lease times have millisecond resolution).
async fn run_out() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// The queued job claimed by `worker` for a lease that has run out on return.
async fn lapsed_claim(db: &Pool, worker: &str) -> Holder {
    let holder = Holder::of(worker, &jobs::claim(db, worker, "cpu", Duration::ZERO, &[]).await.unwrap().unwrap());
    run_out().await;
    holder
}

/// The queued job claimed by worker `first` for a lease that runs out at once, then by `second`.
async fn claimed_twice(db: &Pool, first: &str, second: &str) -> (Holder, Holder) {
    let one = lapsed_claim(db, first).await;
    let two = Holder::of(second, &jobs::claim(db, second, "cpu", LEASE, &[]).await.unwrap().unwrap());
    (one, two)
}

/// Another queued job on the dataset of `job`.
async fn another_job(db: &Pool, job: &Job) -> Job {
    let params = serde_json::json!({});
    let new = NewJob { dataset_id: &job.dataset_id, base_model: "m", params: &params, recipe: "r", epochs: 1, base_is_model: false };
    jobs::insert(db, &new).await.unwrap().unwrap()
}

#[tokio::test]
async fn a_job_on_one_of_our_models_is_queued_only_while_that_model_exists() {
    let (app, job) = queued_job().await;
    let db = &app.db;
    let params = serde_json::json!({});
    let on = |base_model: &'static str| NewJob { dataset_id: &job.dataset_id, base_model, params: &params, recipe: "r", epochs: 1, base_is_model: true };
    assert!(jobs::insert(db, &on("gone")).await.unwrap().is_none(), "a model deleted since the request was checked");
    let finished = jobs::claim(db, "w", "cpu", LEASE, &[]).await.unwrap().unwrap();
    let registered = models::register_for_job(db, &model_of(&finished, "m-kept"), Some(&Holder::of("w", &finished))).await.unwrap();
    assert_eq!(registered, Registration::Registered);
    let queued = jobs::insert(db, &on("m-kept")).await.unwrap().unwrap();
    assert_eq!((queued.base_model.as_str(), queued.status), ("m-kept", Status::Queued));
    assert_ne!(queued.id, job.id);
}

#[tokio::test]
async fn a_lease_that_ran_out_moves_the_job_and_the_first_worker_can_no_longer_end_it() {
    let (app, job) = queued_job().await;
    let db = &app.db;

    // A live lease: nobody else can claim.
    let claimed = jobs::claim(db, "one", "cpu", LEASE, &[]).await.unwrap().unwrap();
    assert_eq!((claimed.id.as_str(), claimed.worker.as_deref(), claimed.status), (job.id.as_str(), Some("one"), Status::Running));
    let one = Holder::of("one", &claimed);
    assert!(jobs::claim(db, "two", "cpu", LEASE, &[]).await.unwrap().is_none());
    assert_eq!(jobs::renew_lease(db, &job.id, &one, LEASE).await.unwrap(), Some(false));
    let stranger = Holder { worker: "two".into(), claim: one.claim };
    assert_eq!(jobs::renew_lease(db, &job.id, &stranger, LEASE).await.unwrap(), None, "only the holder renews");
    assert_eq!(jobs::cancel(db, &job.id).await.unwrap(), Cancel::Requested);
    assert_eq!(jobs::renew_lease(db, &job.id, &one, LEASE).await.unwrap(), Some(true), "the renewal carries the cancel");
    sqlx::query("update jobs set cancel_requested = 0").execute(db).await.unwrap();

    // Worker one stops renewing (its lease runs out): worker two takes the job.
    assert!(jobs::renew_lease(db, &job.id, &one, Duration::ZERO).await.unwrap().is_some());
    run_out().await;
    let taken = jobs::claim(db, "two", "cpu", LEASE, &[]).await.unwrap().unwrap();
    assert_eq!((taken.worker.as_deref(), taken.attempts), (Some("two"), 2));
    let two = Holder::of("two", &taken);
    assert_eq!(jobs::renew_lease(db, &job.id, &one, LEASE).await.unwrap(), None, "worker one learns it lost the job");

    // Worker one, running on regardless, can neither end the job nor register a model for it.
    jobs::finish(db, &job.id, &one, Status::Failed, Some("late")).await.unwrap();
    jobs::requeue(db, &job.id, &one).await.unwrap();
    assert_eq!(status(db, &job.id).await, Status::Running);
    assert_eq!(models::register_for_job(db, &model_of(&job, "m-one"), Some(&one)).await.unwrap(), Registration::NotOurs);
    assert_eq!(models::register_for_job(db, &model_of(&job, "m-two"), Some(&two)).await.unwrap(), Registration::Registered);
    let done = jobs::get(db, &job.id).await.unwrap().unwrap();
    assert_eq!((done.status, done.model_id.as_deref()), (Status::Succeeded, Some("m-two")));
    let registered: Vec<String> = sqlx::query_scalar("select id from models").fetch_all(db).await.unwrap();
    assert_eq!(registered, vec!["m-two".to_string()], "one model for the job");
}

/// Two processes that were given the same worker name (a configuration mistake): the claim number
/// still tells their runs apart, so the one whose lease ran out changes nothing.
#[tokio::test]
async fn a_run_under_the_same_worker_name_whose_claim_passed_on_changes_nothing() {
    let (app, job) = queued_job().await;
    let db = &app.db;
    let (first, second) = claimed_twice(db, "twin", "twin").await;
    assert_eq!((first.claim, second.claim), (1, 2));

    assert_eq!(jobs::renew_lease(db, &job.id, &first, LEASE).await.unwrap(), None, "the first run learns it lost the job");
    jobs::finish(db, &job.id, &first, Status::Failed, Some("late")).await.unwrap();
    jobs::requeue(db, &job.id, &first).await.unwrap();
    assert_eq!(models::register_for_job(db, &model_of(&job, "m-first"), Some(&first)).await.unwrap(), Registration::NotOurs);
    assert_eq!(status(db, &job.id).await, Status::Running, "the second run still holds it");
    assert_eq!(jobs::renew_lease(db, &job.id, &second, LEASE).await.unwrap(), Some(false));

    // A cancel asked for while the second run saves its model wins over its success.
    assert_eq!(jobs::cancel(db, &job.id).await.unwrap(), Cancel::Requested);
    assert_eq!(models::register_for_job(db, &model_of(&job, "m"), Some(&second)).await.unwrap(), Registration::CancelRequested);
    let registered: i64 = sqlx::query_scalar("select count(*) from models").fetch_one(db).await.unwrap();
    assert_eq!(registered, 0, "no model registered");
    assert_eq!(status(db, &job.id).await, Status::Running, "its worker ends it cancelled");
    jobs::finish(db, &job.id, &second, Status::Cancelled, None).await.unwrap();
    assert_eq!(status(db, &job.id).await, Status::Cancelled);
}

/// What a run records as it goes (progress on the job's row, steps, evaluations, mistakes,
/// checkpoints) is its claim's too: once its lease ran out and another claim took the job, a
/// late write of the first run (before its next renewal tells it to stop) changes nothing, even
/// one that would remove the metrics the second run wrote.
#[tokio::test]
async fn a_run_whose_claim_passed_on_records_no_progress_or_metrics() {
    let (app, job) = queued_job().await;
    let db = &app.db;
    let (first, second) = claimed_twice(db, "one", "two").await;
    let report = |accuracy: f64| EvalReport {
        loss: 1.0 - accuracy,
        accuracy,
        precision: accuracy,
        recall: accuracy,
        f1: accuracy,
        per_class: Default::default(),
        confusion_matrix: vec![],
        ece: 0.0,
        mean_score: accuracy,
    };
    let mistake = |file: &str| MistakeRow { blob: "b".into(), file: file.into(), label: "cat".into(), predicted: "dog".into(), score: 0.9 };
    // Every write a run makes, as `holder` would make it with these figures.
    let record = async |holder: &Holder, x: u32| {
        let (id, f) = (&job.id, f64::from(x));
        jobs::set_plan(db, id, holder, x + 3, u64::from(x) * 10).await.unwrap();
        jobs::set_precision(db, id, holder, if x == 2 { "bf16" } else { "f32" }).await.unwrap();
        jobs::set_decision(db, id, holder, &serde_json::json!({"action": format!("run {x}")})).await.unwrap();
        job_metrics::truncate_after(db, id, holder, x - 1).await.unwrap();
        jobs::set_progress(db, id, holder, x, u64::from(x) * 5).await.unwrap();
        jobs::set_phase(db, id, holder, Phase::Training, u64::from(x), 10, Some(f)).await.unwrap();
        jobs::set_epoch_done(db, id, holder, x).await.unwrap();
        job_metrics::record_step(db, id, holder, &TrainPoint { step: u64::from(x), epoch: x, loss: f, learning_rate: f / 100.0 }).await.unwrap();
        job_metrics::record_evaluation(db, id, holder, "validation", x, &report(f / 10.0)).await.unwrap();
        job_metrics::record_mistakes(db, id, holder, x, &[mistake(&format!("run-{x}.jpg"))]).await.unwrap();
        job_metrics::record_checkpoint(db, id, holder, x, &format!("jobs/{id}/run-{x}"), f).await.unwrap();
        jobs::mark_progress(db, id, holder).await.unwrap();
    };
    let written = async || {
        let checkpoints: Vec<(i64, String)> =
            sqlx::query_as("select epoch, path from checkpoints where job_id = $1 order by epoch").bind(&job.id).fetch_all(db).await.unwrap();
        let mistakes = job_metrics::mistakes(db, &job.id, 2).await.unwrap();
        (jobs::get(db, &job.id).await.unwrap().unwrap(), job_metrics::get(db, &job.id).await.unwrap(), mistakes, checkpoints)
    };

    record(&second, 2).await;
    let (row, metrics, mistakes, checkpoints) = written().await;
    // The second run's writes landed (so the comparison below can fail).
    assert_eq!((row.progress.epochs, row.progress.epoch, row.progress.step, row.progress.done), (5, 2, 10, 2));
    assert_eq!((row.precision.as_deref(), row.progress_claim), (Some("bf16"), 2));
    assert_eq!((metrics.train.len(), metrics.validation.len()), (1, 1));
    assert_eq!((mistakes.len(), checkpoints.len()), (1, 1));

    // The first run's late writes, epoch 1 (its truncation would remove epoch 2's metrics).
    record(&first, 1).await;
    assert_eq!(written().await, (row, metrics, mistakes, checkpoints), "the first run changed nothing");
}

/// A process never claims a job it runs on another device, though that run's lease lapsed (the
/// database was out of reach longer than a lease): the run keeps the job under its claim, with no
/// moment at which its renewal would find the job taken. Other jobs are claimed as ever.
#[tokio::test]
async fn a_process_does_not_claim_the_jobs_it_runs() {
    let (app, job) = queued_job().await;
    let db = &app.db;
    let running = lapsed_claim(db, "w").await;
    let other = another_job(db, &job).await;
    // The list names the job, and a part of the other job's id (which must not match it).
    let ours = [job.id.clone(), other.id[..other.id.len() - 1].to_string()];
    let claimed = jobs::claim(db, "w", "cpu:1", LEASE, &ours).await.unwrap().unwrap();
    assert_eq!(claimed.id, other.id, "the job the process runs is older, but not claimed");
    assert!(jobs::claim(db, "w", "cpu:2", LEASE, &ours).await.unwrap().is_none());
    assert_eq!(jobs::renew_lease(db, &job.id, &running, LEASE).await.unwrap(), Some(false), "the run still holds its job");
    assert_eq!(jobs::get(db, &job.id).await.unwrap().unwrap().attempts, 1, "one claim counted");
    // Another process, whose list does not name it, takes it once the lease lapses again.
    jobs::renew_lease(db, &job.id, &running, Duration::ZERO).await.unwrap().unwrap();
    run_out().await;
    assert_eq!(jobs::claim(db, "x", "cpu", LEASE, &[]).await.unwrap().unwrap().id, job.id);
}

/// A process that claims a job one of its own devices still runs (that run's lease lapsed while
/// the database was out of reach) hands the claim back: the run keeps the job. (The worker loop's
/// fallback: its claims skip the jobs it runs, above.)
#[tokio::test]
async fn a_claim_handed_back_leaves_the_job_to_the_run_that_holds_it() {
    let (app, job) = queued_job().await;
    let db = &app.db;
    let running = lapsed_claim(db, "w").await;
    let again = jobs::claim(db, "w", "cpu:1", LEASE, &[]).await.unwrap().unwrap();
    jobs::undo_claim(db, &again.id, &Holder::of("w", &again)).await.unwrap();
    assert_eq!(jobs::renew_lease(db, &job.id, &running, LEASE).await.unwrap(), Some(false), "the first run holds it again");
    assert_eq!(jobs::get(db, &job.id).await.unwrap().unwrap().attempts, 1, "one claim counted");
    // Handing back a claim that has moved on does nothing.
    jobs::undo_claim(db, &again.id, &Holder::of("w", &again)).await.unwrap();
    assert_eq!(jobs::get(db, &job.id).await.unwrap().unwrap().attempts, 1);
}

/// A graceful shutdown hands its job back without counting the claim; a failure's requeue counts.
#[tokio::test]
async fn a_job_handed_back_at_shutdown_keeps_its_claim_count() {
    let (app, job) = queued_job().await;
    let db = &app.db;
    let claimed = jobs::claim(db, "w", "cpu", LEASE, &[]).await.unwrap().unwrap();
    jobs::hand_back(db, &job.id, &Holder::of("w", &claimed)).await.unwrap();
    let back = jobs::get(db, &job.id).await.unwrap().unwrap();
    assert_eq!((back.status, back.attempts), (Status::Queued, 0));
    let claimed = jobs::claim(db, "w", "cpu", LEASE, &[]).await.unwrap().unwrap();
    jobs::requeue(db, &job.id, &Holder::of("w", &claimed)).await.unwrap();
    assert_eq!(jobs::get(db, &job.id).await.unwrap().unwrap().attempts, 1);
}

/// A job every run of which since its last checkpoint ended without an outcome (each process
/// running it died) is failed at its next claim instead of being run again: a job that kills its
/// worker would otherwise crash every process that claims it, for ever. One that wrote a
/// checkpoint in one of those runs is resumed, however often it was interrupted; and its
/// checkpoints mark the claim that wrote them.
#[tokio::test]
async fn a_job_whose_runs_all_died_fails_instead_of_running_again() {
    let app = spawn_app_with(|_| {}).await;
    let dataset = app.upload_pets(2, false).await;
    crate::support::install_base_model(&app.data_dir, "tiny", &crate::support::tiny_config(), &["a", "b"]);
    // One statement each, so the service's worker cannot claim a job before its counts are set.
    let claimed = |progress_claim: u32| {
        let (db, dataset) = (app.db.clone(), dataset.clone());
        async move {
            let id = vitforge::db::new_id();
            sqlx::query(
                "insert into jobs (id, dataset_id, base_model, params, recipe, status, epochs, created_at, attempts, progress_claim) \
                 values ($1, $2, 'tiny', '{}', 'manual', 'queued', 1, $3, $4, $5)",
            )
            .bind(&id)
            .bind(&dataset)
            .bind(vitforge::db::now())
            .bind(i64::from(vitforge::worker::MAX_CLAIMS) + 10)
            .bind(i64::from(progress_claim))
            .execute(&db)
            .await
            .unwrap();
            id
        }
    };
    let died = claimed(10).await;
    let job = app.wait_job(&died, 60).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("not run again: its last 5 runs each ended without an outcome or a new checkpoint"), "{job}");
    assert_eq!(job["progress"]["step"], 0, "nothing was trained");

    let progressed = claimed(11).await;
    let job = app.wait_job(&progressed, 120).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let marked = jobs::get(&app.db, &progressed).await.unwrap().unwrap();
    assert_eq!((marked.attempts, marked.progress_claim), (16, 16), "its checkpoint marked its claim");
}

/// Lease times are written on the database's clock, in the format of every stored time, so that
/// text order is time order on both backends.
#[tokio::test]
async fn leases_are_stored_as_times_a_lease_length_ahead() {
    let (app, job) = queued_job().await;
    let db = &app.db;
    let before = chrono::Utc::now();
    let claimed = jobs::claim(db, "w", "cpu", LEASE, &[]).await.unwrap().unwrap();
    let lease: String = sqlx::query_scalar("select lease_expires_at from jobs where id = $1").bind(&job.id).fetch_one(db).await.unwrap();
    let at = chrono::DateTime::parse_from_rfc3339(&lease).unwrap_or_else(|e| panic!("{lease}: {e}")).with_timezone(&chrono::Utc);
    assert_eq!(vitforge::db::at(at), lease, "stored as every time is");
    let ahead = (at - before).to_std().expect("in the future");
    // The database runs on this machine in the tests: its clock is ours, give or take the round trip.
    assert!(ahead >= LEASE - Duration::from_secs(1) && ahead <= LEASE + Duration::from_secs(5), "{ahead:?}");
    let started = claimed.started_at.clone().expect("started");
    assert_eq!(vitforge::db::at(chrono::DateTime::parse_from_rfc3339(&started).unwrap().with_timezone(&chrono::Utc)), started);

    jobs::renew_lease(db, &job.id, &Holder::of("w", &claimed), Duration::from_secs(600)).await.unwrap().unwrap();
    let renewed: String = sqlx::query_scalar("select lease_expires_at from jobs where id = $1").bind(&job.id).fetch_one(db).await.unwrap();
    assert!(renewed > lease, "{renewed} after {lease}");
}

#[tokio::test]
async fn start_up_recovery_takes_only_what_is_its_own_or_expired() {
    let (app, job) = queued_job().await;
    let db = &app.db;
    jobs::claim(db, "one", "cpu", LEASE, &[]).await.unwrap().unwrap();
    // Another worker's live job stays where it is.
    assert_eq!(jobs::recover_interrupted(db, Some("two")).await.unwrap(), Recovered { requeued: 0, cancelled: vec![] });
    assert_eq!(status(db, &job.id).await, Status::Running);
    // Its own (restarted under the same name) goes back to the queue.
    assert_eq!(jobs::recover_interrupted(db, Some("one")).await.unwrap().requeued, 1);
    assert_eq!(status(db, &job.id).await, Status::Queued);
    // Another worker's job whose lease ran out goes back too.
    jobs::claim(db, "one", "cpu", Duration::ZERO, &[]).await.unwrap().unwrap();
    run_out().await;
    assert_eq!(jobs::recover_interrupted(db, Some("two")).await.unwrap().requeued, 1);
    // A process alone on the database takes every running job.
    jobs::claim(db, "one", "cpu", LEASE, &[]).await.unwrap().unwrap();
    assert_eq!(jobs::recover_interrupted(db, None).await.unwrap().requeued, 1);
    // A job whose cancel was asked for ends cancelled, and says so (its checkpoints can go).
    jobs::claim(db, "one", "cpu", LEASE, &[]).await.unwrap().unwrap();
    assert_eq!(jobs::cancel(db, &job.id).await.unwrap(), Cancel::Requested);
    assert_eq!(jobs::recover_interrupted(db, None).await.unwrap(), Recovered { requeued: 0, cancelled: vec![job.id.clone()] });
    assert_eq!(status(db, &job.id).await, Status::Cancelled);
}

/// The periodic sweep's part of `jobs/` (`vitforge::worker::remove_ended_job_folders`): the
/// folder of a job that has ended, or that no longer exists, goes once nothing in it has changed
/// for the grace, here and in the store; a recent one stays, and so do the folders of jobs that
/// are queued or that run, however old.
#[tokio::test]
async fn the_folders_of_ended_jobs_are_swept_once_left_alone() {
    let (app, queued) = queued_job().await;
    let db = &app.db;
    let paths = vitforge::paths::DataPaths::new(&app.data_dir);
    let objects = vitforge::objects::Objects::local(paths.clone()).unwrap();
    // The queued job is claimed and ends; another runs (claimed elsewhere); a third is queued.
    let first = jobs::claim(db, "elsewhere", "cpu", LEASE, &[]).await.unwrap().unwrap();
    assert_eq!(first.id, queued.id);
    jobs::finish(db, &first.id, &Holder::of("elsewhere", &first), Status::Failed, Some("it ended")).await.unwrap();
    let running = another_job(db, &queued).await;
    assert_eq!(jobs::claim(db, "elsewhere", "cpu", LEASE, &[]).await.unwrap().unwrap().id, running.id);
    let waiting = another_job(db, &queued).await;
    let recent_end = another_job(db, &queued).await;
    jobs::cancel(db, &recent_end.id).await.unwrap();

    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    let folder = |id: &str, old: bool| {
        let dir = paths.job(id);
        std::fs::create_dir_all(dir.join("epoch-1")).unwrap();
        std::fs::write(dir.join("epoch-1").join("state.json"), b"{}").unwrap();
        if old {
            std::fs::File::open(&dir).unwrap().set_modified(two_hours_ago).unwrap();
        }
        dir
    };
    let gone = folder("01a00000-0000-7000-8000-00000000dead", true);
    let swept = [folder(&first.id, true), gone.clone()];
    let kept = [folder(&running.id, true), folder(&waiting.id, true), folder(&recent_end.id, false)];

    let grace = Duration::from_secs(3600);
    let mut removed = vitforge::worker::remove_ended_job_folders(db, &objects, &paths, grace).await.unwrap();
    removed.sort();
    let mut expected = swept.to_vec();
    expected.sort();
    assert_eq!(removed, expected, "the ended job's and the unknown job's folders");
    assert!(swept.iter().all(|d| !d.exists()));
    assert!(kept.iter().all(|d| d.join("epoch-1").join("state.json").is_file()), "the running, the queued and the recent folders stay");
    assert!(vitforge::worker::remove_ended_job_folders(db, &objects, &paths, grace).await.unwrap().is_empty(), "nothing more");
}
