//! Building OCI image layouts (image-spec `image-layout.md`) from Rust: configs, gzip'd tar layers
//! of random bytes, manifests and a multi-platform index, all with real SHA-256 digests.
//!
//! Layers are real `tar+gzip` (the gzip uses stored deflate blocks; no compression crate needed),
//! so skopeo treats them as already compressed and copies them unchanged.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::json;
use sha2::{Digest as _, Sha256};

pub const INDEX_V1: &str = "application/vnd.oci.image.index.v1+json";
pub const MANIFEST_V1: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_V1: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Annotation naming a tag in an OCI layout's `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OS/architecture pair.
#[derive(Clone, Debug)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
}

impl Platform {
    pub fn new(os: &str, architecture: &str) -> Platform {
        Platform {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
        }
    }
}

/// One platform's image inside a layout.
#[derive(Clone, Debug)]
pub struct PlatformImage {
    pub platform: Platform,
    pub manifest_digest: String,
    pub config_digest: String,
    pub layer_digests: Vec<String>,
}

/// An OCI image layout on disk, and what is in it.
#[derive(Clone, Debug)]
pub struct ImageLayout {
    pub dir: PathBuf,
    pub tag: String,
    /// Digest of what the tag points at: the index for several platforms, else the manifest.
    pub top_digest: String,
    pub top_media_type: String,
    /// Bytes of that top-level index or manifest.
    pub top_bytes: Vec<u8>,
    pub images: Vec<PlatformImage>,
    /// Every blob in the layout (index, manifests, configs, layers), as `sha256:<hex>`.
    pub blobs: BTreeSet<String>,
}

