//! Prefetch: resolve each image, pick the wanted platforms from its index, and make sure every
//! manifest, config and layer is cached, with bounded concurrency and live progress.

use super::source::{Fetched, Source};
use crate::error::{Error, UpstreamFault};
use crate::oci::descriptor::{self, Descriptor, Refs};
use crate::oci::{Digest, ErrorCode, ImageRef, PlatformSpec, Reference};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::{BTreeMap, HashSet};
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, oneshot};

/// Which platforms of a multi-platform image to fetch.
#[derive(Clone, Debug)]
pub enum Platforms {
    All,
    Only(Vec<PlatformSpec>),
    /// Every platform whose manifest and blobs the cache already holds, or these when it holds
    /// none: what `export` writes by default, so that an image prefetched with every platform
    /// is exported whole without asking for them again.
    Held(Vec<PlatformSpec>),
}

impl Platforms {
    /// From `--platform a,b` / `platforms = [...]` (`all` meaning every platform); none given
    /// means this machine's platform, as clients default.
    pub fn parse(list: &[String]) -> Result<Platforms, Error> {
        let items: Vec<&str> = list
            .iter()
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if items.contains(&"all") {
            return Ok(Platforms::All);
        }
        if items.is_empty() {
            return Ok(Platforms::Only(vec![PlatformSpec::host()]));
        }
        items
            .into_iter()
            .map(PlatformSpec::parse)
            .collect::<Result<_, _>>()
            .map(Platforms::Only)
            .map_err(Error::from)
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub platforms: Platforms,
    /// Blob fetches at once.
    pub jobs: usize,
    pub with_referrers: bool,
}

/// What one image turned out to be, everything in it now cached.
#[derive(Clone, Debug)]
pub struct Prefetched {
    pub image: ImageRef,
    /// The top-level index or manifest.
    pub top: Descriptor,
    /// Every manifest walked (top, selected platforms, referrers), with media types.
    pub manifests: BTreeMap<Digest, (String, u64)>,
    /// Configs and layers.
    pub blobs: BTreeMap<Digest, u64>,
    /// Referrer manifests found (also in `manifests`).
    pub referrers: Vec<Descriptor>,
    pub platforms: usize,
}

/// Counters shared by every image of a run, read by the display.
#[derive(Default)]
pub struct Progress {
    /// Bytes of blobs that were not cached when first seen.
    pub to_fetch: AtomicU64,
    pub fetched: AtomicU64,
    pub blobs_fetched: AtomicU64,
    pub blobs_cached: AtomicU64,
    pub images_done: AtomicU64,
    pub images_total: AtomicU64,
}

/// Runs prefetch over `images`, each result in input order. Never fails as a whole: an image
/// that fails is reported as such (the error says which manifest or blob), and what it fetched
/// stays cached.
pub async fn run(
    source: Arc<Source>,
    images: Vec<ImageRef>,
    opts: Options,
    progress: Arc<Progress>,
) -> Vec<(ImageRef, Result<Prefetched, Error>)> {
    progress
        .images_total
        .fetch_add(images.len() as u64, Ordering::Relaxed);
    let sem = Arc::new(Semaphore::new(opts.jobs.max(1)));
    let mut tasks = Vec::new();
    for image in images {
        let (source, opts, sem, progress) =
            (source.clone(), opts.clone(), sem.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let r = one(&source, &image, &opts, &sem, &progress).await;
            progress.images_done.fetch_add(1, Ordering::Relaxed);
            (image, r)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        match t.await {
            Ok(r) => out.push(r),
            Err(e) => tracing::error!(error = %e, "prefetch task failed"),
        }
    }
    out
}

fn descriptor_of(m: &Fetched) -> Descriptor {
    Descriptor {
        media_type: m.media_type.clone(),
        digest: m.digest.clone(),
        size: m.bytes.len() as u64,
        platform: None,
        annotations: BTreeMap::new(),
    }
}

async fn one(
    source: &Source,
    image: &ImageRef,
    opts: &Options,
    sem: &Semaphore,
    progress: &Progress,
) -> Result<Prefetched, Error> {
    let (up, repo) = (image.registry.as_str(), &image.repo);
    let top = {
        let _permit = permit(sem).await?;
        source
            .manifest(up, repo, &image.reference)
            .await
            .map_err(|e| e.context("manifest"))?
    };
    let mut out = Prefetched {
        image: image.clone(),
        top: descriptor_of(&top),
        manifests: BTreeMap::new(),
        blobs: BTreeMap::new(),
        referrers: Vec::new(),
        platforms: 0,
    };
    // (manifest, is a referrer): referrers of referrers are not followed.
    let mut queue = vec![(top, false)];
    let mut seen = HashSet::new();
    while let Some((m, is_referrer)) = queue.pop() {
        if !seen.insert(m.digest.clone()) {
            continue;
        }
        out.manifests.insert(
            m.digest.clone(),
            (m.media_type.clone(), m.bytes.len() as u64),
        );
        let refs = descriptor::parse_refs(&m.media_type, &m.bytes).map_err(|e| {
            Error::upstream(
                up,
                UpstreamFault::Protocol(format!("manifest {}: {e}", m.digest)),
            )
        })?;
        match refs {
            Refs::Index(children) => {
                let chosen = match &opts.platforms {
                    Platforms::Held(specs) => held(source, image, &children, specs, sem).await,
                    other => select(&children, other)
                        .map(|c| c.into_iter().map(|d| (d, None)).collect::<Vec<_>>()),
                }
                .map_err(|e| e.context(format!("index {}", m.digest)))?;
                for (c, fetched) in chosen {
                    let child = match fetched {
                        Some(child) => child,
                        None => fetch_manifest(source, image, &c, sem).await?,
                    };
                    out.platforms += 1;
                    queue.push((child, is_referrer));
                }
            }
            Refs::Image { config, layers } => {
                if m.digest == out.top.digest {
                    out.platforms = 1;
                }
                for d in std::iter::once(config).chain(layers) {
                    out.blobs.insert(d.digest, d.size);
                }
            }
        }
        if opts.with_referrers && !is_referrer {
            let list = source
                .referrers(up, repo, &m.digest)
                .await
                .map_err(|e| e.context(format!("referrers of {}", m.digest)))?;
            for r in list {
                let child = fetch_manifest(source, image, &r, sem).await?;
                out.referrers.push(r);
                queue.push((child, true));
            }
        }
    }
    fetch_blobs(source, image, &out.blobs, sem, progress).await?;
    Ok(out)
}

async fn fetch_manifest(
    source: &Source,
    image: &ImageRef,
    d: &Descriptor,
    sem: &Semaphore,
) -> Result<Fetched, Error> {
    let _permit = permit(sem).await?;
    let m = source
        .manifest(
            &image.registry,
            &image.repo,
            &Reference::Digest(d.digest.clone()),
        )
        .await
        .map_err(|e| e.context(format!("manifest {}", d.digest)))?;
    if m.bytes.len() as u64 != d.size {
        return Err(Error::upstream(
            &image.registry,
            UpstreamFault::Protocol(format!(
                "manifest {}: {} bytes, but its descriptor says {}",
                d.digest,
                m.bytes.len(),
                d.size
            )),
        ));
    }
    Ok(m)
}

/// A fetch slot. The semaphore is never closed, so failing is a bug, not a condition.
async fn permit(sem: &Semaphore) -> Result<tokio::sync::SemaphorePermit<'_>, Error> {
    sem.acquire()
        .await
        .map_err(|e| Error::Internal(format!("prefetch: {e}")))
}

/// The entries the cache holds whole (the manifest and each blob it names), with their
/// manifests already read; when it holds none, the entries `specs` select, to be fetched.
/// Fails only when neither finds anything, with `select`'s error.
async fn held(
    source: &Source,
    image: &ImageRef,
    children: &[Descriptor],
    specs: &[PlatformSpec],
    sem: &Semaphore,
) -> Result<Vec<(Descriptor, Option<Fetched>)>, Error> {
    let mut chosen = Vec::new();
    for c in children {
        if !source.is_cached(&c.digest) {
            continue;
        }
        let m = fetch_manifest(source, image, c, sem).await?;
        let whole = match descriptor::parse_refs(&m.media_type, &m.bytes) {
            Ok(Refs::Image { config, layers }) => std::iter::once(&config)
                .chain(&layers)
                .all(|d| source.is_cached(&d.digest)),
            // A nested index or an unreadable manifest is not a platform the cache holds whole.
            _ => false,
        };
        if whole {
            chosen.push((c.clone(), Some(m)));
        }
    }
    if !chosen.is_empty() {
        return Ok(chosen);
    }
    let wanted = select(children, &Platforms::Only(specs.to_vec()))?;
    Ok(wanted.into_iter().map(|d| (d, None)).collect())
}

/// The index entries the platform selection wants. When nothing matches, the platforms asked
/// for are unknown to the image (`MANIFEST_UNKNOWN`), and the error names what it offers.
fn select(children: &[Descriptor], platforms: &Platforms) -> Result<Vec<Descriptor>, Error> {
    let specs = match platforms {
        Platforms::All => return Ok(children.to_vec()),
        Platforms::Only(specs) | Platforms::Held(specs) => specs,
    };
    let chosen: Vec<Descriptor> = children
        .iter()
        .filter(|c| {
            c.platform.as_ref().is_some_and(|p| {
                specs
                    .iter()
                    .any(|s| s.matches(&p.os, &p.architecture, p.variant.as_deref()))
            })
        })
        .cloned()
        .collect();
    if chosen.is_empty() {
        let offered: Vec<String> = children
            .iter()
            .filter_map(|c| c.platform.as_ref().map(|p| p.to_string()))
            .collect();
        let wanted: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
        return Err(Error::client(
            ErrorCode::ManifestUnknown,
            format!(
                "no manifest for {} (it has {})",
                wanted.join(", "),
                if offered.is_empty() {
                    "no platforms".to_owned()
                } else {
                    offered.join(", ")
                }
            ),
        ));
    }
    Ok(chosen)
}

async fn fetch_blobs(
    source: &Source,
    image: &ImageRef,
    blobs: &BTreeMap<Digest, u64>,
    sem: &Semaphore,
    progress: &Progress,
) -> Result<(), Error> {
    let mut pending = Vec::new();
    for (d, size) in blobs {
        if source.is_cached(d) {
            progress.blobs_cached.fetch_add(1, Ordering::Relaxed);
        } else {
            progress.to_fetch.fetch_add(*size, Ordering::Relaxed);
            pending.push((d, *size));
        }
    }
    let fetches = pending.into_iter().map(|(d, size)| async move {
        let _permit = permit(sem).await.map_err(|e| (d, e))?;
        let mut reported = 0u64;
        let got = source
            .blob(&image.registry, &image.repo, d, |n| {
                let n = n.min(size);
                if n > reported {
                    progress.fetched.fetch_add(n - reported, Ordering::Relaxed);
                    reported = n;
                }
            })
            .await;
        // A failed or short fetch leaves the total as it was expected to be; catch the bar up
        // so the rate and ETA stay honest for the rest.
        if size > reported {
            progress
                .fetched
                .fetch_add(size - reported, Ordering::Relaxed);
        }
        match got {
            Ok(_) => {
                progress.blobs_fetched.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err((d, e)),
        }
    });
    let mut errors = futures_util::future::join_all(fetches)
        .await
        .into_iter()
        .filter_map(Result::err);
    let Some((d, first)) = errors.next() else {
        return Ok(());
    };
    match errors.count() {
        0 => Err(first.context(format!("blob {d}"))),
        more => Err(first.context(format!("blob {d} (and {more} more blobs failed)"))),
    }
}

// === display ===

/// Human sizes: `12.3 MiB`.
pub fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn eta(secs: f64) -> String {
    if !secs.is_finite() {
        return "--".into();
    }
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

impl Progress {
    /// One status line: images, bytes, rate, ETA.
    pub fn line(&self, elapsed: Duration) -> String {
        let done = self.fetched.load(Ordering::Relaxed);
        let total = self.to_fetch.load(Ordering::Relaxed).max(done);
        let rate = done as f64 / elapsed.as_secs_f64().max(0.001);
        let left = (total - done) as f64 / rate;
        format!(
            "images {}/{}  fetched {} of {}  {}/s  ETA {}",
            self.images_done.load(Ordering::Relaxed),
            self.images_total.load(Ordering::Relaxed),
            human(done),
            human(total),
            human(rate as u64),
            if done == total {
                "0m00s".into()
            } else {
                eta(left)
            },
        )
    }
}

/// Prints progress until finished: a bar on a terminal, plain lines every few seconds otherwise
/// (logs, CI).
pub struct Display {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub tty: bool,
}

impl Display {
    pub fn start(progress: Arc<Progress>) -> Display {
        let tty = std::io::stdout().is_terminal();
        let (stop, stopped) = oneshot::channel();
        let task = if tty {
            tokio::spawn(draw_bar(progress, stopped))
        } else {
            tokio::spawn(print_lines(progress, stopped))
        };
        Display {
            stop: Some(stop),
            task: Some(task),
            tty,
        }
    }

    /// Stops the display and clears its bar.
    pub async fn finish(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// On a terminal: indicatif draws the bar, its rate and ETA; this copies the counters in.
async fn draw_bar(progress: Arc<Progress>, mut stopped: oneshot::Receiver<()>) {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
    bar.set_style(bar_style());
    loop {
        let done = progress.fetched.load(Ordering::Relaxed);
        bar.set_length(progress.to_fetch.load(Ordering::Relaxed).max(done));
        bar.set_position(done);
        bar.set_message(format!(
            "{}/{}",
            progress.images_done.load(Ordering::Relaxed),
            progress.images_total.load(Ordering::Relaxed)
        ));
        tokio::select! {
            _ = &mut stopped => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    bar.finish_and_clear();
}

/// The bar's look: the same facts as [`Progress::line`], in the same order.
fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "images {msg}  [{bar:30}] {binary_bytes} of {binary_total_bytes}  \
         {binary_bytes_per_sec}  ETA {eta}",
    )
    .expect("the template is valid (a test builds it)")
    .progress_chars("=> ")
}

/// Not a terminal: a [`Progress::line`] every few seconds, only when it changed, so a log is
/// not flooded and can be read (and parsed) line by line.
async fn print_lines(progress: Arc<Progress>, mut stopped: oneshot::Receiver<()>) {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        let line = progress.line(started.elapsed());
        if line != last {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        last = line;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::descriptor::Platform;

    fn d(os: &str, arch: &str) -> Descriptor {
        Descriptor {
            media_type: crate::oci::manifest::OCI_MANIFEST.into(),
            digest: Digest::sha256_of(format!("{os}/{arch}").as_bytes()),
            size: 1,
            platform: Some(Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: None,
            }),
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn platform_selection() {
        let idx = [
            d("linux", "amd64"),
            d("linux", "arm64"),
            d("unknown", "unknown"),
        ];
        let only = Platforms::parse(&["linux/arm64".into()]).unwrap();
        let got = select(&idx, &only).unwrap();
        assert_eq!(got, vec![idx[1].clone()]);
        assert_eq!(select(&idx, &Platforms::All).unwrap().len(), 3);
        let e = select(&idx, &Platforms::parse(&["linux/s390x".into()]).unwrap()).unwrap_err();
        assert_eq!(
            e.to_oci(ErrorCode::NameUnknown).code,
            ErrorCode::ManifestUnknown
        );
        let e = e.to_string();
        assert!(
            e.contains("linux/s390x") && e.contains("linux/amd64"),
            "{e}"
        );
        assert!(matches!(
            Platforms::parse(&["linux/amd64,all".into()]).unwrap(),
            Platforms::All
        ));
        assert!(Platforms::parse(&["linux".into()]).is_err());
    }

    #[test]
    fn progress_line() {
        let p = Progress::default();
        p.to_fetch.store(4 << 20, Ordering::Relaxed);
        p.fetched.store(1 << 20, Ordering::Relaxed);
        p.images_total.store(2, Ordering::Relaxed);
        let line = p.line(Duration::from_secs(1));
        assert!(line.contains("1.0 MiB of 4.0 MiB"), "{line}");
        assert!(line.contains("1.0 MiB/s"), "{line}");
        assert!(line.contains("ETA 0m03s"), "{line}");
        assert_eq!(human(1536), "1.5 KiB");
        // The terminal's bar parses its template.
        let _ = bar_style();
    }
}
