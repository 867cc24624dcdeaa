//! API keys: `hk_<prefix>_<secret>`.
//!
//! The prefix (10 characters) is stored in clear so a key can be found with
//! one indexed lookup and named in logs; the whole key is stored only as a
//! SHA-256 hash. Keys carry ~190 random bits, so a fast hash is enough: no
//! one can guess a key to try offline, unlike a password.

use rand::{distributions::Alphanumeric, Rng};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const PREFIX_LEN: usize = 10;

/// What a key may do beyond its workspace's everyday reads and writes.
/// A key is given scopes when it is made and never gains one later.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Read recipients' phone numbers from run snapshots
    /// (`include_recipients=true`): a server-to-server, admin-tier read.
    Pii,
}

impl Scope {
    pub const ALL: [Scope; 1] = [Scope::Pii];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Pii => "pii",
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|scope| scope.as_str()).collect();
                format!("unknown scope '{s}'; the scopes are: {}", known.join(", "))
            })
    }

    /// Scopes as stored: names joined by commas, sorted, no repeats.
    pub fn join(scopes: &[Scope]) -> String {
        let mut scopes = scopes.to_vec();
        scopes.sort_unstable();
        scopes.dedup();
        scopes
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Reads stored scopes; names this build does not know are dropped, so
    /// an older binary never grants a newer scope.
    pub fn split(stored: &str) -> Vec<Scope> {
        stored
            .split(',')
            .filter_map(|name| Scope::parse(name.trim()).ok())
            .collect()
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

const SECRET_LEN: usize = 32;

/// A key as the user holds it; only ever shown once, when created.
pub struct NewApiKey {
    pub plaintext: String,
    pub prefix: String,
    pub hash: Vec<u8>,
}

/// A key presented by a client, split but not yet checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentedKey<'a> {
    pub prefix: &'a str,
    full: &'a str,
}

impl NewApiKey {
    pub fn generate(rng: &mut impl Rng) -> Self {
        let lower: String = rng
            .sample_iter(&Alphanumeric)
            .take(PREFIX_LEN)
            .map(|b| (b as char).to_ascii_lowercase())
            .collect();
        let secret: String = rng
            .sample_iter(&Alphanumeric)
            .take(SECRET_LEN)
            .map(char::from)
            .collect();
        let plaintext = format!("hk_{lower}_{secret}");
        let hash = hash_key(&plaintext);
        Self {
            plaintext,
            prefix: lower,
            hash,
        }
    }
}

impl<'a> PresentedKey<'a> {
    /// Splits a presented key; `None` when it cannot be a Herald key at all.
    pub fn parse(raw: &'a str) -> Option<Self> {
        let rest = raw.strip_prefix("hk_")?;
        let (prefix, secret) = rest.split_once('_')?;
        let well_formed = prefix.len() == PREFIX_LEN
            && secret.len() == SECRET_LEN
            && prefix.bytes().all(|b| b.is_ascii_alphanumeric())
            && secret.bytes().all(|b| b.is_ascii_alphanumeric());
        well_formed.then_some(Self { prefix, full: raw })
    }

    /// Compares with a stored hash in constant time.
    pub fn matches(&self, stored_hash: &[u8]) -> bool {
        hash_key(self.full).ct_eq(stored_hash).into()
    }
}

fn hash_key(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip_through_storage_and_unknown_names_grant_nothing() {
        assert_eq!(Scope::join(&[Scope::Pii, Scope::Pii]), "pii");
        assert_eq!(Scope::join(&[]), "");
        assert_eq!(Scope::split("pii"), vec![Scope::Pii]);
        assert_eq!(Scope::split(""), vec![]);
        assert_eq!(Scope::split("admin,pii"), vec![Scope::Pii]);
        assert!(Scope::parse("PII").is_err());
        assert!(Scope::parse("admin").unwrap_err().contains("'admin'"));
    }

    #[test]
    fn generated_key_verifies_against_its_hash() {
        let key = NewApiKey::generate(&mut rand::thread_rng());
        let presented = PresentedKey::parse(&key.plaintext).unwrap();
        assert_eq!(presented.prefix, key.prefix);
        assert!(presented.matches(&key.hash));
    }

    #[test]
    fn another_key_with_the_same_prefix_does_not_verify() {
        let key = NewApiKey::generate(&mut rand::thread_rng());
        let forged = format!("hk_{}_{}", key.prefix, "A".repeat(SECRET_LEN));
        assert!(!PresentedKey::parse(&forged).unwrap().matches(&key.hash));
    }

    #[test]
    fn malformed_keys_are_not_parsed() {
        for bad in [
            "",
            "hk_",
            "hk_short_secret",
            "xx_abcdefghij_",
            "Bearer hk_x",
        ] {
            assert!(PresentedKey::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn keys_are_distinct() {
        let mut rng = rand::thread_rng();
        let a = NewApiKey::generate(&mut rng);
        let b = NewApiKey::generate(&mut rng);
        assert_ne!(a.plaintext, b.plaintext);
        assert_ne!(a.prefix, b.prefix);
    }
}
