//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as Postgres speaks it: password verifiers, and the
//! server's side of one login.
//!
//! Written here rather than taken from pgwire 0.41's `ScramAuth` (measured reasons):
//! that one needs the salted password itself — a password equivalent — where Postgres
//! stores only a verifier (`StoredKey`, `ServerKey`); it keeps each login's state in the
//! handler (one shared handler mixes concurrent logins); and it takes a proof followed by
//! anything. pgwire 0.42 fixes the last two but cannot be used with arrow-pg 0.16. The
//! primitives (PBKDF2, HMAC, SHA-256, constant-time comparison, randomness) are
//! aws-lc-rs's, which rustls already builds.
//!
//! Channel binding (`SCRAM-SHA-256-PLUS`) is not offered; over TLS the client's proof still
//! binds the password, and `sslmode=verify-full` authenticates the server.

use std::fmt;
use std::num::NonZeroU32;

use aws_lc_rs::{constant_time, digest, hmac, pbkdf2, rand};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

/// Iterations of a new verifier (Postgres's default `scram_iterations`).
pub const ITERATIONS: u32 = 4096;

/// A password as stored: `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`
/// (Postgres's `pg_authid.rolpassword` form). It cannot be used to log in.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Verifier(SCRAM-SHA-256)")
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data);
    tag.as_ref().try_into().expect("HMAC-SHA-256 is 32 bytes")
}

fn sha256(data: &[u8]) -> [u8; 32] {
    digest::digest(&digest::SHA256, data)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// `n` random bytes.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    rand::fill(&mut out).expect("the system's random source works");
    out
}

/// `Hi(Normalize(password), salt, i)`: SASLprep'ed as Postgres does (a password SASLprep
/// refuses is used as it is).
fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    let prepared = stringprep::saslprep(password)
        .map(|p| p.into_owned())
        .unwrap_or_else(|_| password.to_string());
    let mut out = [0u8; 32];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        NonZeroU32::new(iterations.max(1)).expect("at least one"),
        salt,
        prepared.as_bytes(),
        &mut out,
    );
    out
}

impl Verifier {
    /// A verifier of `password` with a fresh random salt.
    pub fn new(password: &str) -> Self {
        Self::with_salt(password, &random_bytes(16), ITERATIONS)
    }

    fn with_salt(password: &str, salt: &[u8], iterations: u32) -> Self {
        let salted = salted_password(password, salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        Self {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// Whether `password` is the one this verifies (HTTP Basic): as costly as a login.
    pub fn matches(&self, password: &str) -> bool {
        let other = Self::with_salt(password, &self.salt, self.iterations);
        constant_time::verify_slices_are_equal(&other.stored_key, &self.stored_key).is_ok()
    }

    /// Reads the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Self {
            iterations: iterations.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// The stored form.
    pub fn encode(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }

    /// A verifier for a user that does not exist: the same salt for the same name on every
    /// attempt (derived from `secret`, this process's), so that the exchange does not tell
    /// a missing user from a wrong password. No password matches it.
    pub fn mock(user: &str, secret: &[u8]) -> Self {
        Self {
            iterations: ITERATIONS,
            salt: hmac(secret, user.as_bytes())[..16].to_vec(),
            stored_key: hmac(secret, b"no stored key"),
            server_key: hmac(secret, b"no server key"),
        }
    }
}

/// Why a login failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScramError {
    /// The client's messages are not SCRAM as Postgres speaks it.
    Protocol(String),
    /// The proof is wrong: a wrong password (or no such user).
    WrongPassword,
}

impl fmt::Display for ScramError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScramError::Protocol(m) => f.write_str(m),
            ScramError::WrongPassword => f.write_str("wrong password"),
        }
    }
}

