//! The request line's own way out. The fmt layer keeps a span's fields as text, formatted through
//! `Debug` each time one is recorded, and formats every event generically; for the line each
//! request ends with, that cost as much as the rest of a cached manifest GET. [`RequestLines`]
//! sits in front of the fmt layer: it keeps the request span's fields as plain text in the span,
//! and writes the request line itself, byte for byte as the fmt layer would (a test holds the two
//! side by side, in both formats). Every other event still goes through the fmt layer, which is
//! handed the request span's fields, in the order they were recorded, before the first such event.
//! Anything unusual (colours, a parent span, a value that is not text) takes the fmt layer's way.

use crate::telemetry::{REQUEST_SPAN, TARGET};
use std::cell::{Cell, RefCell};
use std::fmt::{self, Write as _};
use tracing::field::{Field, Visit};
use tracing::field::{FieldSet, Value, ValueSet};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::{LookupSpan, SpanRef};

/// The target of the request line, which `http::log::line` gives its event: that module's path,
/// as the event had before it was named here.
pub(crate) const LINE_TARGET: &str = "cachalot::http::log";

/// Fields a request span keeps at most (it has seven; a field recorded twice takes two).
const MAX_ENTRIES: usize = 16;

/// How a value reached the span, so that it is handed to the fmt layer the same way.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Recorded as `&str`: the text format quotes it.
    Str,
    /// Recorded through `Debug` (a `%value`): written as it formatted.
    Raw,
}

#[derive(Clone, Copy)]
struct Entry {
    name: &'static str,
    kind: Kind,
    start: u32,
    end: u32,
}

const NO_ENTRY: Entry = Entry {
    name: "",
    kind: Kind::Raw,
    start: 0,
    end: 0,
};

/// A request span's fields, in the span's extensions, in the order they came.
struct RequestFields {
    text: String,
    entries: [Entry; MAX_ENTRIES],
    len: usize,
    /// How many entries came with the span; the rest were recorded later.
    initial: usize,
    /// The fmt layer has the fields too (an event other than the request line came).
    handed: bool,
    /// A value that cannot be kept as text came: the request line goes through the fmt layer.
    slow: bool,
}

impl RequestFields {
    fn new() -> RequestFields {
        RequestFields {
            text: String::with_capacity(192),
            entries: [NO_ENTRY; MAX_ENTRIES],
            len: 0,
            initial: 0,
            handed: false,
            slow: false,
        }
    }

    fn value(&self, e: &Entry) -> &str {
        &self.text[e.start as usize..e.end as usize]
    }

    /// Keeps the fields of `record`; false (and nothing kept) if one of them cannot be.
    fn keep(&mut self, record: impl FnOnce(&mut dyn Visit)) -> bool {
        let (len, text) = (self.len, self.text.len());
        let mut keep = Keep {
            fields: self,
            ok: true,
            any: false,
        };
        record(&mut keep);
        let ok = keep.ok && keep.any;
        if !ok {
            self.len = len;
            self.text.truncate(text);
        }
        ok
    }
}

struct Keep<'a> {
    fields: &'a mut RequestFields,
    ok: bool,
    any: bool,
}

impl Keep<'_> {
    fn push(&mut self, field: &Field, kind: Kind, start: usize) {
        let f = &mut *self.fields;
        let name = field.name();
        // Names the fmt layer formats in a way of its own, a full span, or a value too long to
        // index: the fmt layer's way.
        if f.len == MAX_ENTRIES
            || name == "message"
            || name == "name"
            || name.starts_with("r#")
            || name.starts_with("log.")
            || f.text.len() > u32::MAX as usize
        {
            self.ok = false;
            return;
        }
        f.entries[f.len] = Entry {
            name,
            kind,
            start: start as u32,
            end: f.text.len() as u32,
        };
        f.len += 1;
        self.any = true;
    }
}

