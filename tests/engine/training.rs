//! Fine-tuning end to end on generated data.

use std::sync::atomic::AtomicBool;

use candle_core::Device;
use vitforge::train::{Control, HeadInit, Phase, TrainError, TrainEvent, TrainMode, TrainParams, TrainSpec, fine_tune};

use crate::synth::{stripes_data, tiny_model};

fn params() -> TrainParams {
    TrainParams { learning_rate: 1e-3, epochs: 10, batch_size: 8, augment: false, validation_split: 0.25, warmup_ratio: 0.1, seed: 11, ..Default::default() }
}

fn run(
    data_dir: &std::path::Path,
    ckpt: &std::path::Path,
    p: TrainParams,
    cancel_after_epoch: Option<u32>,
) -> (Result<vitforge::train::TrainOutcome, TrainError>, Vec<f64>) {
    let (out, events) = run_events(data_dir, ckpt, p, cancel_after_epoch);
    (out, losses(&events))
}

/// The losses of the optimiser steps among `events`.
fn losses(events: &[TrainEvent]) -> Vec<f64> {
    events.iter().filter_map(|e| if let TrainEvent::Step { loss, .. } = e { Some(*loss) } else { None }).collect()
}

/// A run on the stripes data with every event it reports; cancelled once the checkpoint of
/// `cancel_after_epoch` is written.
fn run_events(
    data_dir: &std::path::Path,
    ckpt: &std::path::Path,
    p: TrainParams,
    cancel_after_epoch: Option<u32>,
) -> (Result<vitforge::train::TrainOutcome, TrainError>, Vec<TrainEvent>) {
    run_on(stripes_data(data_dir, 40, 3), ckpt, p, cancel_after_epoch)
}

/// [`run_events`] on `data`.
fn run_on(
    data: vitforge::train::data::TrainData,
    ckpt: &std::path::Path,
    p: TrainParams,
    cancel_after_epoch: Option<u32>,
) -> (Result<vitforge::train::TrainOutcome, TrainError>, Vec<TrainEvent>) {
    let mut model = tiny_model(&["horizontal", "vertical"], 9);
    let cancel = AtomicBool::new(false);
    let mut events = vec![];
    let mut on_event = |e: TrainEvent| {
        if matches!(e, TrainEvent::Checkpoint { epoch, .. } if Some(epoch) == cancel_after_epoch) {
            cancel.store(true, std::sync::atomic::Ordering::Relaxed)
        }
        events.push(e);
    };
    let spec = TrainSpec { params: p, data, checkpoint_root: ckpt.to_path_buf(), max_pixels: 1 << 24, cache_budget: 1 << 28, memory_limit: None };
    let out = fine_tune(&mut model, spec, &Device::Cpu, Control::new(&cancel, &mut on_event));
    (out, events)
}

/// A run whose fence stops holding (a job's run whose claim passed on) writes nothing more into
/// its checkpoint folder, not even the epoch it had just validated, and ends cancelled.
#[test]
fn a_run_whose_fence_stops_holding_writes_no_more_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let data = stripes_data(&tmp.path().join("data"), 40, 3);
    let mut model = tiny_model(&["horizontal", "vertical"], 9);
    let (cancel, asked) = (AtomicBool::new(false), std::cell::Cell::new(0));
    // Holds for the first two epochs' checkpoints, then no more.
    let holds = || {
        asked.set(asked.get() + 1);
        asked.get() <= 2
    };
    let root = tmp.path().join("ck");
    let spec = TrainSpec { params: params(), data, checkpoint_root: root.clone(), max_pixels: 1 << 24, cache_budget: 1 << 28, memory_limit: None };
    let out = fine_tune(&mut model, spec, &Device::Cpu, Control { holds: &holds, ..Control::new(&cancel, &mut |_| {}) });
    assert!(matches!(out, Err(TrainError::Cancelled)), "{:?}", out.map(|o| o.epochs_run));
    assert_eq!(asked.get(), 3, "asked before each checkpoint");
    assert_eq!(vitforge::train::checkpoint::list_epochs(&root), [2], "epoch 3 was not written");
}

