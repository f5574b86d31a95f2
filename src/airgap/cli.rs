//! The `prefetch`, `export` and `import` commands: argument parsing, the run, the summary and
//! the exit code. Errors are one line naming the file, key or reference at fault.

use super::bundle;
use super::prefetch::{self, Display, Options, Platforms, Prefetched, Progress, human};
use super::source::Source;
use crate::config::Config;
use crate::error::Error;
use crate::oci::{ImageRef, PlatformSpec};
use crate::storage::Store;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

/// Which images, and how to fetch them (shared by `prefetch` and `export`).
#[derive(clap::Args, Debug)]
pub struct Selection {
    /// The mirror's configuration file (its upstreams and cache).
    #[arg(long)]
    pub config: PathBuf,
    /// Platforms to fetch from multi-platform images: os/arch[/variant], comma-separated
    /// (default: this machine's; for export, the platforms the cache holds, else this machine's).
    #[arg(long, value_delimiter = ',', conflicts_with = "all_platforms")]
    pub platform: Vec<String>,
    /// Fetch every platform of multi-platform images.
    #[arg(long)]
    pub all_platforms: bool,
    /// Blob fetches at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,
    /// Also fetch the referrers (signatures, SBOMs) of each image.
    #[arg(long)]
    pub with_referrers: bool,
    /// Read references from this file, one per line (# starts a comment).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Image references: nginx:1.27, ghcr.io/org/app@sha256:..., 127.0.0.1:5000/x/y:tag.
    pub images: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub selection: Selection,
    /// The bundle to write (a tar of an OCI image layout).
    #[arg(long)]
    pub output: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// The configuration file of the cache to load into.
    #[arg(long)]
    pub config: PathBuf,
    /// The bundle to load.
    pub bundle: PathBuf,
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("cachalot: {e}");
    ExitCode::FAILURE
}

/// Every error on a line of its own.
fn fail_all(errors: &[Error]) -> ExitCode {
    for e in errors {
        eprintln!("cachalot: {e}");
    }
    ExitCode::FAILURE
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Runtime::new()
        .map_err(|e| Error::Internal(format!("starting the runtime: {e}")))
}

/// The images named on the command line and in `--file`, every one checked before anything is
/// fetched: a typo is reported, not half-run, and every bad reference is, not only the first.
fn resolve(config: &Config, sel: &Selection) -> Result<Vec<ImageRef>, Vec<Error>> {
    let mut named: Vec<(String, String)> =
        sel.images.iter().map(|s| (s.clone(), s.clone())).collect();
    if let Some(file) = &sel.file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| vec![Error::Invalid(format!("{}: {e}", file.display()))])?;
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if !line.is_empty() {
                named.push((format!("{}:{}", file.display(), i + 1), line.to_owned()));
            }
        }
    }
    if named.is_empty() {
        return Err(vec![Error::Invalid(
            "no images given (name them, or use --file LIST)".into(),
        )]);
    }
    let mut images = Vec::new();
    let mut errors = Vec::new();
    for (at, s) in named {
        let checked = match ImageRef::parse(&s) {
            Ok(r) if config.upstream.iter().any(|u| u.name == r.registry) => Ok(r),
            Ok(r) => Err(Error::Invalid(format!(
                "{s:?}: registry {:?} is not configured (no [[upstream]] with name = {:?} in {})",
                r.registry,
                r.registry,
                sel.config.display()
            ))),
            Err(e) => Err(e.into()),
        };
        match checked {
            Ok(r) => {
                if !images.contains(&r) {
                    images.push(r)
                }
            }
            // A reference from a file is named by its line; one from the command line by itself.
            Err(e) if at != s => errors.push(e.context(at)),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(images)
    } else {
        Err(errors)
    }
}

/// The results of a prefetch run, per image.
type Results = Vec<(ImageRef, Result<Prefetched, Error>)>;

