//! Credentials, without HTTP: API keys (stored as SHA-256 hashes) and portal tokens.
//!
//! **API keys** are opaque bearer secrets held by services. The config keeps only the hex SHA-256
//! of each key (a leaked config file does not leak a key); a presented key is hashed and compared
//! with every configured hash in constant time (`subtle`), so neither the match nor its position
//! shows in the timing. Several keys may be configured at once, which is how a key is rotated.
//!
//! **Portal tokens** are short-lived and scoped to one customer:
//! `ddp1.<base64url(claims JSON)>.<base64url(HMAC-SHA256(secret, "ddp1." + claims part))>`, the
//! claims being `{"sub": customer_id, "exp": ms since the epoch}`. The MAC is checked (constant
//! time, by the `hmac` crate) before the claims are even parsed; any change to the token makes it
//! invalid, and a token is refused from its `exp` on. Every instance must share `api.portal_secret`
//! (a forwarded request is checked again by the instance that answers it).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::ApiKey;
use crate::ledger::CustomerId;

/// The prefix of portal tokens (also their version); API keys must not start with it.
pub const PORTAL_TOKEN_PREFIX: &str = "ddp1.";

/// The hex SHA-256 of an API key, as configured in `api.keys[].sha256`.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new random API key (`dd_` + 32 random bytes, base64url), for `drawdown api-key`.
pub fn new_key() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("dd_{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// The configured API keys.
#[derive(Clone, Debug, Default)]
pub struct ApiKeys {
    keys: Vec<(String, [u8; 32])>,
}

impl ApiKeys {
    /// From the config (hashes already validated as 64 hex digits by the config loader).
    pub fn new(cfg: &[ApiKey]) -> Result<Self, String> {
        let mut keys = Vec::with_capacity(cfg.len());
        for k in cfg {
            let mut h = [0u8; 32];
            hex::decode_to_slice(&k.sha256, &mut h)
                .map_err(|e| format!("api key {:?}: sha256: {e}", k.name))?;
            keys.push((k.name.clone(), h));
        }
        Ok(Self { keys })
    }

    /// Whether no key is configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The name of the key `presented` is, if any. Compares against every key, in constant time.
    pub fn verify(&self, presented: &str) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for (name, hash) in &self.keys {
            if bool::from(digest.ct_eq(hash)) && found.is_none() {
                found = Some(name.as_str());
            }
        }
        found
    }
}

/// Why a portal token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of this shape, or its signature does not match (tampered, or another secret).
    #[error("invalid portal token")]
    Invalid,
    /// Correctly signed, but past its expiry.
    #[error("portal token expired")]
    Expired,
}

/// What a valid portal token grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortalClaims {
    /// The one customer it may read.
    #[serde(rename = "sub")]
    pub customer: CustomerId,
    /// Expiry (ms since the epoch, exclusive).
    #[serde(rename = "exp")]
    pub expires_at: i64,
}

/// Signs and checks portal tokens with `api.portal_secret`.
#[derive(Clone)]
pub struct PortalSigner {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for PortalSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PortalSigner(..)")
    }
}

impl PortalSigner {
    /// A signer keyed with `secret`.
    pub fn new(secret: &[u8]) -> Self {
        Self {
            mac: Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length"),
        }
    }

    fn tag(&self, signed: &str) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(signed.as_bytes());
        mac
    }

    /// A token for `claims`.
    pub fn sign(&self, claims: &PortalClaims) -> String {
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("serialisable"));
        let signed = format!("{PORTAL_TOKEN_PREFIX}{body}");
        let sig = URL_SAFE_NO_PAD.encode(self.tag(&signed).finalize().into_bytes());
        format!("{signed}.{sig}")
    }

    /// The claims of `token` if it is signed with this secret and not expired at `now` (ms).
    pub fn verify(&self, token: &str, now: i64) -> Result<PortalClaims, TokenError> {
        let (signed, sig) = token.rsplit_once('.').ok_or(TokenError::Invalid)?;
        let body = signed
            .strip_prefix(PORTAL_TOKEN_PREFIX)
            .ok_or(TokenError::Invalid)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| TokenError::Invalid)?;
        self.tag(signed)
            .verify_slice(&sig)
            .map_err(|_| TokenError::Invalid)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Invalid)?;
        let claims: PortalClaims =
            serde_json::from_slice(&json).map_err(|_| TokenError::Invalid)?;
        if now >= claims.expires_at {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(c: &str, exp: i64) -> PortalClaims {
        PortalClaims {
            customer: CustomerId::parse(c).unwrap(),
            expires_at: exp,
        }
    }

    #[test]
    fn api_keys_match_by_hash_only() {
        let keys = ApiKeys::new(&[
            ApiKey {
                name: "old".into(),
                sha256: hash_key("k1"),
            },
            ApiKey {
                name: "new".into(),
                sha256: hash_key("k2"),
            },
        ])
        .unwrap();
        assert_eq!(keys.verify("k1"), Some("old"));
        assert_eq!(keys.verify("k2"), Some("new"), "rotation: both keys work");
        assert_eq!(keys.verify("k3"), None);
        assert_eq!(keys.verify(""), None);
        assert_eq!(
            keys.verify(&hash_key("k1")),
            None,
            "the hash is not the key"
        );
        assert!(new_key().starts_with("dd_") && new_key() != new_key());
    }

    #[test]
    fn portal_tokens_round_trip_and_expire() {
        let s = PortalSigner::new(&[7u8; 32]);
        let t = s.sign(&claims("cus_a", 2_000));
        assert!(t.starts_with(PORTAL_TOKEN_PREFIX));
        assert_eq!(s.verify(&t, 1_999), Ok(claims("cus_a", 2_000)));
        assert_eq!(s.verify(&t, 2_000), Err(TokenError::Expired));
    }

    #[test]
    fn tampered_or_foreign_portal_tokens_are_invalid() {
        let s = PortalSigner::new(&[7u8; 32]);
        let t = s.sign(&claims("cus_a", 2_000));
        // Another customer's claims under the original signature.
        let (_, sig) = t.rsplit_once('.').unwrap();
        let forged = s.sign(&claims("cus_b", 2_000));
        let (forged_signed, _) = forged.rsplit_once('.').unwrap();
        assert_eq!(
            s.verify(&format!("{forged_signed}.{sig}"), 0),
            Err(TokenError::Invalid)
        );
        // Every single-character change.
        for i in 0..t.len() {
            let mut b = t.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            let changed = String::from_utf8(b).unwrap();
            if changed != t {
                assert_eq!(s.verify(&changed, 0), Err(TokenError::Invalid), "{i}");
            }
        }
        assert_eq!(
            PortalSigner::new(&[8u8; 32]).verify(&t, 0),
            Err(TokenError::Invalid),
            "another secret"
        );
        for junk in ["", "ddp1.", "ddp1..", "x.y.z", "Bearer"] {
            assert_eq!(s.verify(junk, 0), Err(TokenError::Invalid));
        }
    }
}