/// The race a job's folder per claim closes: a run whose claim passed on just after its fence
/// held (its lease lapsed unnoticed) goes on writing checkpoints while the next claim takes the
/// job over. What the new claim resumes from does not change under it, and the old run's later
/// checkpoints land in a folder of the old name, which the new claim never reads.
#[test]
fn a_claim_that_took_over_resumes_from_what_the_run_whose_claim_passed_on_cannot_touch() {
    use vitforge::train::checkpoint::{best_dir, epoch_dir, list_epochs, take_over};
    let tmp = tempfile::tempdir().unwrap();
    let (job, data_dir) = (tmp.path().join("job"), tmp.path().join("data"));
    let stale_root = take_over(&job, 1).unwrap();
    let (passed, passed_seen) = std::sync::mpsc::channel();
    let (taken, taken_seen) = std::sync::mpsc::channel();
    // The latest checkpoint and the best model, byte for byte.
    let contents = |root: &std::path::Path| {
        let epochs = list_epochs(root);
        let state = std::fs::read(epoch_dir(root, *epochs.last().unwrap()).join("state.json")).unwrap();
        (epochs, state, std::fs::read(best_dir(root).join("model.safetensors")).unwrap())
    };
    let (stale, ours, taken_over) = std::thread::scope(|s| {
        let (data_dir, stale_root) = (&data_dir, &stale_root);
        let stale = s.spawn(move || {
            let mut model = tiny_model(&["horizontal", "vertical"], 9);
            let (cancel, asked) = (AtomicBool::new(false), std::cell::Cell::new(0));
            // The third checkpoint's fence holds, and the job is taken over right after; the run
            // stops at its seventh.
            let holds = || {
                asked.set(asked.get() + 1);
                if asked.get() == 3 {
                    passed.send(()).unwrap();
                    taken_seen.recv().unwrap();
                }
                asked.get() <= 6
            };
            let spec = TrainSpec { params: params(), data: stripes_data(data_dir, 40, 3), checkpoint_root: stale_root.clone(), max_pixels: 1 << 24, cache_budget: 1 << 28, memory_limit: None };
            fine_tune(&mut model, spec, &Device::Cpu, Control { holds: &holds, ..Control::new(&cancel, &mut |_| {}) })
        });
        passed_seen.recv().unwrap();
        let ours = take_over(&job, 2).unwrap();
        let taken_over = contents(&ours);
        taken.send(()).unwrap();
        (stale.join().unwrap(), ours, taken_over)
    });
    assert!(matches!(stale, Err(TrainError::Cancelled)), "{:?}", stale.map(|o| o.epochs_run));
    assert_eq!(taken_over.0, [2], "taken over with the second epoch's checkpoint");
    assert!(contents(&ours) == taken_over, "the run whose claim passed on changed the folder taken over");
    assert_eq!(list_epochs(&stale_root), [6], "it wrote on, under its old folder's name");

    // The new claim resumes from epoch 2 and ends as a run never interrupted would.
    let (resumed, events) = run_events(&data_dir, &ours, params(), None);
    assert!(events.iter().any(|e| matches!(e, TrainEvent::Started { resumed_from: Some(2), .. })));
    let (whole, _) = run(&data_dir, &tmp.path().join("whole"), params(), None);
    assert_eq!(resumed.unwrap().history, whole.unwrap().history);
}

#[test]
fn learns_stripes_from_scratch_deterministically() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, losses) = run(&tmp.path().join("data"), &tmp.path().join("ck1"), params(), None);
    let out = out.unwrap();
    assert!(out.best.accuracy >= 0.9, "validation accuracy {}", out.best.accuracy);
    assert_eq!(out.epochs_run, 10);
    assert_eq!(out.history.len(), 10);
    assert!(losses.first().unwrap() > losses.last().unwrap());
    // Same seed, same data: the same run, step for step.
    let (out2, losses2) = run(&tmp.path().join("data"), &tmp.path().join("ck2"), params(), None);
    assert_eq!(losses, losses2);
    assert_eq!(out2.unwrap().history, out.history);
}

#[test]
fn a_cancelled_run_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let p = TrainParams { epochs: 3, ..params() };
    let (whole, whole_losses) = run(&tmp.path().join("data"), &tmp.path().join("whole"), p.clone(), None);
    let whole = whole.unwrap();

    let ck = tmp.path().join("interrupted");
    let (first, first_losses) = run(&tmp.path().join("data"), &ck, p.clone(), Some(2));
    assert!(matches!(first, Err(TrainError::Cancelled)), "{first:?}");
    let (resumed, resumed_losses) = run(&tmp.path().join("data"), &ck, p, None);
    let resumed = resumed.unwrap();
    assert_eq!(resumed.history, whole.history);
    assert_eq!([first_losses, resumed_losses].concat(), whole_losses);
}

