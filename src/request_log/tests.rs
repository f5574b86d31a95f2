//! The request line written here against the fmt layer's own, byte for byte, in both formats.

use super::*;
use crate::config::LogFormat;
use crate::telemetry;
use std::cell::Cell;
use std::sync::Arc;
use tracing_subscriber::EnvFilter;

thread_local! {
    /// Request lines written by [`RequestLines`] itself on this thread.
    pub(super) static FAST_LINES: Cell<u64> = const { Cell::new(0) };
}

#[derive(Clone, Default)]
struct Buf(Arc<parking_lot::Mutex<Vec<u8>>>);

impl std::io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Buf {
    type Writer = Buf;
    fn make_writer(&'a self) -> Buf {
        self.clone()
    }
}

/// The subscriber as it was before this module: the fmt layer alone.
fn reference(format: LogFormat, level: &str, w: Buf) -> Box<dyn Subscriber + Send + Sync> {
    let b = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(level))
        .with_target(false)
        .with_ansi(false)
        .with_writer(w);
    match format {
        LogFormat::Text => Box::new(b.finish()),
        LogFormat::Json => Box::new(b.json().flatten_event(true).finish()),
    }
}

/// What `scenario` logs through the shipped subscriber and through the reference, and how many
/// request lines the shipped one wrote itself.
fn both(format: LogFormat, level: &str, scenario: impl Fn()) -> (String, String, u64) {
    let (ours, theirs) = (Buf::default(), Buf::default());
    let before = FAST_LINES.with(Cell::get);
    tracing::subscriber::with_default(
        telemetry::subscriber(format, EnvFilter::new(level), false, ours.clone()),
        &scenario,
    );
    let fast = FAST_LINES.with(Cell::get) - before;
    tracing::subscriber::with_default(reference(format, level, theirs.clone()), &scenario);
    let text = |b: Buf| String::from_utf8(b.0.lock().clone()).unwrap();
    (text(ours), text(theirs), fast)
}

/// The line with its timestamp (the clock moved between the two runs) replaced, after checking
/// it has the fmt layer's shape, `2026-12-03T03:32:33.835881Z`.
fn masked(line: &str) -> String {
    let at = if line.starts_with('{') {
        "{\"timestamp\":\"".len()
    } else {
        0
    };
    let ts = &line[at..at + 27];
    let shape: String = ts
        .chars()
        .map(|c| if c.is_ascii_digit() { '9' } else { c })
        .collect();
    assert_eq!(shape, "9999-99-99T99:99:99.999999Z", "{line}");
    format!("{}<time>{}", &line[..at], &line[at + 27..])
}

fn assert_same(ours: &str, theirs: &str) {
    assert!(!theirs.is_empty(), "the scenario logged nothing");
    let ours: Vec<String> = ours.lines().map(masked).collect();
    let theirs: Vec<String> = theirs.lines().map(masked).collect();
    assert_eq!(ours, theirs);
}

const AWKWARD_USER: &str = "o\"brien\\\n INFO request{user=\"admin\"}: forged\t\u{1b}[31m\u{7f}é";

/// A request that records every field, with a user name that would forge a line if it were
/// written as it came, and a digest recorded through `Display`.
fn full_request(duration_ms: f64) {
    let span = telemetry::request_span(&http::Method::GET, "manifest");
    telemetry::record_user(&span, AWKWARD_USER);
    span.in_scope(|| {
        telemetry::record_target("docker.io", "library/alp\"ine");
        telemetry::record_cache("hit");
    });
    telemetry::record_digest(&span, &"sha256:0123abcd");
    crate::http::log::line(&span, 200, 397, duration_ms, true);
}

#[test]
fn the_request_line_is_the_fmt_layers_byte_for_byte_in_both_formats() {
    for duration_ms in [
        1.426163,
        0.0,
        816.83672,
        12345.0,
        0.00001234,
        3e17,
        694952942135688.3,
    ] {
        for format in [LogFormat::Text, LogFormat::Json] {
            let (ours, theirs, fast) = both(format, "info", || full_request(duration_ms));
            assert_eq!(fast, 1, "{format:?}: the line went the fmt layer's way");
            assert_same(&ours, &theirs);
            assert_eq!(ours.lines().count(), 1, "{ours}");
        }
    }
}