/// Loads the config and runs the selection's prefetch; prints per-image lines and a summary.
/// `Err` is a setup failure (every bad reference, or the one other cause); image failures are
/// in the results.
/// With `held_by_default` (export), no platform option means the platforms the cache holds
/// whole, or this machine's when it holds none.
async fn run_selection(
    config: &Config,
    sel: &Selection,
    held_by_default: bool,
) -> Result<(Arc<Source>, Results), Vec<Error>> {
    let platforms = if sel.all_platforms {
        Platforms::All
    } else if sel.platform.is_empty() && held_by_default {
        Platforms::Held(vec![PlatformSpec::host()])
    } else {
        Platforms::parse(&sel.platform).map_err(|e| vec![e.context("--platform")])?
    };
    let images = resolve(config, sel)?;
    let source = Source::open(config, |note| println!("{note}"))
        .await
        .map_err(|e| vec![e])?;
    let source = Arc::new(source);
    let opts = Options {
        platforms,
        jobs: sel.jobs as usize,
        with_referrers: sel.with_referrers,
    };
    let progress = Arc::new(Progress::default());
    let display = Display::start(progress.clone());
    let started = Instant::now();
    let results = prefetch::run(source.clone(), images, opts, progress.clone()).await;
    display.finish().await;
    for (image, r) in &results {
        match r {
            Ok(p) => println!(
                "ok    {image}  {}  ({} platform{}, {} blobs)",
                p.top.digest,
                p.platforms,
                if p.platforms == 1 { "" } else { "s" },
                p.blobs.len()
            ),
            Err(e) => println!("FAIL  {image}  {e}"),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let fetched = progress.fetched.load(std::sync::atomic::Ordering::Relaxed);
    let ok = results.iter().filter(|(_, r)| r.is_ok()).count();
    println!(
        "prefetched {ok} of {} images: {} blobs fetched ({} in {secs:.1}s, {}/s), {} already cached",
        results.len(),
        progress
            .blobs_fetched
            .load(std::sync::atomic::Ordering::Relaxed),
        human(fetched),
        human((fetched as f64 / secs.max(0.001)) as u64),
        progress
            .blobs_cached
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    Ok((source, results))
}

fn report_failures(results: &Results) -> bool {
    let failed: Vec<_> = results
        .iter()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| (i, e)))
        .collect();
    if failed.is_empty() {
        return false;
    }
    eprintln!("cachalot: {} image(s) failed:", failed.len());
    for (image, e) in failed {
        eprintln!("  {image}: {e}");
    }
    true
}

fn load(path: &Path) -> Result<Config, Error> {
    let c = Config::load(path)?;
    for u in &c.upstream {
        u.password()?;
    }
    Ok(c)
}

/// `cachalot prefetch`.
pub fn prefetch(sel: Selection) -> ExitCode {
    let config = match load(&sel.config) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(e),
    };
    match rt.block_on(run_selection(&config, &sel, false)) {
        Err(errors) => fail_all(&errors),
        Ok((_, results)) if report_failures(&results) => ExitCode::FAILURE,
        Ok(_) => ExitCode::SUCCESS,
    }
}

/// `cachalot export`: prefetch (which fetches what is missing, unless offline), then write the
/// bundle from the cache. Any failed image means no bundle.
pub fn export(args: ExportArgs) -> ExitCode {
    let config = match load(&args.selection.config) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(e),
    };
    let (source, results) = match rt.block_on(run_selection(&config, &args.selection, true)) {
        Ok(r) => r,
        Err(errors) => return fail_all(&errors),
    };
    if report_failures(&results) {
        return fail(format!(
            "{}: not written, because some images could not be fetched",
            args.output.display()
        ));
    }
    let images: Vec<Prefetched> = results.into_iter().filter_map(|(_, r)| r.ok()).collect();
    let root = source.root();
    let output = args.output.clone();
    let written = rt.block_on(async move {
        tokio::task::spawn_blocking(move || bundle::export(&root, &images, &output))
            .await
            .map_err(|e| Error::Internal(format!("export task: {e}")))?
    });
    match written {
        Ok(w) => {
            println!(
                "wrote {}: {} blobs, {}",
                args.output.display(),
                w.blobs,
                human(w.bytes)
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("export to {}: {e}", args.output.display())),
    }
}

/// `cachalot import`. Needs the cache to itself: a running server holds its metadata.
pub fn import(args: ImportArgs) -> ExitCode {
    let config = match load(&args.config) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let store = match Store::open_for_import(&config.cache.dir) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy => {
            return fail(format!(
                "cache.dir {}: in use by a running cachalot; stop it, import, then start it again",
                config.cache.dir.display()
            ));
        }
        Err(e) => return fail(format!("cache.dir {}: {e}", config.cache.dir.display())),
    };
    match bundle::import(&store, &config, &args.bundle) {
        Ok(i) => {
            for w in &i.warnings {
                eprintln!("cachalot: warning: {}: {w}", args.bundle.display());
            }
            for t in &i.tags {
                println!("tagged {t}");
            }
            println!(
                "imported {}: {} blobs ({} new, {}), {} manifests, {} tags",
                args.bundle.display(),
                i.blobs,
                i.new_blobs,
                human(i.bytes),
                i.manifests,
                i.tags.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("import rejected, nothing was loaded: {e}")),
    }
}
