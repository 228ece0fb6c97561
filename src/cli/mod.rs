//! The command line: the `Cli` that `main` parses, and the subcommands besides `serve` (`train`,
//! `predict`, `eval`, `init-model`, `bench`, `selfcheck`), which run the same engine as the service, with
//! progress bars for long work.

pub mod bench;
pub mod selfcheck;
pub mod train_flags;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use candle_core::Device;
use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde_json::json;

use crate::config::ServeConfig;
use crate::budget::MemoryBudget;
use crate::dataset::{BlobStore, Duplicates, IngestError, IngestLimits, Progress, Purpose, Split, ingest_cancellable};
use crate::model::classifier::{ClassifyError, Classifier};
use crate::model::{LoadedModel, ModelSource, PrecisionChoice, VitConfig};
use crate::telemetry::LogFormat;
use crate::train::data::TrainData;
use crate::train::eval::{EvalError, EvalSplit, evaluate_records_with_progress};
use crate::train::{Control, Phase, Recipe, TrainError, TrainEvent, TrainParams, TrainSpec, cli_checkpoint_root, fine_tune};
use crate::worker::submit::DEFAULT_BASE_MODEL;

/// vitforge: fine-tune a pre-trained Vision Transformer on your images and serve it over HTTP.
///
/// With no subcommand, `vitforge` runs `serve`.
#[derive(Debug, Parser)]
#[command(name = "vitforge", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub serve: ServeConfig,

    /// Log output format.
    #[arg(long, env = "VITFORGE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

impl Cli {
    /// Parses the command line as [`Parser::parse`] does (printing the error and exiting on a bad
    /// one), and refuses `serve`'s flags before a subcommand (`vitforge --port 80 train …`), where
    /// they would be ignored. Global flags (`--log-format`) go before or after the subcommand.
    /// (clap's `args_conflicts_with_subcommands` refused the global flags there too.)
    pub fn parse_args() -> Self {
        let mut command = Self::command();
        let matches = command.get_matches_mut();
        if let Some((name, _)) = matches.subcommand() {
            let misplaced: Vec<String> = command
                .get_arguments()
                .filter(|a| !a.is_global_set() && matches.value_source(a.get_id().as_str()) == Some(ValueSource::CommandLine))
                .map(|a| a.get_long().map_or_else(|| a.get_id().to_string(), |l| format!("--{l}")))
                .collect();
            if !misplaced.is_empty() {
                command
                    .error(
                        ErrorKind::ArgumentConflict,
                        format!("{} is a flag of `serve`, not of `{name}`: give it after `serve`, or without a subcommand", misplaced.join(", ")),
                    )
                    .exit();
            }
        }
        Self::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut command).exit())
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service, its job workers and the predictor (the default).
    Serve(Box<ServeConfig>),
    /// Fine-tune a model on a folder, archive or Parquet file of labelled images.
    Train(Box<TrainArgs>),
    /// Classify image files with a model folder; prints JSON.
    Predict(PredictArgs),
    /// Evaluate a model on labelled images; prints JSON metrics.
    Eval(EvalArgs),
    /// Write a randomly initialised model (for training from scratch and for tests).
    InitModel(InitModelArgs),
    /// Measure inference and training speed and peak memory (JSON lines).
    Bench(bench::BenchArgs),
    /// Check this build on a device against transformers' golden values (preprocessing, logits,
    /// loss, every gradient), then training steps and a save/load round trip.
    Selfcheck(selfcheck::SelfcheckArgs),
}

/// `vitforge train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training images: a folder or a zip / tar / tar.gz archive in image-folder layout
    /// (`<class>/<image>`, optionally under `train/`, `validation/`, `test/`), or a Hugging Face
    /// Parquet export.
    #[arg(long)]
    pub data: PathBuf,
    /// Base model: a Hugging Face hub id or a local folder with config.json and model.safetensors.
    #[arg(long, default_value = DEFAULT_BASE_MODEL)]
    pub base_model: String,
    /// Folder to write the fine-tuned model to: created, or replaced when it is empty or holds an
    /// earlier model (only config.json, model.safetensors, preprocessor_config.json). A folder
    /// holding anything else is refused, as is one that is, contains or lies inside --data or
    /// --base-model.
    #[arg(long)]
    pub output: PathBuf,
    /// Compute device: auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Defaults to start from: `auto` (small-data recipe: probe head, then a gentle fine-tune) or
    /// `manual` (Hugging Face's defaults). Default: auto, or manual when a hyper-parameter flag
    /// other than --seed, --validation-split, --time-budget-secs and --precision is given. Given
    /// flags override either. The [default: …] of each flag below is `manual`'s; `auto` changes
    /// several (the README's Recipes section, or `GET /recipes`, lists both).
    #[arg(long, value_enum)]
    pub recipe: Option<Recipe>,
    #[command(flatten)]
    pub hyper: train_flags::HyperParams,
}