#[test]
fn a_user_name_cannot_forge_a_line_or_a_field() {
    let (text, _, _) = both(LogFormat::Text, "info", || full_request(1.5));
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "a terminal escape reached the log: {text:?}"
    );
    let (json, _, _) = both(LogFormat::Json, "info", || full_request(1.5));
    let v: serde_json::Value = serde_json::from_str(json.trim_end()).unwrap();
    assert_eq!(v["span"]["user"], AWKWARD_USER);
    assert_eq!(v["span"]["repo"], "library/alp\"ine");
    assert_eq!(v["spans"], serde_json::json!([]));
    assert_eq!(v["duration_ms"], 1.5);
}

#[test]
fn other_events_in_a_request_carry_its_fields_as_before() {
    let scenario = || {
        let span = telemetry::request_span(&http::Method::HEAD, "blob");
        telemetry::record_user(&span, "anonymous");
        span.in_scope(|| {
            telemetry::record_target("ghcr.io", "org/app");
            tracing::warn!(error = "upstream said \"no\"", "a warning in the request");
            // Recorded after the fmt layer was handed the fields: both keep it.
            telemetry::record_cache("miss");
            let child = tracing::info_span!("fill", digest = "sha256:beef");
            child.in_scope(|| tracing::info!(bytes = 5u64, "in a child span"));
            // Twice: the text shows both, JSON the last.
            telemetry::record_cache("coalesced");
            // The line written while the request span is entered: JSON lists it in "spans".
            crate::http::log::line(&span, 206, 5, 0.25, false);
        });
        tracing::error!("outside any request");
    };
    for format in [LogFormat::Text, LogFormat::Json] {
        let (ours, theirs, fast) = both(format, "info", scenario);
        assert_eq!(fast, 1, "{format:?}");
        assert_same(&ours, &theirs);
        assert_eq!(ours.lines().count(), 4, "{ours}");
    }
}

/// Events of one request on several threads at once (a fill's task and the request's): each
/// waits for the fields to be handed to the fmt layer, which never sees the span without them.
#[test]
fn events_on_other_threads_wait_for_the_fields_to_be_handed_over() {
    for format in [LogFormat::Text, LogFormat::Json] {
        let run = |dispatch: tracing::Dispatch| {
            for i in 0..100 {
                let span = tracing::dispatcher::with_default(&dispatch, || {
                    let span = telemetry::request_span(&http::Method::GET, "blob");
                    telemetry::record_user(&span, "u");
                    span
                });
                let go = std::sync::Barrier::new(4);
                std::thread::scope(|s| {
                    for t in 0..4 {
                        let (dispatch, span, go) = (&dispatch, &span, &go);
                        s.spawn(move || {
                            tracing::dispatcher::with_default(dispatch, || {
                                go.wait();
                                if t == 0 {
                                    telemetry::record_digest(span, &format_args!("sha256:{i}"));
                                }
                                tracing::info!(parent: span, t, "from a thread");
                            })
                        });
                    }
                });
            }
        };
        let (ours, theirs) = (Buf::default(), Buf::default());
        run(tracing::Dispatch::new(telemetry::subscriber(
            format,
            EnvFilter::new("info"),
            false,
            ours.clone(),
        )));
        run(tracing::Dispatch::new(reference(
            format,
            "info",
            theirs.clone(),
        )));
        // The threads' order, and whether the digest came before an event, vary: without the
        // digest, every line is one of the four the fmt layer alone writes.
        let lines = |b: &Buf| -> std::collections::BTreeSet<String> {
            let text = String::from_utf8(b.0.lock().clone()).unwrap();
            assert_eq!(text.lines().count(), 400);
            text.lines().map(|l| without_digest(&masked(l))).collect()
        };
        let (ours, theirs) = (lines(&ours), lines(&theirs));
        assert_eq!(theirs.len(), 4, "{theirs:#?}");
        assert_eq!(ours, theirs);
    }
}

/// `line` without the digest field, text or JSON, and its number.
fn without_digest(line: &str) -> String {
    for (field, after) in [(" digest=sha256:", ""), ("\"digest\":\"sha256:", "\",")] {
        if let Some(at) = line.find(field) {
            let rest = &line[at + field.len()..];
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            return format!("{}{}", &line[..at], &rest[digits + after.len()..]);
        }
    }
    line.to_owned()
}