/// A run resumed by a version of the service that chooses validation images differently (here
/// one that no longer takes two pairs of files for look-alikes) goes on from its checkpoint with
/// the validation images it had, and ends as the uninterrupted run did. A checkpoint of other
/// data is not resumed, with its split or without.
#[test]
fn a_run_resumed_by_a_version_that_splits_differently_keeps_its_split() {
    let tmp = tempfile::tempdir().unwrap();
    let p = TrainParams { epochs: 3, ..params() };
    let data_dir = tmp.path().join("data");
    let upgraded = || stripes_data(&data_dir, 40, 3);
    let old = || {
        let mut data = upgraded();
        for (a, b) in [(0, 2), (4, 6)] {
            data.look_alikes.insert(data.train[b].path.clone(), data.train[a].path.clone());
        }
        data
    };
    let split = |mut data: vitforge::train::data::TrainData| {
        data.ensure_validation(p.validation_split, p.seed);
        data.validation
    };
    assert_ne!(split(old()), split(upgraded()), "the test needs versions whose splits differ");

    let (whole, whole_events) = run_on(old(), &tmp.path().join("whole"), p.clone(), None);
    let ck = tmp.path().join("interrupted");
    let (first, first_events) = run_on(old(), &ck, p.clone(), Some(2));
    assert!(matches!(first, Err(TrainError::Cancelled)), "{first:?}");
    let (resumed, events) = run_on(upgraded(), &ck, p.clone(), None);
    assert!(events.iter().any(|e| matches!(e, TrainEvent::Started { resumed_from: Some(2), .. })), "{:?}", &events[..2]);
    assert_eq!(resumed.unwrap().history, whole.unwrap().history);
    assert_eq!([losses(&first_events), losses(&events)].concat(), losses(&whole_events));

    // Other settings on the same images: the recorded split is not theirs; the run starts over
    // with its own.
    let other = TrainParams { learning_rate: 2e-3, epochs: 1, ..p.clone() };
    let (restarted, events) = run_on(upgraded(), &ck, other.clone(), None);
    assert!(events.iter().any(|e| matches!(e, TrainEvent::Restarted { .. })), "{:?}", &events[..2]);
    let (afresh, _) = run_on(upgraded(), &tmp.path().join("afresh"), other, None);
    assert_eq!(restarted.unwrap().history, afresh.unwrap().history);
    // Other images (one fewer): the same.
    let mut fewer = upgraded();
    fewer.train.pop();
    let (_, events) = run_on(fewer, &ck, p, None);
    assert!(events.iter().any(|e| matches!(e, TrainEvent::Restarted { .. })), "{:?}", &events[..2]);
    assert!(events.iter().any(|e| matches!(e, TrainEvent::Started { resumed_from: None, .. })));
}

#[test]
fn head_only_changes_only_the_head() {
    let tmp = tempfile::tempdir().unwrap();
    let data = stripes_data(&tmp.path().join("data"), 12, 4);
    let mut model = tiny_model(&["horizontal", "vertical"], 9);
    let before = model.params.snapshot().unwrap();
    let p = TrainParams { train_mode: TrainMode::HeadOnly, epochs: 2, learning_rate: 1e-2, ..params() };
    let spec = TrainSpec { params: p, data, checkpoint_root: tmp.path().join("ck"), max_pixels: 1 << 24, cache_budget: 1 << 28, memory_limit: None };
    let cancel = AtomicBool::new(false);
    fine_tune(&mut model, spec, &Device::Cpu, Control::new(&cancel, &mut |_| {})).unwrap();
    let after = model.params.snapshot().unwrap();
    for (name, t) in &before {
        let same = t.eq(&after[name]).unwrap().min_all().unwrap().to_scalar::<u8>().unwrap() == 1;
        assert_eq!(same, !name.starts_with("classifier."), "{name}");
    }
}

#[test]
fn refuses_bad_hyper_parameters_before_touching_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, losses) = run(&tmp.path().join("data"), &tmp.path().join("ck"), TrainParams { epochs: 0, ..params() }, None);
    assert!(matches!(out, Err(TrainError::Params(ref e)) if e.field == "epochs"), "{out:?}");
    assert!(losses.is_empty());
}

