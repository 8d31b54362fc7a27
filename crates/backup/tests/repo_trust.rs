//! A repository that detects tampering with its config and survives misuse:
//! * the config is authenticated under the master key: an altered chunk size, a removed
//!   mac, an added key slot are refused; a format-1 config is refused until `upgrade`;
//! * what a hostile config can make us pay is bounded before any key derivation runs
//!   (absurd Argon2 cost, thousands of key slots);
//! * `init` never overwrites an existing repository's config, even on a store that ignores
//!   create-only puts (some S3-compatible servers ignore If-None-Match).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use snapblk_backup::file::FileStore;
use snapblk_backup::repo::InitOptions;
use snapblk_backup::store::{ObjectMeta, ObjectStore, StoreError};
use snapblk_backup::{BackupError, Repository};

fn store(dir: &Path) -> Arc<dyn ObjectStore> {
    Arc::new(FileStore::new(dir))
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut Value)) {
    let p = dir.join("config");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

fn open_err(dir: &Path) -> String {
    match Repository::open(store(dir), b"secret") {
        Ok(_) => panic!("a tampered config opened"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn an_altered_config_is_refused() {
    let d = tempfile::tempdir().unwrap();
    Repository::init(store(d.path()), b"secret", &InitOptions::default()).unwrap();
    Repository::open(store(d.path()), b"secret").expect("the untouched config opens");
    let orig = std::fs::read(d.path().join("config")).unwrap();

    edit_config(d.path(), |v| v["chunk_size"] = 4096.into());
    assert!(open_err(d.path()).contains("fails authentication"));

    std::fs::write(d.path().join("config"), &orig).unwrap();
    edit_config(d.path(), |v| {
        v.as_object_mut().unwrap().remove("mac");
    });
    assert!(open_err(d.path()).contains("fails authentication"));

    // A slot for someone else's secret, added by whoever can write the bucket.
    std::fs::write(d.path().join("config"), &orig).unwrap();
    let other = tempfile::tempdir().unwrap();
    Repository::init(store(other.path()), b"intruder", &InitOptions::default()).unwrap();
    let intruder: Value =
        serde_json::from_slice(&std::fs::read(other.path().join("config")).unwrap()).unwrap();
    edit_config(d.path(), |v| {
        v["keys"]
            .as_array_mut()
            .unwrap()
            .push(intruder["keys"][0].clone())
    });
    assert!(open_err(d.path()).contains("fails authentication"));
    // The intruder's own secret opens the slot, but the config still fails its mac.
    assert!(Repository::open(store(d.path()), b"intruder").is_err());
}

#[test]
fn hostile_key_derivation_costs_are_refused_before_running() {
    let d = tempfile::tempdir().unwrap();
    Repository::init(store(d.path()), b"secret", &InitOptions::default()).unwrap();
    let orig = std::fs::read(d.path().join("config")).unwrap();
    for (field, value) in [("m_kib", 4u64 << 20), ("t", 100), ("p", 64)] {
        std::fs::write(d.path().join("config"), &orig).unwrap();
        edit_config(d.path(), |v| v["keys"][0][field] = value.into());
        let t0 = Instant::now();
        let e = open_err(d.path());
        assert!(e.contains("argon2 cost"), "{field}: {e}");
        assert!(t0.elapsed().as_secs() < 2, "{field}: the cost was paid");
    }
    std::fs::write(d.path().join("config"), &orig).unwrap();
    edit_config(d.path(), |v| {
        let slot = v["keys"][0].clone();
        v["keys"] = Value::Array(vec![slot; 1000]);
    });
    assert!(open_err(d.path()).contains("key slots"));
}

#[test]
fn a_format_1_config_is_refused_until_upgraded() {
    let d = tempfile::tempdir().unwrap();
    let r = Repository::init(store(d.path()), b"secret", &InitOptions::default()).unwrap();
    let id = r.config().id.clone();
    edit_config(d.path(), |v| {
        v["version"] = 1.into();
        v.as_object_mut().unwrap().remove("mac");
    });
    let e = open_err(d.path());
    assert!(e.contains("repo upgrade"), "{e}");
    let up = Repository::upgrade(store(d.path()), b"secret").unwrap();
    assert_eq!(
        (up.config().version, up.config().id.as_str()),
        (snapblk_backup::config::VERSION, id.as_str())
    );
    Repository::open(store(d.path()), b"secret").expect("upgraded repository opens");
    assert!(Repository::upgrade(store(d.path()), b"wrong").is_err());
}

/// A store whose create-only put overwrites whatever is there and says it created it.
struct IgnoresIfNoneMatch(FileStore);

impl ObjectStore for IgnoresIfNoneMatch {
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn get(&self, k: &str, max: u64) -> Result<Vec<u8>, StoreError> {
        self.0.get(k, max)
    }
    fn get_range(&self, k: &str, o: u64, l: u64) -> Result<Vec<u8>, StoreError> {
        self.0.get_range(k, o, l)
    }
    fn put(&self, k: &str, d: &[u8]) -> Result<(), StoreError> {
        self.0.put(k, d)
    }
    fn put_new(&self, k: &str, d: &[u8]) -> Result<bool, StoreError> {
        self.0.put(k, d).map(|()| true)
    }
    fn list(&self, p: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.0.list(p)
    }
    fn delete(&self, k: &str) -> Result<(), StoreError> {
        self.0.delete(k)
    }
}

#[test]
fn init_never_overwrites_an_existing_repository() {
    let d = tempfile::tempdir().unwrap();
    Repository::init(store(d.path()), b"secret", &InitOptions::default()).unwrap();
    let before = std::fs::read(d.path().join("config")).unwrap();
    let careless: Arc<dyn ObjectStore> = Arc::new(IgnoresIfNoneMatch(FileStore::new(d.path())));
    let e = Repository::init(careless, b"other", &InitOptions::default())
        .err()
        .expect("init over an existing repository succeeded");
    assert!(matches!(e, BackupError::RepositoryExists(_)), "{e}");
    assert_eq!(std::fs::read(d.path().join("config")).unwrap(), before);
    Repository::open(store(d.path()), b"secret").expect("the repository is intact");
}
