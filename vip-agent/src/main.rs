//! The `vip-agent` binary: parse the command line, set up logging, run. Errors from the
//! library are typed; this edge prints them on one line and exits non-zero.

use std::{
    io::{IsTerminal, Write},
    process::ExitCode,
};

use tracing_subscriber::EnvFilter;
use vip_agent::config::{self, Command, LogFormat, OutputFormat, ParseError, RunConfig};

fn main() -> ExitCode {
    let argv: Vec<_> = std::env::args_os().collect();
    let env = |k: &str| std::env::var(k).ok();
    // A bad value that came from VIP_* or the --config file says so.
    let from = |message: &str| match config::origin_of(message, &argv, &env) {
        Some(origin) => format!(" (from {origin})"),
        None => String::new(),
    };
    let cli = match config::parse_args(argv.clone(), &env) {
        Ok(cli) => cli,
        Err(ParseError::Clap(e)) if !e.use_stderr() => e.exit(),
        Err(ParseError::Clap(e)) => {
            // One line, like every other error: clap's own message, without its blank
            // line and "For more information" footer.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!("vip-agent: {first}{} (see --help)", from(first));
            return ExitCode::from(2);
        }
        Err(ParseError::Config(e)) => {
            eprintln!("vip-agent: error: {:#}", anyhow::Error::from(e));
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Run(args) => match RunConfig::try_from(*args) {
            Ok(cfg) => run(cfg),
            Err(e) => {
                let message = e.to_string();
                eprintln!("vip-agent: error: {message}{}", from(&message));
                return ExitCode::FAILURE;
            }
        },
        Command::Manifest(m) => manifest(&m),
        Command::Status(args) => status(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.is::<Logged>() => ExitCode::FAILURE,
        Err(err) => {
            // Not eprintln!, which panics when stderr is gone.
            let _ = writeln!(std::io::stderr(), "vip-agent: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn logging(format: LogFormat) {
    // kube's client logs every failed request at ERROR, with no URL: the agent says what
    // failed itself (once per 30 s while the Lease API does not answer).
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube_client=off"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(|| LossyStderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// Standard error that drops what it cannot write. A log reader that goes away (a pipe
/// closed, a shipper restarted) must not stop the agent: on a failed write,
/// tracing-subscriber reports the failure with `eprintln!`, which panics on the same
/// closed pipe, and the agent died holding the VIP on `lo`, its program attached and its
/// pins in place.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// An error the agent already wrote to its JSON log: no plain line after it.
#[derive(Debug, thiserror::Error)]
#[error("already logged")]
struct Logged;

fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let json = cfg.log_format == LogFormat::Json;
    logging(cfg.log_format);
    for variable in config::unknown_variables(std::env::vars_os().filter_map(|(name, _)| name.into_string().ok())) {
        tracing::warn!(%variable, "no flag reads this variable: misspelled? (see --help for the VIP_ names)");
    }
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(vip_agent::agent::run(cfg)).map_err(anyhow::Error::from));
    match result {
        // With --log-format json a log shipper parses every line: the reason the agent
        // stopped is one more JSON line, not a plain one.
        Err(err) if json => {
            tracing::error!(error = %format!("{err:#}"), "vip-agent stopped on an error");
            Err(Logged.into())
        }
        other => other,
    }
}

fn manifest(m: &config::ManifestCommand) -> anyhow::Result<()> {
    print!("{}", vip_deploy::render(m.kind, &m.args)?);
    Ok(())
}

fn status(args: &config::StatusArgs) -> anyhow::Result<()> {
    let status = vip_agent::status::collect(&args.pin_path, args.metrics_addr)?;
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        OutputFormat::Table => print!("{}", vip_agent::status::render(&status)),
    }
    Ok(())
}
