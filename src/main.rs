use clap::Parser;
use vitforge::config::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    vitforge::telemetry::init(cli.log_format);
    match cli.command {
        None => vitforge::startup::serve(cli.serve),
        Some(Command::Serve(cfg)) => vitforge::startup::serve(*cfg),
    }
}