impl Visit for Keep<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        let start = self.fields.text.len();
        self.fields.text.push_str(value);
        self.push(field, Kind::Str, start);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let start = self.fields.text.len();
        if write!(self.fields.text, "{value:?}").is_err() {
            self.ok = false;
        }
        self.push(field, Kind::Raw, start);
    }

    // Numbers and the rest are JSON numbers, not strings, in the fmt layer's lines: not kept.
    fn record_f64(&mut self, _: &Field, _: f64) {
        self.ok = false;
    }
    fn record_i64(&mut self, _: &Field, _: i64) {
        self.ok = false;
    }
    fn record_u64(&mut self, _: &Field, _: u64) {
        self.ok = false;
    }
    fn record_i128(&mut self, _: &Field, _: i128) {
        self.ok = false;
    }
    fn record_u128(&mut self, _: &Field, _: u128) {
        self.ok = false;
    }
    fn record_bool(&mut self, _: &Field, _: bool) {
        self.ok = false;
    }
    fn record_bytes(&mut self, _: &Field, _: &[u8]) {
        self.ok = false;
    }
    fn record_error(&mut self, _: &Field, _: &(dyn std::error::Error + 'static)) {
        self.ok = false;
    }
}

/// Held while a request span's fields are handed to the fmt layer: they are out of the span's
/// extensions meanwhile, and another thread's event or record on the span waits for them. Taken
/// only when an event other than the request line comes in a request span.
static HANDING: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

#[derive(PartialEq, Eq)]
enum Kept {
    /// Kept; `handed`: the fmt layer is to be given the record too.
    Yes { handed: bool },
    /// The span keeps no fields here (not a request span, or they are being handed over).
    Missing,
    /// A value that cannot be kept as text: the span's fields are now the fmt layer's alone.
    Refused,
}

/// Keeps `values` in `span`'s fields, if it has them.
fn keep_record<S>(span: &SpanRef<'_, S>, values: &Record<'_>) -> Kept
where
    S: for<'a> LookupSpan<'a>,
{
    let mut ext = span.extensions_mut();
    let Some(f) = ext.get_mut::<RequestFields>() else {
        return Kept::Missing;
    };
    if f.keep(|v| values.record(v)) {
        Kept::Yes { handed: f.handed }
    } else {
        f.slow = true;
        Kept::Refused
    }
}

fn is_request_span(meta: &Metadata<'_>) -> bool {
    meta.name() == REQUEST_SPAN && meta.target() == TARGET && meta.is_span()
}

/// The layer in front of the fmt layer `inner`; `writer` is the fmt layer's own.
pub(crate) struct RequestLines<L, W> {
    inner: L,
    writer: W,
    json: bool,
    /// Colours are the fmt layer's business: with them, every line goes its way.
    fast: bool,
}

impl<L, W> RequestLines<L, W> {
    pub(crate) fn new(inner: L, writer: W, json: bool, ansi: bool) -> RequestLines<L, W> {
        RequestLines {
            inner,
            writer,
            json,
            fast: !ansi,
        }
    }
}

impl<L, W> RequestLines<L, W> {
    /// Hands the fmt layer what it was not given of `span`'s fields: the span's attributes, then
    /// every record, one by one as they came, so that what it keeps is what it would have kept.
    fn hand_over<S>(&self, span: &SpanRef<'_, S>, ctx: &Context<'_, S>)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        L: Layer<S>,
    {
        match span.extensions().get::<RequestFields>().map(|f| f.handed) {
            Some(true) => return,
            None if !is_request_span(span.metadata()) => return,
            // Ours to hand over; or, on a request span without them, another thread may be
            // handing them over right now, and this event must wait for it.
            _ => {}
        }
        let _one = HANDING.lock();
        if span
            .extensions()
            .get::<RequestFields>()
            .is_none_or(|f| f.handed)
        {
            return;
        }
        // Taken out while the fmt layer works: it locks the same extensions.
        let Some(mut f) = span.extensions_mut().remove::<RequestFields>() else {
            return;
        };
        let meta = span.metadata();
        let fields = meta.fields();
        let id = span.id();
        let found: Vec<(Field, &str, Kind)> = f.entries[..f.len]
            .iter()
            .filter_map(|e| Some((fields.field(e.name)?, f.value(e), e.kind)))
            .collect();
        let (initial, recorded) = found.split_at(f.initial.min(found.len()));
        with_values(fields, initial, |values| {
            self.inner
                .on_new_span(&Attributes::new(meta, values), &id, ctx.clone())
        });
        for one in recorded {
            with_values(fields, std::slice::from_ref(one), |values| {
                self.inner.on_record(&id, &Record::new(values), ctx.clone())
            });
        }
        f.handed = true;
        span.extensions_mut().insert(f);
    }

