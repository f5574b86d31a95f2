//! The `cachalot` command line: parse flags, load config, start telemetry, run.

#![forbid(unsafe_code)]

use cachalot::config::Config;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cachalot",
    version,
    about = "A pull-through caching proxy and mirror for OCI registries"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the mirror (on the built-in default without --config).
    Serve {
        /// The configuration file (TOML); config/cachalot.toml documents every key.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Never contact an upstream; serve only what is cached.
        #[arg(long)]
        offline: bool,
    },
    /// Parse and validate a config file and print the effective config.
    CheckConfig {
        /// The configuration file to check.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run one eviction pass over the cache and print what it removed.
    Gc {
        /// The configuration file of the cache.
        #[arg(long)]
        config: PathBuf,
        /// Print what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Re-hash every cached blob and manifest, quarantine what is damaged; exit 0 when nothing
    /// was, 1 when something was, 2 when it could not run (through the running server if it
    /// holds the cache).
    Verify {
        /// The configuration file of the cache.
        #[arg(long)]
        config: PathBuf,
    },
    /// Fetch images into the cache (through the running server if it holds the cache).
    Prefetch(cachalot::airgap::cli::Selection),
    /// Write images as an OCI image layout tar, fetching what is missing.
    Export(cachalot::airgap::cli::ExportArgs),
    /// Verify a bundle and load it into the cache.
    Import(cachalot::airgap::cli::ImportArgs),
    /// Print (or write) what a client needs to pull through the mirror.
    ClientConfig {
        /// The client to configure.
        #[arg(value_enum)]
        client: cachalot::client_config::Client,
        /// The mirror's base URL as the clients reach it, e.g. http://mirror:5000.
        #[arg(long)]
        mirror: String,
        /// Registries (upstream names) to configure, comma-separated; all of the config's when absent.
        #[arg(long, value_delimiter = ',')]
        registries: Vec<String>,
        /// The mirror's configuration file; the built-in default's upstreams when absent.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Do not verify the mirror's TLS certificate.
        #[arg(long)]
        insecure: bool,
        /// The CA certificate (PEM) that signed the mirror's, as a path on the client.
        #[arg(long)]
        ca_file: Option<String>,
        /// Write the files under this directory instead of printing them.
        #[arg(long)]
        output_dir: Option<PathBuf>,
    },
    /// Print a shell completion script.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Exit 0 when the server answers 200 on its health URL, else 1 (a container HEALTHCHECK
    /// without a shell or curl in the image).
    Healthcheck {
        /// The URL to GET (plain http://) [default: http://127.0.0.1:5000/healthz].
        #[arg(long, conflicts_with = "config")]
        url: Option<String>,
        /// Check the server this config file describes: /healthz on its server.listen port.
        #[arg(long)]
        config: Option<PathBuf>,
        /// How long the whole exchange may take, e.g. 5s or 500ms.
        #[arg(long, default_value = "5s")]
        timeout: cachalot::config::Dur,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => match check_credentials(&c).and_then(|()| check_auth(&c)) {
                Ok(warnings) => {
                    let budget = connection_budget_warning(&c);
                    for w in c.tls_warnings().into_iter().chain(warnings).chain(budget) {
                        eprintln!("cachalot: warning: {w}");
                    }
                    print!("{}", c.to_toml());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            },
            Err(e) => fail(e),
        },
        Command::Gc { config, dry_run } => match Config::load(&config) {
            Ok(c) => gc(&c, dry_run),
            Err(e) => fail(e),
        },
        Command::Verify { config } => cachalot::verify::cli(&config),
        Command::Prefetch(args) => cachalot::airgap::cli::prefetch(args),
        Command::Export(args) => cachalot::airgap::cli::export(args),
        Command::Import(args) => cachalot::airgap::cli::import(args),
        Command::ClientConfig {
            client,
            mirror,
            registries,
            config,
            insecure,
            ca_file,
            output_dir,
        } => {
            let config = match config {
                Some(path) => match Config::load(&path) {
                    Ok(c) => c,
                    Err(e) => return fail(e),
                },
                None => Config::builtin_default(),
            };
            let opts = match cachalot::client_config::parse_mirror(&mirror) {
                Ok(mirror) => cachalot::client_config::Options {
                    mirror,
                    registries,
                    insecure,
                    ca_file,
                },
                Err(e) => return fail(e),
            };
            match cachalot::client_config::render(client, &config, &opts) {
                Ok(out) => write_client_config(&out, output_dir.as_deref()),
                Err(e) => fail(e),
            }
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "cachalot", &mut script);
            emit(&script)
        }
        Command::Healthcheck {
            url,
            config,
            timeout,
        } => {
            let url = match (url, config) {
                (Some(url), _) => url,
                (None, Some(path)) => match Config::load(&path) {
                    Ok(c) => match health_url(&c) {
                        Ok(url) => url,
                        Err(e) => return fail(format!("healthcheck: {}: {e}", path.display())),
                    },
                    Err(e) => return fail(format!("healthcheck: {e}")),
                },
                (None, None) => "http://127.0.0.1:5000/healthz".to_owned(),
            };
            match probe_health(&url, timeout.0) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(format!("healthcheck: {url}: {e}")),
            }
        }
        Command::Serve { config, offline } => {
            let mut config = match config {
                Some(path) => match Config::load(&path) {
                    Ok(c) => c,
                    Err(e) => return fail(e),
                },
                None => Config::builtin_default(),
            };
            config.cache.offline |= offline;
            if let Err(e) = check_credentials(&config) {
                return fail(e);
            }
            if let Err(e) = cachalot::telemetry::init(&config.log) {
                return fail(e);
            }
            flush_logs_on_panic();
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => return fail(e),
            };
            let code = rt.block_on(serve(config));
            cachalot::telemetry::flush();
            // Tasks still running end with the runtime, and may log as they go.
            drop(rt);
            cachalot::telemetry::flush();
            code
        }
    }
}

