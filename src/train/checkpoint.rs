//! Epoch checkpoints: weights, optimiser state and loop state, written atomically so a resumed
//! fine-tune continues exactly where the last completed epoch left it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::TrainError;
use super::data::SplitOrder;
use super::report::EvalReport;
use crate::model::io::{remove_path, save_folder, write_dir_atomically, write_file, write_safetensors};
use crate::model::{PreprocessorConfig, VitConfig};

/// What the loop needs besides tensors to continue after epoch `epoch`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoopState {
    /// Fingerprint of the hyper-parameters, labels and examples; a checkpoint of another run is
    /// never resumed.
    pub fingerprint: String,
    /// The last completed epoch (1-based).
    pub epoch: u32,
    /// Optimiser steps taken.
    pub global_step: u64,
    pub best_epoch: Option<u32>,
    pub best_score: Option<(f64, f64)>,
    /// Epochs in a row in which neither the validation macro-F1 nor the validation loss improved
    /// (early stopping counts these).
    pub epochs_since_best: u32,
    /// The lowest validation loss so far (absent in checkpoints written before it was kept).
    #[serde(default)]
    pub lowest_loss: Option<f64>,
    /// Validation report of every completed epoch.
    pub history: Vec<EvalReport>,
    /// What `after_probe: auto` decided after the probe epoch (kept, so a resumed run goes on
    /// as decided).
    #[serde(default)]
    pub decision: Option<super::auto::Decision>,
    /// Seconds the run had spent when this state was saved, over every attempt (its time
    /// budget counts them). 0 in checkpoints written before it was kept.
    #[serde(default)]
    pub seconds: f64,
    /// How long the next epoch is expected to take: the last gradient epoch's length, or the
    /// probe's estimate (a resumed run checks its time budget with it before its first epoch).
    #[serde(default)]
    pub next_epoch_seconds: Option<f64>,
    /// How the run split validation images off its training images, where it did (a version
    /// of the service that would split them differently resumes the run with this split).
    /// Absent in checkpoints written before it was kept.
    #[serde(default)]
    pub split: Option<SplitOrder>,
}

impl LoopState {
    /// The state before the first epoch of a run with this fingerprint.
    pub fn fresh(fingerprint: String) -> Self {
        Self {
            fingerprint,
            epoch: 0,
            global_step: 0,
            best_epoch: None,
            best_score: None,
            epochs_since_best: 0,
            lowest_loss: None,
            history: vec![],
            decision: None,
            seconds: 0.0,
            next_epoch_seconds: None,
            split: None,
        }
    }
}

/// Folder name of epoch `n`'s checkpoint.
pub fn epoch_dir(root: &Path, epoch: u32) -> PathBuf {
    root.join(format!("epoch-{epoch}"))
}

/// Folder of the best epoch's model.
pub fn best_dir(root: &Path) -> PathBuf {
    root.join("best")
}

/// Where epoch `epoch`'s model is written when it is the best so far, before the checkpoint
/// that names it; [`promote_best`] then makes it `best/`. So `best/` always holds the best epoch
/// of the latest checkpoint: a crash between the two leaves the staged folder, which
/// [`settle_staged_best`] promotes or removes on resume.
pub fn staged_best_dir(root: &Path, epoch: u32) -> PathBuf {
    root.join(format!("best-next-{epoch}"))
}

/// Makes epoch `epoch`'s staged best model `best/` (once its checkpoint is written).
pub fn promote_best(root: &Path, epoch: u32) -> std::io::Result<()> {
    crate::model::io::replace_dir(&staged_best_dir(root, epoch), &best_dir(root))
}

/// On resume from the checkpoint whose state is `state` (none: starting afresh): a staged best
/// model that checkpoint names is promoted (the crash came after the checkpoint, before the
/// promotion); any other is removed (the crash came before its checkpoint, which is not there).
pub fn settle_staged_best(root: &Path, state: Option<&LoopState>) -> std::io::Result<()> {
    for entry in fs::read_dir(root)? {
        let path = entry?.path();
        let Some(epoch) = path.file_name().and_then(|n| n.to_str()?.strip_prefix("best-next-")?.parse::<u32>().ok()) else { continue };
        if state.is_some_and(|s| s.epoch == epoch && s.best_epoch == Some(epoch)) {
            promote_best(root, epoch)?;
        } else {
            fs::remove_dir_all(&path)?;
        }
    }
    Ok(())
}

