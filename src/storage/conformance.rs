//! The contract every [`BlobStore`] keeps, run against each implementation. A new backend adds
//! one line to the `backends!` list at the bottom and must pass all of it.

use super::{
    Access, BlobStore, BlobWriter, Bucket, CommitError, FsStore, MemoryStore, RealDisk, S3Store,
    Usage,
};
use crate::oci::{Algorithm, Digest, Verified, Verifier};
use std::sync::Arc;
use std::time::Duration;

/// A store under test, with whatever must live as long as it (a temp directory, a runtime).
pub(crate) struct Subject {
    pub store: Arc<dyn BlobStore>,
    /// Whether a reader holding an object keeps reading it after its removal. Files and
    /// memory do; a bucket cannot (a removed object is gone for every reader), and its holders
    /// get an error instead of bytes.
    pub holders_outlive_removal: bool,
    _keep: Option<tempfile::TempDir>,
    _rt: Option<tokio::runtime::Runtime>,
}

fn proof(data: &[u8]) -> Verified {
    let mut v = Verifier::new(Algorithm::Sha256);
    v.update(data);
    v.verify(&Digest::sha256_of(data)).unwrap()
}

/// Bytes that differ at every offset, so a read at the wrong place shows.
fn blob(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

fn write(store: &dyn BlobStore, data: &[u8]) -> Box<dyn BlobWriter> {
    let mut w = store.begin(&Digest::sha256_of(data)).unwrap();
    // In pieces, as a fill writes.
    for part in data.chunks(7000) {
        w.write(part).unwrap();
    }
    w
}

fn put(store: &dyn BlobStore, data: &[u8]) -> Digest {
    write(store, data).commit(proof(data), "test/repo").unwrap();
    Digest::sha256_of(data)
}

fn read(store: &dyn BlobStore, d: &Digest) -> Option<Vec<u8>> {
    let b = store.open(d, Access::Read).unwrap()?;
    let mut buf = vec![0; b.len as usize];
    b.reader.read_exact_at(&mut buf, 0).unwrap();
    Some(buf)
}

pub(crate) fn a_commit_is_visible_only_after_it_completes(s: Subject) {
    let store = &*s.store;
    let data = blob(100_000, 1);
    let d = Digest::sha256_of(&data);
    let w = write(store, &data);
    assert!(store.open(&d, Access::Read).unwrap().is_none());
    assert!(store.stat(&d).unwrap().is_none());
    assert_eq!(store.usage(), Usage::default());
    assert_eq!(w.commit(proof(&data), "test/repo").unwrap(), 100_000);
    assert_eq!(store.stat(&d).unwrap(), Some(100_000));
    assert_eq!(read(store, &d).unwrap(), data);
    assert_eq!(
        store.usage(),
        Usage {
            bytes: 100_000,
            objects: 1
        }
    );
    let rows = store.objects().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((&rows[0].digest, rows[0].size), (&d, 100_000));
}

pub(crate) fn an_aborted_fill_leaves_nothing(s: Subject) {
    let store = &*s.store;
    let data = blob(50_000, 2);
    let d = Digest::sha256_of(&data);
    drop(write(store, &data));
    assert!(store.open(&d, Access::Read).unwrap().is_none());
    assert!(store.objects().unwrap().is_empty());
    assert_eq!(store.usage(), Usage::default());
    // The digest can still be filled afterwards.
    assert_eq!(put(store, &data), d);
    assert_eq!(read(store, &d).unwrap(), data);
}

pub(crate) fn a_proof_for_other_bytes_commits_nothing(s: Subject) {
    let store = &*s.store;
    let data = blob(10_000, 3);
    let d = Digest::sha256_of(&data);
    // The right digest, but the writer got one byte less than was hashed.
    let mut w = store.begin(&d).unwrap();
    w.write(&data[..data.len() - 1]).unwrap();
    let e = w.commit(proof(&data), "test/repo").unwrap_err();
    assert!(matches!(e, CommitError::WrongProof { .. }), "{e}");
    // A proof of other bytes altogether.
    let w = write(store, &data);
    let e = w.commit(proof(b"other"), "test/repo").unwrap_err();
    assert!(e.to_string().contains(&d.to_string()), "{e}");
    assert!(store.open(&d, Access::Read).unwrap().is_none());
    assert_eq!(store.usage(), Usage::default());
}

pub(crate) fn concurrent_fills_of_one_digest_store_it_once(s: Subject) {
    let data = Arc::new(blob(300_000, 4));
    let d = Digest::sha256_of(&data);
    let fills: Vec<_> = (0..4)
        .map(|_| {
            let (store, data) = (s.store.clone(), data.clone());
            std::thread::spawn(move || put(&*store, &data))
        })
        .collect();
    for f in fills {
        assert_eq!(f.join().unwrap(), d);
    }
    let store = &*s.store;
    assert_eq!(read(store, &d).unwrap(), *data);
    assert_eq!(
        store.usage(),
        Usage {
            bytes: 300_000,
            objects: 1
        }
    );
    assert_eq!(store.objects().unwrap().len(), 1);
}

pub(crate) fn ranges_read_the_right_bytes(s: Subject) {
    let store = &*s.store;
    let data = blob(1 << 20, 5);
    let d = put(store, &data);
    let b = store.open(&d, Access::Read).unwrap().unwrap();
    assert_eq!(b.len, 1 << 20);
    for (start, len) in [
        (0, 1),
        (1, 4095),
        (4096, 4096),
        (777_777, 123_456),
        ((1 << 20) - 1, 1),
    ] {
        let mut buf = vec![0; len];
        b.reader.read_exact_at(&mut buf, start as u64).unwrap();
        assert_eq!(buf, data[start..start + len], "range {start}+{len}");
    }
    // Past the end: nothing, and an exact read there is an error, not a short answer.
    let mut buf = [0; 8];
    assert_eq!(b.reader.read_at(&mut buf, 1 << 20).unwrap(), 0);
    assert!(b.reader.read_exact_at(&mut buf, (1 << 20) - 4).is_err());
}

pub(crate) fn a_fill_is_readable_while_it_grows(s: Subject) {
    let store = &*s.store;
    let data = blob(20_000, 6);
    let d = Digest::sha256_of(&data);
    let mut w = store.begin(&d).unwrap();
    let reader = w.reader().unwrap();
    w.write(&data[..5000]).unwrap();
    let mut buf = vec![0; 5000];
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, data[..5000]);
    w.write(&data[5000..]).unwrap();
    w.commit(proof(&data), "test/repo").unwrap();
    // The same reader carries on past the commit.
    let mut buf = vec![0; 15_000];
    reader.read_exact_at(&mut buf, 5000).unwrap();
    assert_eq!(buf, data[5000..]);
}