    /// Hands over the fields of every request span that `event`'s line may show.
    fn hand_over_for<S>(&self, event: &Event<'_>, ctx: &Context<'_, S>)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        L: Layer<S>,
    {
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope {
                self.hand_over(&span, ctx);
            }
        }
        // The JSON format lists the spans entered, which need not be the event's.
        if let Some(current) = ctx.lookup_current() {
            for span in current.scope() {
                self.hand_over(&span, ctx);
            }
        }
    }
}

/// Calls `f` with at most the first 8 of `found` as a value set of `fields`, each value given as
/// it first came: a string as a string, the rest as text through `Debug`.
fn with_values(fields: &FieldSet, found: &[(Field, &str, Kind)], f: impl FnOnce(&ValueSet<'_>)) {
    let shown: Vec<tracing::field::DisplayValue<&str>> = found
        .iter()
        .map(|(_, v, _)| tracing::field::display(*v))
        .collect();
    let Some((first, _, _)) = found.first() else {
        f(&fields.value_set(&[]));
        return;
    };
    let mut values: [(&Field, Option<&dyn Value>); 8] = [(first, None); 8];
    for (i, ((field, v, kind), d)) in found.iter().zip(&shown).enumerate().take(8) {
        values[i] = (
            field,
            Some(match kind {
                Kind::Str => v as &dyn Value,
                Kind::Raw => d as &dyn Value,
            }),
        );
    }
    f(&fields.value_set(&values))
}

impl<S, L, W> Layer<S> for RequestLines<L, W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    L: Layer<S>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.inner.on_register_dispatch(subscriber);
    }

    fn on_layer(&mut self, subscriber: &mut S) {
        self.inner.on_layer(subscriber);
    }

    fn register_callsite(
        &self,
        metadata: &'static Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        self.inner.register_callsite(metadata)
    }

    fn enabled(&self, metadata: &Metadata<'_>, ctx: Context<'_, S>) -> bool {
        self.inner.enabled(metadata, ctx)
    }

    fn event_enabled(&self, event: &Event<'_>, ctx: Context<'_, S>) -> bool {
        self.inner.event_enabled(event, ctx)
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        self.inner.max_level_hint()
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if is_request_span(attrs.metadata())
            && attrs.fields().len() <= 8
            && let Some(span) = ctx.span(id)
        {
            let mut f = RequestFields::new();
            if attrs.is_empty() || f.keep(|v| attrs.record(v)) {
                f.initial = f.len;
                span.extensions_mut().insert(f);
                return;
            }
        }
        self.inner.on_new_span(attrs, id, ctx);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let mut forward = true;
        if let Some(span) = ctx.span(id) {
            let mut kept = keep_record(&span, values);
            if kept == Kept::Missing && is_request_span(span.metadata()) {
                // Another thread may be handing the fields over: once it is done, they are kept
                // here and in the fmt layer both.
                drop(HANDING.lock());
                kept = keep_record(&span, values);
            }
            match kept {
                Kept::Yes { handed } => forward = handed,
                Kept::Refused => self.hand_over(&span, &ctx),
                Kept::Missing => {}
            }
        }
        if forward {
            self.inner.on_record(id, values, ctx);
        }
    }

    fn on_follows_from(&self, span: &Id, follows: &Id, ctx: Context<'_, S>) {
        self.inner.on_follows_from(span, follows, ctx);
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        if self.fast && meta.target() == LINE_TARGET && self.write_line(event, &ctx) {
            return;
        }
        self.hand_over_for(event, &ctx);
        self.inner.on_event(event, ctx);
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        self.inner.on_enter(id, ctx);
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        self.inner.on_exit(id, ctx);
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        self.inner.on_close(id, ctx);
    }

    fn on_id_change(&self, old: &Id, new: &Id, ctx: Context<'_, S>) {
        self.inner.on_id_change(old, new, ctx);
    }
}