/// `vitforge predict`.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// Model folder (or hub id).
    #[arg(long)]
    pub model: String,
    /// Labels per image in `top_k` (1 or more).
    #[arg(long, default_value_t = 5, value_parser = at_least(1))]
    pub top_k: usize,
    /// Test-time flip: average each image's probabilities with its mirror image's (twice the
    /// compute).
    #[arg(long)]
    pub flip: bool,
    /// Compute device: auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Precision of the matrix products: f32, bf16 (bf16 operands, f32 accumulation) or auto
    /// (bf16 on a GPU and where the CPU multiplies bf16 natively and faster, else f32).
    #[arg(long, value_enum, default_value_t = PrecisionChoice::F32)]
    pub precision: PrecisionChoice,
    /// Image files, or folders of them: a folder's images are classified in name order, its
    /// sub-folders' too, and files in it that are not images (by their content: a README, a CSV)
    /// or are clutter (`.DS_Store`, `Thumbs.db`) are passed over. An image that cannot be read or
    /// decoded gets `{"file", "error"}` in place of its prediction, the others are still
    /// classified, and the command then exits with status 1.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

/// `vitforge eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model folder (or hub id).
    #[arg(long)]
    pub model: String,
    /// Labelled images: a folder or archive in image-folder layout, or Parquet.
    #[arg(long)]
    pub data: PathBuf,
    /// Which split of the data to evaluate on.
    #[arg(long, value_enum, default_value_t = EvalSplit::All)]
    pub split: EvalSplit,
    /// Images per forward pass (1 or more).
    #[arg(long, default_value_t = 16, value_parser = at_least(1))]
    pub batch_size: usize,
    /// Compute device: auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Precision of the matrix products: f32, bf16 or auto (as `predict`).
    #[arg(long, value_enum, default_value_t = PrecisionChoice::F32)]
    pub precision: PrecisionChoice,
}