/// The server's side of one login, between the client's first and final messages.
#[derive(Debug)]
pub struct Exchange {
    verifier: Verifier,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

/// The attribute `name=` at the start of `part`.
fn attribute(part: Option<&str>, name: char) -> Result<&str, ScramError> {
    part.and_then(|p| p.strip_prefix(name))
        .and_then(|p| p.strip_prefix('='))
        .ok_or_else(|| ScramError::Protocol(format!("expected attribute `{name}`")))
}

impl Exchange {
    /// Takes the client-first message; returns the exchange and the server-first message.
    /// The user name in it is ignored (Postgres takes the startup packet's).
    pub fn start(client_first: &[u8], verifier: Verifier) -> Result<(Self, String), ScramError> {
        let text = std::str::from_utf8(client_first)
            .map_err(|_| ScramError::Protocol("client-first message is not UTF-8".into()))?;
        // gs2-header: `n,,` or `y,,` (no channel binding offered, so never `p=`); no authzid.
        let (gs2_header, bare) = if let Some(bare) = text.strip_prefix("n,,") {
            ("n,,", bare)
        } else if let Some(bare) = text.strip_prefix("y,,") {
            ("y,,", bare)
        } else if text.starts_with("p=") {
            return Err(ScramError::Protocol(
                "channel binding was not offered (use SCRAM-SHA-256)".into(),
            ));
        } else {
            return Err(ScramError::Protocol(
                "malformed gs2 header (an authorization identity is not supported)".into(),
            ));
        };
        let mut parts = bare.split(',');
        if bare.starts_with("m=") {
            return Err(ScramError::Protocol(
                "mandatory extensions are not supported".into(),
            ));
        }
        let _user = attribute(parts.next(), 'n')?;
        let client_nonce = attribute(parts.next(), 'r')?;
        if client_nonce.is_empty()
            || !client_nonce
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err(ScramError::Protocol("malformed client nonce".into()));
        }
        let nonce = format!("{client_nonce}{}", B64.encode(random_bytes(18)));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok((
            Self {
                verifier,
                gs2_header: gs2_header.to_string(),
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                nonce,
            },
            server_first,
        ))
    }

    /// Takes the client-final message: exactly `c=…,r=…,p=…`, nothing before or after.
    /// Returns the server-final message when the proof is right.
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        let text = std::str::from_utf8(client_final)
            .map_err(|_| ScramError::Protocol("client-final message is not UTF-8".into()))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or_else(|| ScramError::Protocol("the client-final message has no proof".into()))?;
        let mut parts = without_proof.split(',');
        let binding = attribute(parts.next(), 'c')?;
        let nonce = attribute(parts.next(), 'r')?;
        if parts.next().is_some() {
            return Err(ScramError::Protocol(
                "unexpected attributes before the proof".into(),
            ));
        }
        if B64.decode(binding).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
            return Err(ScramError::Protocol(
                "channel binding does not match".into(),
            ));
        }
        if nonce != self.nonce {
            return Err(ScramError::Protocol("nonce does not match".into()));
        }
        // Strict: 32 bytes of base64 and nothing else (a proof followed by junk is refused).
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| ScramError::Protocol("malformed proof".into()))?;
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for (k, (p, s)) in client_key
            .iter_mut()
            .zip(proof.iter().zip(signature.iter()))
        {
            *k = p ^ s;
        }
        if constant_time::verify_slices_are_equal(&sha256(&client_key), &self.verifier.stored_key)
            .is_err()
        {
            return Err(ScramError::WrongPassword);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's side, as libpq computes it.
    fn client_final(password: &str, client_first_bare: &str, server_first: &str) -> String {
        let mut fields = server_first.split(',');
        let nonce = fields.next().unwrap().strip_prefix("r=").unwrap();
        let salt = B64
            .decode(fields.next().unwrap().strip_prefix("s=").unwrap())
            .unwrap();
        let iterations: u32 = fields.next().unwrap()[2..].parse().unwrap();
        let salted = salted_password(password, &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored = sha256(&client_key);
        let without_proof = format!("c=biws,r={nonce}");
        let auth = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = hmac(&stored, auth.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature)
            .map(|(a, b)| a ^ b)
            .collect();
        format!("{without_proof},p={}", B64.encode(proof))
    }

    #[test]
    fn a_right_password_logs_in_and_a_wrong_one_or_junk_does_not() {
        let v = Verifier::new("s3cret");
        assert_eq!(Verifier::parse(&v.encode()), Some(v.clone()));
        assert!(v.matches("s3cret") && !v.matches("s3cre"));
        let bare = "n=,r=rOprNGfwEbeRWgbNEkqO";
        let login = |password: &str, junk: &str| {
            let (x, server_first) = Exchange::start(format!("n,,{bare}").as_bytes(), v.clone())?;
            let last = client_final(password, bare, &server_first) + junk;
            x.finish(last.as_bytes())
        };
        assert!(login("s3cret", "").unwrap().starts_with("v="));
        assert_eq!(login("wrong", ""), Err(ScramError::WrongPassword));
        assert!(matches!(
            login("s3cret", "junk"),
            Err(ScramError::Protocol(_))
        ));
        assert!(matches!(
            login("s3cret", ",x=1"),
            Err(ScramError::Protocol(_))
        ));
        // A channel-binding request is refused rather than downgraded.
        assert!(Exchange::start(b"p=tls-server-end-point,,n=,r=abc", v.clone()).is_err());
    }

    #[test]
    fn a_missing_user_gets_the_same_salt_every_time_and_never_logs_in() {
        let secret = random_bytes(32);
        let a = Verifier::mock("ghost", &secret);
        assert_eq!(a, Verifier::mock("ghost", &secret));
        assert_ne!(a.salt, Verifier::mock("other", &secret).salt);
        assert!(!a.matches(""));
    }
}
