//! A blob relayed from the upstream to one client without the store: when the cache cannot
//! take the blob at all (pass-through), or when a fill's store failed midway and its followers
//! carry on from where the stored bytes end. Still verified: the blob's last byte is held back
//! until the digest matched.

use super::Target;
use super::inflight::HashState;
use crate::error::{Error, UpstreamFault};
use crate::oci::{Digest, Verifier};
use crate::upstream::UpstreamBody;
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use std::collections::VecDeque;

/// The part `pos..end` of a blob, read from an upstream body and checked against its digest.
pub(super) struct Relay {
    t: Target,
    digest: Digest,
    /// `None` until the resuming GET has been sent.
    body: Option<UpstreamBody>,
    /// Where a resuming GET starts: the hash covers the bytes before it.
    resume_at: u64,
    hash: Verifier,
    /// Blob offset of the next body byte.
    offset: u64,
    /// Next byte the client needs, and the end of its range (exclusive; `None`: the blob's).
    pos: u64,
    end: Option<u64>,
    len: Option<u64>,
    /// Chunks ready to hand out; the blob's last byte waits in `held` for the digest.
    ready: VecDeque<Bytes>,
    held: Option<Bytes>,
    done: bool,
}

impl Relay {
    /// An upstream response from byte 0, already received (its status decided the client's).
    pub(super) fn pass_through(
        t: Target,
        digest: Digest,
        body: UpstreamBody,
        len: Option<u64>,
    ) -> Relay {
        let hash = Verifier::new(digest.algorithm());
        Relay::new(t, digest, Some(body), 0, hash, len, 0, None)
    }

    /// Limits what is sent to `pos..end`, before the first byte went out.
    pub(super) fn set_range(&mut self, pos: u64, end: Option<u64>) {
        self.pos = pos;
        self.end = end;
    }

    /// Carries on a fill whose store failed after `at` bytes, `hash` being the state after
    /// them: GETs the rest from the upstream.
    pub(super) fn resume(
        t: Target,
        digest: Digest,
        at: u64,
        hash: HashState,
        len: Option<u64>,
        pos: u64,
        end: Option<u64>,
    ) -> Relay {
        Relay::new(t, digest, None, at, *hash.0, len, pos, end)
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        t: Target,
        digest: Digest,
        body: Option<UpstreamBody>,
        resume_at: u64,
        hash: Verifier,
        len: Option<u64>,
        pos: u64,
        end: Option<u64>,
    ) -> Relay {
        Relay {
            t,
            digest,
            body,
            resume_at,
            hash,
            offset: 0,
            pos,
            end,
            len,
            ready: VecDeque::new(),
            held: None,
            done: false,
        }
    }

    /// The next bytes of the range, `None` once it is complete, or the error that must cut the
    /// response short.
    pub(super) async fn next(&mut self) -> Result<Option<Bytes>, Error> {
        loop {
            if let Some(b) = self.ready.pop_front() {
                return Ok(Some(b));
            }
            if self.done {
                return Ok(None);
            }
            if self.body.is_none() {
                self.get().await?;
            }
            self.pull().await?;
        }
    }

    /// Sends the resuming GET, from `resume_at` on.
    async fn get(&mut self) -> Result<(), Error> {
        let (t, at) = (&self.t, self.resume_at);
        let up = &t.upstream;
        let range = (at > 0)
            .then(|| HeaderValue::try_from(format!("bytes={at}-")))
            .transpose()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let resp = up
            .send(t.blob_request(Method::GET, &self.digest, range))
            .await?;
        self.offset = match resp.status() {
            StatusCode::PARTIAL_CONTENT => at,
            s if s.is_success() => 0,
            _ => return Err(up.status_error(&resp)),
        };
        self.body = Some(resp.into_body());
        Ok(())
    }

    /// Reads one frame and queues what of it falls in the range.
    async fn pull(&mut self) -> Result<(), Error> {
        let up = self.t.upstream.clone();
        let body = self
            .body
            .as_mut()
            .ok_or_else(|| Error::Internal("relay without a body".into()))?;
        let frame = tokio::time::timeout(up.body_timeout(), body.frame())
            .await
            .map_err(|_| {
                Error::upstream(
                    up.name(),
                    UpstreamFault::Timeout("waiting for the blob body"),
                )
            })?;
        let data = match frame {
            None => return self.at_eof(),
            Some(Err(e)) => {
                return Err(Error::upstream(
                    up.name(),
                    UpstreamFault::Protocol(format!("body: {e}")),
                ));
            }
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(_) => return Ok(()),
            },
        };
        let chunk_start = self.offset;
        self.offset += data.len() as u64;
        // Hash only what the shared state has not seen yet.
        if self.offset > self.resume_at {
            let from = self.resume_at.saturating_sub(chunk_start) as usize;
            self.hash.update(&data[from..]);
        }
        let lo = self.pos.max(chunk_start);
        let hi = self.end.map_or(self.offset, |e| e.min(self.offset));
        if lo < hi {
            let mut part = data.slice((lo - chunk_start) as usize..(hi - chunk_start) as usize);
            if let Some(prev) = self.held.take() {
                self.ready.push_back(prev);
            }
            let reaches_end = self.end.is_none() || self.len.is_some_and(|l| hi >= l);
            if reaches_end {
                // Keep the last byte back until the digest is known.
                self.held = Some(part.split_off(part.len() - 1));
            }
            if !part.is_empty() {
                self.ready.push_back(part);
            }
            self.pos = hi;
        }
        // A range that ends before the blob does cannot be verified without the rest.
        if self.end.is_some_and(|e| self.pos >= e) && self.held.is_none() {
            self.done = true;
        }
        Ok(())
    }

    /// The body ended: release the held byte if the blob is whole and matches.
    fn at_eof(&mut self) -> Result<(), Error> {
        self.done = true;
        let whole = self.len.is_none_or(|l| self.offset == l);
        let hash = std::mem::replace(&mut self.hash, Verifier::new(self.digest.algorithm()));
        let up = self.t.upstream.name();
        if !whole {
            return Err(Error::upstream(
                up,
                UpstreamFault::Truncated {
                    expected: self.len.unwrap_or(0),
                    got: self.offset,
                },
            ));
        }
        if let Err(m) = hash.verify(&self.digest) {
            return Err(Error::upstream(
                up,
                UpstreamFault::DigestMismatch {
                    expected: m.expected.to_string(),
                    actual: m.actual.to_string(),
                },
            ));
        }
        if let Some(last) = self.held.take() {
            self.ready.push_back(last);
        }
        Ok(())
    }
}