impl<L, W> RequestLines<L, W>
where
    W: for<'w> MakeWriter<'w> + 'static,
{
    /// Writes the request line for `event` as the fmt layer would; false if it must go the fmt
    /// layer's way (nothing written then).
    fn write_line<S>(&self, event: &Event<'_>, ctx: &Context<'_, S>) -> bool
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        thread_local! {
            static LINE: RefCell<String> = const { RefCell::new(String::new()) };
        }
        let Some(span) = event.parent().and_then(|id| ctx.span(id)) else {
            return false;
        };
        // A span above the request's would be in the line.
        if span.parent().is_some() {
            return false;
        }
        let ext = span.extensions();
        let Some(fields) = ext.get::<RequestFields>().filter(|f| !f.slow) else {
            return false;
        };
        // The JSON format lists the spans entered when the line is written, which are usually
        // none (the body ends in hyper's connection task) and else this request's span.
        let spans_listed = if self.json {
            match ctx.lookup_current() {
                None => false,
                Some(c) if c.id() == span.id() => true,
                Some(_) => return false,
            }
        } else {
            false
        };
        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return false;
            };
            line.clear();
            let ok = if self.json {
                json_line(
                    &mut line,
                    event,
                    span.metadata().name(),
                    fields,
                    spans_listed,
                )
            } else {
                text_line(&mut line, event, span.metadata().name(), fields)
            };
            if ok.is_err() {
                return false;
            }
            // The fmt layer reports a failed write on stderr; the process's writer never fails.
            let _ = std::io::Write::write_all(
                &mut self.writer.make_writer_for(event.metadata()),
                line.as_bytes(),
            );
            #[cfg(test)]
            tests::FAST_LINES.with(|n| n.set(n.get() + 1));
            true
        })
    }
}

/// The fmt layer's timestamp, `2026-12-03T03:32:33.835881Z`: the date and time of day are
/// formatted once a second on each thread, and only the microseconds on every line.
fn timestamp(out: &mut String) -> fmt::Result {
    thread_local! {
        static SECOND: Cell<(u64, [u8; 20])> = const { Cell::new((u64::MAX, [0; 20])) };
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .filter(|d| d.as_secs() <= LAST_SECOND);
    let Some(now) = now else {
        // Before 1970 or after 9999: tracing-subscriber's own formatter knows how.
        if SystemTime.format_time(&mut Writer::new(out)).is_err() {
            out.push_str("<unknown time>");
        }
        return Ok(());
    };
    let secs = now.as_secs();
    let (cached, mut prefix) = SECOND.get();
    if cached != secs {
        prefix = date_time(secs);
        SECOND.set((secs, prefix));
    }
    out.push_str(std::str::from_utf8(&prefix).map_err(|_| fmt::Error)?);
    let micros = now.subsec_micros();
    let mut digits = [b'0'; 6];
    let mut m = micros;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (m % 10) as u8;
        m /= 10;
    }
    out.push_str(std::str::from_utf8(&digits).map_err(|_| fmt::Error)?);
    out.push('Z');
    Ok(())
}

/// 9999-12-31T23:59:59Z: the fmt layer writes later years another way.
const LAST_SECOND: u64 = 253_402_300_799;

/// `YYYY-MM-DDTHH:MM:SS.` of a second since 1970 (UTC), up to [`LAST_SECOND`].
fn date_time(secs: u64) -> [u8; 20] {
    // Howard Hinnant's days-to-civil, on days since 0000-03-01.
    let z = secs / 86_400 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let tod = secs % 86_400;
    let mut b = *b"0000-00-00T00:00:00.";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, tod / 3_600);
    put(14, 2, tod / 60 % 60);
    put(17, 2, tod % 60);
    b
}

fn level_text(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => " INFO",
        Level::WARN => " WARN",
        Level::ERROR => "ERROR",
    }
}

fn level_json(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => "INFO",
        Level::WARN => "WARN",
        Level::ERROR => "ERROR",
    }
}

// === the text format (tracing-subscriber's `Full`, no colours, no target) ===