#[test]
fn a_request_span_under_another_span_goes_the_fmt_layers_way() {
    let scenario = || {
        let outer = tracing::info_span!("conn", peer = 7u64);
        outer.in_scope(|| {
            let span = telemetry::request_span(&http::Method::GET, "tags");
            telemetry::record_user(&span, "u");
            crate::http::log::line(&span, 404, 0, 2.0, true);
        });
    };
    for format in [LogFormat::Text, LogFormat::Json] {
        let (ours, theirs, fast) = both(format, "info", scenario);
        assert_eq!(fast, 0, "{format:?}");
        assert_same(&ours, &theirs);
    }
}

#[test]
fn the_filter_still_decides() {
    for format in [LogFormat::Text, LogFormat::Json] {
        let (ours, _, fast) = both(format, "warn", || full_request(1.0));
        assert_eq!((ours.as_str(), fast), ("", 0));
        // Off for the request line's module only: the line goes, the span's other events stay.
        let (ours, theirs, _) = both(format, "info,cachalot::http::log=warn", || {
            let span = telemetry::request_span(&http::Method::GET, "manifest");
            telemetry::record_user(&span, "u");
            tracing::info!(parent: &span, "kept");
            crate::http::log::line(&span, 200, 1, 1.0, true);
        });
        assert_same(&ours, &theirs);
        assert_eq!(ours.lines().count(), 1, "{ours}");
    }
}

#[test]
fn timestamps_are_the_fmt_layers() {
    for (secs, expected) in [
        (0, "1970-01-01T00:00:00."),
        (951_782_400, "2000-02-29T00:00:00."),
        (951_868_799, "2000-02-29T23:59:59."),
        (4_107_542_399, "2100-02-28T23:59:59."),
        (1_788_406_353, "2026-09-03T03:32:33."),
        (LAST_SECOND, "9999-12-31T23:59:59."),
    ] {
        assert_eq!(std::str::from_utf8(&date_time(secs)).unwrap(), expected);
    }
    // Against the fmt layer's own clock and formatter, to the second (retried across a tick).
    for _ in 0..3 {
        let (mut ours, mut theirs) = (String::new(), String::new());
        timestamp(&mut ours).unwrap();
        SystemTime
            .format_time(&mut Writer::new(&mut theirs))
            .unwrap();
        assert_eq!(ours.len(), theirs.len(), "{ours} {theirs}");
        if ours[..19] == theirs[..19] {
            return;
        }
    }
    panic!("the timestamps never agreed to the second");
}

#[test]
fn json_escaping_is_serde_jsons() {
    let all: String = (0u8..0x80)
        .map(char::from)
        .chain("é\u{2028}".chars())
        .collect();
    let mut ours = String::new();
    json_str(&mut ours, &all);
    assert_eq!(ours, serde_json::to_string(&all).unwrap());
}

proptest::proptest! {
    #[test]
    fn json_numbers_are_serde_jsons(v in proptest::num::f64::ANY) {
        let mut ours = String::new();
        json_f64(&mut ours, v);
        proptest::prop_assert_eq!(ours, serde_json::to_string(&v).unwrap());
    }

    #[test]
    fn durations_print_as_debug_prints_them(v in proptest::num::f64::ANY) {
        let mut ours = String::new();
        debug_f64(&mut ours, v);
        proptest::prop_assert_eq!(ours, format!("{v:?}"));
    }

    /// Where the request line's durations are, with few digits and with many.
    #[test]
    fn durations_in_milliseconds_print_as_debug_prints_them(
        secs in 0u64..100_000,
        nanos in 0u32..1_000_000_000,
        digits in 0u32..10,
    ) {
        let nanos = nanos - nanos % 10u32.pow(digits);
        let v = std::time::Duration::new(secs, nanos).as_secs_f64() * 1000.0;
        let mut ours = String::new();
        debug_f64(&mut ours, v);
        proptest::prop_assert_eq!(ours, format!("{v:?}"));
    }

    #[test]
    fn strings_print_as_debug_prints_them(s in "\\PC*|[ -~]*") {
        let mut ours = String::new();
        debug_str(&mut ours, &s);
        proptest::prop_assert_eq!(ours, format!("{s:?}"));
    }
}