/// Loads the htpasswd file as `serve` would (an error names it) and returns the warnings about
/// `[auth]` and `[[access]]`: rules naming unknown users, Basic credentials over plain HTTP.
fn check_auth(c: &Config) -> Result<Vec<String>, cachalot::config::ConfigError> {
    let htpasswd = match c.auth.as_ref().and_then(|a| a.htpasswd.as_ref()) {
        Some(p) => {
            Some(cachalot::auth::load_htpasswd(p).map_err(cachalot::config::ConfigError::Invalid)?)
        }
        None => None,
    };
    Ok(cachalot::auth::warnings(c, htpasswd.as_ref()))
}

/// Prints the snippets (each under a comment naming its path), or writes them under `dir`.
fn write_client_config(
    out: &cachalot::client_config::Output,
    dir: Option<&std::path::Path>,
) -> ExitCode {
    match dir {
        None => {
            let text: String = out
                .snippets
                .iter()
                .map(|s| format!("# {}\n{}\n", s.path, s.content))
                .collect();
            if emit(text.as_bytes()) != ExitCode::SUCCESS {
                return ExitCode::FAILURE;
            }
        }
        Some(dir) => {
            for s in &out.snippets {
                let path = dir.join(&s.relative);
                let written = path
                    .parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|()| std::fs::write(&path, &s.content));
                if let Err(e) = written {
                    return fail(format!(
                        "--output-dir: cannot write {}: {e}",
                        path.display()
                    ));
                }
                println!("wrote {} (for {})", path.display(), s.path);
            }
        }
    }
    for n in &out.notes {
        eprintln!("cachalot: note: {n}");
    }
    ExitCode::SUCCESS
}

/// Writes `bytes` to stdout; a reader that went away (`| head`) is not an error worth a panic.
fn emit(bytes: &[u8]) -> ExitCode {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => fail(format!("writing to stdout: {e}")),
    }
}

/// Reads every configured password and TLS file now, and finds every credential helper and
/// command (without running them), so a missing variable, file or program fails at start (and
/// in `check-config`) with its key named, not at the first pull.
fn check_credentials(c: &Config) -> Result<(), cachalot::config::ConfigError> {
    if let (Some(cert), Some(key)) = (&c.server.tls_cert, &c.server.tls_key) {
        cachalot::server::check_tls_pair(cert, key)
            .map_err(cachalot::config::ConfigError::Invalid)?;
    }
    for u in &c.upstream {
        u.password()?;
        u.check_credential_program()?;
        cachalot::upstream::tls::client_config(u)?;
    }
    if c.storage.backend == cachalot::config::Backend::S3 {
        c.storage.credentials()?;
    }
    if let Some(cluster) = &c.cluster {
        cluster.secret()?;
    }
    Ok(())
}

async fn serve(config: Config) -> ExitCode {
    // SIGHUP means "reload" (the htpasswd file and the server certificate listen for it
    // themselves); its default action would end the process, so it is taken over before
    // anything else, whatever the config reloads.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    cachalot::server::raise_open_files_limit();
    let drain_timeout = config.server.drain_timeout.0;
    let server = match cachalot::server::spawn(config).await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    if let Some(mut hup) = hup {
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP received: files with changes are reloaded, the rest kept");
            }
        });
    }
    shutdown_signal().await;
    tracing::info!(
        drain_timeout = ?drain_timeout,
        "shutting down: new connections are refused, responses in flight run on (a second SIGTERM or SIGINT exits at once)"
    );
    tokio::select! {
        () = server.shutdown() => ExitCode::SUCCESS,
        () = shutdown_signal() => {
            tracing::warn!("second signal: exiting without waiting for the responses in flight");
            // At once, as asked: nothing left running may hold the exit up. What was not
            // committed is lost as a crash would lose it (the cache stays consistent).
            cachalot::telemetry::flush();
            std::process::exit(1)
        }
    }
}