/// `vitforge init-model`.
#[derive(Debug, Args)]
pub struct InitModelArgs {
    /// Architecture: tiny, small or base (patch 16, 224×224), or a config.json file.
    #[arg(long)]
    pub config: String,
    /// Class names, comma-separated: at least two, all different.
    #[arg(long, value_delimiter = ',', required = true)]
    pub labels: Vec<String>,
    /// Folder to write the model to: created, or replaced when it is empty or holds an earlier
    /// model (only config.json, model.safetensors, preprocessor_config.json); a folder holding
    /// anything else is refused.
    #[arg(long)]
    pub output: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// A clap value parser of whole numbers no smaller than `min`, whose error says so (clap's own
/// ranges print the type's maximum as the upper bound).
pub(crate) fn at_least(min: usize) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
    move |s| match s.trim().parse::<usize>() {
        Ok(n) if n >= min => Ok(n),
        Ok(_) => Err(format!("must be {min} or more")),
        Err(_) => Err(format!("not a whole number ({min} or more)")),
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
fn bar(len: u64, template: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(bar_style(template));
    pb.enable_steady_tick(TICK);
    pb
}

fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> ")
}

/// Loads a model with its own labels, with a bar for the download of a hub model's weights when
/// they are not cached yet (none otherwise).
fn load_showing_download(source: &ModelSource, device: &Device) -> Result<LoadedModel, crate::model::ModelError> {
    let mut pb: Option<ProgressBar> = None;
    let mut downloaded = |done: u64, total: u64| {
        // (0, 0): nothing to count yet (or waiting for another download of the same file).
        if total > 0 {
            let pb = pb.get_or_insert_with(|| bar(total, "{spinner} downloading [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}) eta {eta}"));
            pb.set_position(done);
        }
        ControlFlow::Continue(())
    };
    let model = LoadedModel::load_with(source, None, device, 0, &mut downloaded);
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    model
}

/// How often a progress bar redraws by itself.
const TICK: Duration = Duration::from_millis(200);

/// Shows a training event on the progress bar (or as a line above it).
fn show_event(pb: &ProgressBar, shown: &mut Option<Phase>, root: &Path, e: TrainEvent) {
    match e {
        TrainEvent::Started { total_steps, train_images, validation_images, resumed_from, precision, .. } => {
            say(pb, format!("training on {train_images} images, validating on {validation_images}, {total_steps} steps, products in {}", precision.name()));
            if let Some(epoch) = resumed_from {
                say(pb, format!("resuming after epoch {epoch} from {}", root.display()));
            }
        }
        TrainEvent::Restarted { reason } => say(pb, format!("starting over: {reason}")),
        TrainEvent::Step { epoch, step, steps, loss, learning_rate, images_per_s } => {
            show_phase(pb, shown, Phase::Training, step, steps);
            pb.set_message(format!("steps, epoch {epoch} loss {loss:.4} lr {learning_rate:.2e} {images_per_s:.1} img/s"));
        }
        TrainEvent::Phase { phase, done, total } => {
            show_phase(pb, shown, phase, done, total);
            pb.set_message(phase_unit(phase));
        }
        TrainEvent::Epoch { epoch, report, improved, .. } => say(
            pb,
            format!(
                "epoch {epoch}: validation loss {:.4} accuracy {:.4} macro-F1 {:.4}{}",
                report.loss,
                report.accuracy,
                report.f1,
                if improved { " (best so far)" } else { "" }
            ),
        ),
        TrainEvent::Checkpoint { .. } => {}
        TrainEvent::Probe { c, cv_accuracy, cv_log_loss, features_seconds, fit_seconds, views } => say(
            pb,
            format!(
                "probe head fitted in {fit_seconds:.1} s after a {features_seconds:.1} s feature pass{}: C = {c}{}",
                if views > 0 { format!(" over the images and {views} other view(s) of each") } else { String::new() },
                cv_accuracy.zip(cv_log_loss).map(|(a, l)| format!(", cross-validated log-loss {l:.4} and accuracy {a:.4}")).unwrap_or_default()
            ),
        ),
        TrainEvent::Test { report } => say(pb, format!("test: accuracy {:.4} macro-F1 {:.4} calibration error {:.4}", report.accuracy, report.f1, report.ece)),
        TrainEvent::Decided { decision, .. } => say(pb, format!("auto: {}", decision.reason)),
        TrainEvent::Stopped { why, .. } => say(pb, why),
        TrainEvent::Calibrated { calibration: c } if c.fitted => say(
            pb,
            format!("scores calibrated: temperature {:.3}, validation calibration error {:.4} → {:.4}", c.temperature, c.validation_ece_before, c.validation_ece_after),
        ),
        TrainEvent::Calibrated { calibration: c } => say(pb, format!("scores not calibrated: {}", c.reason.as_deref().unwrap_or("no reason given"))),
    }
}

/// Points the bar at `phase`: its name as the prefix, `done` of `total`; a new phase restarts the
/// bar's clock so its rate and estimate are the phase's own, counted from `done` (a phase that
/// resumes part-way, as training does after each validation, must not read the jump from the
/// last phase's position to its own as steps done in no time: its estimate would show ~0).
fn show_phase(pb: &ProgressBar, shown: &mut Option<Phase>, phase: Phase, done: u64, total: u64) {
    pb.set_length(total);
    if *shown == Some(phase) {
        pb.set_position(done);
        return;
    }
    *shown = Some(phase);
    pb.set_prefix(phase.as_str());
    // The estimator takes the new position in now (only a tick records it, and the steady ticker
    // would record it later, as a jump), then restarts from it.
    pb.disable_steady_tick();
    pb.set_position(done);
    pb.tick();
    pb.reset_elapsed();
    pb.enable_steady_tick(TICK);
}

/// What `done` / `total` count in a phase, for the bar.
fn phase_unit(phase: Phase) -> &'static str {
    match phase {
        Phase::Features | Phase::Validating => "images",
        Phase::Probe => "fits",
        Phase::Training => "steps",
        Phase::Loading | Phase::Saving => "",
    }
}