#[test]
fn a_probe_head_is_fitted_in_epoch_one_without_gradient_steps() {
    let tmp = tempfile::tempdir().unwrap();
    // A backbone that already sees stripes: trained on them, then given a head that knows nothing.
    let data = stripes_data(&tmp.path().join("data"), 40, 3);
    let mut model = tiny_model(&["horizontal", "vertical"], 9);
    let spec = TrainSpec { params: params(), data: data.clone(), checkpoint_root: tmp.path().join("pre"), max_pixels: 1 << 24, cache_budget: 1 << 28, memory_limit: None };
    let cancel = AtomicBool::new(false);
    fine_tune(&mut model, spec, &Device::Cpu, Control::new(&cancel, &mut |_| {})).unwrap();
    let blank: std::collections::BTreeMap<String, candle_core::Tensor> = ["classifier.weight", "classifier.bias"]
        .iter()
        .map(|n| {
            let t = model.params.snapshot().unwrap()[*n].zeros_like().unwrap();
            (n.to_string(), t)
        })
        .collect();
    model.params.set_some(&blank).unwrap();
    let before = model.params.snapshot().unwrap();
    let p = TrainParams { head_init: HeadInit::Probe, epochs: 1, ..params() };
    let spec = TrainSpec { params: p, data, checkpoint_root: tmp.path().join("ck"), max_pixels: 1 << 24, cache_budget: 1 << 28, memory_limit: None };
    let (mut steps, mut probes, mut features) = (0, vec![], 0);
    let mut on_event = |e: TrainEvent| match e {
        TrainEvent::Step { .. } => steps += 1,
        TrainEvent::Probe { c, cv_accuracy, .. } => probes.push((c, cv_accuracy)),
        TrainEvent::Phase { phase: Phase::Features, .. } => features += 1,
        _ => {}
    };
    let out = fine_tune(&mut model, spec, &Device::Cpu, Control::new(&cancel, &mut on_event)).unwrap();
    assert_eq!((steps, probes.len(), out.best_epoch, out.epochs_run), (0, 1, 1, 1));
    assert!(features > 0);
    assert!(probes[0].1.unwrap() >= 0.9, "{probes:?}");
    // The backbone's features separate the classes; the fitted head finds that at once.
    assert!(out.best.accuracy >= 0.9, "validation accuracy {}", out.best.accuracy);
    let after = model.params.snapshot().unwrap();
    for (name, t) in &before {
        let same = t.eq(&after[name]).unwrap().min_all().unwrap().to_scalar::<u8>().unwrap() == 1;
        assert_eq!(same, !name.starts_with("classifier."), "{name}");
    }

    // With 2 other views (the mirror image and a crop): the features pass covers 3 × the
    // training images in one count, and the head is fitted on them all (it differs).
    model.params.set_some(&blank).unwrap();
    let p = TrainParams { head_init: HeadInit::Probe, epochs: 1, probe_views: Some(2), ..params() };
    let spec = TrainSpec { params: p, data: stripes_data(&tmp.path().join("data"), 40, 3), checkpoint_root: tmp.path().join("views"), max_pixels: 1 << 24, cache_budget: 1 << 28, memory_limit: None };
    let mut counts = vec![];
    let mut on_event = |e: TrainEvent| {
        if let TrainEvent::Phase { phase: Phase::Features, done, total } = e {
            counts.push((done, total));
        }
    };
    let viewed = fine_tune(&mut model, spec, &Device::Cpu, Control::new(&cancel, &mut on_event)).unwrap();
    let train = 60; // 40 images per class, a quarter held out

    assert!(counts.iter().all(|&(_, total)| total == 3 * train), "{counts:?}");
    assert_eq!(counts.last().copied(), Some((3 * train, 3 * train)), "{counts:?}");
    assert!(viewed.best.accuracy >= 0.9, "validation accuracy {}", viewed.best.accuracy);
    let head = |m: &std::collections::BTreeMap<String, candle_core::Tensor>| m["classifier.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_ne!(head(&model.params.snapshot().unwrap()), head(&after), "the views change the fit");
}

#[test]
fn a_probe_run_resumed_after_the_probe_epoch_ends_like_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let p = TrainParams { head_init: HeadInit::Probe, epochs: 3, learning_rate: 1e-4, ..params() };
    let (whole, whole_losses) = run(&tmp.path().join("data"), &tmp.path().join("whole"), p.clone(), None);
    let whole = whole.unwrap();
    assert_eq!(whole.history.len(), 3);
    // Two gradient epochs of 60 training images in batches of 8.
    assert_eq!(whole_losses.len(), 16);
    let ck = tmp.path().join("interrupted");
    let (first, first_losses) = run(&tmp.path().join("data"), &ck, p.clone(), Some(1));
    assert!(matches!(first, Err(TrainError::Cancelled)), "{first:?}");
    assert!(first_losses.is_empty());
    let (resumed, resumed_losses) = run(&tmp.path().join("data"), &ck, p, None);
    assert_eq!(resumed.unwrap().history, whole.history);
    assert_eq!(resumed_losses, whole_losses);
}

