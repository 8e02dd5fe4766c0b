//! Portal tokens: `PortalSigner::verify` on any text, and `sign` then `verify`.
//!
//! A fuzz input is `[mode, ...]`. Mode even: the rest is a token, verified against [`SECRET`] at
//! [`NOW`] (the seeds hold tokens signed with it, so mutations start from valid ones). Mode odd:
//! the rest is (customer, expiry, time, an edit) from which a token is signed, checked at that
//! time, then edited at one position and checked again.

use arbitrary::{Arbitrary, Unstructured};
use drawdown::credentials::{PortalClaims, PortalSigner, TokenError, PORTAL_TOKEN_PREFIX};
use drawdown::ledger::CustomerId;

/// The secret of the seeds' tokens (32 bytes, the minimum `api.portal_secret` allows).
pub const SECRET: &[u8; 32] = b"drawdown-fuzz-portal-secret-0001";

/// The time the tokens of mode 0 are checked at (ms): 2026-01-01T00:00:00Z.
pub const NOW: i64 = 1_767_225_600_000;

#[derive(Debug, Arbitrary)]
struct Signed<'a> {
    customer: &'a str,
    expires_at: i64,
    now: i64,
    /// A position in the token and the byte put there.
    edit: (usize, u8),
}

/// One fuzz input.
pub fn run(data: &[u8]) {
    let [mode, rest @ ..] = data else { return };
    let signer = PortalSigner::new(SECRET);
    if mode % 2 == 0 {
        verify_any(&signer, rest);
    } else if let Ok(s) = Signed::arbitrary_take_rest(Unstructured::new(rest)) {
        round_trip(&signer, &s);
    }
}

fn verify_any(signer: &PortalSigner, rest: &[u8]) {
    let Ok(token) = std::str::from_utf8(rest) else {
        return;
    };
    match signer.verify(token, NOW) {
        Ok(claims) => {
            // Only a token this secret signed verifies: signing its claims again gives a token
            // that verifies to the same claims (the text may differ in its JSON's spelling).
            assert!(token.starts_with(PORTAL_TOKEN_PREFIX));
            assert!(claims.expires_at > NOW);
            assert_eq!(signer.verify(&signer.sign(&claims), NOW), Ok(claims));
        }
        Err(TokenError::Expired | TokenError::Invalid) => {}
    }
    // Another secret never accepts it.
    let other = PortalSigner::new(b"another-secret-of-thirty-two-by!");
    assert_eq!(other.verify(token, NOW), Err(TokenError::Invalid));
}

fn round_trip(signer: &PortalSigner, s: &Signed<'_>) {
    let Ok(customer) = CustomerId::parse(s.customer) else {
        return;
    };
    let claims = PortalClaims {
        customer,
        expires_at: s.expires_at,
    };
    let token = signer.sign(&claims);
    let want = if s.now < s.expires_at {
        Ok(claims.clone())
    } else {
        Err(TokenError::Expired)
    };
    assert_eq!(signer.verify(&token, s.now), want, "{token}");
    // Any change of one byte makes it invalid (or not text at all).
    let mut bytes = token.clone().into_bytes();
    let (pos, byte) = s.edit;
    let pos = pos % bytes.len();
    if bytes[pos] == byte {
        return;
    }
    bytes[pos] = byte;
    if let Ok(edited) = String::from_utf8(bytes) {
        assert_eq!(
            signer.verify(&edited, s.now),
            Err(TokenError::Invalid),
            "{token} -> {edited}"
        );
    }
}