/// Prints a line above the bar, or to stderr when the bar is hidden.
fn say(pb: &ProgressBar, msg: String) {
    if pb.is_hidden() {
        eprintln!("{msg}");
    } else {
        pb.println(msg);
    }
}

/// Reads a folder, archive or Parquet file into a temporary blob store, with a progress spinner;
/// a Ctrl-C (`cancel`) stops it at the next file, and the scratch copy goes with its folder.
fn import(data: &Path, store: &BlobStore, cancel: &AtomicBool) -> anyhow::Result<crate::dataset::Ingested> {
    // Said plainly, rather than as the ingest's I/O error twice over.
    if !data.exists() {
        anyhow::bail!("--data {}: no such file or folder", data.display());
    }
    let pb = bar(0, "{spinner} listing entries: {pos} {elapsed}");
    let mut checking = false;
    let mut shown = |progress: Progress| match progress {
        Progress::Listing { listed } => pb.set_position(listed),
        Progress::Checking { checked, entries } => {
            // The length before the new style's first draw.
            pb.set_length(entries);
            if !checking {
                checking = true;
                pb.reset();
                pb.set_style(bar_style("{spinner} checking [{bar:30}] {pos}/{len} files ({per_sec}) eta {eta}"));
            }
            pb.set_position(checked);
        }
    };
    let imported = ingest_cancellable(data, store, &IngestLimits::default(), &mut shown, cancel, &MemoryBudget::unlimited(), Purpose::Dataset);
    pb.finish_and_clear();
    let ingested = match imported {
        Err(IngestError::Cancelled) => {
            return Err(Interrupted(format!("interrupted while reading {}: nothing was trained", data.display())).into());
        }
        other => other.with_context(|| format!("reading {}", data.display()))?,
    };
    eprintln!("imported {} images in {} classes from {}", ingested.images.len(), ingested.classes.len(), data.display());
    for r in ingested.rejected.iter().take(20) {
        eprintln!("  skipped {}: {}", r.file, r.reason);
    }
    if ingested.rejected.len() > 20 {
        eprintln!("  ... and {} more skipped files", ingested.rejected.len() - 20);
    }
    note_groups(&ingested.duplicates(), Duplicates::describe, "the same file", "files");
    if let Some(similar) = ingested.look_alikes() {
        note_groups(&similar, Duplicates::describe_look_alikes, "alike", "groups");
    }
    Ok(ingested)
}

/// A `note:` on stderr for a duplicate summary, with its first groups: "  the same file: a.jpg
/// (cat, train), b.jpg (cat, test)".
fn note_groups(summary: &Duplicates, describe: fn(&Duplicates) -> Option<String>, what: &str, more: &str) {
    let Some(text) = describe(summary) else { return };
    eprintln!("note: {text}; all are used as given");
    for group in summary.groups.iter().take(10) {
        let files: Vec<String> = group.files.iter().map(|f| format!("{} ({}, {})", f.file, f.label, f.split)).collect();
        let rest = if group.count > group.files.len() as u64 { format!(" and {} more", group.count - group.files.len() as u64) } else { String::new() };
        eprintln!("  {what}: {}{rest}", files.join(", "));
    }
    if summary.groups_total > 10 {
        eprintln!("  ... and {} more such {more}", summary.groups_total - 10);
    }
}