fn text_line(
    out: &mut String,
    event: &Event<'_>,
    span_name: &str,
    f: &RequestFields,
) -> fmt::Result {
    timestamp(out)?;
    out.push(' ');
    out.push_str(level_text(event.metadata().level()));
    out.push(' ');
    out.push_str(span_name);
    if f.len > 0 {
        out.push('{');
        for (i, e) in f.entries[..f.len].iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            out.push_str(e.name);
            out.push('=');
            match e.kind {
                Kind::Str => debug_str(out, f.value(e)),
                Kind::Raw => out.push_str(f.value(e)),
            }
        }
        out.push('}');
    }
    out.push_str(": ");
    let mut v = TextFields {
        out,
        first: true,
        ok: Ok(()),
    };
    event.record(&mut v);
    v.ok?;
    out.push('\n');
    Ok(())
}

/// Bytes that `<str as Debug>` writes as they are: printable ASCII but `"` and `\`.
const PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0x20;
    while b < 0x7f {
        t[b] = b != b'"' as usize && b != b'\\' as usize;
        b += 1;
    }
    t
};

/// `<str as Debug>`: a quoted string, escaped; plain ASCII without going through `fmt`.
fn debug_str(out: &mut String, s: &str) {
    if s.bytes().all(|b| PLAIN[b as usize]) {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        let _ = write!(out, "{s:?}");
    }
}

/// `<f64 as Debug>`, through zmij where the two must agree. Both write the shortest digits that
/// read back as `v` (boundaries included for an even mantissa) in plain decimal notation with at
/// least one fractional digit; at up to 15 significant digits those digits are the only ones of
/// their length, as decimals that close are farther apart than a double's rounding interval is
/// wide. At 16 or 17 the two pick another last digit at times, and `Debug` writes an exponent
/// outside [1e-4, 1e16): there, `Debug` itself.
fn debug_f64(out: &mut String, v: f64) {
    if v == 0.0 || (1e-4..1e16).contains(&v.abs()) {
        let mut buf = zmij::Buffer::new();
        let s = buf.format_finite(v);
        let significant = s
            .bytes()
            .filter(u8::is_ascii_digit)
            .skip_while(|&b| b == b'0')
            .count();
        if significant <= 15 && !s.contains(['e', 'E']) {
            out.push_str(s);
            return;
        }
    }
    let _ = write!(out, "{v:?}");
}

/// The event's fields as tracing-subscriber's `DefaultVisitor` writes them.
struct TextFields<'a> {
    out: &'a mut String,
    first: bool,
    ok: fmt::Result,
}

impl TextFields<'_> {
    fn name(&mut self, field: &Field) {
        if !self.first {
            self.out.push(' ');
        }
        self.first = false;
        let name = field.name();
        if name.starts_with("r#") || name.starts_with("log.") {
            self.ok = Err(fmt::Error);
        }
        if name != "message" {
            self.out.push_str(name);
            self.out.push('=');
        }
    }
}

