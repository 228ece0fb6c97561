use vitforge::cli::{self, Cli, Command};

fn main() -> anyhow::Result<()> {
    // Before any thread starts: the allocator's settings for training's large, short-lived buffers.
    vitforge::malloc::configure();
    let cli = Cli::parse_args();
    vitforge::telemetry::init(cli.log_format);
    // A cap on the CPU kernels that cannot be read is an error here, not a silent default later.
    vitforge::model::isa::cap_from_env().map_err(anyhow::Error::msg)?;
    vitforge::model::dpbf16_from_env().map_err(anyhow::Error::msg)?;
    vitforge::model::mkl_from_env().map_err(anyhow::Error::msg)?;
    let result = match cli.command {
        None => vitforge::startup::serve(cli.serve),
        Some(Command::Serve(cfg)) => vitforge::startup::serve(*cfg),
        Some(Command::Train(args)) => cli::train(*args),
        Some(Command::Predict(args)) => cli::predict(args),
        Some(Command::Eval(args)) => cli::eval(args),
        Some(Command::InitModel(args)) => cli::init_model(args),
        Some(Command::Bench(args)) => cli::bench::bench(args),
        Some(Command::Selfcheck(args)) => cli::selfcheck::selfcheck(args),
    };
    // Stopped by Ctrl-C: the shell's status for SIGINT, after the message.
    if let Err(e) = &result
        && let Some(interrupted) = e.downcast_ref::<cli::Interrupted>()
    {
        eprintln!("{interrupted}");
        std::process::exit(130);
    }
    result
}