/// Refuses an `--output` that writing a model would destroy something in: a folder holding
/// anything but an earlier model's files, or one that is, contains or lies inside one of
/// `inputs` (flag, path), such as `--data`. Nothing is touched.
fn check_output(output: &Path, inputs: &[(&str, &Path)]) -> anyhow::Result<()> {
    let out = resolved(output);
    // A model replaces its folder whole (written aside, then renamed into place): the current
    // folder, or one above it, would leave the shell in a folder that no longer exists.
    if let Ok(cwd) = std::env::current_dir().map(|d| resolved(&d))
        && cwd.starts_with(&out)
    {
        anyhow::bail!(
            "--output {} is the current folder or one above it, which writing a model replaces whole; name a folder inside it (e.g. --output model)",
            output.display()
        );
    }
    for (flag, input) in inputs {
        let input_at = resolved(input);
        let overlap = if out == input_at {
            Some("is")
        } else if input_at.starts_with(&out) {
            Some("contains")
        } else if out.starts_with(&input_at) {
            Some("lies inside")
        } else {
            None
        };
        if let Some(how) = overlap {
            anyhow::bail!(
                "--output {} {how} {flag} {}: writing the model there would replace or alter it; choose a folder outside it",
                output.display(),
                input.display()
            );
        }
    }
    let foreign = crate::model::io::foreign_entries(output).with_context(|| format!("--output {}", output.display()))?;
    if !foreign.is_empty() {
        let shown = foreign.iter().take(5).map(String::as_str).collect::<Vec<_>>().join(", ");
        let more = if foreign.len() > 5 { format!(" and {} more", foreign.len() - 5) } else { String::new() };
        anyhow::bail!(
            "--output {} already holds files that are not a model's ({shown}{more}); refusing to replace it: \
             choose another folder, or empty it first",
            output.display()
        );
    }
    Ok(())
}

/// `path` made absolute with symbolic links and `..` resolved as far as it exists (the rest is
/// appended as given), so two spellings of one folder compare equal.
fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    for existing in absolute.ancestors() {
        if let Ok(real) = existing.canonicalize() {
            let rest = absolute.strip_prefix(existing).unwrap_or(Path::new(""));
            return real.join(rest);
        }
    }
    absolute
}

/// The context of an error loading `what` from `source`. For a hub id it adds that no local
/// folder has that name either, so a mistyped folder does not read as a network failure only.
fn loading(what: &str, source: &ModelSource) -> String {
    match source {
        ModelSource::Dir(dir) => format!("loading {what} {}", dir.display()),
        ModelSource::Hub(id) => format!("loading {what} '{id}' from the Hugging Face hub (no folder '{id}' here either)"),
    }
}

/// Every imported image as (blob file, class, split).
fn records(ingested: &crate::dataset::Ingested, store: &BlobStore) -> anyhow::Result<Vec<(PathBuf, String, Split)>> {
    ingested
        .images
        .iter()
        .map(|r| Ok((store.path(&r.blob)?, r.label.clone(), r.split)))
        .collect()
}