/// The checkpoint state a run stopped in: rewrites epoch `epoch`'s `state.json` under `root`
/// with `change` applied (as the run would have left it had it gone on to that point).
fn edit_state(root: &std::path::Path, epoch: u32, change: impl FnOnce(&mut serde_json::Value)) {
    let path = root.join(format!("epoch-{epoch}/state.json"));
    let mut state: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    change(&mut state);
    std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
}

/// A run that early stopping or its time budget ended stays ended when it runs again on its
/// checkpoints (as a job does after a crash while it calibrates, tests or saves): no further
/// epoch, the stop reported with its reason, and the steps already done counted in the progress.
#[test]
fn a_stopped_run_run_again_on_its_checkpoints_does_not_train_on() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let started = |events: &[TrainEvent]| {
        events.iter().find_map(|e| if let TrainEvent::Started { resumed_from, steps_done, .. } = e { Some((*resumed_from, *steps_done)) } else { None })
    };
    let decided = |events: &[TrainEvent]| {
        events.iter().find_map(|e| if let TrainEvent::Stopped { decision, epochs, total_steps, .. } = e { Some((decision.clone(), *epochs, *total_steps)) } else { None })
    };
    for (name, p, stopped) in [
        // Early stopping's count had reached the patience.
        ("patience", TrainParams { early_stopping_patience: Some(3), ..params() }, Box::new(|s: &mut serde_json::Value| s["epochs_since_best"] = 3.into()) as Box<dyn Fn(&mut serde_json::Value)>),
        // The budget was nearly spent, and an epoch takes longer than what is left.
        ("budget", TrainParams { time_budget_secs: Some(1000), ..params() }, Box::new(|s: &mut serde_json::Value| {
            s["seconds"] = 999.5.into();
            s["next_epoch_seconds"] = 2.0.into();
        })),
    ] {
        let root = tmp.path().join(name);
        let (first, first_events) = run_events(&data, &root, p.clone(), Some(2));
        assert!(matches!(first, Err(TrainError::Cancelled)), "{name}: {first:?}");
        let steps = losses(&first_events).len() as u64;
        assert!(steps > 0);
        edit_state(&root, 2, stopped);
        let (again, events) = run_events(&data, &root, p, None);
        let again = again.unwrap();
        assert_eq!(started(&events), Some((Some(2), steps)), "{name}: the progress counts the steps done");
        assert!(losses(&events).is_empty(), "{name}: no step after the stop");
        assert_eq!(again.epochs_run, 2, "{name}");
        let (decision, epochs, total_steps) = decided(&events).expect("the stop is reported");
        assert_eq!((epochs, total_steps, decision.epochs), (2, steps, 2), "{name}: the plan shrinks to what was done");
        let why = if name == "patience" { "stopped early after epoch 2" } else { "time budget of 1000 s" };
        assert!(decision.reason.contains(why), "{name}: {}", decision.reason);
        assert_eq!(again.decision, Some(decision), "{name}: the outcome says why it stopped");
    }
}

/// A run that calibrated and then runs again on its checkpoints (a crash before its model was
/// registered) calibrates the same weights again: the same temperature, not one fitted on
/// already-calibrated scores (about 1).
#[test]
fn a_calibrated_run_run_again_finds_the_same_temperature() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, root) = (tmp.path().join("data"), tmp.path().join("run"));
    let p = TrainParams { epochs: 3, calibrate: true, ..params() };
    let (first, _) = run(&data, &root, p.clone(), None);
    let first = first.unwrap();
    let (again, losses) = run(&data, &root, p, None);
    let again = again.unwrap();
    assert!(losses.is_empty());
    let (t1, t2) = (first.calibration.unwrap().temperature, again.calibration.unwrap().temperature);
    assert!(t1 != 1.0 && (t1 - t2).abs() < 1e-9, "{t1} then {t2}");
    assert_eq!(again.best_dir, first.best_dir);
    assert_ne!(again.best_dir, root.join("best"), "best/ keeps the uncalibrated weights");
}