/// Folder of the kept model with its scores calibrated (written at the end of a run that
/// calibrates; `best/` keeps the uncalibrated weights).
pub fn calibrated_dir(root: &Path) -> PathBuf {
    root.join("calibrated")
}

/// Writes epoch `state.epoch`'s checkpoint (a loadable model folder plus `optimizer.safetensors`
/// and `state.json`), then removes older epoch checkpoints.
pub fn save(
    root: &Path,
    cfg: &VitConfig,
    pre: &PreprocessorConfig,
    weights: &BTreeMap<String, Tensor>,
    optimizer: &BTreeMap<String, Tensor>,
    state: &LoopState,
) -> Result<PathBuf, TrainError> {
    let dir = epoch_dir(root, state.epoch);
    write_dir_atomically(&dir, |tmp| {
        save_folder(&tmp.join("model"), cfg, pre, weights)?;
        write_safetensors(&tmp.join("optimizer.safetensors"), optimizer)?;
        write_file(&tmp.join("state.json"), serde_json::to_string_pretty(state).unwrap_or_default().as_bytes())
    })?;
    for old in list_epochs(root).into_iter().filter(|e| *e < state.epoch) {
        fs::remove_dir_all(epoch_dir(root, old))?;
    }
    Ok(dir)
}

/// Epoch numbers of the checkpoints present, ascending.
pub fn list_epochs(root: &Path) -> Vec<u32> {
    let mut epochs: Vec<u32> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("epoch-")?.parse().ok())
        .collect();
    epochs.sort_unstable();
    epochs
}

/// A checkpoint read back for resuming.
pub struct Restored {
    pub state: LoopState,
    pub weights: BTreeMap<String, Tensor>,
    pub optimizer: BTreeMap<String, Tensor>,
}

/// Reads the latest checkpoint under `root` when its fingerprint is one of `fingerprints`;
/// `Ok(None)` when there is none, an error describing why when the latest one is unusable.
pub fn load_latest(root: &Path, fingerprints: &[&str]) -> Result<Option<Restored>, TrainError> {
    let Some(epoch) = list_epochs(root).pop() else {
        return Ok(None);
    };
    let dir = epoch_dir(root, epoch);
    let unusable = |what: String| TrainError::Checkpoint(format!("checkpoint {}: {what}", dir.display()));
    let state = read_state(&dir).map_err(unusable)?;
    if !fingerprints.contains(&state.fingerprint.as_str()) {
        return Err(unusable("it belongs to other settings or data".into()));
    }
    let load = |p: PathBuf| -> Result<BTreeMap<String, Tensor>, TrainError> {
        Ok(candle_core::safetensors::load(&p, &Device::Cpu).map_err(|e| unusable(e.to_string()))?.into_iter().collect())
    };
    let weights = load(dir.join("model").join("model.safetensors"))?;
    let optimizer = load(dir.join("optimizer.safetensors"))?;
    Ok(Some(Restored { state, weights, optimizer }))
}

/// The loop state of the latest checkpoint under `root`, whatever run wrote it; none when there
/// is no checkpoint or its state cannot be read.
pub fn latest_state(root: &Path) -> Option<LoopState> {
    read_state(&epoch_dir(root, list_epochs(root).pop()?)).ok()
}

/// The loop state of the checkpoint in `dir`.
fn read_state(dir: &Path) -> Result<LoopState, String> {
    let text = fs::read_to_string(dir.join("state.json")).map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| e.to_string())
}

/// Folder name of claim `claim`'s checkpoints in a job's folder (see [`take_over`]).
pub fn claim_dir(job_dir: &Path, claim: i64) -> PathBuf {
    job_dir.join(format!("claim-{claim}"))
}

