//! A short-lived cache of API key records, so a busy client does not cost a
//! database read per request just to say who it is.
//!
//! Entries live [`KEY_CACHE_TTL`]; a revoke through this node's API drops the
//! entry at once, and a revoke elsewhere (another node, `herald keys revoke`)
//! takes effect within the TTL. Only keys that exist are cached, so guessing
//! prefixes cannot fill it, and the hash is still checked on every request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::store::ApiKeyRecord;

/// How stale a cached key may be when it was revoked on another node.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(1);

/// Bound on entries; past it the cache starts afresh (cheap, and rare:
/// it takes this many distinct live keys within one TTL).
const MAX_ENTRIES: usize = 10_000;

#[derive(Default)]
pub struct KeyCache {
    by_prefix: Mutex<HashMap<String, (ApiKeyRecord, Instant)>>,
}

impl KeyCache {
    /// The cached record for `prefix`, if it is younger than the TTL.
    pub fn get(&self, prefix: &str) -> Option<ApiKeyRecord> {
        let entries = self.by_prefix.lock().expect("key cache poisoned");
        let (record, cached_at) = entries.get(prefix)?;
        (cached_at.elapsed() < KEY_CACHE_TTL).then(|| record.clone())
    }

    pub fn insert(&self, record: &ApiKeyRecord) {
        let mut entries = self.by_prefix.lock().expect("key cache poisoned");
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(record.prefix.clone(), (record.clone(), Instant::now()));
    }

    /// Forgets a key, so its revocation takes effect on this node at once.
    pub fn forget(&self, prefix: &str) {
        self.by_prefix
            .lock()
            .expect("key cache poisoned")
            .remove(prefix);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(prefix: &str) -> ApiKeyRecord {
        ApiKeyRecord {
            id: 1,
            workspace_id: 1,
            prefix: prefix.to_owned(),
            key_hash: vec![0; 32],
            label: None,
            scopes: vec![],
            created_at: 0,
            revoked_at: None,
        }
    }

    #[test]
    fn forgotten_keys_are_read_again() {
        let cache = KeyCache::default();
        cache.insert(&record("hk_abc"));
        assert_eq!(cache.get("hk_abc").map(|r| r.id), Some(1));
        cache.forget("hk_abc");
        assert!(cache.get("hk_abc").is_none());
    }

    #[test]
    fn a_full_cache_starts_afresh_instead_of_growing() {
        let cache = KeyCache::default();
        for n in 0..=MAX_ENTRIES {
            cache.insert(&record(&format!("hk_{n}")));
        }
        assert_eq!(cache.by_prefix.lock().unwrap().len(), 1);
        assert!(cache.get(&format!("hk_{MAX_ENTRIES}")).is_some());
    }
}