pub(crate) fn removal_spares_a_holder_and_what_was_read_since(s: Subject) {
    let store = &*s.store;
    let (a, b) = (blob(40_000, 7), blob(60_000, 8));
    let (da, db) = (put(store, &a), put(store, &b));
    let listed = store.objects().unwrap();
    std::thread::sleep(Duration::from_millis(5));
    // A read after the listing makes `a` recently used; `b` is held open by a reader.
    let held = store.open(&db, Access::Quiet).unwrap().unwrap();
    assert!(store.open(&da, Access::Read).unwrap().is_some());
    let removed = store.remove(&listed).unwrap();
    assert_eq!(removed, vec![db.clone()]);
    assert!(store.open(&db, Access::Read).unwrap().is_none());
    assert_eq!(
        store.usage(),
        Usage {
            bytes: 40_000,
            objects: 1
        }
    );
    // The holder still reads every byte of what was removed; where it cannot, it is told so,
    // never handed other bytes.
    let mut buf = vec![0; 60_000];
    let held_read = held.reader.read_exact_at(&mut buf, 0);
    if s.holders_outlive_removal {
        held_read.unwrap();
        assert_eq!(buf, b);
    } else {
        assert!(held_read.is_err());
    }
    assert_eq!(read(store, &da).unwrap(), a);
}

pub(crate) fn quiet_opens_do_not_count_as_reads(s: Subject) {
    let store = &*s.store;
    let d = put(store, &blob(1000, 9));
    let listed = store.objects().unwrap();
    std::thread::sleep(Duration::from_millis(5));
    assert!(store.open(&d, Access::Quiet).unwrap().is_some());
    assert_eq!(store.remove(&listed).unwrap(), vec![d]);
}

fn fs() -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let (store, _meta) = FsStore::open(dir.path(), Arc::new(RealDisk)).unwrap();
    Subject {
        store: Arc::new(store),
        holders_outlive_removal: true,
        _keep: Some(dir),
        _rt: None,
    }
}

fn memory() -> Subject {
    Subject {
        store: Arc::new(MemoryStore::new()),
        holders_outlive_removal: true,
        _keep: None,
        _rt: None,
    }
}

/// The bucket over object_store's in-memory store, on a runtime of its own.
fn s3() -> Subject {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let bucket = Bucket::with_store(
        Arc::new(object_store::memory::InMemory::new()),
        "cache/",
        Arc::new(crate::metrics::Metrics::new(&[])),
    );
    Subject {
        store: Arc::new(S3Store::new(bucket, rt.handle().clone()).unwrap()),
        holders_outlive_removal: false,
        _keep: None,
        _rt: Some(rt),
    }
}

/// One `#[test]` per backend and contract item.
macro_rules! backends {
    ($($backend:ident),*) => {
        $(
            mod $backend {
                backends!(@tests $backend:
                    a_commit_is_visible_only_after_it_completes,
                    an_aborted_fill_leaves_nothing,
                    a_proof_for_other_bytes_commits_nothing,
                    concurrent_fills_of_one_digest_store_it_once,
                    ranges_read_the_right_bytes,
                    a_fill_is_readable_while_it_grows,
                    removal_spares_a_holder_and_what_was_read_since,
                    quiet_opens_do_not_count_as_reads);
            }
        )*
    };
    (@tests $backend:ident: $($test:ident),*) => {
        $(
            #[test]
            fn $test() {
                super::$test(super::$backend());
            }
        )*
    };
}

backends!(fs, memory, s3);