/// Makes `claim_dir(job_dir, claim)` the folder that claim `claim` of a job resumes from and
/// writes its checkpoints in. The folder of the newest earlier claim that holds a checkpoint (the
/// job's own folder for a job checkpointed before claims had folders) becomes it by one rename;
/// every other entry of `job_dir` goes. The newest claim, not the latest epoch: each claim's
/// folder starts as the one before it, so the newest is the line of runs whose progress the
/// database recorded, and a later epoch in an older claim's folder is what a run whose claim
/// had passed on wrote after all.
///
/// A run whose claim passed on while it ran (its lease lapsed) may still be writing its
/// checkpoints by the old folder's path: the rename is atomic, so each of its writes lands wholly
/// in what this claim takes over (and is resumed from, a complete checkpoint or a staged best
/// model settled as after a crash) or wholly in a folder of its old name that this claim never
/// reads. It can no longer replace a checkpoint or best model under this claim, nor remove one.
/// What cannot be removed of the other folders (a run still writing there) is left to the next
/// take-over or the job's end, and logged.
pub fn take_over(job_dir: &Path, claim: i64) -> std::io::Result<PathBuf> {
    fs::create_dir_all(job_dir)?;
    let ours = claim_dir(job_dir, claim);
    let newest = claim_folders(job_dir)?.into_iter().rev().map(|(_, path)| path).find(|path| !list_epochs(path).is_empty());
    let source = match newest {
        Some(newest) => Some(newest),
        None if !list_epochs(job_dir).is_empty() => Some(gather_unclaimed(job_dir, claim)?),
        None => None,
    };
    match source {
        Some(source) if source != ours => {
            if ours.exists() {
                fs::remove_dir_all(&ours)?;
            }
            fs::rename(&source, &ours)?;
        }
        Some(_) => {}
        None => fs::create_dir_all(&ours)?,
    }
    fs::File::open(job_dir)?.sync_all()?;
    for entry in fs::read_dir(job_dir)?.flatten() {
        let path = entry.path();
        if path != ours && let Err(e) = remove_path(&path) {
            tracing::warn!(path = %path.display(), error = %e, "removing a superseded checkpoint folder failed; it goes when the job ends");
        }
    }
    clear_interrupted_writes(&ours)?;
    Ok(ours)
}

/// The file in a claim's folder naming the claim whose line of runs its checkpoints belong to
/// (see [`mark_claim`]).
const CLAIM_MARK: &str = "claim";

/// Marks the claim's folder `root` as claim `claim`'s, once the claim has chosen what it resumes
/// from (its own checkpoints go in from then on). The mark travels with the folder when a later
/// claim takes it over; so where machines share an object store, the checkpoint in a folder
/// is known to be of the line the claim it names chose, whatever the folder's name
/// (`Objects::fetch_checkpoint` compares it with the store's). Written whole or not at all.
pub fn mark_claim(root: &Path, claim: i64) -> std::io::Result<()> {
    let staged = root.join(format!(".{CLAIM_MARK}.tmp"));
    let mut file = fs::File::create(&staged)?;
    std::io::Write::write_all(&mut file, claim.to_string().as_bytes())?;
    file.sync_all()?;
    fs::rename(&staged, root.join(CLAIM_MARK))
}

/// The claim the folder `root` was marked with by [`mark_claim`]; 0, older than any claim, for
/// a folder never marked (checkpointed before the marks, or by a process without an object store)
/// or whose mark does not read as a claim.
pub fn marked_claim(root: &Path) -> std::io::Result<i64> {
    match fs::read_to_string(root.join(CLAIM_MARK)) {
        Ok(text) => Ok(text.trim().parse().unwrap_or(0)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// The claims' folders in a job's folder, by claim, ascending.
pub fn claim_folders(job_dir: &Path) -> std::io::Result<Vec<(i64, PathBuf)>> {
    let mut claims: Vec<(i64, PathBuf)> = fs::read_dir(job_dir)?
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.strip_prefix("claim-")?.parse::<i64>().ok()?, e.path())))
        .filter(|(_, path)| path.is_dir())
        .collect();
    claims.sort();
    Ok(claims)
}