/// A file the run cannot write is named in the error, with what was being done (the operating
/// system's message alone names neither).
#[test]
fn a_checkpoint_folder_that_cannot_be_made_is_named_in_the_error() {
    let tmp = tempfile::tempdir().unwrap();
    let blocker = tmp.path().join("a-file");
    std::fs::write(&blocker, "not a folder").unwrap();
    let root = blocker.join("checkpoints");
    let (out, _) = run(&tmp.path().join("data"), &root, TrainParams { epochs: 1, ..params() }, None);
    let message = out.unwrap_err().to_string();
    assert!(message.starts_with(&format!("creating the checkpoint folder {}: ", root.display())), "{message}");
}

/// Calibration divides the head by the fitted temperature and changes no prediction: the same
/// run without it ends with the same head times the temperature, and the same accuracy.
#[test]
fn calibration_folds_a_temperature_into_the_head_and_changes_no_prediction() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // 40 images per class, a quarter held out: 20 validation images, enough to calibrate.
    let p = TrainParams { epochs: 4, ..params() };
    let head = |dir: &std::path::Path| {
        let m = vitforge::model::LoadedModel::load(&vitforge::model::ModelSource::Dir(dir.to_path_buf()), None, &Device::Cpu, 0).unwrap();
        m.params.snapshot().unwrap()["classifier.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let (plain, _) = run(&data, &tmp.path().join("plain"), TrainParams { calibrate: false, ..p.clone() }, None);
    let plain = plain.unwrap();
    assert!(plain.calibration.is_none());
    let (cal, _) = run(&data, &tmp.path().join("cal"), TrainParams { calibrate: true, ..p }, None);
    let cal = cal.unwrap();
    let c = cal.calibration.clone().expect("calibrated");
    assert!(c.fitted && c.temperature > 0.0 && c.temperature != 1.0, "{c:?}");
    assert_eq!((cal.best_epoch, cal.best.accuracy), (plain.best_epoch, plain.best.accuracy));
    let (h_plain, h_cal) = (head(&plain.best_dir), head(&cal.best_dir));
    for (a, b) in h_plain.iter().zip(&h_cal) {
        assert!((f64::from(*a) / c.temperature - f64::from(*b)).abs() < 1e-5, "{a} / {} vs {b}", c.temperature);
    }
}

/// After its probe epoch, `after_probe: auto` decides: on 20 training images per class it stops
/// there (the probe fitted on 3 other views of each image as well) and says why; a time budget
/// too short for an epoch stops a run before it.
#[test]
fn auto_decides_after_the_probe_and_a_time_budget_stops_epochs() {
    use vitforge::train::AfterProbe;
    use vitforge::train::auto::Action;
    let tmp = tempfile::tempdir().unwrap();
    // 40 images per class, half of them held out.
    let p = TrainParams { head_init: HeadInit::Probe, after_probe: AfterProbe::Auto, epochs: 1, validation_split: 0.5, ..params() };
    const { assert!(20 < vitforge::train::auto::MIN_PER_CLASS_TO_FINE_TUNE) };
    let (out, losses) = run(&tmp.path().join("data"), &tmp.path().join("auto"), p, None);
    let out = out.unwrap();
    let d = out.decision.expect("a decision");
    assert_eq!((d.action, d.epochs, out.epochs_run), (Action::ProbeOnly, 1, 1), "{}", d.reason);
    assert!(d.reason.contains("per class"), "{}", d.reason);
    assert!(d.reason.contains("3 other view(s)"), "{}", d.reason);
    assert!(losses.is_empty(), "no gradient step after the probe");

    // A manual run of 1000 epochs with a one-second budget: once an epoch shows how long one
    // takes, the run stops before an epoch that would end past the budget.
    let p = TrainParams { time_budget_secs: Some(1), epochs: 1000, early_stopping_patience: None, ..params() };
    let mut decided = None;
    let data = crate::synth::stripes_data(&tmp.path().join("data"), 40, 3);
    let mut model = crate::synth::tiny_model(&["horizontal", "vertical"], 9);
    let cancel = AtomicBool::new(false);
    let spec = TrainSpec { params: p, data, checkpoint_root: tmp.path().join("budget"), max_pixels: 1 << 24, cache_budget: 1 << 28, memory_limit: None };
    let mut on_event = |e: TrainEvent| {
        if let TrainEvent::Stopped { decision, .. } = e {
            decided = Some(decision);
        }
    };
    let out = fine_tune(&mut model, spec, &Device::Cpu, Control::new(&cancel, &mut on_event)).unwrap();
    assert!(out.epochs_run < 1000, "stopped early: {} epochs", out.epochs_run);
    let stop = decided.expect("the stop is reported");
    assert!(stop.reason.contains("time budget"), "{}", stop.reason);
}

/// With enough training images per class, `auto` fine-tunes the last layers after the probe:
/// the decision says so, gradient steps follow the probe epoch, and the frozen embeddings stay
/// as they were.
#[test]
fn auto_fine_tunes_the_last_layers_with_enough_images_per_class() {
    use vitforge::train::AfterProbe;
    use vitforge::train::auto::{Action, LAST_LAYERS, MAX_FINE_TUNE_EPOCHS, MIN_PER_CLASS_TO_FINE_TUNE};
    let tmp = tempfile::tempdir().unwrap();
    // Just over the threshold once a tenth is held out for validation.
    let data = stripes_data(&tmp.path().join("data"), MIN_PER_CLASS_TO_FINE_TUNE * 10 / 9 + 2, 4);
    assert!(data.train_counts().iter().all(|&n| n >= MIN_PER_CLASS_TO_FINE_TUNE), "{:?}", data.train_counts());
    let mut model = tiny_model(&["horizontal", "vertical"], 9);
    let read = |m: &vitforge::model::LoadedModel| {
        let t = m.params.tensor(vitforge::model::weights::keys::PATCH_WEIGHT, false).unwrap();
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let before = read(&model);
    let p = TrainParams {
        head_init: HeadInit::Probe,
        after_probe: AfterProbe::Auto,
        epochs: 1,
        early_stopping_patience: None,
        validation_split: 0.1,
        ..params()
    };
    let cancel = AtomicBool::new(false);
    let mut steps = 0;
    let mut on_event = |e: TrainEvent| {
        if let TrainEvent::Step { .. } = e {
            steps += 1;
        }
    };
    let spec = TrainSpec { params: p, data, checkpoint_root: tmp.path().join("run"), max_pixels: 1 << 24, cache_budget: 1 << 28, memory_limit: None };
    let out = fine_tune(&mut model, spec, &Device::Cpu, Control::new(&cancel, &mut on_event)).unwrap();
    let d = out.decision.expect("a decision");
    assert_eq!((d.action, d.epochs, out.epochs_run), (Action::LastLayers, 1 + MAX_FINE_TUNE_EPOCHS, 1 + MAX_FINE_TUNE_EPOCHS), "{}", d.reason);
    assert!(d.reason.contains(&format!("last {LAST_LAYERS} layers")), "{}", d.reason);
    assert!(steps > 0, "gradient steps after the probe");
    assert!(read(&model) == before, "the embeddings are frozen");
}

/// Twenty classes at a 10:1 imbalance (40 images in the largest, 4 in the smallest): the probe
/// run trains, reports every class's precision, recall, F1 and support on the test split, and
/// beats chance by far on the rare classes too.
#[test]
fn twenty_imbalanced_classes_train_and_report_every_class() {
    use image::{Rgb, RgbImage};
    use rand::{Rng, SeedableRng};
    use vitforge::dataset::Split;
    use vitforge::train::AfterProbe;
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let classes: Vec<String> = (0..20).map(|c| format!("c{c:02}")).collect();
    let mut records = vec![];
    for (c, class) in classes.iter().enumerate() {
        // Each class a colour of its own, with per-pixel noise and a random size.
        let base = [(c * 37 % 256) as i32, (c * 91 % 256) as i32, (c * 151 % 256) as i32];
        let train = 40 - c * 36 / 19; // 40 … 4
        let dir = tmp.path().join("data").join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..train + 3 {
            let (w, h) = (rng.random_range(32..64), rng.random_range(32..64));
            let img = RgbImage::from_fn(w, h, |_, _| Rgb(base.map(|v| (v + rng.random_range(-12..=12)).clamp(0, 255) as u8)));
            let path = dir.join(format!("{i}.png"));
            img.save(&path).unwrap();
            records.push((path, class.clone(), if i < train { Split::Train } else { Split::Test }));
        }
    }
    let data = vitforge::train::data::TrainData::from_records(records);
    let labels: Vec<&str> = classes.iter().map(String::as_str).collect();
    let mut model = tiny_model(&labels, 3);
    let p = TrainParams { head_init: HeadInit::Probe, after_probe: AfterProbe::Auto, epochs: 1, validation_split: 0.25, ..params() };
    let cancel = AtomicBool::new(false);
    let spec = TrainSpec { params: p, data, checkpoint_root: tmp.path().join("run"), max_pixels: 1 << 24, cache_budget: 1 << 28, memory_limit: None };
    let out = fine_tune(&mut model, spec, &Device::Cpu, Control::new(&cancel, &mut |_| {})).unwrap();
    let test = out.test.expect("a test report");
    assert_eq!(test.per_class.len(), 20);
    for (class, m) in &test.per_class {
        assert_eq!(m.support, 3, "{class}");
    }
    let rare_recall: f64 = classes[15..].iter().map(|c| test.per_class[c].recall).sum::<f64>() / 5.0;
    assert!(test.accuracy > 0.6 && rare_recall > 0.5, "accuracy {} rare-class recall {rare_recall}", test.accuracy);
    let d = out.decision.expect("auto decides");
    assert!(d.reason.contains("per class"), "{}", d.reason);
}

/// A loss that turns NaN (here a head weight that is NaN) ends the run as diverged, before that
/// step is taken or reported, so no NaN is recorded and no NaN model is kept.
#[test]
fn a_run_whose_loss_turns_nan_fails_as_diverged() {
    let tmp = tempfile::tempdir().unwrap();
    let data = stripes_data(&tmp.path().join("data"), 40, 3);
    let mut model = tiny_model(&["horizontal", "vertical"], 9);
    let head = vitforge::model::weights::keys::HEAD_WEIGHT;
    let weight = model.params.tensor(head, false).unwrap();
    let mut values = weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values[0] = f32::NAN;
    let poisoned = candle_core::Tensor::from_vec(values, weight.shape(), &Device::Cpu).unwrap();
    model.params.set_some(&[(head.to_string(), poisoned)].into_iter().collect()).unwrap();
    let cancel = AtomicBool::new(false);
    let mut events = vec![];
    let mut on_event = |e: TrainEvent| events.push(e);
    let p = TrainParams { head_init: HeadInit::Random, ..params() };
    let spec = TrainSpec { params: p, data, checkpoint_root: tmp.path().join("ck"), max_pixels: 1 << 24, cache_budget: 1 << 28, memory_limit: None };
    let out = fine_tune(&mut model, spec, &Device::Cpu, Control::new(&cancel, &mut on_event));
    let Err(err) = out else { panic!("a diverged run fails") };
    assert!(matches!(err, TrainError::Diverged(_)), "{err}");
    assert!(err.to_string().contains("the loss of step 1 is NaN"), "{err}");
    assert!(losses(&events).is_empty(), "no step reported");
}

/// `trainable_layers` above the base model's encoder layers is refused when the run starts, with
/// both numbers (before, it trained every layer without a word); as many as it has is accepted.
#[test]
fn more_trainable_layers_than_the_model_has_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let data = stripes_data(&tmp.path().join("data"), 12, 3);
    let layers = tiny_model(&["horizontal", "vertical"], 9).cfg.num_hidden_layers;
    let run = |n: usize| {
        let mut model = tiny_model(&["horizontal", "vertical"], 9);
        let cancel = AtomicBool::new(false);
        let p = TrainParams { train_mode: TrainMode::LastNLayers, trainable_layers: Some(n as u32), epochs: 1, ..params() };
        let spec = TrainSpec { params: p, data: data.clone(), checkpoint_root: tmp.path().join(format!("ck{n}")), max_pixels: 1 << 24, cache_budget: 1 << 28, memory_limit: None };
        fine_tune(&mut model, spec, &Device::Cpu, Control::new(&cancel, &mut |_| {}))
    };
    let Err(err) = run(layers + 1) else { panic!("trained more layers than the model has") };
    assert!(matches!(err, TrainError::Params(_)), "{err}");
    let expected = format!("trainable_layers: is {}, more than the {layers} encoder layers of the base model", layers + 1);
    assert!(err.to_string().contains(&expected), "{err}");
    run(layers).expect("every encoder layer may train");
}