impl ImageLayout {
    /// Writes a layout to `dir` (created): one image per platform with `layers` random layers each,
    /// under an index when there are several platforms; `tag` names the top-level descriptor.
    pub fn build(dir: &Path, tag: &str, platforms: &[Platform], layers: usize) -> ImageLayout {
        assert!(!platforms.is_empty());
        std::fs::create_dir_all(dir.join("blobs/sha256")).expect("create layout dirs");
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("write oci-layout");
        let mut blobs = BTreeSet::new();
        let mut put = |bytes: &[u8]| -> (String, u64) {
            let hex = hex::encode(Sha256::digest(bytes));
            std::fs::write(dir.join("blobs/sha256").join(&hex), bytes).expect("write blob");
            let digest = format!("sha256:{hex}");
            blobs.insert(digest.clone());
            (digest, bytes.len() as u64)
        };

        let mut images = Vec::new();
        let mut manifest_descs = Vec::new();
        for (p, platform) in platforms.iter().enumerate() {
            let mut layer_descs = Vec::new();
            let mut diff_ids = Vec::new();
            let mut layer_digests = Vec::new();
            for l in 0..layers {
                // Different sizes, one of them spanning several deflate blocks.
                let size = 20_000 + 70_000 * ((p + l) % 3) + (random_u64() % 4096) as usize;
                let tar = tar_one_file(&format!("layer-{p}-{l}.bin"), &random_bytes(size));
                diff_ids.push(format!("sha256:{}", hex::encode(Sha256::digest(&tar))));
                let (digest, size) = put(&gzip_stored(&tar));
                layer_descs
                    .push(json!({"mediaType": LAYER_TAR_GZIP, "digest": digest, "size": size}));
                layer_digests.push(digest);
            }
            let config = json!({
                "created": "2024-01-01T00:00:00Z",
                "architecture": platform.architecture,
                "os": platform.os,
                "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
                "history": [{"created": "2024-01-01T00:00:00Z", "comment": format!("cachalot e2e {}", random_u64())}],
            });
            let (config_digest, config_size) = put(&serde_json::to_vec(&config).unwrap());
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": MANIFEST_V1,
                "config": {"mediaType": CONFIG_V1, "digest": config_digest, "size": config_size},
                "layers": layer_descs,
            });
            let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
            let (manifest_digest, manifest_size) = put(&manifest_bytes);
            manifest_descs.push((
                json!({
                    "mediaType": MANIFEST_V1,
                    "digest": manifest_digest,
                    "size": manifest_size,
                    "platform": {"architecture": platform.architecture, "os": platform.os},
                }),
                manifest_bytes,
            ));
            images.push(PlatformImage {
                platform: platform.clone(),
                manifest_digest,
                config_digest,
                layer_digests,
            });
        }

        let (top_bytes, top_media_type) = if manifest_descs.len() == 1 {
            (manifest_descs[0].1.clone(), MANIFEST_V1)
        } else {
            let index = json!({
                "schemaVersion": 2,
                "mediaType": INDEX_V1,
                "manifests": manifest_descs.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
            });
            (serde_json::to_vec(&index).unwrap(), INDEX_V1)
        };
        let (top_digest, top_size) = put(&top_bytes);
        let layout_index = json!({
            "schemaVersion": 2,
            "mediaType": INDEX_V1,
            "manifests": [{
                "mediaType": top_media_type,
                "digest": top_digest,
                "size": top_size,
                "annotations": {REF_NAME: tag},
            }],
        });
        std::fs::write(
            dir.join("index.json"),
            serde_json::to_vec(&layout_index).unwrap(),
        )
        .expect("write index.json");
        ImageLayout {
            dir: dir.to_owned(),
            tag: tag.to_owned(),
            top_digest,
            top_media_type: top_media_type.to_owned(),
            top_bytes,
            images,
            blobs,
        }
    }

    /// Reads what a layout written by someone else (skopeo) holds for `tag`, checking that every
    /// blob file's SHA-256 matches its name.
    pub fn read(dir: &Path, tag: &str) -> ImageLayout {
        let index: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join("index.json")).expect("read index.json"),
        )
        .expect("index.json is JSON");
        let desc = index["manifests"]
            .as_array()
            .expect("index.json manifests")
            .iter()
            .find(|d| d["annotations"][REF_NAME] == tag)
            .unwrap_or_else(|| panic!("no {tag} in {}", dir.display()))
            .clone();
        let top_digest = desc["digest"].as_str().unwrap().to_owned();
        let mut blobs = BTreeSet::new();
        for entry in std::fs::read_dir(dir.join("blobs/sha256")).expect("blobs dir") {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(entry.path()).unwrap();
            assert_eq!(
                hex::encode(Sha256::digest(&bytes)),
                name,
                "blob file content does not match its name in {}",
                dir.display()
            );
            blobs.insert(format!("sha256:{name}"));
        }
        let top_bytes = std::fs::read(dir.join("blobs/sha256").join(&top_digest[7..]))
            .expect("top-level blob present");
        ImageLayout {
            dir: dir.to_owned(),
            tag: tag.to_owned(),
            top_digest,
            top_media_type: desc["mediaType"].as_str().unwrap_or("").to_owned(),
            top_bytes,
            images: Vec::new(),
            blobs,
        }
    }

    /// Bytes of one blob of this layout.
    pub fn blob(&self, digest: &str) -> Vec<u8> {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        std::fs::read(self.dir.join("blobs/sha256").join(hex)).expect("blob in layout")
    }

    /// Every layer digest of every platform.
    pub fn layer_digests(&self) -> Vec<String> {
        self.images
            .iter()
            .flat_map(|i| i.layer_digests.iter().cloned())
            .collect()
    }
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Pseudo-random bytes (SHA-256 in counter mode over a per-call seed); unique per call.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let seed = random_u64().to_le_bytes();
    let mut out = Vec::with_capacity(len + 32);
    let mut counter = 0u64;
    while out.len() < len {
        let mut h = Sha256::new();
        h.update(seed);
        h.update(counter.to_le_bytes());
        out.extend_from_slice(&h.finalize());
        counter += 1;
    }
    out.truncate(len);
    out
}

/// A u64 that differs between calls and between runs.
pub fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let mut h = Sha256::new();
    h.update(nanos.to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    u64::from_le_bytes(h.finalize()[..8].try_into().unwrap())
}

/// A ustar archive holding one regular file.
pub fn tar_one_file(name: &str, data: &[u8]) -> Vec<u8> {
    assert!(name.len() < 100);
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    let mut field = |at: usize, len: usize, value: &str| {
        header[at..at + value.len()].copy_from_slice(value.as_bytes());
        debug_assert!(value.len() <= len);
    };
    field(100, 8, "0000644\0");
    field(108, 8, "0000000\0");
    field(116, 8, "0000000\0");
    field(124, 12, &format!("{:011o}\0", data.len()));
    field(136, 12, &format!("{:011o}\0", 1_704_067_200u64));
    field(148, 8, "        "); // checksum placeholder: spaces
    field(156, 1, "0");
    field(257, 6, "ustar\0");
    field(263, 2, "00");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());

    let mut out = header.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// RFC 1952 gzip of `data` using stored (uncompressed) deflate blocks.
pub fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let mut chunks = data.chunks(65_535).peekable();
    if data.is_empty() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        out.push(u8::from(last)); // BFINAL, BTYPE=00
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, slot) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *slot = c;
    }
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}