/// Moves the checkpoints of a job checkpointed before claims had folders (directly in
/// `job_dir`; no run of that version writes any more) into a folder of their own, returned.
fn gather_unclaimed(job_dir: &Path, claim: i64) -> std::io::Result<PathBuf> {
    let staging = job_dir.join(format!(".claim-{claim}.legacy"));
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    fs::create_dir(&staging)?;
    for entry in fs::read_dir(job_dir)?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("epoch-") || name.starts_with("best") || name == "calibrated" || name.starts_with(".best") {
            fs::rename(entry.path(), staging.join(&*name))?;
        }
    }
    Ok(staging)
}

/// Settles what writes interrupted in the checkpoint folder `dir` left (by a crash, or by a
/// take-over's rename under a run still writing): a best model moved aside goes back
/// (`settle_staged_best` then promotes the staged one if the checkpoint names it), and the
/// half-written folders, hidden by their names, go. Returns what was removed.
pub fn clear_interrupted_writes(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    for restored in crate::model::io::restore_interrupted_replacements(dir)? {
        tracing::warn!(path = %restored.display(), "restored a folder whose replacement a write interrupted");
    }
    let mut removed = vec![];
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
            remove_path(&path)?;
            removed.push(path);
        }
    }
    Ok(removed)
}

/// Removes the checkpoints in `root` and the best models staged for them (as
/// [`settle_staged_best`] does with no checkpoint): what a checkpoint of another line of runs,
/// about to be put in, supersedes (`best/` is replaced with that one's). A staged model left
/// would be promoted on resume when its epoch's number matched.
pub fn remove_superseded(root: &Path) -> std::io::Result<()> {
    for epoch in list_epochs(root) {
        fs::remove_dir_all(epoch_dir(root, epoch))?;
    }
    settle_staged_best(root, None)
}

