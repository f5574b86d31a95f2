//! `GET /v2/<name>/referrers/<digest>`: always an image index (empty when nothing refers to the
//! digest, never a 404), filtered by `artifactType` here whatever the upstream does, with the
//! upstream's `Link` turned into the client's own, and a `Warning` when the answer is stale.

use super::body::{self, Body};
use super::handlers::{AppState, query_param, rewrite_link_to};
use crate::error::Error;
use crate::metrics::Source;
use crate::mirror::Target;
use crate::oci::Digest;
use crate::oci::manifest::OCI_INDEX;
use http::{Response, header};
use tracing::Span;

const FILTERS_APPLIED: header::HeaderName = header::HeaderName::from_static("oci-filters-applied");

/// The query parameters the mirror reads itself; every other one pages the upstream's list.
const OWN_PARAMS: [&str; 2] = ["ns", "artifactType"];

pub(super) async fn referrers(
    state: &AppState,
    t: &Target,
    subject: &Digest,
    query: Option<&str>,
    head: bool,
) -> Result<Response<Body>, Error> {
    crate::telemetry::record_digest(&Span::current(), subject);
    let artifact_type = query_param(query, "artifactType").filter(|a| !a.is_empty());
    let page = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(
            form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .filter(|(k, _)| !OWN_PARAMS.contains(&k.as_ref())),
        )
        .finish();
    let r = state.mirror.referrers(t, subject, &page).await?;
    let listing = match &artifact_type {
        Some(a) => r.listing.filtered(a),
        None => r.listing,
    };
    let body = listing.to_index();
    let mut builder = Response::builder()
        .header(header::CONTENT_TYPE, OCI_INDEX)
        .header(header::CONTENT_LENGTH, body.len());
    if artifact_type.is_some() {
        builder = builder.header(FILTERS_APPLIED, "artifactType");
    }
    if let Some(link) = &r.link {
        let path = format!("/v2/{}/referrers/{subject}", t.client_name);
        let filter = artifact_type.as_deref().map(|a| ("artifactType", a));
        if let Some(l) = rewrite_link_to(link, &path, t.ns.as_deref(), filter) {
            builder = builder.header(header::LINK, l);
        }
    }
    if let Some(stale) = r.stale {
        builder = builder.header(header::WARNING, stale.warning());
    }
    let source = if r.fetched {
        Source::Upstream
    } else {
        Source::Cache
    };
    state.metrics.served(source, body.len() as u64);
    Ok(builder
        .body(if head {
            body::empty()
        } else {
            body::full(body)
        })
        .expect("valid headers"))
}