impl Visit for TextFields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.name(field);
        if field.name() == "message" {
            // The fmt layer escapes terminal controls in a message; one that has any goes its way.
            let start = self.out.len();
            let _ = write!(self.out, "{value:?}");
            if self.out[start..].chars().any(|c| {
                matches!(
                    c,
                    '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
                )
            }) {
                self.ok = Err(fmt::Error);
            }
        } else {
            let _ = write!(self.out, "{value:?}");
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.name(field);
            debug_str(self.out, value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.name(field);
        self.out.push_str(itoa::Buffer::new().format(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.name(field);
        self.out.push_str(itoa::Buffer::new().format(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.name(field);
        self.out.push_str(if value { "true" } else { "false" });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.name(field);
        debug_f64(self.out, value);
    }

    fn record_error(&mut self, _: &Field, _: &(dyn std::error::Error + 'static)) {
        self.ok = Err(fmt::Error);
    }
}

// === the JSON format (flattened event, no target, the span and the spans entered) ===

fn json_line(
    out: &mut String,
    event: &Event<'_>,
    span_name: &str,
    f: &RequestFields,
    spans_listed: bool,
) -> fmt::Result {
    out.push_str("{\"timestamp\":\"");
    let start = out.len();
    timestamp(out)?;
    // Its characters need no escaping, unless the clock failed in some odd way.
    if out[start..]
        .bytes()
        .any(|b| b == b'"' || b == b'\\' || b < 0x20)
    {
        return Err(fmt::Error);
    }
    out.push_str("\",\"level\":\"");
    out.push_str(level_json(event.metadata().level()));
    out.push('"');
    let mut v = JsonFields { out, ok: Ok(()) };
    event.record(&mut v);
    v.ok?;
    out.push_str(",\"span\":");
    json_span(out, span_name, f);
    out.push_str(",\"spans\":[");
    if spans_listed {
        json_span(out, span_name, f);
    }
    out.push_str("]}\n");
    Ok(())
}

/// The span's object: its fields by name (the last value of a field recorded twice), then its name.
fn json_span(out: &mut String, span_name: &str, f: &RequestFields) {
    let mut last: [Option<&Entry>; MAX_ENTRIES] = [None; MAX_ENTRIES];
    let mut n = 0;
    for e in f.entries[..f.len].iter().rev() {
        if !last[..n].iter().flatten().any(|l| l.name == e.name) {
            last[n] = Some(e);
            n += 1;
        }
    }
    let chosen = &mut last[..n];
    chosen.sort_unstable_by_key(|e| e.map(|e| e.name));
    out.push('{');
    for e in chosen.iter().flatten() {
        json_str(out, e.name);
        out.push(':');
        json_str(out, f.value(e));
        out.push(',');
    }
    out.push_str("\"name\":");
    json_str(out, span_name);
    out.push('}');
}

/// A JSON number as serde_json writes it (`null` if not finite).
fn json_f64(out: &mut String, v: f64) {
    if v.is_finite() {
        out.push_str(zmij::Buffer::new().format_finite(v));
    } else {
        out.push_str("null");
    }
}

/// A JSON string as serde_json writes it.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    JsonEscaped(out).write(s);
    out.push('"');
}

/// Escapes what it is given as serde_json does: `"`, `\` and control characters only.
struct JsonEscaped<'a>(&'a mut String);

impl JsonEscaped<'_> {
    fn write(&mut self, s: &str) {
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate() {
            let escaped = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                0x08 => "\\b",
                0x0c => "\\f",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..0x20 => "",
                _ => continue,
            };
            self.0.push_str(&s[plain..i]);
            if escaped.is_empty() {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                self.0.push_str("\\u00");
                self.0.push(HEX[(b >> 4) as usize] as char);
                self.0.push(HEX[(b & 0xf) as usize] as char);
            } else {
                self.0.push_str(escaped);
            }
            plain = i + 1;
        }
        self.0.push_str(&s[plain..]);
    }
}

impl fmt::Write for JsonEscaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write(s);
        Ok(())
    }
}

/// The event's fields as tracing-serde's `SerdeMapVisitor` writes them into serde_json.
struct JsonFields<'a> {
    out: &'a mut String,
    ok: fmt::Result,
}

impl JsonFields<'_> {
    fn name(&mut self, field: &Field) {
        self.out.push(',');
        json_str(self.out, field.name());
        self.out.push(':');
    }
}

impl Visit for JsonFields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.name(field);
        self.out.push('"');
        let _ = write!(JsonEscaped(self.out), "{value:?}");
        self.out.push('"');
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.name(field);
        json_str(self.out, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.name(field);
        self.out.push_str(itoa::Buffer::new().format(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.name(field);
        self.out.push_str(itoa::Buffer::new().format(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.name(field);
        self.out.push_str(if value { "true" } else { "false" });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.name(field);
        json_f64(self.out, value);
    }

    fn record_i128(&mut self, _: &Field, _: i128) {
        self.ok = Err(fmt::Error);
    }

    fn record_u128(&mut self, _: &Field, _: u128) {
        self.ok = Err(fmt::Error);
    }

    fn record_bytes(&mut self, _: &Field, _: &[u8]) {
        self.ok = Err(fmt::Error);
    }

    fn record_error(&mut self, _: &Field, _: &(dyn std::error::Error + 'static)) {
        self.ok = Err(fmt::Error);
    }
}

#[cfg(test)]
mod tests;
