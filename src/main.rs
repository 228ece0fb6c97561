use clap::Parser;
use vitforge::config::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    vitforge::telemetry::init(cli.log_format);
    match cli.command {
        None => vitforge::startup::serve(cli.serve),
        Some(Command::Serve(cfg)) => vitforge::startup::serve(*cfg),
        Some(Command::Train(args)) => vitforge::cli::train(*args),
        Some(Command::Predict(args)) => vitforge::cli::predict(args),
        Some(Command::Eval(args)) => vitforge::cli::eval(args),
        Some(Command::InitModel(args)) => vitforge::cli::init_model(args),
        Some(Command::Bench(args)) => vitforge::cli::bench::bench(args),
    }
}