/// Removes every checkpoint under `root` (used before re-running from scratch).
pub fn clear(root: &Path) -> Result<(), TrainError> {
    if root.exists() {
        fs::remove_dir_all(root)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder under `dir` holding `what` in a file `w`.
    fn folder(dir: PathBuf, what: &str) {
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("w"), what).unwrap();
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    /// A claim takes over the newest claim's folder that holds a checkpoint by renaming it, and
    /// everything else in the job's folder goes; a first claim starts an empty folder.
    #[test]
    fn a_claim_takes_over_the_newest_claims_checkpoints_and_the_rest_goes() {
        let tmp = tempfile::tempdir().unwrap();
        let job = tmp.path().join("job");
        let ours = take_over(&job, 1).unwrap();
        assert_eq!((ours.clone(), names(&job), names(&ours).len()), (claim_dir(&job, 1), vec!["claim-1".to_string()], 0));

        folder(epoch_dir(&claim_dir(&job, 1), 5), "claim 1 epoch 5");
        folder(epoch_dir(&claim_dir(&job, 2), 3), "claim 2 epoch 3");
        // Claim 1's epoch 5 is later, but claim 3 took the job over from claim 1 after all.
        folder(epoch_dir(&claim_dir(&job, 3), 4), "claim 3 epoch 4");
        folder(best_dir(&claim_dir(&job, 3)), "claim 3 best");
        folder(staged_best_dir(&claim_dir(&job, 4), 6), "claim 4 staged, no checkpoint");
        let ours = take_over(&job, 5).unwrap();
        assert_eq!(names(&job), ["claim-5"]);
        assert_eq!(names(&ours), ["best", "epoch-4"]);
        assert_eq!(fs::read_to_string(epoch_dir(&ours, 4).join("w")).unwrap(), "claim 3 epoch 4");
        assert_eq!(fs::read_to_string(best_dir(&ours).join("w")).unwrap(), "claim 3 best");
    }

    /// A job checkpointed before claims had folders keeps its checkpoints, moved into the claim's.
    #[test]
    fn checkpoints_written_before_claims_had_folders_are_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        let job = tmp.path().join("job");
        folder(epoch_dir(&job, 2), "epoch 2");
        folder(best_dir(&job), "best");
        folder(job.join(".epoch-3.tmp-0192"), "half-written");
        let ours = take_over(&job, 7).unwrap();
        assert_eq!(names(&job), ["claim-7"]);
        assert_eq!(names(&ours), ["best", "epoch-2"]);
        assert_eq!(fs::read_to_string(epoch_dir(&ours, 2).join("w")).unwrap(), "epoch 2");
    }

    /// What an interrupted write left in the folder taken over is settled: a best model moved
    /// aside is put back, half-written folders go.
    #[test]
    fn a_folder_taken_over_is_settled_like_after_a_crash() {
        let tmp = tempfile::tempdir().unwrap();
        let job = tmp.path().join("job");
        let before = claim_dir(&job, 1);
        folder(epoch_dir(&before, 4), "epoch 4");
        folder(before.join(".best.old-0192"), "best of epoch 3");
        folder(staged_best_dir(&before, 4), "best of epoch 4");
        folder(before.join(".epoch-5.tmp-0193"), "half-written");
        let ours = take_over(&job, 2).unwrap();
        assert_eq!(names(&ours), ["best", "best-next-4", "epoch-4"]);
        assert_eq!(fs::read_to_string(best_dir(&ours).join("w")).unwrap(), "best of epoch 3");
    }

    /// A run still writing by the old folder's path after the take-over (its claim passed on)
    /// writes into a folder of that name, never into the one taken over.
    #[test]
    fn a_run_writing_by_the_old_path_after_a_take_over_misses_the_folder_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        let job = tmp.path().join("job");
        let stale = take_over(&job, 1).unwrap();
        folder(epoch_dir(&stale, 1), "epoch 1");
        let ours = take_over(&job, 2).unwrap();
        crate::model::io::write_dir_atomically(&epoch_dir(&stale, 2), |t| crate::model::io::write_file(&t.join("w"), b"stale epoch 2")).unwrap();
        fs::remove_dir_all(epoch_dir(&stale, 1)).unwrap_err();
        assert_eq!(names(&ours), ["epoch-1"]);
        assert_eq!(list_epochs(&stale), [2]);
    }

    /// What a crash leaves between staging a best model, writing its checkpoint and promoting it
    /// is settled on resume: promoted when the checkpoint names it, removed when not.
    #[test]
    fn a_staged_best_model_is_promoted_only_when_its_checkpoint_names_it() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let best = || fs::read_to_string(best_dir(root).join("w")).unwrap();
        let state = |epoch: u32, best_epoch: u32| LoopState { epoch, best_epoch: Some(best_epoch), ..LoopState::fresh(String::new()) };
        folder(best_dir(root), "epoch 1");

        // The crash came before epoch 2's checkpoint: the latest is epoch 1's, best stays.
        folder(staged_best_dir(root, 2), "epoch 2");
        settle_staged_best(root, Some(&state(1, 1))).unwrap();
        assert_eq!(best(), "epoch 1");
        assert!(!staged_best_dir(root, 2).exists());

        // The crash came after epoch 2's checkpoint, which names epoch 2: promoted.
        folder(staged_best_dir(root, 2), "epoch 2");
        settle_staged_best(root, Some(&state(2, 2))).unwrap();
        assert_eq!(best(), "epoch 2");
        assert!(!staged_best_dir(root, 2).exists());

        // A staged model no checkpoint names (or no checkpoint at all) goes.
        folder(staged_best_dir(root, 4), "epoch 4");
        settle_staged_best(root, Some(&state(3, 2))).unwrap();
        folder(staged_best_dir(root, 5), "epoch 5");
        settle_staged_best(root, None).unwrap();
        assert_eq!(best(), "epoch 2");
        assert_eq!(fs::read_dir(root).unwrap().count(), 1, "only best/ is left");
    }
}