/// `vitforge train`: fine-tunes and writes the best epoch's model to `--output`; prints a JSON
/// summary on stdout.
pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    let recipe = args.recipe.unwrap_or(if args.hyper.any_recipe_flag() { Recipe::Manual } else { Recipe::Auto });
    let params: TrainParams = args.hyper.apply(recipe.base());
    params.validate().map_err(|e| anyhow::anyhow!("invalid hyper-parameter {e}"))?;
    let device = crate::model::device(&args.device)?;
    let source = ModelSource::parse(&args.base_model)?;
    let mut inputs = vec![("--data", args.data.as_path())];
    if let ModelSource::Dir(dir) = &source {
        inputs.push(("--base-model", dir.as_path()));
    }
    check_output(&args.output, &inputs)?;
    // `.` or `..` has no folder name to put the checkpoints beside, nor can it be renamed into place.
    let output = resolved(&args.output);
    let cancel = Arc::new(AtomicBool::new(false));
    cancel_on_signal(cancel.clone(), "stopping after the current batch")?;
    let scratch = tempfile::tempdir()?;
    let store = BlobStore::open(scratch.path().join("blobs"))?;
    let ingested = import(&args.data, &store, &cancel)?;
    let records = records(&ingested, &store)?;
    let looks: Vec<_> = records.iter().zip(&ingested.images).map(|((path, _, _), image)| (path.clone(), image.label.as_str(), image.look)).collect();
    let mut data = TrainData::with_labels(ingested.classes.clone(), records)?;
    data.set_look_alikes(&looks);
    let pb = bar(0, "{spinner} {prefix:>10} [{bar:30}] {pos}/{len} {msg} eta {eta}");
    pb.set_prefix(Phase::Loading.as_str());
    // A hub model not cached yet: its download on the bar, in MiB.
    let mut downloaded = |done: u64, total: u64| {
        // (0, 0): nothing to count yet (or waiting for another download of the same file).
        if total > 0 {
            pb.set_length(total >> 20);
            pb.set_position(done >> 20);
            pb.set_message("MiB downloaded");
        }
        // Ctrl-C stops the download too (what came in is kept for the next run to resume).
        if cancel.load(Ordering::SeqCst) { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    };
    let mut model = match LoadedModel::load_with(&source, Some(&ingested.classes), &device, params.seed, &mut downloaded) {
        Err(crate::model::ModelError::Stopped) => {
            pb.finish_and_clear();
            return Err(Interrupted(format!("interrupted while downloading {source}: nothing was trained; the next run resumes the download")).into());
        }
        other => other.with_context(|| loading("base model", &source))?,
    };
    say(
        &pb,
        format!(
            "base model {source}: {} parameters, {}",
            model.params.num_scalars(),
            if model.report.head_reset { "new classification head" } else { "its own classification head" }
        ),
    );
    let root = cli_checkpoint_root(&output);
    let memory_limit = crate::config::process_memory().map(|bytes| crate::train::memory::MemoryLimit { bytes, source: "this machine's memory".into() });
    let spec = TrainSpec {
        params: params.clone(),
        data,
        checkpoint_root: root.clone(),
        max_pixels: IngestLimits::default().max_image_pixels,
        cache_budget: crate::train::cache_budget_within(memory_limit.as_ref()),
        memory_limit,
    };
    let mut shown = None;
    let mut on_event = |e: TrainEvent| show_event(&pb, &mut shown, &root, e);
    let result = fine_tune(&mut model, spec, &device, Control::new(&cancel, &mut on_event));
    pb.finish_and_clear();
    let outcome = match result {
        Err(TrainError::Cancelled) => {
            // The scratch copy of the data goes now; the checkpoints stay for the next run.
            drop(scratch);
            return Err(interrupted(&root).into());
        }
        other => other?,
    };
    // Again: the folder may have been filled while the model trained.
    check_output(&args.output, &inputs)?;
    model.save(&output).with_context(|| format!("writing {}", args.output.display()))?;
    crate::train::checkpoint::clear(&root)?;
    let summary = json!({
        "output": args.output.to_string_lossy(),
        "best_epoch": outcome.best_epoch,
        "epochs_run": outcome.epochs_run,
        "validation": outcome.best,
        "test": outcome.test,
        "calibration": outcome.calibration,
        "decision": outcome.decision,
        "recipe": recipe,
        "params": params,
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// `vitforge train` stopped by SIGINT (Ctrl-C) or SIGTERM; `main` exits with 130 on it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Interrupted(String);

/// What an interrupted run left under checkpoint root `root`, and how to go on: the latest epoch
/// checkpoint is kept (the next run of the same command resumes from it); without one, the
/// empty root is removed.
fn interrupted(root: &Path) -> Interrupted {
    match crate::train::checkpoint::list_epochs(root).last() {
        Some(epoch) => Interrupted(format!(
            "interrupted: the checkpoint of epoch {epoch} is kept in {}; run the same command again to resume from it",
            root.display()
        )),
        None => {
            let _ = crate::train::checkpoint::clear(root);
            Interrupted("interrupted before the first epoch ended: there is no checkpoint to resume from".into())
        }
    }
}

/// Sets `cancel` at the first SIGINT (Ctrl-C) or SIGTERM, so the work stops at its next check
/// (`what` says where) and cleans up; a second signal exits at once (status 130). The handlers
/// are in place when this returns.
fn cancel_on_signal(cancel: Arc<AtomicBool>, what: &'static str) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (mut int, mut term) = runtime
            .block_on(async { Ok::<_, std::io::Error>((signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?)) })
            .context("listening for Ctrl-C")?;
        std::thread::spawn(move || {
            runtime.block_on(async move {
                tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
                cancel.store(true, Ordering::Relaxed);
                eprintln!("{what} (Ctrl-C again to stop at once, leaving the scratch copy of the data)");
                tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
                std::process::exit(130);
            })
        });
    }
    #[cfg(not(unix))]
    let _ = (cancel, what);
    Ok(())
}

/// `vitforge predict`: prints `{"predictions": [{"file", "label", "score", "top_k"}]}`, with
/// `{"file", "error"}` in place of the prediction of a file that cannot be read or decoded (the
/// others are still classified); fails at the end when any file did.
pub fn predict(args: PredictArgs) -> anyhow::Result<()> {
    let inputs = predict_inputs(&args.images)?;
    let device = crate::model::device(&args.device)?;
    let source = ModelSource::parse(&args.model)?;
    let model = load_showing_download(&source, &device).with_context(|| loading("model", &source))?;
    let clf = Classifier::new(model, &device, args.precision.resolve(&device)).with_context(|| loading("model", &source))?;
    let pb = if inputs.len() > PREDICT_BATCH {
        bar(inputs.len() as u64, "{spinner} classifying [{bar:30}] {pos}/{len} files ({per_sec}) eta {eta}")
    } else {
        ProgressBar::hidden()
    };
    let mut predictions = Vec::with_capacity(inputs.len());
    let (mut failed, mut passed_over) = (0, 0);
    // A chunk at a time, so only one forward pass of files is held in memory.
    for chunk in inputs.chunks(PREDICT_BATCH) {
        let never = AtomicBool::new(false);
        // `Ok(None)`: a file in a folder that is not an image, passed over.
        let prepared: Vec<Result<Option<Vec<f32>>, String>> = chunk
            .par_iter()
            .map(|(path, in_folder)| {
                let bytes = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
                if *in_folder && !crate::imaging::looks_like_an_image(&bytes) {
                    return Ok(None);
                }
                let image = [(path.display().to_string(), bytes)];
                match clf.prepare(&image, crate::imaging::DEFAULT_MAX_PIXELS, &never) {
                    Ok(mut pixels) => Ok(Some(pixels.remove(0))),
                    Err(ClassifyError::Image { reason, .. }) => Err(reason),
                    Err(other) => Err(other.to_string()),
                }
            })
            .collect();
        // What became of each file; the pixels of those to classify go into one forward pass.
        enum Outcome {
            Classified,
            Failed(String),
            PassedOver,
        }
        let mut pixels = Vec::with_capacity(chunk.len());
        let outcomes: Vec<Outcome> = prepared
            .into_iter()
            .map(|p| match p {
                Ok(Some(p)) => {
                    pixels.push(p);
                    Outcome::Classified
                }
                Ok(None) => Outcome::PassedOver,
                Err(e) => Outcome::Failed(e),
            })
            .collect();
        let mut answers = if pixels.is_empty() { vec![] } else { clf.predictions(&clf.probabilities_tta(&pixels, args.flip)?, args.top_k) }.into_iter();
        for ((path, _), outcome) in chunk.iter().zip(outcomes) {
            match outcome {
                Outcome::PassedOver => passed_over += 1,
                Outcome::Failed(error) => {
                    failed += 1;
                    say(&pb, format!("{}: {error}", path.display()));
                    predictions.push(json!({"file": path.to_string_lossy(), "error": error}));
                }
                Outcome::Classified => {
                    let answer = answers.next().with_context(|| format!("no prediction for {}", path.display()))?;
                    predictions.push(json!({"file": path.to_string_lossy(), "label": answer.label, "score": answer.score, "top_k": answer.top_k}));
                }
            }
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    if passed_over > 0 {
        eprintln!("passed over {passed_over} file(s) in the folders given that are not images");
    }
    println!("{}", serde_json::to_string_pretty(&json!({ "predictions": predictions }))?);
    if failed > 0 {
        anyhow::bail!("{failed} of {} images could not be read or decoded; their entries carry an \"error\" instead of a label", predictions.len());
    }
    if predictions.is_empty() {
        anyhow::bail!("no image in the folders given");
    }
    Ok(())
}

/// The files `vitforge predict` reads, each with whether it came from a folder: each file given
/// as it is (a path that does not exist is its own error, in its entry), and each folder's files
/// depth-first in name order, without clutter (`dataset::is_clutter`) and without following
/// links to folders.
fn predict_inputs(given: &[PathBuf]) -> anyhow::Result<Vec<(PathBuf, bool)>> {
    let mut inputs = Vec::new();
    for path in given {
        if !path.is_dir() {
            inputs.push((path.clone(), false));
            continue;
        }
        let walk = walkdir::WalkDir::new(path).sort_by_file_name().into_iter();
        for entry in walk.filter_entry(|e| e.depth() == 0 || !crate::dataset::is_clutter(&e.file_name().to_string_lossy())) {
            let entry = entry.with_context(|| format!("reading the folder {}", path.display()))?;
            if entry.file_type().is_file() || (entry.path_is_symlink() && entry.path().is_file()) {
                inputs.push((entry.into_path(), true));
            }
        }
    }
    Ok(inputs)
}

/// Images per forward pass of `vitforge predict`.
const PREDICT_BATCH: usize = 16;

/// `vitforge eval`: prints the metrics block (accuracy, macro precision / recall / F1, per class,
/// confusion matrix) of a model on labelled images, and how many images it rests on.
pub fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let device = crate::model::device(&args.device)?;
    let source = ModelSource::parse(&args.model)?;
    let model = load_showing_download(&source, &device).with_context(|| loading("model", &source))?;
    let cancel = Arc::new(AtomicBool::new(false));
    cancel_on_signal(cancel.clone(), "stopping")?;
    let scratch = tempfile::tempdir()?;
    let store = BlobStore::open(scratch.path().join("blobs"))?;
    let ingested = import(&args.data, &store, &cancel)?;
    let limits = IngestLimits::default();
    let pb = bar(0, "{spinner} evaluating [{bar:30}] {pos}/{len} images ({per_sec}) eta {eta}");
    let mut progress = |done: usize, total: usize| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    };
    let records = records(&ingested, &store)?;
    let (split, precision) = (Some(args.split), args.precision.resolve(&device));
    let evaluated =
        evaluate_records_with_progress(&model, records, split, limits.max_image_pixels, args.batch_size, &device, precision, Some(&cancel), &mut progress);
    pb.finish_and_clear();
    let evaluation = match evaluated {
        Err(EvalError::Train(TrainError::Cancelled)) => return Err(Interrupted("interrupted: nothing was evaluated".into()).into()),
        other => other?,
    };
    let mut out = serde_json::to_value(&evaluation.report)?;
    out["num_images"] = json!(evaluation.num_images);
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// `vitforge init-model`: writes a randomly initialised model.
pub fn init_model(args: InitModelArgs) -> anyhow::Result<()> {
    let cfg = match VitConfig::preset(&args.config) {
        Some(cfg) => cfg,
        None => VitConfig::from_json(&std::fs::read_to_string(&args.config).with_context(|| {
            format!("--config {}: not tiny, small or base, and not a readable config.json", args.config)
        })?)?,
    };
    let labels = class_names(&args.labels)?;
    check_output(&args.output, &[])?;
    let model = LoadedModel::random(&cfg, &labels, args.seed, &Device::Cpu)?;
    model.save(&resolved(&args.output)).with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!("wrote a random {}-parameter model with labels {labels:?} to {}", model.params.num_scalars(), args.output.display());
    Ok(())
}

/// The class names of `--labels`, trimmed: at least two, none empty, none twice.
fn class_names(given: &[String]) -> anyhow::Result<Vec<String>> {
    let labels: Vec<String> = given.iter().map(|l| l.trim().to_string()).collect();
    if labels.iter().any(String::is_empty) {
        anyhow::bail!("--labels {:?}: a class name is empty; give the names separated by commas, like cat,dog", given.join(","));
    }
    for (i, label) in labels.iter().enumerate() {
        if labels[..i].contains(label) {
            anyhow::bail!("--labels: class '{label}' is given twice; each class name must be different");
        }
    }
    if labels.len() < 2 {
        anyhow::bail!("--labels: a classifier needs at least 2 classes, got {} ({})", labels.len(), labels.join(","));
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_that_resumes_part_way_starts_its_rate_afresh() {
        let pb = bar(0, "{pos}/{len}");
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        let mut shown = None;
        show_phase(&pb, &mut shown, Phase::Validating, 40, 40);
        // Training resumes at step 101 of 1,000 after validating 40 images.
        show_phase(&pb, &mut shown, Phase::Training, 101, 1000);
        std::thread::sleep(TICK * 2);
        assert_eq!(pb.position(), 101);
        assert!(pb.per_sec() < 1.0, "the jump from 40 to 101 was read as {} steps/s", pb.per_sec());
        assert_eq!(pb.prefix(), "training");
        show_phase(&pb, &mut shown, Phase::Training, 111, 1000);
        std::thread::sleep(TICK * 2);
        assert!(pb.per_sec() > 1.0, "steps within the phase count: {}", pb.per_sec());
    }
}