/// A warning when `server.max_connections` exceeds what the open-file limit affords (judged at
/// the hard limit, to which `serve` raises the soft one).
fn connection_budget_warning(c: &Config) -> Option<String> {
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    let upstreams = cachalot::server::upstream_connection_limits(c);
    let budget = cachalot::server::connection_budget_for(hard, upstreams)?;
    (c.server.max_connections > budget).then(|| {
        format!(
            "server.max_connections = {} exceeds the {budget} connections the open-file limit here \
             affords ({} files; each connection may hold a socket and a cache file); it will be \
             lowered to {budget}: raise the limit (ulimit -Hn, systemd LimitNOFILE) to serve more",
            c.server.max_connections,
            hard.unwrap_or(0),
        )
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

fn gc(config: &Config, dry_run: bool) -> ExitCode {
    use cachalot::storage::{Store, evict};
    let store = match Store::open(&config.cache.dir) {
        Ok(s) => s,
        Err(e) => {
            return fail(format!(
                "cache.dir {}: {e} (a running server holds the cache and evicts in the background)",
                config.cache.dir.display()
            ));
        }
    };
    let report = match evict::run_pass(&store, &config.eviction_policy(), dry_run) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let verb = if dry_run { "would evict" } else { "evicted" };
    println!(
        "{verb} {} objects, {} bytes (size: {} bytes, unused: {} bytes); cache {} -> {} bytes, bound {}",
        report.evicted.len(),
        report.bytes(None),
        report.bytes(Some(evict::Reason::Size)),
        report.bytes(Some(evict::Reason::Unused)),
        report.before,
        report.after,
        config.cache.max_size,
    );
    for (repo, bytes, count) in report.top_repositories(10) {
        println!("  {repo}: {count} objects, {bytes} bytes");
    }
    ExitCode::SUCCESS
}

/// `/healthz` on the config's listener, reached over loopback when it listens on every address
/// (a container's HEALTHCHECK runs beside the server, whatever port the config chose).
fn health_url(c: &Config) -> Result<String, &'static str> {
    if c.server.tls_cert.is_some() {
        return Err(
            "server.tls_cert is set, so the listener speaks HTTPS, which healthcheck does not; pass --url to a plain listener",
        );
    }
    let mut addr = c.server.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok(format!("http://{addr}/healthz"))
}

/// One `GET url` over plain HTTP/1.1, by hand: the check runs every few seconds in every
/// container, so it should not start a runtime and a connection pool for one status line.
/// Ok only for a 200 whose status line arrives within `limit`.
fn probe_health(url: &str, limit: std::time::Duration) -> Result<(), String> {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let u = url::Url::parse(url).map_err(|e| format!("--url is not a URL: {e}"))?;
    if u.scheme() != "http" {
        return Err("--url must be http:// (point it at a plain listener)".into());
    }
    let deadline = Instant::now() + limit;
    // A zero timeout means "none" to the socket calls; a spent deadline must still time out.
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let addrs = u
        .socket_addrs(|| Some(80))
        .map_err(|e| format!("cannot resolve the host: {e}"))?;
    let mut stream = None;
    let mut last = String::from("the host has no address");
    for a in addrs {
        match std::net::TcpStream::connect_timeout(&a, left()) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = format!("connect to {a}: {e}"),
        }
    }
    let mut s = stream.ok_or(last)?;
    let host = match u.port() {
        Some(p) => format!("{}:{p}", u.host_str().unwrap_or_default()),
        None => u.host_str().unwrap_or_default().to_owned(),
    };
    let target = match u.query() {
        Some(q) => format!("{}?{q}", u.path()),
        None => u.path().to_owned(),
    };
    let timed_out = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("no answer within {}", cachalot::config::Dur(limit))
        }
        _ => e.to_string(),
    };
    s.set_write_timeout(Some(left())).map_err(timed_out)?;
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: cachalot-healthcheck\r\nConnection: close\r\n\r\n"
    )
    .map_err(timed_out)?;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
        s.set_read_timeout(Some(left())).map_err(timed_out)?;
        match s.read(&mut buf).map_err(timed_out)? {
            0 => break,
            n => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default();
    match line.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        Some(code) if line.starts_with("HTTP/") => Err(format!("answered {code}, not 200")),
        _ => Err(format!("no HTTP status line in the answer ({line:?})")),
    }
}

/// Log lines leave a few milliseconds late (`log_writer`): the ones written before a panic go
/// out ahead of its message, and are not lost if the panic ends the process.
fn flush_logs_on_panic() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // The writer's own thread would wait on itself.
        if std::thread::current().name() != Some("cachalot-log") {
            cachalot::telemetry::flush();
        }
        previous(info);
    }));
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    // After the log's lines so far, not before them.
    cachalot::telemetry::flush();
    eprintln!("cachalot: {e}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_url_follows_the_listen_port_over_loopback() {
        let url = |listen: &str| {
            let c = Config::from_toml_str(&format!("[server]\nlisten = {listen:?}\n")).unwrap();
            health_url(&c).unwrap()
        };
        assert_eq!(url("0.0.0.0:5123"), "http://127.0.0.1:5123/healthz");
        assert_eq!(url("[::]:5123"), "http://[::1]:5123/healthz");
        assert_eq!(url("10.1.2.3:80"), "http://10.1.2.3:80/healthz");
    }
}
