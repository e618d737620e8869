//! The `drctl` binary: parse, set up logging and signals, dispatch, map errors to exit codes.

use clap::Parser;
use drctl::cancel::Cancel;
use drctl::cli::ABORT_RECOVERY;
use drctl::cli::{json_line, Cli};

/// Whether the command line is `wal fetch`'s, which runs as PostgreSQL's restore_command:
/// PostgreSQL takes an exit status below 126 as "not archived" and ends recovery there.
fn is_wal_fetch() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2).any(|w| w[0] == "wal" && w[1] == "fetch")
}

fn main() {
    // Any failure of `wal fetch`, a bad argument or a panic too, stops recovery.
    let fetching = is_wal_fetch();
    if fetching {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            report(info);
            std::process::exit(ABORT_RECOVERY);
        }));
    }
    let cli = Cli::try_parse().unwrap_or_else(|e| {
        if fetching && e.use_stderr() {
            let _ = e.print();
            std::process::exit(ABORT_RECOVERY);
        }
        e.exit()
    });
    let filter = std::env::var("DRCTL_LOG").unwrap_or_else(|_| {
        match cli.global.verbose {
            0 => "warn",
            1 => "info",
            _ => "debug",
        }
        .to_owned()
    });
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    if cli.global.json {
        subscriber.json().init();
    } else {
        subscriber.init();
    }
    let json = cli.global.json;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let cancel = Cancel::new();
    let result = runtime.block_on(async {
        let c = cancel.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            for _ in 0..2 {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                if c.is_cancelled() {
                    eprintln!("drctl: interrupted again, exiting now");
                    drctl::cancel::before_forced_exit();
                    std::process::exit(130);
                }
                eprintln!("drctl: stopping (interrupt again to exit at once)");
                c.cancel();
            }
        });
        drctl::cli::run(cli, cancel).await
    });
    // Blocking pipeline threads stop on their own once cancelled; don't wait for them here.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    if let Err(e) = result {
        if json {
            let v = serde_json::json!({
                "kind": e.kind().as_str(),
                "message": e.message(),
                "hint": e.guidance(),
                "retryable": e.is_retryable(),
                "exit_code": e.exit_code(),
            });
            println!("{}", json_line("error", &v));
        }
        eprintln!("drctl: error: {}", e.message());
        if let Some(h) = e.guidance() {
            eprintln!("drctl: hint: {h}");
        }
        std::process::exit(e.exit_code());
    }
}
